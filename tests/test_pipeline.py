"""Tests for :mod:`neuralsync.pipeline`: the contracts of DESIGN.md on small synthetic streams.

Every run here really trains the live model; series are short and the lookback is 8 to stay fast.
"""

from __future__ import annotations

import datetime as dt
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch

from neuralsync import pipeline as pipeline_module
from neuralsync.adaptation import build_adapters
from neuralsync.base import Adapter, Deferred, Gate, GateDecision, Prediction, Proposal
from neuralsync.config import Scenario
from neuralsync.errors import ConfigError, DataError, StreamOrderError
from neuralsync.learner import OnlineLearner
from neuralsync.pipeline import Pipeline
from neuralsync.sources import DataFrameSource, frame_to_batch
from neuralsync.state import state_digest

LOOKBACK = 8


# -- helpers ------------------------------------------------------------------------------------


def _scenario(**settings) -> Scenario:
    options = {
        "name": "test",
        "csv": "-",
        "timestamp": "t",
        "features": ["x"],
        "targets": "y",
        "lookback": LOOKBACK,
        "model": {"hidden": [16]},
        "detector": {"type": "none"},
    }
    options.update(settings)
    return Scenario(**options)


def _frame(n: int = 300, seed: int = 0, level: float = 0.0) -> pd.DataFrame:
    """An AR(1) target with a sine, and a feature that leads it: learnable, not trivial."""
    rng = np.random.default_rng(seed)
    y = np.zeros(n)
    for i in range(1, n):
        y[i] = 0.8 * y[i - 1] + np.sin(i / 6.0) + rng.normal(0.0, 0.3)
    x = np.roll(y, -1) + rng.normal(0.0, 0.2, n)  # a noisy peek at the next target
    return pd.DataFrame({"t": np.arange(n, dtype=float), "x": x, "y": y + level})


def _keyed_frame(n: int = 200, seed: int = 0) -> pd.DataFrame:
    """Two series at very different levels, rows interleaved by time."""
    a, b = _frame(n, seed), _frame(n, seed + 1, level=0.0)
    a["k"], b["k"] = "AAA", "BBB"
    b["x"], b["y"] = b["x"] * 100 + 1000, b["y"] * 100 + 1000
    frame = pd.concat([a, b]).sort_values(["t", "k"], kind="stable")
    return frame.reset_index(drop=True)[["t", "k", "x", "y"]]


def _shift_frame(n: int = 900, seed: int = 0) -> pd.DataFrame:
    """A level jump at t=300 and a tenfold volatility jump at t=600."""
    rng = np.random.default_rng(seed)
    y = np.zeros(n)
    for i in range(1, n):
        y[i] = 0.7 * y[i - 1] + rng.normal(0.0, 0.2 if i < 600 else 2.0)
    y[300:] += 5.0
    return pd.DataFrame({"t": np.arange(n, dtype=float), "y": y})


@dataclass
class Run:
    pipeline: Pipeline
    predictions: list[Prediction]
    events: list[dict]


def _run(
    scenario: Scenario,
    frame: pd.DataFrame,
    *,
    adapters=(),
    change_points=None,
    chunk_size: int = 64,
) -> Run:
    pipeline = Pipeline(scenario, adapters=adapters)
    if change_points is not None:
        pipeline.set_change_points(change_points)
    events: list[dict] = []
    pipeline.events.subscribe(lambda e: events.append(e.to_dict()))
    source = DataFrameSource(
        frame,
        timestamp=scenario.timestamp,
        columns=[c for c in frame.columns if c not in (scenario.timestamp, scenario.key)],
        key=scenario.key,
        chunk_size=chunk_size,
    )
    predictions: list[Prediction] = []
    for batch in source:
        predictions += pipeline.process(batch)
    predictions += pipeline.finish()
    return Run(pipeline, predictions, events)


def _bits(predictions, issued_until: float | None = None) -> dict[tuple, str]:
    """Forecast values by (key, issue time, target, step), as exact float bits."""
    out = {}
    for p in predictions:
        if issued_until is not None and p.issued_at > issued_until:
            continue
        index = (p.key, p.issued_at, p.target, p.step)
        assert index not in out, f"forecast {index} reported twice"
        out[index] = float(p.prediction).hex()
    return out


def _without_wall_time(events: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "wall_time"} for e in events]


# -- no look-ahead ------------------------------------------------------------------------------

LOOK_AHEAD_CASES = {
    "horizon 1": {"horizon": 1},
    "horizon 3": {"horizon": 3},
    "keyed, horizon 3": {"horizon": 3, "key": "k"},
    "late labels, batches of 3": {"horizon": 2, "label_delay": 5, "model": {"batch_size": 3}},
    "reference path (adam, two layers)": {
        "horizon": 2,
        "model": {"optimizer": "adam", "lr": 0.003, "hidden": [16, 8]},
    },
}


@pytest.mark.parametrize("case", list(LOOK_AHEAD_CASES))
def test_no_look_ahead_changing_the_future_leaves_every_earlier_forecast_bit_identical(case):
    settings = LOOK_AHEAD_CASES[case]
    scenario = _scenario(
        detector={"type": "adwin", "cooldown": 20},
        adaptation={"adapters": ["fresh_start"], "support_size": 24, "canary_size": 8},
        **settings,
    )
    keyed = "key" in settings
    frame = _keyed_frame(160) if keyed else _frame(240)
    cut = 119.0 if keyed else 159.0
    future = frame["t"] > cut
    rng = np.random.default_rng(99)
    changed = frame.copy()
    # Features AND targets after the cut become loud noise at another level.
    changed.loc[future, ["x", "y"]] = rng.normal(50.0, 40.0, (int(future.sum()), 2))

    original = _run(scenario, frame, adapters=build_adapters(scenario))
    perturbed = _run(scenario, changed, adapters=build_adapters(scenario))

    before = _bits(original.predictions, issued_until=cut)
    horizon = scenario.horizon
    per_key_forecasts = int(cut) + 1 - (LOOKBACK - 1)  # issued at t = L-1, ..., cut
    assert len(before) == per_key_forecasts * horizon * (2 if keyed else 1)
    assert _bits(perturbed.predictions, issued_until=cut) == before
    # Every decision taken up to the cut is the same, too.
    cut_position = int(np.flatnonzero(frame["t"] <= cut)[-1]) + 1
    early = [e for e in _without_wall_time(original.events) if e["position"] <= cut_position]
    early_changed = [
        e for e in _without_wall_time(perturbed.events) if e["position"] <= cut_position
    ]
    assert early == early_changed
    # ...and the change did reach the later forecasts (the test can fail).
    after, after_changed = _bits(original.predictions), _bits(perturbed.predictions)
    assert after.keys() == after_changed.keys()
    differing = [i for i in after if after[i] != after_changed[i]]
    assert differing and min(i[1] for i in differing) > cut


def test_the_forecast_issued_at_a_row_already_uses_that_row():
    """The other side of no look-ahead: the newest row is in the window (no lag by one)."""
    frame = _frame(60)
    changed = frame.copy()
    changed.loc[30, "y"] += 10.0
    a = _bits(_run(_scenario(), frame).predictions)
    b = _bits(_run(_scenario(), changed).predictions)
    assert all(a[i] == b[i] for i in a if i[1] < 30)
    assert a[(None, 30.0, "y", 1)] != b[(None, 30.0, "y", 1)]


# -- label delay --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("horizon", "label_delay", "batch_size"),
    [(1, None, 1), (3, None, 1), (3, 7, 1), (2, None, 4), (1, 4, 3)],
)
def test_a_sample_is_learned_only_once_its_whole_truth_has_arrived(
    horizon, label_delay, batch_size
):
    scenario = _scenario(
        horizon=horizon, label_delay=label_delay, model={"hidden": [8], "batch_size": batch_size}
    )
    batch = frame_to_batch(_frame(48), timestamp="t", columns=["x", "y"])
    pipeline = Pipeline(scenario)
    delay = label_delay or horizon
    for n in range(1, 49):
        pipeline.process(batch.slice(n - 1, n))
        # forecasts are issued from row L on; the one of row r is learnable at row r + delay
        learnable = max(0, n - delay - LOOKBACK + 1)
        metrics = pipeline.metrics()
        assert metrics["learn_steps"] == learnable // batch_size, f"after row {n}"
        assert metrics["forecasts"] == max(0, n - LOOKBACK + 1)
    # Had a sample been learned early, its truth would hold NaN and the step would be skipped.
    assert pipeline.metrics()["skipped_steps"] == 0
    assert pipeline.events.counts.get("learn_skipped", 0) == 0


def test_label_delay_counts_rows_of_the_same_key():
    scenario = _scenario(key="k", horizon=2, model={"hidden": [8], "batch_size": 3})
    frame = _keyed_frame(40)
    batch = frame_to_batch(frame, timestamp="t", columns=["x", "y"], key="k")
    pipeline = Pipeline(scenario)
    rows = {"AAA": 0, "BBB": 0}
    for i in range(len(frame)):
        pipeline.process(batch.slice(i, i + 1))
        rows[frame["k"].iloc[i]] += 1
        learnable = sum(max(0, r - 2 - LOOKBACK + 1) for r in rows.values())
        assert pipeline.metrics()["learn_steps"] == learnable // 3


# -- determinism --------------------------------------------------------------------------------


def _determinism_scenario(seed: int, dropout: float = 0.1) -> Scenario:
    return _scenario(
        seed=seed,
        horizon=2,
        model={"hidden": [16], "dropout": dropout},
        detector={"type": "adwin", "cooldown": 20},
        adaptation={"adapters": ["fresh_start"], "support_size": 24, "canary_size": 8},
    )


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_same_seed_same_forecasts_and_state_different_seed_differs(dropout):
    frame = _frame(200)
    runs = []
    for seed in (3, 3, 4):
        scenario = _determinism_scenario(seed, dropout)
        runs.append(_run(scenario, frame, adapters=build_adapters(scenario)))
        torch.rand(100)  # whatever runs in between must not matter
    a, b, c = runs
    assert _bits(a.predictions) == _bits(b.predictions)
    assert _without_wall_time(a.events) == _without_wall_time(b.events)
    assert state_digest(a.pipeline.state_dict()) == state_digest(b.pipeline.state_dict())
    assert _bits(a.predictions) != _bits(c.predictions)


def test_chunking_of_the_stream_does_not_change_anything():
    frame = _frame(150)
    scenario = _scenario(horizon=2)
    one = _run(scenario, frame, chunk_size=1)
    many = _run(scenario, frame, chunk_size=1000)
    assert _bits(one.predictions) == _bits(many.predictions)
    assert state_digest(one.pipeline.state_dict()) == state_digest(many.pipeline.state_dict())


def test_two_pipelines_side_by_side_do_not_disturb_each_other():
    frame = _frame(120)
    alone = _run(_determinism_scenario(0), frame)
    first = Pipeline(_determinism_scenario(0))
    second = Pipeline(_determinism_scenario(1))
    source = DataFrameSource(frame, timestamp="t", columns=["x", "y"], chunk_size=10)
    predictions = []
    for batch in source:
        predictions += first.process(batch)
        second.process(batch)
    predictions += first.finish()
    assert _bits(predictions) == _bits(alone.predictions)


# -- regime changes -----------------------------------------------------------------------------


def test_regime_changes_are_events_with_stream_and_wall_time_and_scored_against_truth():
    frame = _shift_frame()
    scenario = _scenario(
        features=[], detector={"type": "adwin"}, change_point_tolerance=300, horizon=1
    )
    run = _run(scenario, frame, change_points=[300.0, 600.0])
    changes = [e for e in run.events if e["type"] == "regime_change"]
    assert changes, "no regime change found in a series with a level and a volatility jump"
    for event in changes:
        assert event["detector"] == "adwin"
        assert isinstance(event["stream_time"], float)
        # stream time is the time of the row being processed when the change was seen
        assert event["stream_time"] == frame["t"].iloc[event["position"] - 1]
        wall = dt.datetime.fromisoformat(event["wall_time"])
        assert abs(dt.datetime.now(dt.UTC) - wall) < dt.timedelta(minutes=10)
    metrics = run.pipeline.metrics()
    assert metrics["regime_changes"] == [e["stream_time"] for e in changes]
    detection = metrics["detection"]
    assert detection["true_change_points"] == 2
    assert detection["tolerance_rows"] == 300
    # Recompute delays and false alarms by hand from the events: row t=c is position c+1.
    positions = [e["position"] for e in changes]
    delays, used = [], set()
    for change in (301, 601):
        hit = next(
            (i for i, p in enumerate(positions) if i not in used and change <= p < change + 300),
            None,
        )
        delays.append(None if hit is None else positions[hit] - change)
        if hit is not None:
            used.add(hit)
    assert detection["delays"] == delays
    assert detection["detected"] == sum(d is not None for d in delays) >= 1
    assert detection["missed"] == 2 - detection["detected"]
    assert detection["false_alarms"] == len(positions) - len(used)
    found = [d for d in delays if d is not None]
    assert detection["mean_delay"] == pytest.approx(np.mean(found))


def test_no_detection_figures_without_change_points_and_none_detector_is_silent():
    run = _run(_scenario(features=[], detector={"type": "none"}), _shift_frame(400))
    metrics = run.pipeline.metrics()
    assert "detection" not in metrics
    assert metrics["regime_changes"] == []
    assert not [e for e in run.events if e["type"] == "regime_change"]


# -- metrics ------------------------------------------------------------------------------------


def _scored_figures(predictions: list[Prediction]) -> dict[str, float]:
    scored = [p for p in predictions if not np.isnan(p.truth)]
    pred = np.array([p.prediction for p in scored])
    truth = np.array([p.truth for p in scored])
    last = np.array([p.last_value for p in scored])
    return {
        "n": len(scored),
        "mse": float(np.mean((pred - truth) ** 2)),
        "mae": float(np.mean(np.abs(pred - truth))),
        "baseline_mse": float(np.mean((last - truth) ** 2)),
        "baseline_mae": float(np.mean(np.abs(last - truth))),
    }


def test_per_key_metrics_and_last_value_baseline_match_the_forecasts():
    scenario = _scenario(key="k", horizon=2)
    run = _run(scenario, _keyed_frame(150))
    metrics = run.pipeline.metrics()
    assert sorted(metrics["per_key"]) == ["AAA", "BBB"]
    total = 0
    for key, figures in metrics["per_key"].items():
        expected = _scored_figures([p for p in run.predictions if p.key == key])
        total += figures["n_predictions"]
        assert figures["n_predictions"] == expected["n"] == (150 - LOOKBACK + 1) * 2 - 1 - 2
        assert figures["mse"] == pytest.approx(expected["mse"], rel=1e-9)
        assert figures["mae"] == pytest.approx(expected["mae"], rel=1e-9)
        baseline = figures["baseline_last_value"]
        assert baseline["mse"] == pytest.approx(expected["baseline_mse"], rel=1e-9)
        assert baseline["mae"] == pytest.approx(expected["baseline_mae"], rel=1e-9)
        assert 0.0 <= baseline["directional_accuracy"] <= 1.0
        assert 0.0 <= figures["directional_accuracy"] <= 1.0
    assert total == metrics["n_predictions"]
    # BBB lives at 100 times AAA's scale: its errors are ~10^4 times larger
    aaa, bbb = metrics["per_key"]["AAA"], metrics["per_key"]["BBB"]
    assert bbb["baseline_last_value"]["mse"] > 1000 * aaa["baseline_last_value"]["mse"]
    overall = _scored_figures(run.predictions)
    assert metrics["baseline_last_value"]["mse"] == pytest.approx(overall["baseline_mse"])
    assert metrics["mse"] == pytest.approx(overall["mse"])
    # every forecast reports the last value observed when it was issued
    by_time = {(k, t): y for k, t, y in frame_rows(_keyed_frame(150))}
    for p in run.predictions[:50]:
        assert p.last_value == by_time[(p.key, p.issued_at)]


def _two_target_frame() -> pd.DataFrame:
    frame = _frame(120)
    frame["z"] = frame["x"] * 0.5 - frame["y"]
    return frame


def _two_target_run(monkeypatch, as_arrays: bool) -> Run:
    # Horizon 3 over two targets: a row completes one step of each of the 3 forecasts before
    # it, on both targets; scored one value at a time or as arrays (Pipeline._score).
    monkeypatch.setattr(pipeline_module, "SCORE_AS_ARRAYS", 1 if as_arrays else 10**9)
    return _run(_scenario(targets=["y", "z"], horizon=3), _two_target_frame())


@pytest.mark.parametrize("as_arrays", [False, True])
def test_every_step_of_every_target_is_scored_once_and_the_metrics_match_the_records(
    monkeypatch, as_arrays
):
    frame = _two_target_frame()
    run = _two_target_run(monkeypatch, as_arrays)
    scored = [p for p in run.predictions if not np.isnan(p.truth)]
    forecasts = 120 - LOOKBACK + 1
    assert len(scored) == (forecasts - 1) * 3 * 2 - 2 * (1 + 2)  # the last ones lack truths
    seen = {(p.issued_at, p.target, p.step) for p in scored}
    assert len(seen) == len(scored)  # no forecast value scored twice
    assert {p.step for p in scored} == {1, 2, 3} and {p.target for p in scored} == {"y", "z"}
    by_time = frame.set_index("t")
    for p in scored[:40]:
        assert p.truth == by_time.loc[p.issued_at + p.step, p.target]
        assert p.last_value == by_time.loc[p.issued_at, p.target]
    metrics = run.pipeline.metrics()
    expected = _scored_figures(scored)
    assert metrics["n_predictions"] == expected["n"]
    assert metrics["mse"] == pytest.approx(expected["mse"], rel=1e-9)
    assert metrics["mae"] == pytest.approx(expected["mae"], rel=1e-9)
    assert metrics["baseline_last_value"]["mse"] == pytest.approx(expected["baseline_mse"])
    pred, truth, last = np.array([(p.prediction, p.truth, p.last_value) for p in scored]).T
    hits = np.mean(np.sign(pred - last) == np.sign(truth - last))
    assert metrics["directional_accuracy"] == pytest.approx(hits, rel=1e-12)


def _with_nan_as_text(predictions: list[Prediction]) -> list[tuple]:
    return [tuple("nan" if v != v else v for v in p) for p in predictions]


def test_scoring_as_arrays_changes_no_record_and_no_figure_beyond_rounding(monkeypatch):
    one_by_one = _two_target_run(monkeypatch, as_arrays=False)
    at_once = _two_target_run(monkeypatch, as_arrays=True)
    # The records the end of the stream emits carry NaN truths, which never compare equal.
    assert _with_nan_as_text(at_once.predictions) == _with_nan_as_text(one_by_one.predictions)
    expected, got = one_by_one.pipeline.metrics(), at_once.pipeline.metrics()
    assert got["n_predictions"] == expected["n_predictions"]
    assert got["directional_accuracy"] == expected["directional_accuracy"]
    for name in ("mse", "mae"):
        assert got[name] == pytest.approx(expected[name], rel=1e-12)
        assert got["baseline_last_value"][name] == pytest.approx(
            expected["baseline_last_value"][name], rel=1e-12
        )


def _records_and_columns(scenario: Scenario, frame: pd.DataFrame):
    """Two pipelines on the same stream, one returning records, one columns."""
    runs = []
    for as_columns in (False, True):
        pipeline = Pipeline(scenario)
        source = DataFrameSource.for_scenario(frame, scenario, chunk_size=37)
        scored = []
        for batch in source:
            if as_columns:
                scored.append(pipeline.process_columns(batch))
            else:
                scored += pipeline.process(batch)
        runs.append((pipeline, scored))
    return runs


@pytest.mark.parametrize("as_arrays", [False, True])
@pytest.mark.parametrize("keyed", [False, True])
def test_scored_values_as_columns_are_the_records_in_the_same_order(monkeypatch, as_arrays, keyed):
    monkeypatch.setattr(pipeline_module, "SCORE_AS_ARRAYS", 1 if as_arrays else 10**9)
    if keyed:
        scenario, frame = _scenario(key="k", horizon=2), _keyed_frame(120)
    else:
        scenario, frame = _scenario(targets=["y", "z"], horizon=3), _two_target_frame()
    (by_records, records), (by_columns, blocks) = _records_and_columns(scenario, frame)
    assert len(records) > 300 and len(blocks) > 2
    assert [r for block in blocks for r in block.records()] == records
    assert sum(len(block) for block in blocks) == len(records)
    assert by_columns.metrics() == by_records.metrics()  # scored the same way either way
    table = pd.concat([block.to_frame() for block in blocks], ignore_index=True)
    assert list(table.columns) == list(Prediction._fields)
    assert table["step"].dtype == np.int64 and table["prediction"].dtype == np.float64
    errors = np.array([p.prediction - p.truth for p in records])
    np.testing.assert_array_equal(table["prediction"] - table["truth"], errors)
    if keyed:
        assert set(table["key"]) == {"AAA", "BBB"}


def test_process_columns_calls_the_prediction_hook_with_records():
    scenario = _scenario(horizon=2)
    pipeline = Pipeline(scenario)
    heard: list[Prediction] = []
    pipeline.on_prediction = heard.extend
    returned = []
    for batch in DataFrameSource.for_scenario(_frame(80), scenario, chunk_size=30):
        returned += pipeline.process_columns(batch).records()
    assert len(returned) > 100 and heard == returned


def frame_rows(frame: pd.DataFrame):
    return zip(frame["k"], frame["t"], frame["y"], strict=True)


def test_single_series_has_no_per_key_block_and_learns_to_beat_the_last_value():
    run = _run(_scenario(), _frame(400))
    metrics = run.pipeline.metrics()
    assert "per_key" not in metrics
    assert metrics["rows"] == 400 and metrics["forecasts"] == 400 - LOOKBACK + 1
    # x peeks at the next y, so a model that learns beats persistence clearly
    assert metrics["mse"] < 0.7 * metrics["baseline_last_value"]["mse"]


# -- adaptation ---------------------------------------------------------------------------------


def _period_two_frame(n: int = 400, change: int = 200, seed: int = 0) -> pd.DataFrame:
    """Small noise, then an exact period-2 oscillation: y[t+1] == y[t-1] from the change on."""
    rng = np.random.default_rng(seed)
    y = rng.normal(0.0, 0.1, n)
    y[change:] = 5.0 * (-1.0) ** np.arange(n - change)
    return pd.DataFrame({"t": np.arange(n, dtype=float), "y": y})


class OracleAdapter(Adapter):
    """Proposes the exact forecast of a period-2 series: the value two rows back."""

    name = "oracle"

    def __init__(self):
        self.calls = []
        self.proposed: list[OnlineLearner] = []

    def on_regime_change(self, change, live, support_x, support_y):
        self.calls.append((change, tuple(support_x.shape), tuple(support_y.shape)))
        learner = OnlineLearner(
            live.config, live.n_inputs, live.lookback, live.horizon, live.target_index
        )
        head = learner.module_.net[-1]
        with torch.no_grad():
            head.weight.zero_()
            head.bias.zero_()
            head.weight[0, (live.lookback - 2) * live.n_inputs + live.target_index[0]] = 1.0
        self.proposed.append(learner)
        return Proposal(learner, self.name, {"pattern": "period 2"})

    def state_dict(self):
        return {"calls": len(self.calls)}

    def load_state_dict(self, state):
        self.restored_calls = state.get("calls")


class TerribleAdapter(Adapter):
    """Proposes a model with huge random weights: the gate must keep it out."""

    name = "terrible"

    def __init__(self):
        self.calls = 0

    def on_regime_change(self, change, live, support_x, support_y):
        self.calls += 1
        learner = live.clone()
        with torch.no_grad():
            for parameter in learner.module_.parameters():
                parameter.copy_(torch.linspace(-1e3, 1e3, parameter.numel()).view_as(parameter))
        return Proposal(learner, self.name, {"why": "to be rejected"})


def _adaptation_scenario(**settings) -> Scenario:
    options = {
        "features": [],
        "model": {"type": "linear"},
        "detector": {"type": "adwin"},
        "adaptation": {"support_size": 32, "canary_size": 16},
    }
    options.update(settings)
    return _scenario(**options)


def test_an_adapter_proposal_that_beats_the_live_model_is_swapped_in():
    adapter = OracleAdapter()
    scenario = _adaptation_scenario()
    run = _run(scenario, _period_two_frame(), adapters=[adapter])
    types = [e["type"] for e in run.events]
    assert "regime_change" in types and adapter.calls
    decisions = [e for e in run.events if e["type"] == "gate_decision"]
    assert len(decisions) == len(adapter.calls)
    accepted = [e for e in decisions if e["accepted"]]
    assert accepted, decisions
    for decision in decisions:
        assert decision["source"] == "oracle" and decision["pattern"] == "period 2"
        assert decision["reason"]
        assert {"candidate_mse", "live_mse", "margin"} <= decision.keys()
        index = run.events.index(decision)
        follows_swap = index + 1 < len(run.events) and run.events[index + 1]["type"] == "swap"
        assert follows_swap == decision["accepted"]
        if decision["accepted"]:
            assert decision["candidate_mse"] < decision["live_mse"]
    swaps = [e for e in run.events if e["type"] == "swap"]
    assert run.pipeline.metrics()["swaps"] == len(swaps) == len(accepted)
    assert all(s["source"] == "oracle" and s["position"] > 200 for s in swaps)
    # The proposal is the live model now: it learned the canary samples, then the stream.
    assert run.pipeline.learner.steps_ >= scenario.adaptation.canary_size
    live_head = run.pipeline.learner.module_.net[-1].weight.detach()
    assert live_head[0, LOOKBACK - 2] == pytest.approx(1.0, abs=0.05)
    assert float(live_head.abs().sum()) == pytest.approx(1.0, abs=0.1)
    change, support_x_shape, support_y_shape = adapter.calls[0]
    assert change.detector == "adwin" and change.key is None
    assert (
        change.position == next(e for e in run.events if e["type"] == "regime_change")["position"]
    )
    assert support_x_shape[1:] == (LOOKBACK, 1) and support_y_shape[1:] == (1, 1)
    assert support_x_shape[0] <= scenario.adaptation.support_size
    # After the swap the period-2 series is forecast almost exactly (persistence is off by 10).
    swap_time = float(swaps[-1]["stream_time"])
    late = [p for p in run.predictions if p.issued_at > swap_time + 20 and not np.isnan(p.truth)]
    assert len(late) > 50
    assert np.mean([(p.prediction - p.truth) ** 2 for p in late]) < 0.01
    assert np.mean([(p.last_value - p.truth) ** 2 for p in late]) > 50
    # The adapter's state is part of the pipeline's snapshot and comes back on load.
    state = run.pipeline.state_dict()
    assert state["adapters"]["oracle"] == {"calls": len(adapter.calls)}
    fresh = OracleAdapter()
    Pipeline(scenario, adapters=[fresh]).load_state_dict(state)
    assert fresh.restored_calls == len(adapter.calls)


def test_the_gate_rejects_a_terrible_proposal_and_nothing_changes():
    frame = _period_two_frame()
    scenario = _adaptation_scenario()
    plain = _run(scenario, frame)
    adapter = TerribleAdapter()
    run = _run(scenario, frame, adapters=[adapter])
    decisions = [e for e in run.events if e["type"] == "gate_decision"]
    assert adapter.calls >= 1 and len(decisions) == adapter.calls
    for decision in decisions:
        assert decision["source"] == "terrible" and decision["accepted"] is False
        assert "does not beat" in decision["reason"]
        assert decision["candidate_mse"] > 100 * decision["live_mse"]
    assert not [e for e in run.events if e["type"] == "swap"]
    assert run.pipeline.metrics()["swaps"] == 0
    # A rejected proposal leaves the live model alone: forecasts as if there were no adapter.
    assert _bits(run.predictions) == _bits(plain.predictions)
    assert state_digest(run.pipeline.learner.state_dict()) == state_digest(
        plain.pipeline.learner.state_dict()
    )


def test_fresh_start_adapter_from_the_scenario_goes_through_the_canary_gate():
    scenario = _scenario(
        features=[],
        detector={"type": "adwin"},
        adaptation={"adapters": ["fresh_start"], "support_size": 48, "canary_size": 16},
    )
    adapters = build_adapters(scenario)
    assert [a.name for a in adapters] == ["fresh_start"]
    run = _run(scenario, _shift_frame(), adapters=adapters)
    changes = [e for e in run.events if e["type"] == "regime_change"]
    decisions = [e for e in run.events if e["type"] == "gate_decision"]
    skipped = [e for e in run.events if e["type"] == "adaptation_skipped"]
    assert changes and decisions
    assert len(decisions) + len(skipped) == len(changes)
    for decision in decisions:
        assert decision["source"] == "fresh_start"
        assert decision["support_size"] == 48 and decision["epochs"] == 1
        assert decision["candidate_mse"] >= 0 and decision["live_mse"] >= 0
        index = run.events.index(decision)
        assert run.events[index - 1]["type"] == "regime_change"
        follows_swap = index + 1 < len(run.events) and run.events[index + 1]["type"] == "swap"
        assert follows_swap == decision["accepted"]
        assert decision["accepted"] == (decision["candidate_mse"] < decision["live_mse"])
    accepted = sum(d["accepted"] for d in decisions)
    assert run.pipeline.metrics()["swaps"] == accepted


def test_adaptation_is_skipped_with_a_reason_when_there_are_too_few_labelled_samples():
    scenario = _adaptation_scenario(adaptation={"support_size": 32, "canary_size": 400})
    adapter = OracleAdapter()
    run = _run(scenario, _period_two_frame(), adapters=[adapter])
    skipped = [e for e in run.events if e["type"] == "adaptation_skipped"]
    changes = [e for e in run.events if e["type"] == "regime_change"]
    assert skipped and len(skipped) == len(changes)
    assert "needs more than 400" in skipped[0]["reason"]
    assert adapter.calls == [] and run.pipeline.metrics()["swaps"] == 0


def test_unknown_adapter_name_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown adapter 'fresh_stat'.*did you mean"):
        build_adapters(_scenario(adaptation={"adapters": ["fresh_stat"]}))


class _DetailAdapter(OracleAdapter):
    def __init__(self, details):
        super().__init__()
        self.details = details

    def on_regime_change(self, change, live, support_x, support_y):
        proposal = super().on_regime_change(change, live, support_x, support_y)
        proposal.details = dict(self.details)
        return proposal


def test_a_proposal_detail_named_kind_does_not_crash_the_stream():
    run = _run(
        _adaptation_scenario(), _period_two_frame(), adapters=[_DetailAdapter({"kind": "x"})]
    )
    assert [e for e in run.events if e["type"] == "gate_decision"]


def test_a_proposal_detail_cannot_rewrite_the_event_type():
    run = _run(
        _adaptation_scenario(), _period_two_frame(), adapters=[_DetailAdapter({"type": "mlp"})]
    )
    assert [e for e in run.events if e["type"] == "gate_decision"]


# -- bad input ----------------------------------------------------------------------------------


def _with_missing(frame: pd.DataFrame, rows: list[int], column: str = "y") -> pd.DataFrame:
    changed = frame.copy()
    changed.loc[rows, column] = np.nan
    return changed


def test_missing_value_under_error_policy_names_row_and_column():
    frame = _with_missing(_frame(60), [25], column="x")
    with pytest.raises(DataError, match=r"frame row:25, column 'x'.*missing value") as info:
        _run(_scenario(missing="error"), frame)
    assert "missing: drop" in str(info.value)


def test_missing_value_under_drop_policy_is_the_same_as_a_stream_without_the_row():
    frame = _frame(120)
    dropped = [20, 21, 70]
    run = _run(_scenario(missing="drop", horizon=2), _with_missing(frame, dropped))
    clean = _run(_scenario(horizon=2), frame.drop(index=dropped).reset_index(drop=True))
    assert _bits(run.predictions) == _bits(clean.predictions)
    metrics = run.pipeline.metrics()
    assert metrics["missing"] == {"policy": "drop", "dropped_rows": 3, "filled_cells": 0}
    assert metrics["rows"] == 120 and metrics["bad_records"] == 0


def test_missing_value_under_ffill_policy_repeats_the_last_value_of_the_key():
    frame = _frame(120)
    holes = _with_missing(_with_missing(frame, [30, 31]), [50], column="x")
    filled = frame.copy()
    filled.loc[[30, 31], "y"] = frame.loc[29, "y"]
    filled.loc[50, "x"] = frame.loc[49, "x"]
    run = _run(_scenario(missing="ffill"), holes)
    reference = _run(_scenario(), filled)
    assert _bits(run.predictions) == _bits(reference.predictions)
    assert run.pipeline.metrics()["missing"]["filled_cells"] == 3


def test_ffill_of_a_key_with_no_value_yet_drops_the_row():
    frame = _with_missing(_frame(40), [0])
    run = _run(_scenario(missing="ffill"), frame)
    assert run.pipeline.metrics()["missing"] == {
        "policy": "ffill",
        "dropped_rows": 1,
        "filled_cells": 0,
    }
    clean = _run(_scenario(), _frame(40).iloc[1:].reset_index(drop=True))
    assert _bits(run.predictions) == _bits(clean.predictions)


@pytest.mark.parametrize("missing", ["error", "drop", "ffill"])
def test_an_infinite_value_is_a_bad_record_under_every_missing_policy(missing):
    frame = _frame(60)
    frame.loc[33, "y"] = np.inf
    with pytest.raises(DataError, match=r"frame row:33, column 'y'.*infinite value inf"):
        _run(_scenario(missing=missing), frame)
    run = _run(_scenario(missing=missing, bad_records="dead_letter"), frame)
    bad = [e for e in run.events if e["type"] == "bad_record"]
    assert len(bad) == 1 and "infinite" in bad[0]["reason"] and bad[0]["position"] == 34
    clean = _run(_scenario(), _frame(60).drop(index=33).reset_index(drop=True))
    assert _bits(run.predictions) == _bits(clean.predictions)


def _dirty_frame() -> tuple[pd.DataFrame, pd.DataFrame]:
    """A clean frame, and the same with bad rows inserted: text, inf, out of order, duplicate."""
    clean = _frame(100)
    dirty = clean.astype({"x": object, "y": object})
    bad_rows = pd.DataFrame(
        {
            "t": [20.5, 40.5, 10.0, 70.0],
            "x": [0.1, 0.2, 0.3, 0.4],
            "y": ["oops", np.inf, 1.0, 2.0],
        },
        index=[20.5, 40.5, 61.5, 70.5],
    )
    dirty.index = dirty.index.astype(float)
    dirty = pd.concat([dirty, bad_rows]).sort_index().reset_index(drop=True)
    return clean, dirty


def test_dead_letter_sets_bad_rows_aside_with_reasons_and_the_stream_goes_on():
    clean, dirty = _dirty_frame()
    run = _run(_scenario(bad_records="dead_letter"), dirty)
    reference = _run(_scenario(), clean)
    bad = [e for e in run.events if e["type"] == "bad_record"]
    assert [e["position"] for e in bad] == [22, 43, 65, 75]
    reasons = [e["reason"] for e in bad]
    assert "non-numeric value 'oops' in column 'y'" in reasons[0]
    assert "infinite value" in reasons[1]
    assert reasons[2].startswith("out-of-order timestamp 10.0")
    assert reasons[3].startswith("duplicate timestamp 70.0")
    assert all(e["origin"].startswith("frame row:") for e in bad)
    assert "oops" in bad[0]["raw"]
    assert bad[2]["origin"] == "frame row:64, column 't'"
    metrics = run.pipeline.metrics()
    assert metrics["bad_records"] == 4 and metrics["rows"] == 104
    # good rows kept flowing and were used exactly as without the bad ones
    assert _bits(run.predictions) == _bits(reference.predictions)
    assert metrics["n_predictions"] == reference.pipeline.metrics()["n_predictions"]


def test_bad_rows_under_error_policy_stop_with_where_and_what():
    _, dirty = _dirty_frame()
    with pytest.raises(DataError, match=r"frame row:21.*non-numeric value 'oops'.*dead_letter"):
        _run(_scenario(), dirty)
    ordered = _frame(50)
    ordered.loc[30, "t"] = 5.0
    with pytest.raises(StreamOrderError, match=r"frame row:30, column 't'.*out-of-order"):
        _run(_scenario(), ordered)


def test_a_missing_column_is_a_config_error_naming_it():
    frame = _frame(20).rename(columns={"x": "xx"})
    pipeline = Pipeline(_scenario())
    batch = frame_to_batch(frame, timestamp="t", columns=["xx", "y"])
    with pytest.raises(ConfigError, match=r"column 'x' named in the scenario.*did you mean 'xx'"):
        pipeline.process(batch)


def test_a_proposal_detail_named_like_a_gate_figure_does_not_crash_the_stream():
    class Shadowing(Adapter):
        name = "shadowing"

        def on_regime_change(self, change, live, support_x, support_y):
            details = {"accepted": "mine", "source": "mine", "reason": "mine"}
            return Proposal(live.clone(), source="shadowing", details=details)

    events = []
    pipeline = Pipeline(
        _scenario(features=[], detector={"type": "adwin"}, adaptation={"canary_size": 8}),
        adapters=[Shadowing()],
    )
    pipeline.events.subscribe(lambda e: events.append(e.to_dict()))
    for batch in DataFrameSource(_shift_frame(), timestamp="t", columns=["y"], chunk_size=100):
        pipeline.process(batch)
    decisions = [e for e in events if e["type"] == "gate_decision"]
    assert decisions, "the shift should have produced a regime change and a gate decision"
    for decision in decisions:
        assert isinstance(decision["accepted"], bool)
        assert decision["source"] == "shadowing" and decision["reason"] != "mine"


def test_keyed_change_points_are_scored_in_their_own_key_rows():
    """A change of key 'a' detected late in stream rows but promptly in 'a's own rows counts."""
    rng = np.random.default_rng(3)
    rows = []
    for i in range(900):
        for key in ("a", "b", "c"):
            level = 6.0 if key == "a" and i >= 450 else 0.0
            rows.append({"t": float(i), "k": key, "y": level + rng.normal(0.0, 0.3)})
    frame = pd.DataFrame(rows)
    scenario = _scenario(
        features=[], key="k", detector={"type": "adwin"}, change_point_tolerance=150
    )
    pipeline = Pipeline(scenario)
    pipeline.set_change_points([450.0], keys=["a"])
    for batch in DataFrameSource(frame, timestamp="t", columns=["y"], key="k", chunk_size=300):
        pipeline.process(batch)
    detection = pipeline.metrics()["detection"]
    assert detection["per_key_rows"] is True
    assert detection["true_change_points"] == 1 and detection["detected"] == 1
    (delay,) = detection["delays"]
    assert 0 <= delay < 150  # in 'a's rows; the same delay in stream rows is about 3x larger
    on_a = [d for d in pipeline.detections_ if d["key"] == "a"]
    assert on_a and on_a[0]["key_row"] - 451 == delay


# -- judging proposals under a label delay --------------------------------------------------------


class _LiveCopyLater(Adapter):
    """Background work whose result is the live model exactly as it was at the regime change:
    judged fairly, it must score on every canary sample exactly what the live model scored."""

    name = "copy"
    result_delay = 40

    def on_regime_change(self, change, live, support_x, support_y):
        future: Future = Future()
        future.set_result(Proposal(live.clone(), self.name))
        return Deferred(future, {})


class _RecordingGate(Gate):
    def __init__(self):
        self.seen = []

    def decide(self, proposal, live_errors, canary_x, canary_y):
        self.seen.append((proposal.canary_errors.clone(), live_errors.clone(), len(canary_x)))
        return GateDecision(True, "recorded", {})


def _replay_shift_with(adapter: Adapter, horizon: int) -> tuple[_RecordingGate, list[dict]]:
    """The level-shift stream through a pipeline with ``adapter`` and a recording gate (canary
    window 8): the gate, with what it saw, and the events."""
    gate = _RecordingGate()
    scenario = _scenario(
        features=[],
        horizon=horizon,
        model={"hidden": [16], "fast_path": False},
        detector={"type": "adwin"},
        adaptation={"canary_size": 8},
    )
    pipeline = Pipeline(scenario, adapters=[adapter], gate=gate)
    events: list[dict] = []
    pipeline.events.subscribe(lambda e: events.append(e.to_dict()))
    for batch in DataFrameSource(_shift_frame(), timestamp="t", columns=["y"], chunk_size=50):
        pipeline.process(batch)
    return gate, events


@pytest.mark.parametrize("horizon", [1, 4])
def test_a_copy_of_the_live_model_is_judged_as_the_live_model_whatever_the_label_delay(horizon):
    """With a label delay d the live model forecast each canary sample before the d - 1
    samples labelled just before it; the candidate must too, or it is judged with hindsight.
    Then, swapped in, the copy and the replaced model score the same over probation."""
    gate, events = _replay_shift_with(_LiveCopyLater(), horizon)
    assert gate.seen, "the level shift should have produced a change and a delivery"
    for candidate, live, n in gate.seen:
        assert len(candidate) == len(live) == n == 40 - (horizon - 1)
        torch.testing.assert_close(candidate, live.to(candidate.dtype), rtol=1e-5, atol=1e-6)
    ends = [e for e in events if e["type"] in ("swap_confirmed", "rollback")]
    assert ends and all(e["type"] == "swap_confirmed" for e in ends)
    for end in ends:
        assert end["previous_mse"] == pytest.approx(end["live_mse"], rel=1e-5)


class _LiveCopyNow(_LiveCopyLater):
    """Defers without a delay of its own (as meta-adaptation does for an rls live model)."""

    result_delay = 0


@pytest.mark.parametrize("horizon", [1, 4])
def test_work_deferred_without_a_delay_is_judged_on_a_full_canary_window_past_the_gap(horizon):
    gate, events = _replay_shift_with(_LiveCopyNow(), horizon)
    started = [e for e in events if e["type"] == "adaptation_started"]
    assert gate.seen and started
    assert {e["deliver_after_samples"] for e in started} == {8 + horizon - 1}
    for candidate, live, n in gate.seen:
        assert len(candidate) == len(live) == n == 8
        torch.testing.assert_close(candidate, live.to(candidate.dtype), rtol=1e-5, atol=1e-6)


def test_a_proposal_never_trains_on_targets_its_canary_forecasts_were_issued_without():
    """Horizon 4: the three samples labelled just before the canary have targets inside the
    canary's forecast periods; the adapter's support stops before them, and the gate scores
    the canary alone."""
    seen = {}

    class Watcher(Adapter):
        name = "watcher"

        def on_regime_change(self, change, live, support_x, support_y):
            recent = list(pipeline._recent)
            seen["support_last"] = support_x[-1].numpy()
            seen["recent"] = [w for w, _, _ in recent]
            return Proposal(live.clone(), self.name)

    gate = _RecordingGate()
    scenario = _scenario(
        features=[],
        horizon=4,
        detector={"type": "adwin"},
        adaptation={"canary_size": 8, "support_size": 32},
    )
    pipeline = Pipeline(scenario, adapters=[Watcher()], gate=gate)
    gate.decide = lambda proposal, live_errors, x, y: (
        seen.setdefault("canary", (len(live_errors), len(x))),
        GateDecision(False, "recorded", {}),
    )[1]
    for batch in DataFrameSource(_shift_frame(), timestamp="t", columns=["y"], chunk_size=50):
        pipeline.process(batch)
    assert "support_last" in seen, "the level shift should have produced a regime change"
    gap = 4 - 1
    np.testing.assert_array_equal(seen["support_last"], seen["recent"][-8 - gap - 1])
    assert seen["canary"] == (8, 8)
