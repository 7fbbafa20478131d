"""Tests for :mod:`neuralsync.recall`: the library of past regimes' models, the choice among
them, the margin a recalled model must clear, and its place in the pipeline (events, exact
resume, switching it off)."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
import torch
from stream_support import feed, stop_and_resume, switching_frame, switching_scenario

from neuralsync.adaptation import adapter_names, build_adapters
from neuralsync.base import Proposal
from neuralsync.config import ModelConfig, Scenario
from neuralsync.errors import ConfigError
from neuralsync.gates import CanaryGate
from neuralsync.learner import OnlineLearner
from neuralsync.pipeline import Pipeline
from neuralsync.recall import RegimeRecall
from neuralsync.rls import RLSLearner
from neuralsync.state import state_digest


def _linear(sign: float, steps: int = 300) -> OnlineLearner:
    """A linear model that has learned y = sign * x."""
    config = ModelConfig(type="linear", lr=0.1, subtract_last=False)
    model = OnlineLearner(config, n_inputs=1, lookback=1, horizon=1, target_index=[0])
    generator = torch.Generator().manual_seed(int(sign > 0))
    for _ in range(steps):
        x = torch.randn(8, 1, 1, generator=generator)
        model.learn(x, sign * x)
    return model


def test_recall_proposes_the_stored_model_that_fits_the_newest_samples():
    torch.manual_seed(0)
    recall = RegimeRecall(models=4, select=16)
    empty = torch.zeros(0, 1, 1)
    # The first change: nothing stored yet, so no proposal; the live model is stored.
    assert recall.on_regime_change(None, _linear(-1.0), empty, empty) is None
    assert recall.on_regime_change(None, _linear(2.0), empty, empty) is None
    x = torch.randn(64, 1, 1)
    # Old samples of y = 2x, then the newest 16 of y = -x: the choice looks at those only.
    support_y = torch.cat([2 * x[:48], -x[48:]])
    proposal = recall.on_regime_change(None, _linear(0.5), x, support_y)
    assert proposal.source == "recall" and proposal.event == "recall"
    assert proposal.details["chosen"] == 0 and proposal.details["library"] == 2
    assert proposal.details["select_size"] == 16 and proposal.margin == 0.1
    assert proposal.details["select_mse"] < 1e-3 < proposal.details["select_mse_worst"]
    prediction = proposal.learner.predict(torch.ones(1, 1, 1))
    assert prediction.item() == pytest.approx(-1.0, abs=0.02)


def test_the_library_is_bounded_and_holds_copies_that_the_live_model_does_not_move():
    recall = RegimeRecall(models=2, select=8)
    live = _linear(1.0)
    empty = torch.zeros(0, 1, 1)
    for position in (100, 200, 300):
        recall.on_regime_change(_change(position), live, empty, empty)
    assert len(recall.library_) == 2 and recall.stored_at_ == [200, 300]
    kept = copy.deepcopy(recall.library_[-1]["module"]["net.0.weight"])
    for _ in range(50):  # the live model goes on learning another regime
        x = torch.randn(8, 1, 1)
        live.learn(x, -x)
    assert torch.equal(kept, recall.library_[-1]["module"]["net.0.weight"])
    assert not torch.equal(kept, live.module_.net[0].weight.detach())


def _change(position: int):
    from neuralsync.base import RegimeChange

    return RegimeChange(position, float(position), None, "adwin")


def test_a_recalled_model_must_beat_the_live_one_by_its_margin():
    live = _linear(1.0)
    x = torch.randn(32, 1, 1)
    y = 1.2 * x
    live_errors = live.squared_errors(x, y)
    better = _linear(1.1)  # about 75 % lower canary error than the live model
    slightly = copy.deepcopy(live)
    with torch.no_grad():
        slightly.module_.net[0].weight.mul_(1.01)  # a few per cent lower
    gate = CanaryGate()
    assert gate.decide(Proposal(slightly, "recall", margin=0.0), live_errors, x, y).accepted
    refused = gate.decide(Proposal(slightly, "recall", margin=0.1), live_errors, x, y)
    assert not refused.accepted and refused.figures["margin"] == 0.1
    assert refused.reason.endswith("canary window by 10%")
    assert gate.decide(Proposal(better, "recall", margin=0.1), live_errors, x, y).accepted
    # The gate's own margin still applies when it is the larger.
    assert (
        not CanaryGate(margin=0.9)
        .decide(Proposal(better, "recall", margin=0.1), live_errors, x, y)
        .accepted
    )


def test_a_recalled_model_must_also_stand_out_from_noise():
    # One lucky sample makes the mean 30 % lower but the advantage noise (z well under 1):
    # the gate refuses it for a proposal that asks z >= 1, as recall's do by default.
    live = _linear(1.0)
    x = torch.randn(64, 1, 1, generator=torch.Generator().manual_seed(3))
    live_errors = torch.ones(64)
    lucky = torch.full((64,), 1.05)
    lucky[0] = -20.0  # not a squared error, but what the z-score sees is the differences
    gate = CanaryGate()
    noisy = Proposal(live, "recall", canary_errors=lucky, margin=0.1)
    assert gate.decide(noisy, live_errors, x, x).accepted
    refused = gate.decide(dataclasses.replace(noisy, min_z=1.0), live_errors, x, x)
    assert not refused.accepted and "within noise" in refused.reason
    assert refused.figures["advantage_z"] < 1.0
    steady_errors = 0.8 + 0.01 * torch.randn(64, generator=torch.Generator().manual_seed(4))
    steady = Proposal(live, "recall", canary_errors=steady_errors, min_z=1.0)
    assert gate.decide(steady, live_errors, x, x).accepted
    # The setting reaches recall's proposals from the scenario.
    scenario = Scenario.model_validate(
        {
            "name": "t",
            "csv": "t.csv",
            "timestamp": "time",
            "targets": "y",
            "adaptation": {"recall": {"min_z": 2.5}},
        }
    )
    recall = RegimeRecall.from_scenario(scenario)
    assert RegimeRecall().min_z == 1.0 and recall.min_z == 2.5
    empty = torch.zeros(0, 1, 1)
    recall.on_regime_change(None, _linear(-1.0), empty, empty)
    assert recall.on_regime_change(None, live, x, x).min_z == 2.5


def _rls_live(window_forgetting: float) -> RLSLearner:
    config = ModelConfig(type="rls", lr=0.01, rls_window_forgetting=window_forgetting)
    return RLSLearner(config, n_inputs=2, lookback=4, horizon=1, target_index=[0, 1])


def _learn_regime(learner: RLSLearner, sign: float, rows: int, seed: int) -> None:
    generator = np.random.default_rng(seed)
    for _ in range(rows):
        window = generator.standard_normal((1, 4, 2)).astype(np.float32)
        learner.learn(window, sign * window[:, -1:, :])


@pytest.mark.parametrize("window_forgetting", [1.0, 0.999])
def test_a_recalled_rls_model_keeps_the_live_window_expert_only_if_it_forgets_nothing(
    window_forgetting,
):
    # The window expert of an rls model that forgets nothing has learned every sample the
    # stored copy had and every one since: recall hands it on, with the levels it clips with,
    # and brings back the regime-bound rest (channel expert, mixture, network) as stored.
    recall = RegimeRecall(models=2, select=8)
    live = _rls_live(window_forgetting)
    empty = torch.zeros(0, 4, 2)
    _learn_regime(live, -1.0, 200, seed=0)
    recall.on_regime_change(_change(200), live, empty, empty.narrow(1, 0, 1))
    stored = RLSLearner.from_state_dict(recall.library_[0], "cpu")
    _learn_regime(live, 1.0, 200, seed=1)
    x = torch.randn(16, 4, 2, generator=torch.Generator().manual_seed(2))
    proposal = recall.on_regime_change(_change(400), live, x, -x[:, -1:, :])
    back = proposal.learner
    assert back is not live and back.window_ is not live.window_
    assert np.array_equal(back.channel_.W_, stored.channel_.W_)
    assert np.array_equal(back.gram_, stored.gram_)
    lifelong = window_forgetting == 1.0
    assert np.array_equal(back.window_.W_, live.window_.W_) is lifelong
    assert np.array_equal(back.window_.W_, stored.window_.W_) is not lifelong
    assert (back.levels_.n_ == live.levels_.n_ != stored.levels_.n_) is lifelong
    # The live model is untouched by what it handed on.
    before = live.window_.W_.copy()
    back.learn(x[:1].numpy(), x[:1, -1:, :].numpy())
    assert np.array_equal(live.window_.W_, before)


def test_bad_settings_are_refused(tmp_path):
    from neuralsync.config import load_scenario

    with pytest.raises(ValueError, match="at least 1"):
        RegimeRecall(models=0)
    with pytest.raises(ValueError, match="margin"):
        RegimeRecall(margin=1.0)
    with pytest.raises(ValueError, match="min_z"):
        RegimeRecall(min_z=-1.0)
    path = tmp_path / "s.yaml"
    path.write_text("name: s\ntimestamp: t\ntargets: [y]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"adaptation\.recall\.margin"):
        load_scenario(path, {"adaptation.recall.margin": 1.5})
    with pytest.raises(ConfigError, match=r"adaptation\.recall\.min_z"):
        load_scenario(path, {"adaptation.recall.min_z": -0.5})


# -- in the pipeline ----------------------------------------------------------------------------


def _scenario(**settings) -> Scenario:
    # Meta-adaptation and evolution off: these tests watch recall alone.
    off = {"meta": {"enabled": False}, "evolution": {"enabled": False}}
    return switching_scenario("recall", off, **settings)


def _run(scenario: Scenario, frame: pd.DataFrame) -> tuple[Pipeline, list, list[dict]]:
    pipeline = Pipeline(scenario, adapters=build_adapters(scenario))
    events: list[dict] = []
    pipeline.events.subscribe(lambda e: events.append(e.to_dict()))
    return pipeline, feed(pipeline, frame), events


def test_recall_brings_back_a_regime_model_at_the_detection_and_lowers_the_error():
    scenario = _scenario()
    assert adapter_names(scenario) == ["recall"]
    frame = switching_frame(2100)
    pipeline, _, events = _run(scenario, frame)
    types = [e["type"] for e in events]
    recalls = [i for i, t in enumerate(types) if t == "recall"]
    assert recalls, "no detection after the first stored a model"
    for i in recalls:
        decision, detection = events[i + 1], events[i - 1]
        # Consulted at once: the same position as the detection, no adaptation_scheduled.
        assert detection["type"] == "regime_change"
        assert decision["type"] == "gate_decision" and decision["source"] == "recall"
        assert events[i]["position"] == detection["position"] == decision["position"]
        assert {"library", "chosen", "select_mse", "candidate_mse", "live_mse"} <= set(events[i])
    accepted = [events[i] for i in recalls if events[i]["accepted"]]
    assert accepted and all(e["candidate_mse"] < 0.9 * e["live_mse"] for e in accepted)
    assert "adaptation_scheduled" not in types
    off = _scenario(adaptation={"canary_size": 16, "adapters": []} | _OFF)
    baseline, _, _ = _run(off, frame)
    assert pipeline.metrics()["mse"] < baseline.metrics()["mse"]


_OFF = {"recall": {"enabled": False}, "meta": {"enabled": False}, "evolution": {"enabled": False}}


def test_a_run_stopped_after_models_were_stored_resumes_bit_identically():
    scenario = _scenario()
    frame = switching_frame(2100)
    straight, expected, events = _run(scenario, frame)
    first_recall = next(e for e in events if e["type"] == "recall")
    stop = first_recall["position"] + 30

    resumed, second, snapshot = stop_and_resume(scenario, frame, stop)
    assert len(snapshot["adapters"]["recall"]["library"]) == 2
    assert resumed == expected
    assert state_digest(second.state_dict()) == state_digest(straight.state_dict())


def test_recall_switches_off_from_the_scenario_and_the_command_line(tmp_path):
    from typer.testing import CliRunner

    from neuralsync.cli import app

    assert adapter_names(Scenario(name="s", timestamp="t", targets="y"))[0] == "recall"
    assert adapter_names(_scenario(adaptation=_OFF)) == []
    runner = CliRunner()
    for flags, enabled in (([], True), (["--no-recall"], False)):
        out = tmp_path / str(enabled)
        args = ["replay", "default", "--out", str(out), "--limit", "200", "--no-progress"]
        result = runner.invoke(app, [*args, "--no-report", *flags])
        assert result.exit_code == 0, result.output
        saved = json.loads((out / "scenario.json").read_text(encoding="utf-8"))
        assert saved["adaptation"]["recall"]["enabled"] is enabled
