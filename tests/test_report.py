"""Tests for :mod:`neuralsync.report`: the report figure of a replay run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from neuralsync.errors import DataError
from neuralsync.report import _decimate, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEADER = ["issued_at", "timestamp", "key", "target", "step", "prediction", "truth", "last_value"]


def _write_predictions(path: Path, rows: list[list[object]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows(rows)


def _series(n: int, change: int, rng: np.random.Generator) -> np.ndarray:
    """A random walk whose drift flips at ``change``."""
    drift = np.where(np.arange(n) < change, 0.05, -0.08)
    return np.cumsum(drift + rng.normal(0.0, 0.3, n))


@pytest.fixture
def single_run(tmp_path: Path) -> Path:
    """A single-series run with ISO timestamps, horizon 2, change points and a last unscored row."""
    rng = np.random.default_rng(0)
    n = 600
    values = _series(n, 300, rng)
    times = pd.date_range("2024-01-01", periods=n, freq="h")
    iso = [t.isoformat() for t in times]
    rows: list[list[object]] = []
    for i in range(1, n):
        for step in (1, 2):
            if i - step < 0:
                continue
            issued = i - step
            prediction = values[issued] + rng.normal(0.0, 0.2)
            rows.append(
                [iso[issued], iso[i], "", "price", step, prediction, values[i], values[issued]]
            )
    rows.append([iso[-1], "", "", "price", 1, values[-1], "", values[-1]])  # truth not known yet
    run = tmp_path / "single"
    run.mkdir()
    _write_predictions(run / "predictions.csv", rows)
    metrics = {
        "name": "drift-flip",
        "mse": 0.11,
        "baseline_last_value": {"mse": 0.13},
        "regime_changes": [iso[330], iso[450]],
        "regime_change_keys": [None, None],
        "change_points": [iso[300]],
    }
    (run / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return run


@pytest.fixture
def keyed_run(tmp_path: Path) -> Path:
    """A keyed run (three keys, two targets) with numeric timestamps and no change points."""
    rng = np.random.default_rng(1)
    n = 400
    rows: list[list[object]] = []
    for key in ("AAA", "NA", "CCC"):  # "NA" must stay a key, not become a missing value
        for target in ("price", "volume"):
            values = _series(n, 200, rng)
            for i in range(1, n):
                rows.append(
                    [
                        float(i - 1),
                        float(i),
                        key,
                        target,
                        1,
                        values[i - 1] + rng.normal(0, 0.1),
                        values[i],
                        values[i - 1],
                    ]
                )
    run = tmp_path / "keyed"
    run.mkdir()
    _write_predictions(run / "predictions.csv", rows)
    metrics = {
        "mse": 0.2,
        "baseline_last_value": {"mse": 0.25},
        "regime_changes": [150.0, 230.0],
        "regime_change_keys": ["AAA", "CCC"],
    }
    (run / "metrics.json").write_text(json.dumps(metrics), encoding="utf-8")
    return run


def _check_png(path: Path) -> np.ndarray:
    """Assert ``path`` is a plausible report PNG and return its pixels."""
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000
    image = imread(path)
    height, width = image.shape[:2]
    # 12x9 inches at ~110 dpi, give or take what tight layout trims or adds.
    assert 800 <= width <= 1600
    assert 600 <= height <= 1200
    assert width > height
    assert image.shape[2] in (3, 4)
    return image


def _ink(image: np.ndarray) -> float:
    """The share of pixels that are not white: how much was drawn."""
    return float((image[..., :3] < 0.95).any(axis=-1).mean())


def test_single_series_report(single_run: Path) -> None:
    path = write_report(single_run)
    assert path == single_run / "report.png"
    image = _check_png(path)
    assert _ink(image) > 0.03  # three panels of lines, not a blank page
    assert not (single_run / "report.png.partial").exists()


def test_keyed_report_with_numeric_times(keyed_run: Path) -> None:
    image = _check_png(write_report(keyed_run, rolling=50))
    assert _ink(image) > 0.03


def test_empty_run_says_so(tmp_path: Path) -> None:
    run = tmp_path / "empty"
    run.mkdir()
    _write_predictions(
        run / "predictions.csv", [["2024-01-01T00:00:00", "", "", "x", 1, 1.0, "", 1.0]]
    )
    (run / "metrics.json").write_text(json.dumps({"regime_changes": []}), encoding="utf-8")
    image = _check_png(write_report(run))
    # Only the message (and no title figures) is drawn: far less ink than a real report.
    assert 0 < _ink(image) < 0.02


def test_run_without_any_files(tmp_path: Path) -> None:
    image = _check_png(write_report(tmp_path))
    assert 0 < _ink(image) < 0.02


def test_small_max_points_and_overwrite(single_run: Path) -> None:
    first = write_report(single_run).read_bytes()
    second = write_report(single_run, rolling=10, max_points=50).read_bytes()
    assert second.startswith(PNG_SIGNATURE)
    assert first != second  # the report was redrawn in place


def test_missing_column_is_a_data_error(tmp_path: Path) -> None:
    (tmp_path / "predictions.csv").write_text("timestamp,prediction\n1,2\n", encoding="utf-8")
    with pytest.raises(DataError, match="truth"):
        write_report(tmp_path)


def test_missing_run_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        write_report(tmp_path / "nope")


def test_decimate_keeps_extremes_and_order() -> None:
    rng = np.random.default_rng(2)
    x = np.arange(100_003)
    y = rng.normal(size=x.size)
    y[12_345] = 50.0
    y[77_777] = np.nan
    xs, ys = _decimate(x, y, 1000)
    assert len(xs) <= 1000
    assert np.all(np.diff(xs) > 0)
    assert np.nanmax(ys) == 50.0
    assert np.nanmin(ys) == np.nanmin(y)
    short_x, short_y = _decimate(x[:10], y[:10], 1000)
    assert np.array_equal(short_x, x[:10])
    assert np.array_equal(short_y, y[:10])
