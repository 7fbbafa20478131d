"""Tests for :mod:`neuralsync.meta`: meta-gradients, the regime memory, the adapter, and its
place in the pipeline (events, snapshot, exact resume, switching it off)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from stream_support import feed, stop_and_resume, switching_frame, switching_scenario
from torch.func import grad

from neuralsync.adaptation import adapter_names, build_adapters
from neuralsync.config import MetaConfig, ModelConfig, Scenario
from neuralsync.learner import OnlineLearner
from neuralsync.meta import MetaAdapter, RegimeMemory, adapt, meta_gradient, mse_loss
from neuralsync.models import WindowMLP
from neuralsync.pipeline import Pipeline
from neuralsync.state import state_digest

# -- meta-gradients ---------------------------------------------------------------------------


def _tiny() -> tuple[WindowMLP, dict[str, torch.Tensor], list[tuple[torch.Tensor, ...]]]:
    """A 3 → 3 → 1 tanh network in float64 with every weight random, and two tasks."""
    generator = torch.Generator().manual_seed(0)
    net = WindowMLP(n_inputs=1, lookback=3, horizon=1, target_index=[0], hidden=[3],
                    activation="tanh").double()  # fmt: skip
    params = {
        k: 0.5 * torch.randn(v.shape, generator=generator, dtype=torch.float64)
        for k, v in net.named_parameters()
    }
    tasks = []
    for _ in range(2):
        x = torch.randn(8, 3, 1, generator=generator, dtype=torch.float64)
        y = torch.randn(8, 1, 1, generator=generator, dtype=torch.float64)
        tasks.append((x[:4], y[:4], x[4:], y[4:]))
    return net, params, tasks


def _meta_loss(net, init, rates, tasks, steps, clip=None):
    losses = [
        mse_loss(net, adapt(net, init, rates, sx, sy, steps, clip=clip), qx, qy)
        for sx, sy, qx, qy in tasks
    ]
    return float(sum(losses) / len(losses))


def _finite_differences(f, params: dict[str, torch.Tensor], eps: float = 1e-6):
    out = {}
    for name, value in params.items():
        estimate = torch.zeros_like(value)
        for i in range(value.numel()):
            up = {k: v.clone() for k, v in params.items()}
            down = {k: v.clone() for k, v in params.items()}
            up[name].view(-1)[i] += eps
            down[name].view(-1)[i] -= eps
            estimate.view(-1)[i] = (f(up) - f(down)) / (2 * eps)
        out[name] = estimate
    return out


@pytest.mark.parametrize("meta_sgd", [False, True], ids=["maml", "maml+meta-sgd"])
def test_second_order_maml_gradient_matches_finite_differences(meta_sgd):
    net, init, tasks = _tiny()
    steps, lr = 2, 0.3
    rates = {k: torch.full_like(v, lr) for k, v in init.items()} if meta_sgd else None
    init_grad, rate_grad, _ = meta_gradient(
        net, init, rates, tasks, algorithm="maml", inner_steps=steps, inner_lr=lr
    )
    fixed = rates or {k: lr for k in init}
    expected = _finite_differences(lambda p: _meta_loss(net, p, fixed, tasks, steps), init)
    for name in init:
        torch.testing.assert_close(init_grad[name], expected[name], rtol=1e-5, atol=1e-8)
    if meta_sgd:
        expected = _finite_differences(lambda r: _meta_loss(net, init, r, tasks, steps), rates)
        for name in rates:
            torch.testing.assert_close(rate_grad[name], expected[name], rtol=1e-5, atol=1e-8)


def test_first_order_maml_is_the_query_gradient_at_the_adapted_weights():
    net, init, tasks = _tiny()
    init_grad, _, _ = meta_gradient(net, init, None, tasks, algorithm="fomaml", inner_steps=3)
    rates = {k: 0.1 for k in init}
    expected = {k: torch.zeros_like(v) for k, v in init.items()}
    for sx, sy, qx, qy in tasks:
        adapted = adapt(net, init, rates, sx, sy, 3)
        for k, g in grad(lambda p, qx=qx, qy=qy: mse_loss(net, p, qx, qy))(adapted).items():
            expected[k] += g / len(tasks)
    for name in init:
        torch.testing.assert_close(init_grad[name], expected[name], rtol=1e-9, atol=1e-12)
    # ... which is not the exact gradient: the second-order terms are missing.
    exact, _, _ = meta_gradient(net, init, None, tasks, algorithm="maml", inner_steps=3)
    assert not torch.allclose(exact["net.0.weight"], init_grad["net.0.weight"])


def test_reptile_direction_points_from_the_adapted_weights_to_the_init():
    net, init, tasks = _tiny()
    direction, rate_grad, _ = meta_gradient(net, init, None, tasks, algorithm="reptile")
    assert rate_grad is None
    rates = {k: 0.1 for k in init}
    for name in init:
        expected = sum(
            init[name] - adapt(net, init, rates, torch.cat([a, c]), torch.cat([b, d]), 5)[name]
            for a, b, c, d in tasks
        ) / len(tasks)
        torch.testing.assert_close(direction[name], expected)


def test_batched_tasks_agree_with_one_task_at_a_time_and_unequal_tasks_run():
    net, init, tasks = _tiny()
    batched, _, loss = meta_gradient(net, init, None, tasks, algorithm="maml", inner_steps=2)
    singles = [meta_gradient(net, init, None, [t], algorithm="maml", inner_steps=2) for t in tasks]
    for name in init:
        torch.testing.assert_close(batched[name], (singles[0][0][name] + singles[1][0][name]) / 2)
    assert loss == pytest.approx((singles[0][2] + singles[1][2]) / 2)
    unequal = [(sx[:3], sy[:3], qx, qy) for sx, sy, qx, qy in tasks[:1]] + tasks[1:]
    looped, _, loss = meta_gradient(net, init, None, unequal, algorithm="maml", inner_steps=2)
    assert np.isfinite(loss) and all(torch.isfinite(g).all() for g in looped.values())


def test_meta_training_lowers_the_query_loss_after_adaptation():
    """Tasks that share a structure (y = a * last value, a in {-0.8, 0.9}): after meta-
    training, k steps from the meta-initialisation fit a task better than k steps from the
    starting weights."""
    from neuralsync.meta import MetaLearner

    torch.manual_seed(0)
    memory = RegimeMemory(max_segments=4, segment_size=128)
    generator = torch.Generator().manual_seed(1)
    for a in (-0.8, 0.9, -0.8, 0.9):
        x = torch.randn(128, 4, 1, generator=generator)
        memory.add(x, a * x[:, -1:, :])
    net = WindowMLP(n_inputs=1, lookback=4, horizon=1, target_index=[0], hidden=[8])
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    config = MetaConfig(meta_lr=0.01, inner_steps=3, inner_lr=0.1)
    learner = MetaLearner(net, params, config)
    held_out = memory.sample_tasks(8, 16, 16, torch.Generator().manual_seed(99))

    def loss_after_adapting(init):
        rates = learner.rates or {k: config.inner_lr for k in init}
        return _meta_loss(net, init, rates, held_out, config.inner_steps, config.inner_grad_clip)

    before = loss_after_adapting(params)
    for step in range(60):
        learner.step(memory.sample_tasks(4, 16, 16, torch.Generator().manual_seed(step)))
    assert loss_after_adapting(learner.init) < 0.5 * before


# -- regime memory ------------------------------------------------------------------------------


def test_memory_is_bounded_and_tasks_respect_time_order():
    memory = RegimeMemory(max_segments=3, segment_size=50)
    for segment in range(5):
        time_index = torch.arange(80, dtype=torch.float32) + 1000 * segment
        memory.add(time_index.view(-1, 1, 1).expand(80, 2, 1), time_index.view(-1, 1, 1))
    assert len(memory) == 3
    assert [int(y[0, 0, 0]) // 1000 for _, y in memory.segments] == [2, 3, 4]  # oldest evicted
    assert all(len(x) == 50 for x, _ in memory.segments)  # the newest samples of each
    for _, sy, _, qy in memory.sample_tasks(20, 16, 8, torch.Generator().manual_seed(0)):
        assert sy.shape[0] == 16 and qy.shape[0] == 8
        assert sy.flatten().diff().eq(1).all() and qy.flatten().diff().eq(1).all()
        assert qy.min() == sy.max() + 1  # the query comes right after the support
        assert int(sy[0]) // 1000 == int(qy[0]) // 1000  # one regime per task


def test_at_long_horizons_the_query_starts_after_the_targets_the_support_saw():
    memory = RegimeMemory(segment_size=100)
    time_index = torch.arange(100, dtype=torch.float32)
    memory.add(time_index.view(-1, 1, 1), time_index.view(-1, 1, 1))
    for _, sy, _, qy in memory.sample_tasks(20, 16, 8, torch.Generator().manual_seed(0), gap=23):
        assert sy.shape[0] == 16 and qy.shape[0] == 8
        assert qy.min() == sy.max() + 24  # 23 samples between: no target step shared at H = 24
    # A short segment still gives a task, the gap kept as far as it fits.
    short = RegimeMemory()
    short.add(torch.zeros(30, 2, 1), torch.arange(30.0).view(-1, 1, 1))
    ((_, sy, _, qy),) = short.sample_tasks(1, 16, 16, torch.Generator(), gap=23)
    assert len(sy) >= 1 and len(qy) >= 1 and qy.min() == sy.max() + 24


def test_memory_cuts_short_segments_into_shorter_tasks():
    memory = RegimeMemory()
    memory.add(torch.zeros(10, 2, 1), torch.arange(10.0).view(-1, 1, 1))
    ((sx, _, qx, _),) = memory.sample_tasks(1, 16, 16, torch.Generator())
    assert len(sx) + len(qx) <= 10 and len(sx) >= 1 and len(qx) >= 1
    assert memory.sample_tasks(3, 4, 4, torch.Generator()) != []
    assert RegimeMemory().sample_tasks(3, 4, 4, torch.Generator()) == []


# -- the adapter -------------------------------------------------------------------------------


def _live() -> OnlineLearner:
    torch.manual_seed(0)
    return OnlineLearner(ModelConfig(hidden=[8]), n_inputs=1, lookback=4, horizon=1,
                         target_index=[0])  # fmt: skip


def _support(n: int = 96, a: float = -0.5, seed: int = 0):
    x = torch.randn(n, 4, 1, generator=torch.Generator().manual_seed(seed))
    return x, a * x[:, -1:, :]


def test_adapter_state_round_trips_and_continues_identically():
    config = MetaConfig(meta_steps=4, support_window=8, query_size=8)
    adapter = MetaAdapter(config, canary_size=16)
    live = _live()
    adapter.on_regime_change(None, live, *_support(seed=0))
    state = copy.deepcopy(adapter.state_dict())
    twin = MetaAdapter(config, canary_size=16)
    twin.load_state_dict(state)
    assert state_digest(twin.state_dict()) == state_digest(state)
    first = adapter.on_regime_change(None, live, *_support(a=0.7, seed=1))
    second = twin.on_regime_change(None, live, *_support(a=0.7, seed=1))
    assert state_digest(adapter.state_dict()) == state_digest(twin.state_dict())
    pairs = zip(
        first.learner.module_.parameters(), second.learner.module_.parameters(), strict=True
    )
    assert all(torch.equal(p, q) for p, q in pairs)
    assert first.details == second.details
    assert adapter.meta_updates_ == 8 and len(adapter.memory) == 2


def test_adapter_details_name_the_steps_support_and_losses():
    adapter = MetaAdapter(MetaConfig(meta_steps=2, inner_steps=3), canary_size=8)
    proposal = adapter.on_regime_change(None, _live(), *_support())
    assert proposal.event == "meta_adapt" and proposal.source == "meta"
    d = proposal.details
    assert d["steps"] == 3 and d["support_size"] == 32 and d["algorithm"] == "fomaml"
    assert d["support_mse_after"] < d["support_mse_before"]


# -- in the pipeline ---------------------------------------------------------------------------


def _meta_scenario(**settings) -> Scenario:
    # Recall and evolution off: these tests watch meta-adaptation alone.
    off = {"recall": {"enabled": False}, "evolution": {"enabled": False}}
    return switching_scenario("meta", {"meta": {"meta_steps": 5}, **off}, **settings)


def test_meta_adaptation_is_on_by_default_and_emits_its_events_in_order():
    scenario = _meta_scenario()
    assert adapter_names(scenario) == ["meta"]
    pipeline = Pipeline(scenario, adapters=build_adapters(scenario))
    events = []
    pipeline.events.subscribe(lambda e: events.append(e.to_dict()))
    feed(pipeline, switching_frame())
    types = [e["type"] for e in events]
    assert "adaptation_scheduled" in types and "meta_adapt" in types
    for i, event in enumerate(events):
        if event["type"] == "meta_adapt":
            decision = events[i + 1]
            assert decision["type"] == "gate_decision" and decision["source"] == "meta"
            assert decision["position"] == event["position"]
            assert event["accepted"] == decision["accepted"]
            assert {"steps", "support_size", "candidate_mse", "live_mse"} <= set(event)
            if event["accepted"]:
                assert events[i + 2]["type"] == "swap"
    scheduled = [e for e in events if e["type"] == "adaptation_scheduled"]
    adapted = [e for e in events if e["type"] == "meta_adapt"]
    assert len(adapted) >= 1 and scheduled[0]["after_samples"] == 16 + 16
    assert pipeline.metrics()["swaps"] == types.count("swap")


def test_meta_adaptation_switches_off():
    off = _meta_scenario(adaptation={"meta": {"enabled": False}})
    assert [a.name for a in build_adapters(off)] == ["recall", "evolution"]
    named = _meta_scenario(adaptation={"adapters": ["fresh_start"]})
    assert [a.name for a in build_adapters(named)] == ["fresh_start"]


def test_a_run_stopped_between_a_detection_and_its_adaptation_resumes_bit_identically():
    scenario = _meta_scenario()
    frame = switching_frame()
    straight = Pipeline(scenario, adapters=build_adapters(scenario))
    events = []
    straight.events.subscribe(lambda e: events.append(e.to_dict()))
    expected = feed(straight, frame)
    scheduled = next(e for e in events if e["type"] == "adaptation_scheduled")
    stop = scheduled["position"] + 5  # the adapter waits for samples: its turn is pending

    resumed, second, snapshot = stop_and_resume(scenario, frame, stop)
    assert snapshot["scheduled"] and snapshot["adapters"]["meta"]["learner"] is None
    assert resumed == expected
    assert state_digest(second.state_dict()) == state_digest(straight.state_dict())
    assert straight.state_dict()["adapters"]["meta"]["learner"] is not None


def test_an_rls_proposal_is_judged_on_samples_after_the_consultation_and_resumes_exactly():
    """An rls live model's experts have already learned the canary window; a proposal that
    copies them is deferred and judged on the next samples instead, after catching up on them
    as the live model did. A run stopped while it is pending resumes bit-identically."""
    scenario = _meta_scenario(model={"type": "rls", "hidden": [4], "lr": 0.005})
    frame = switching_frame()
    straight = Pipeline(scenario, adapters=build_adapters(scenario))
    events = []
    straight.events.subscribe(lambda e: events.append(e.to_dict()))
    expected = feed(straight, frame)
    started = [e for e in events if e["type"] == "adaptation_started"]
    judged = [e for e in events if e["type"] == "meta_adapt"]
    assert started and len(judged) == len(started)
    for start, verdict in zip(started, judged, strict=True):
        assert start["adapter"] == "meta" and start["deliver_after_samples"] == 16
        assert verdict["position"] >= start["position"] + 16

    stop = started[0]["position"] + 5
    resumed, second, snapshot = stop_and_resume(scenario, frame, stop)
    assert [entry[2] for entry in snapshot["deferred"]] == ["meta"]
    assert resumed == expected
    assert state_digest(second.state_dict()) == state_digest(straight.state_dict())


def test_the_command_line_switches_meta_adaptation_off(tmp_path):
    import json

    from typer.testing import CliRunner

    from neuralsync.cli import app

    runner = CliRunner()
    for flags, enabled in (([], True), (["--no-meta"], False)):
        out = tmp_path / str(enabled)
        args = ["replay", "default", "--out", str(out), "--limit", "200", "--no-progress"]
        result = runner.invoke(app, [*args, "--no-report", *flags])
        assert result.exit_code == 0, result.output
        saved = json.loads((out / "scenario.json").read_text(encoding="utf-8"))
        assert saved["adaptation"]["meta"]["enabled"] is enabled
