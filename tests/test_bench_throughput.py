"""Tests of ``neuralsync bench throughput``: one quick run, its JSON and what it must show.

The benchmark takes half a minute or so; it runs once per session (shared by the pytest-xdist
workers through a lock file) and every test reads its figures.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any

import pytest
from cli_support import last_json_object
from filelock import FileLock
from typer.testing import CliRunner

from neuralsync.cli import app

N_INPUTS, HIDDEN = 8, 32  # the benchmark's model: 8 -> 32 -> 1, one row of 8 inputs
KEY_COUNTS = (1_000, 10_000)


def _run_benchmark() -> dict[str, Any]:
    runner = CliRunner()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = runner.invoke(app, ["bench", "throughput", "--quick", "--json"])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {result.exception!r}\n{result.output}")
    # click >= 8.2 keeps stdout and stderr apart and `output` interleaves them; older versions
    # mix stderr into stdout. Either way the JSON is the last object of stdout.
    try:
        stderr = result.stderr
    except ValueError:  # stderr not captured separately
        stderr = ""
    return {
        "code": result.exit_code,
        "stdout": result.stdout,
        "stderr": stderr,
        "output": result.output,
        "warnings": [
            {
                "filename": w.filename,
                "text": f"{w.category.__name__}: {w.message}",
                "line": w.lineno,
            }
            for w in caught
        ],
    }


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    done = root / "bench-throughput-quick.json"
    with FileLock(str(root / "bench-throughput-quick.lock")):
        if not done.is_file():
            done.write_text(json.dumps(_run_benchmark()))
    return json.loads(done.read_text())


@pytest.fixture(scope="module")
def figures(bench: dict[str, Any]) -> dict[str, Any]:
    assert bench["code"] == 0, bench["output"]
    return last_json_object(bench["stdout"])


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def test_exits_0_with_the_figures_as_json_on_stdout(bench, figures):
    assert bench["code"] == 0, bench["output"]
    assert "Traceback" not in bench["output"]
    assert figures["quick"] is True
    assert isinstance(figures["torch_threads"], int) and figures["torch_threads"] >= 1
    assert {
        "single_series_events_per_second",
        "ratios",
        "many_series",
        "long_horizon",
        "replay_default_rows_per_second",
    } <= figures.keys()


def test_the_figures_are_logged_as_they_are_measured(bench):
    # The log goes to stderr (a rich console); `output` holds both streams.
    log = bench["output"]
    for line in ("events/s", "key-events/s", "rows/s", "1,000 keys", "10,000 keys", "576 values"):
        assert line in log, line
    if bench["stderr"]:
        assert "key-events/s" in bench["stderr"]
        assert "key-events/s" not in bench["stdout"].split("{", 1)[0]


def test_the_benchmark_code_itself_raises_no_warnings(bench):
    bench_dir = os.path.join("neuralsync", "bench", "")
    ours = [w for w in bench["warnings"] if bench_dir in w["filename"]]
    assert not ours, ours


def test_single_series_rates_and_the_fast_path_is_faster(figures):
    single = figures["single_series_events_per_second"]
    assert set(single) == {"eager_torch", "reference", "fast"}
    assert all(_positive(rate) for rate in single.values()), single
    ratios = figures["ratios"]
    assert ratios["fast_over_reference"] == pytest.approx(single["fast"] / single["reference"])
    assert ratios["fast_over_eager_torch"] == pytest.approx(single["fast"] / single["eager_torch"])
    assert ratios["reference_over_eager_torch"] == pytest.approx(
        single["reference"] / single["eager_torch"]
    )
    # The fast path is some 50-100x faster; 2x holds on the noisiest machine.
    assert single["fast"] > 2 * single["reference"], single
    assert single["fast"] > 2 * single["eager_torch"], single


def test_many_series_at_1000_and_10000_keys(figures):
    fleets = figures["many_series"]
    assert isinstance(fleets, list) and fleets
    by_keys = {(f["device"], f["keys"]): f for f in fleets}
    assert len(by_keys) == len(fleets)
    for keys in KEY_COUNTS:
        assert ("cpu", keys) in by_keys, sorted(by_keys)
    params = (N_INPUTS * HIDDEN + HIDDEN + HIDDEN + 1) * 4  # float32 weights and biases
    for (_, keys), fleet in by_keys.items():
        assert keys in KEY_COUNTS
        assert _positive(fleet["key_events_per_second"]), fleet
        assert _positive(fleet["peak_rss_mib"]), fleet
        assert fleet["params_bytes_per_key"] == pytest.approx(params), fleet
        assert fleet["optimizer_bytes_per_key"] == 0  # plain SGD: no momentum buffer
        assert fleet["window_bytes_per_key"] == pytest.approx(N_INPUTS * 4), fleet  # lookback 1
        overhead = fleet["overhead_bytes_per_key"]
        assert 0 < overhead <= 1024, fleet


def test_replay_of_the_default_scenario_on_both_paths(figures):
    replay = figures["replay_default_rows_per_second"]
    assert _positive(replay["fast"]) and _positive(replay["reference"]), replay
    assert replay["fast_over_reference"] == pytest.approx(replay["fast"] / replay["reference"])
    assert replay["fast"] > replay["reference"], replay


def test_long_horizon_scoring_both_ways_scores_the_same_values_the_same(figures):
    long_horizon = figures["long_horizon"]
    arrays, one_by_one = long_horizon["as_arrays"], long_horizon["one_at_a_time"]
    assert _positive(arrays["rows_per_second"]) and _positive(one_by_one["rows_per_second"])
    # 600 rows, lookback 16: 585 forecasts of 48 steps of 12 columns, each completed value
    # scored once either way; the last 48 forecasts miss 1, 2, ..., 48 of their steps.
    scored = (585 * 48 - 48 * 49 // 2) * 12
    assert arrays["values_scored"] == one_by_one["values_scored"] == scored
    assert arrays["mse"] == pytest.approx(one_by_one["mse"], rel=1e-12)
    assert long_horizon["as_arrays_over_one_at_a_time"] == pytest.approx(
        arrays["rows_per_second"] / one_by_one["rows_per_second"]
    )
    columns = long_horizon["as_columns"]
    assert _positive(columns["rows_per_second"])
    # Columns and records scored as arrays take the same scoring path: equal to the bit.
    assert columns["values_scored"] == scored and columns["mse"] == arrays["mse"]
    assert long_horizon["as_columns_over_as_arrays"] == pytest.approx(
        columns["rows_per_second"] / arrays["rows_per_second"]
    )
