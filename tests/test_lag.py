"""Tests for :mod:`neuralsync.lag` and the ``adaptation_lag`` figures of a replay."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from neuralsync.config import load_scenario
from neuralsync.lag import adaptation_lag, lag_from_predictions, summarise
from neuralsync.replay import replay

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"


def test_lag_counts_forecasts_until_the_error_is_back_within_ten_percent():
    errors = np.r_[np.full(300, 1.0), np.linspace(4.0, 1.0, 100), np.full(300, 1.0)]
    (record,) = adaptation_lag(errors, [300], window=1)
    first_back = 300 + int(np.flatnonzero(errors[300:] <= 1.1)[0])
    assert record["lag"] == first_back - 300
    assert record["level_before"] == 1.0 and record["recovered"]
    assert record["excess_error"] == pytest.approx((errors[300:first_back] - 1.0).sum())


def test_a_model_that_never_recovers_is_charged_up_to_the_next_change():
    errors = np.r_[np.full(200, 1.0), np.full(200, 3.0), np.full(200, 1.0)]
    first, second = adaptation_lag(errors, [200, 400], window=20)
    assert (first["lag"], first["recovered"]) == (200, False)
    assert first["excess_error"] == pytest.approx(400.0)
    # the level before the second change comes from after the first one only
    assert second["level_before"] == pytest.approx(3.0) and second["lag"] == 0


def test_a_change_without_history_is_not_scored():
    (record,) = adaptation_lag([1.0, 2.0], [0])
    assert record["lag"] is None
    assert summarise([record])["median_lag"] is None


def test_lag_from_predictions_places_changes_by_stream_time():
    n = 400
    times = pd.date_range("2024-01-01", periods=n, freq="h")
    truth = np.zeros(n)
    prediction = np.where((np.arange(n) >= 200) & (np.arange(n) < 230), 2.0, 0.1)
    frame = pd.DataFrame(
        {
            "timestamp": times.strftime("%Y-%m-%dT%H:%M:%S"),
            "step": 1,
            "prediction": prediction,
            "truth": truth,
        }
    )
    result = lag_from_predictions(frame, ["2024-01-09T08:00:00"], window=10)  # row 200
    (record,) = result["per_change"]
    assert record["index"] == 200 and record["lag"] == 30
    assert record["recovered_at"] == "2024-01-10T14:00:00"
    same = lag_from_predictions(frame, [times[200].value], window=10)  # nanoseconds
    assert same["per_change"][0]["index"] == 200
    assert result["median_lag"] == 30 and result["basis"] == "true"


def test_replay_writes_adaptation_lag_to_metrics_json(tmp_path):
    lines = (SCENARIOS / "recurring.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (tmp_path / "recurring.csv").write_text("".join(lines[:1501]), encoding="utf-8")
    raw = yaml.safe_load((SCENARIOS / "recurring.yaml").read_text(encoding="utf-8"))
    raw["change_points"] = str(SCENARIOS / "recurring.changepoints.json")
    (tmp_path / "recurring.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    out = tmp_path / "run"
    replay(load_scenario(tmp_path / "recurring.yaml"), out)
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    lag = metrics["adaptation_lag"]
    assert lag["basis"] == "true" and lag["changes"] == 2  # rows 600 and 1200
    assert [r["stream_time"] for r in lag["per_change"]] == metrics["change_points"][:2]
    assert all(isinstance(r["lag"], int) for r in lag["per_change"])
    assert (out / "report.png").stat().st_size > 0
