"""Tests for :class:`neuralsync.OnlineForecaster`: river's verbs over the replay pipeline.

The facade must be the same pipeline as ``neuralsync replay`` (bit-identical forecasts and
state), keep the label delay and the no-look-ahead rule, survive a snapshot into another
process, and refuse calls that would corrupt the stream with a clear error, leaving its state
as it was.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from neuralsync import OnlineForecaster, Scenario
from neuralsync.cli import app
from neuralsync.errors import CheckpointError, ConfigError, DataError, StreamOrderError
from neuralsync.state import load_snapshot, state_digest

ROOT = Path(__file__).resolve().parent.parent
FAST = {"lookback": 8, "model": {"hidden": [16]}, "detector": {"type": "none"}}


def _series(n: int = 300, seed: int = 0) -> np.ndarray:
    """An AR(1) around a sine: learnable, not trivial."""
    rng = np.random.default_rng(seed)
    y = np.zeros(n)
    for i in range(1, n):
        y[i] = 0.8 * y[i - 1] + math.sin(i / 6.0) + rng.normal(0.0, 0.3)
    return y


def _digest(forecaster: OnlineForecaster) -> str:
    return state_digest(forecaster.pipeline.state_dict())


# -- river's verbs --------------------------------------------------------------------------------


def test_no_arguments_forecasts_a_plain_float_series():
    model = OnlineForecaster()
    assert model.lookback == 32 and model.horizon == 1
    y = _series(400)
    early = []
    for i, value in enumerate(y):
        model.learn_one(value)
        if i < 31:
            early.append(model.forecast())
    assert all(math.isnan(f[0]) for f in early)  # no window yet
    forecast = model.forecast()
    assert len(forecast) == 1 and math.isfinite(forecast[0])
    metrics = model.metrics()
    assert metrics["rows"] == 400 and metrics["forecasts"] == 400 - 31
    assert metrics["mse"] < metrics["baseline_last_value"]["mse"]


def test_forecast_returns_the_horizon_and_any_shorter_prefix():
    model = OnlineForecaster(horizon=3, **FAST)
    for value in _series(100):
        model.learn_one(value)
    full = model.forecast()
    assert len(full) == 3 and model.forecast(2) == full[:2] and model.forecast(1) == full[:1]
    assert model.forecast(3, xs=[{}, {}, {}]) == full


def test_several_targets_and_features_by_name():
    y, x = _series(120), _series(120, seed=1)
    model = OnlineForecaster(targets=["a", "b"], features=["f"], horizon=2, **FAST)
    for i in range(120):
        model.learn_one({"a": y[i], "b": -y[i]}, {"f": x[i]}, t=float(i))
    forecast = model.forecast()
    assert [sorted(step) for step in forecast] == [["a", "b"], ["a", "b"]]
    assert model.pipeline.inputs == ["f", "a", "b"]


def test_label_delay_enforced_inside():
    """A forecast is learned from only once its whole horizon is observed."""
    model = OnlineForecaster(horizon=3, **FAST)
    steps = []
    for value in _series(40):
        model.learn_one(value)
        steps.append(model.metrics()["learn_steps"])
    # forecasts from row 8 on; the one issued at row r is learned at row r + 3
    assert steps[:10] == [0] * 10 and steps[10] == 1 and steps[-1] == 40 - 8 + 1 - 3
    late = OnlineForecaster(horizon=3, label_delay=5, **FAST)
    for value in _series(40):
        late.learn_one(value)
    assert late.metrics()["learn_steps"] == 40 - 8 + 1 - 5


def test_no_look_ahead_rewriting_the_future_leaves_earlier_forecasts_identical():
    y = _series(200)
    changed = y.copy()
    changed[120:] += np.random.default_rng(5).normal(0, 3, 80)

    def forecasts(values):
        model = OnlineForecaster(horizon=2, **FAST)
        out = []
        for value in values:
            model.learn_one(value)
            out.append(model.forecast())
        return out

    original, rewritten = forecasts(y), forecasts(changed)
    assert all(math.isnan(v) for f in original[:7] for v in f)  # no window yet
    assert original[7:120] == rewritten[7:120]  # bit-identical
    assert original[125:] != rewritten[125:]


def test_keys_and_forecast_many():
    model = OnlineForecaster(key="symbol", **FAST)
    for i, value in enumerate(_series(60)):
        model.learn_one(value, key="AAA")
        if i % 2 == 0:
            model.learn_one(100 + value, key="BBB")
    model.learn_one(5.0, key="CCC")
    table = model.forecast_many()
    assert list(table.index) == ["AAA", "BBB", "CCC"] and table.index.name == "symbol"
    assert list(table.columns) == [1]
    assert table.loc["AAA", 1] == model.forecast(key="AAA")[0]
    assert table.loc["BBB", 1] == model.forecast(key="BBB")[0]
    assert math.isnan(table.loc["CCC", 1])
    assert list(model.forecast_many(keys=["BBB"]).index) == ["BBB"]
    assert set(model.metrics()["per_key"]) == {"AAA", "BBB", "CCC"}


def test_learn_many_equals_learn_one_row_by_row():
    y, x = _series(150), _series(150, seed=2)
    frame = pd.DataFrame(
        {
            "time": pd.date_range("2024-01-01", periods=150, freq="h").repeat(2),
            "sym": ["A", "B"] * 150,
            "f": np.repeat(x, 2),
            "p": np.ravel(np.column_stack([y, 3 * y + 10])),
        }
    )
    settings = {"timestamp": "time", "key": "sym", "features": ["f"], "targets": "p", **FAST}
    one = OnlineForecaster(horizon=2, **settings)
    for row in frame.itertuples():
        one.learn_one(row.p, {"f": row.f}, t=row.time, key=row.sym)
    many = OnlineForecaster(horizon=2, **settings)
    many.learn_many(frame.iloc[:97])
    many.learn_many(frame.iloc[97:])
    assert _digest(one) == _digest(many)
    pd.testing.assert_frame_equal(one.forecast_many(), many.forecast_many())
    # the time may also be the index, and without any time each row is its key's next step
    indexed = OnlineForecaster(horizon=2, **settings)
    indexed.learn_many(frame.set_index("time"))
    assert _digest(indexed) == _digest(one)
    stepped = OnlineForecaster(key="sym", **FAST)
    stepped.learn_many(pd.DataFrame({"sym": ["A", "B", "A"], "y": [1.0, 2.0, 3.0]}))
    stepped.learn_one(4.0, key="A")
    assert stepped.pipeline.series["A"].last_timestamp == 2.0


def test_freeze_stops_learning_but_keeps_forecasting():
    model = OnlineForecaster(**FAST)
    y = _series(200)
    for value in y[:100]:
        model.learn_one(value)
    model.freeze()
    weights = state_digest(model.pipeline.learner.state_dict())
    steps = model.metrics()["learn_steps"]
    forecasts = []
    for value in y[100:]:
        model.learn_one(value)
        forecasts.append(model.forecast()[0])
    assert model.frozen and model.metrics()["learn_steps"] == steps
    assert state_digest(model.pipeline.learner.state_dict()) == weights
    assert len(set(forecasts)) == len(forecasts)  # new windows, new forecasts
    model.unfreeze()
    model.learn_one(0.0)
    assert model.metrics()["learn_steps"] == steps + 1


def test_events_are_the_pipelines():
    seen = []
    model = OnlineForecaster(lookback=8, detector={"type": "adwin", "cooldown": 20})
    model.events.subscribe(seen.append)
    rng = np.random.default_rng(0)
    for value in np.r_[rng.normal(0, 0.1, 300), rng.normal(0, 3.0, 300)]:
        model.learn_one(value)
    assert any(e.type == "regime_change" for e in seen)
    model.snapshot()
    assert seen[-1].type == "checkpoint" and seen[-1].data["bytes"] > 0
    assert seen[-1].to_dict()["position"] == 600


def test_configured_from_the_same_scenarios_as_the_cli():
    by_name = OnlineForecaster("default", lookback=12, model={"lr": 0.05})
    assert by_name.scenario.features == ["load", "temperature"]
    assert by_name.lookback == 12 and by_name.scenario.model.lr == 0.05
    assert by_name.scenario.model.hidden == [32]  # nested options update, not replace
    by_path = OnlineForecaster(ROOT / "scenarios" / "symbols.yaml")
    assert by_path.scenario.key == "symbol"
    scenario = Scenario(name="s", timestamp="t", targets="y", lookback=5)
    assert OnlineForecaster(scenario).scenario is scenario


# -- the same pipeline as `neuralsync replay` ----------------------------------------------------


def _replay(tmp_path: Path, name: str, rows: int) -> tuple[pd.DataFrame, dict]:
    out = tmp_path / name
    result = CliRunner().invoke(
        app,
        ["replay", name, "--out", str(out), "--limit", str(rows), "--no-report", "--no-progress"],
    )
    assert result.exit_code == 0, result.output
    # round_trip: pandas' default float parser may miss the last bit of a 17-digit number
    # (seen with the pandas of a CUDA machine), and this comparison is bit for bit.
    predictions = pd.read_csv(
        out / "predictions.csv", keep_default_na=False, float_precision="round_trip"
    )
    snapshot = load_snapshot(out / "checkpoints" / f"state-{rows:012d}.pt")
    return predictions, snapshot["pipeline"]


def _comparable(state: dict) -> str:
    """A replay also scores its scenario's known change points; the facade is not told them."""
    told = ("change_point_positions", "change_point_key_rows")
    return state_digest({k: v for k, v in state.items() if k not in told})


def test_learn_one_forecasts_bit_identical_to_replay(tmp_path):
    predictions, replayed = _replay(tmp_path, "default", 500)
    raw = pd.read_csv(ROOT / "scenarios" / "default.csv", dtype=str, nrows=500)
    model = OnlineForecaster("default")
    mine = {}
    for row in raw.itertuples():
        model.learn_one(
            float(row.price),
            {"load": float(row.load), "temperature": float(row.temperature)},
            t=row.timestamp,
        )
        forecast = model.forecast()[0]
        if not math.isnan(forecast):
            mine[pd.Timestamp(row.timestamp).isoformat()] = forecast
    theirs = dict(zip(predictions["issued_at"], predictions["prediction"], strict=True))
    assert len(theirs) == 500 - 32 and set(theirs) <= set(mine)
    assert all(mine[t] == theirs[t] for t in theirs)  # bit for bit: floats written exactly
    assert _comparable(model.pipeline.state_dict()) == _comparable(replayed)


def test_keyed_learn_one_and_learn_many_bit_identical_to_replay(tmp_path):
    rows = 600  # 200 bars of three symbols, horizon 3, a feature
    predictions, replayed = _replay(tmp_path, "symbols", rows)
    raw = pd.read_csv(ROOT / "scenarios" / "symbols.csv", dtype=str, nrows=rows)
    one = OnlineForecaster("symbols")
    mine = {}
    for row in raw.itertuples():
        one.learn_one(
            float(row.price), {"volume": float(row.volume)}, t=row.timestamp, key=row.symbol
        )
        for step, value in enumerate(one.forecast(key=row.symbol), start=1):
            mine[(pd.Timestamp(row.timestamp).isoformat(), row.symbol, step)] = value
    scored = predictions[predictions["truth"] != ""]
    theirs = {(r.issued_at, r.key, r.step): r.prediction for r in scored.itertuples(index=False)}
    assert len(theirs) > 1500 and all(mine[k] == v for k, v in theirs.items())
    many = OnlineForecaster("symbols")
    for start in range(0, rows, 250):  # the raw text cells, parsed as replay parses them
        many.learn_many(raw.iloc[start : start + 250])
    assert _comparable(one.pipeline.state_dict()) == _comparable(replayed)
    assert _comparable(many.pipeline.state_dict()) == _comparable(replayed)


# -- snapshot and restore -------------------------------------------------------------------------


def test_snapshot_restore_in_process_continues_identically():
    y = _series(200)
    straight = OnlineForecaster(horizon=2, **FAST)
    for value in y:
        straight.learn_one(value)
    first = OnlineForecaster(horizon=2, **FAST)
    for value in y[:77]:
        first.learn_one(value)
    first.freeze()
    data = first.snapshot()
    first.unfreeze()
    second = OnlineForecaster.restore(data)
    assert second.frozen and second.scenario == first.scenario
    second.unfreeze()
    for value in y[77:]:
        second.learn_one(value)
    assert _digest(second) == _digest(straight) and second.forecast() == straight.forecast()


RESTORE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from neuralsync import OnlineForecaster
    from neuralsync.state import state_digest

    folder = Path(sys.argv[1])
    model = OnlineForecaster.restore((folder / "snapshot.bin").read_bytes())
    rows = json.loads((folder / "rows.json").read_text())
    forecasts = []
    for row in rows:
        model.learn_one(row["y"], {"x": row["x"]}, t=row["t"], key=row["key"])
        forecasts.append([v.hex() for v in model.forecast(key=row["key"])])
    print(json.dumps({"forecasts": forecasts,
                      "digest": state_digest(model.pipeline.state_dict())}))
    """
)


def test_snapshot_restored_in_a_new_process_continues_identically(tmp_path):
    y, x = _series(240), _series(240, seed=3)
    rows = [
        {"y": float(y[i]), "x": float(x[i]), "t": f"2024-01-{1 + i // 24:02d} {i % 24:02d}:00",
         "key": "AB"[i % 2]}
        for i in range(240)
    ]  # fmt: skip
    model = OnlineForecaster(
        timestamp="time", key="k", features=["x"], targets="y", horizon=2, lookback=8,
        adaptation={"adapters": ["fresh_start"], "support_size": 32, "canary_size": 16},
        detector={"type": "adwin", "cooldown": 10},
    )  # fmt: skip
    for row in rows[:130]:
        model.learn_one(row["y"], {"x": row["x"]}, t=row["t"], key=row["key"])
    (tmp_path / "snapshot.bin").write_bytes(model.snapshot())
    (tmp_path / "rows.json").write_text(json.dumps(rows[130:]))
    expected = []
    for row in rows[130:]:
        model.learn_one(row["y"], {"x": row["x"]}, t=row["t"], key=row["key"])
        expected.append([v.hex() for v in model.forecast(key=row["key"])])
    result = subprocess.run(
        [sys.executable, "-c", RESTORE_SCRIPT, str(tmp_path)],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    restored = json.loads(result.stdout.strip().splitlines()[-1])
    assert restored["forecasts"] == expected
    assert restored["digest"] == _digest(model)


# -- bad calls: a clear error, and the forecaster as it was -------------------------------------


@pytest.fixture
def warm() -> OnlineForecaster:
    model = OnlineForecaster(**FAST)
    for i, value in enumerate(_series(30)):
        model.learn_one(value, t=float(i))
    return model


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda m: m.learn_one(1.0, t=29.0), StreamOrderError, "29.0 is not after the last"),
        (lambda m: m.learn_one(1.0, t=3.0), StreamOrderError, "goes back before the last"),
        (lambda m: m.learn_one(float("nan"), t=30.0), DataError, "missing value (NaN)"),
        (lambda m: m.learn_one(float("inf"), t=30.0), DataError, "infinite value inf"),
        (lambda m: m.learn_one("1.5", t=30.0), TypeError, "y must be a number, got '1.5'"),
        (lambda m: m.learn_one({"z": 1.0}), ValueError, "unknown target 'z'"),
        (lambda m: m.learn_one(1.0, {"f": 1.0}), TypeError, "built without any"),
        (lambda m: m.learn_one(1.0, t="2024-01-01"), TypeError, "times are numbers"),
        (lambda m: m.learn_one(1.0, t=float("nan")), ValueError, "t must be finite"),
        (lambda m: m.learn_one(1.0, key=3), TypeError, "key must be a string"),
        (lambda m: m.forecast(2), ValueError, "forecasts 1 to 1 steps ahead"),
        (lambda m: m.forecast(0), ValueError, "forecasts 1 to 1 steps ahead"),
        (lambda m: m.forecast(1.5), TypeError, "horizon must be an integer"),
        (lambda m: m.forecast(1, xs=[{}, {}]), ValueError, "one mapping of features per step"),
        (
            lambda m: m.learn_many(pd.DataFrame({"t": [40.0, 39.0], "y": [1.0, 2.0]})),
            StreamOrderError,
            "learn_many row:1: timestamp 39.0 goes back before the previous one, 40.0",
        ),
        (
            lambda m: m.learn_many(pd.DataFrame({"t": [40.0, 41.0], "y": ["1", "oops"]})),
            DataError,
            "learn_many row:1: non-numeric value 'oops'",
        ),
        (lambda m: m.learn_many(pd.DataFrame({"t": [40.0]})), ConfigError, "column 'y'"),
        (lambda m: m.learn_many([1.0]), TypeError, "takes a pandas DataFrame"),
    ],
)
def test_bad_calls_raise_clear_errors_and_change_nothing(warm, call, error, message):
    before = _digest(warm)
    with pytest.raises(error) as raised:
        call(warm)
    assert message in str(raised.value)
    assert _digest(warm) == before
    warm.learn_one(1.0, t=30.0)  # still usable


def test_bad_settings_and_snapshots_are_clear_errors():
    with pytest.raises(ConfigError, match=r"unknown option 'lookbak' \(did you mean 'lookback'"):
        OnlineForecaster(lookbak=3)
    with pytest.raises(ConfigError, match=r"option 'model\.lr': Input should be greater than 0"):
        OnlineForecaster(model={"lr": -1})
    with pytest.raises(ConfigError, match=r"no scenario 'defualt'.*did you mean 'default'"):
        OnlineForecaster("defualt")
    with pytest.raises(CheckpointError, match="cannot read the snapshot"):
        OnlineForecaster.restore(b"not a snapshot")
    with pytest.raises(TypeError, match="takes the bytes of snapshot"):
        OnlineForecaster.restore("snapshot.bin")
    dated = OnlineForecaster(**FAST)
    dated.learn_one(1.0, t="2024-01-01")
    with pytest.raises(TypeError, match="times are dates: pass t="):
        dated.learn_one(2.0)
    with pytest.raises(StreamOrderError, match="2024-01-01T00:00:00 is not after"):
        dated.learn_one(2.0, t=pd.Timestamp("2024-01-01", tz="UTC"))
    with pytest.raises(TypeError, match=r"pass their values as x="):
        OnlineForecaster(features=["f"], **FAST).learn_one(1.0)


def test_missing_values_follow_the_scenarios_policy():
    model = OnlineForecaster(missing="ffill", **FAST)
    for value in [1.0, 2.0, float("nan"), 4.0]:
        model.learn_one(value)
    assert model.metrics()["missing"]["filled_cells"] == 1
    bad = []
    model = OnlineForecaster(bad_records="dead_letter", **FAST)
    model.events.subscribe(lambda e: bad.append(e) if e.type == "bad_record" else None)
    model.learn_one(1.0)
    model.learn_one(float("inf"))
    model.learn_one(3.0)
    assert len(bad) == 1 and "infinite value" in bad[0].data["reason"]
    assert model.metrics()["rows"] == 3
