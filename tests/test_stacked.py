"""Many series at once: stacked per-key models agree with the reference path, on both backends."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from neuralsync.config import ModelConfig, Scenario
from neuralsync.learner import OnlineLearner
from neuralsync.pipeline import Pipeline
from neuralsync.sources import DataFrameSource
from neuralsync.stacked import StackedForecaster, StackedLearners, stacked_reason

CONFIGS = {
    "mlp": ModelConfig(),
    "tanh-momentum-decay": ModelConfig(
        activation="tanh", hidden=[16], lr=0.03, momentum=0.9, weight_decay=0.01
    ),
    "linear-tight-clip": ModelConfig(type="linear", grad_clip=0.05),
    "no-clip-raw-window": ModelConfig(grad_clip=None, subtract_last=False),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_stacked_learners_equal_independent_reference_learners(name):
    config = CONFIGS[name]
    torch.manual_seed(0)
    references = [OnlineLearner(config, 3, 6, 2, [2, 0]) for _ in range(6)]
    fleet = StackedLearners.from_learners(references)
    generator = torch.Generator().manual_seed(1)
    for _ in range(150):
        keys = torch.randperm(6, generator=generator)[:4]  # a changing subset of keys ticks
        x = torch.randn(4, 6, 3, generator=generator)
        y = torch.randn(4, 2, 2, generator=generator)
        forecasts = fleet.predict(keys, x)
        losses = fleet.learn(keys, x, y)
        for i, key in enumerate(keys.tolist()):
            expected = references[key].predict(x[i : i + 1])[0]
            np.testing.assert_allclose(forecasts[i].numpy(), expected, atol=2e-5)
            assert losses[i].item() == pytest.approx(
                references[key].learn(x[i : i + 1], y[i : i + 1]), abs=2e-5
            )
    for key, reference in enumerate(references):
        exported = fleet.learner(key)
        x = torch.randn(2, 6, 3, generator=generator)
        np.testing.assert_allclose(exported.predict(x), reference.predict(x), atol=2e-5)
        assert exported.steps_ == reference.steps_


def test_a_non_finite_key_keeps_its_weights_and_the_others_learn():
    fleet = StackedLearners(
        ModelConfig(momentum=0.5), n_keys=3, n_inputs=1, lookback=4, horizon=1, target_index=[0]
    )
    before = fleet.flat_.clone()
    x = torch.randn(3, 4, 1)
    y = torch.tensor([[[1.0]], [[float("nan")]], [[2.0]]])
    for _ in range(3):
        fleet.learn(None, x, y)
    assert torch.equal(fleet.flat_[1], before[1])
    assert torch.equal(fleet.flat_momentum_[1], torch.zeros_like(fleet.flat_momentum_[1]))
    assert not torch.equal(fleet.flat_[0], before[0]) and not torch.equal(fleet.flat_[2], before[2])
    assert fleet.steps_.tolist() == [3, 0, 3] and fleet.skipped_steps_.tolist() == [0, 3, 0]


def test_unsupported_models_are_refused_with_the_reason():
    assert "hidden layers" in stacked_reason(ModelConfig(hidden=[8, 8]))
    assert "adam" in stacked_reason(ModelConfig(optimizer="adam"))
    with pytest.raises(ValueError, match="dropout"):
        StackedLearners(ModelConfig(dropout=0.1), 2, 1, 4, 1, [0])


def _drive(forecaster: StackedForecaster, n_ticks: int, n_keys: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    outputs = []
    for t in range(n_ticks):
        if t % 3 == 0:
            keys, rows = None, torch.randn(n_keys, 3, generator=generator) + t * 0.01
        else:
            keys = torch.randperm(n_keys, generator=generator)[: n_keys // 2]
            rows = torch.randn(len(keys), 3, generator=generator) + t * 0.01
        outputs.append(forecaster.step(rows, keys))
    return outputs


@pytest.mark.parametrize(("horizon", "lookback"), [(1, 4), (3, 6), (2, 2)])
def test_numba_and_torch_backends_agree(horizon, lookback):
    config = ModelConfig(momentum=0.9, weight_decay=0.01, lr=0.03)
    runs = []
    for backend in ("torch", "numba"):
        forecaster = StackedForecaster(
            config,
            n_keys=20,
            n_inputs=3,
            lookback=lookback,
            horizon=horizon,
            target_index=[2, 0],
            backend=backend,
        )
        runs.append((forecaster, _drive(forecaster, 120, 20, seed=3)))
    (torch_run, torch_out), (numba_run, numba_out) = runs
    for a, b in zip(torch_out, numba_out, strict=True):
        assert torch.equal(a.isnan(), b.isnan())
        torch.testing.assert_close(a.nan_to_num(), b.nan_to_num(), atol=1e-4, rtol=1e-4)
    assert torch.equal(torch_run.learners.steps_, numba_run.learners.steps_)
    assert torch.equal(torch_run.scored_, numba_run.scored_)
    assert numba_run.metrics()["mse"] == pytest.approx(torch_run.metrics()["mse"], rel=1e-4)


def _smooth_frame(n: int) -> pd.DataFrame:
    t = np.arange(n, dtype=float)
    rng = np.random.default_rng(5)
    x = np.sin(t / 9) + rng.normal(0, 0.05, n)
    y = 10 + 3 * np.sin(t / 13) + 0.5 * x + rng.normal(0, 0.1, n)
    return pd.DataFrame({"t": t, "x": x, "y": y})


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("horizon", [1, 2])
def test_one_stacked_key_forecasts_as_the_pipeline_does(backend, horizon):
    """The same protocol: same window, normalisation, label delay and SGD step."""
    frame = _smooth_frame(300)
    scenario = Scenario(
        name="one",
        timestamp="t",
        features=["x"],
        targets=["y"],
        lookback=5,
        horizon=horizon,
        detector={"type": "none"},
    )
    pipeline = Pipeline(scenario)
    forecaster = StackedForecaster(
        scenario.model,
        n_keys=1,
        n_inputs=len(scenario.inputs),
        lookback=5,
        horizon=horizon,
        target_index=pipeline.target_index,
        backend=backend,
    )
    layers = [m for m in pipeline.learner.module_.net if isinstance(m, torch.nn.Linear)]
    forecaster.learners.flat_[0] = torch.cat(
        [p.detach().flatten() for m in layers for p in (m.weight, m.bias)]
    )
    predictions = []
    for batch in DataFrameSource.for_scenario(frame, scenario, chunk_size=50):
        predictions += pipeline.process(batch)
    stacked = {}
    values = torch.tensor(frame[scenario.inputs].to_numpy(), dtype=torch.float32)
    for row, t in zip(values, frame["t"], strict=True):
        stacked[float(t)] = forecaster.step(row[None], torch.tensor([0]))[0]
    assert len(predictions) > 250
    for p in predictions:
        expected = stacked[p.issued_at][p.step - 1, 0].item()
        assert expected == pytest.approx(p.prediction, rel=1e-4, abs=1e-4)
    assert int(forecaster.learners.steps_[0]) == pipeline.learner.steps_


def test_state_round_trip_continues_identically():
    config = ModelConfig(momentum=0.5)
    whole = StackedForecaster(config, n_keys=8, n_inputs=3, lookback=3, horizon=2, target_index=[1])
    _drive(whole, 40, 8, seed=1)
    learners = whole.learners.state_dict()
    copy = StackedForecaster(config, n_keys=8, n_inputs=3, lookback=3, horizon=2, target_index=[1])
    copy.learners.load_state_dict(learners)
    for name, value in vars(whole).items():
        if isinstance(value, torch.Tensor):
            getattr(copy, name).copy_(value)
    a, b = _drive(whole, 30, 8, seed=2), _drive(copy, 30, 8, seed=2)
    for x, y in zip(a, b, strict=True):
        assert x.nan_to_num().numpy().tobytes() == y.nan_to_num().numpy().tobytes()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_agrees_with_cpu():
    config = ModelConfig(momentum=0.9)
    cpu = StackedForecaster(
        config, n_keys=64, n_inputs=3, lookback=4, horizon=2, target_index=[0], backend="torch"
    )
    gpu = StackedForecaster(
        config, n_keys=64, n_inputs=3, lookback=4, horizon=2, target_index=[0], device="cuda"
    )
    gpu.learners.flat_.copy_(cpu.learners.flat_)
    for a, b in zip(_drive(cpu, 60, 64, seed=4), _drive(gpu, 60, 64, seed=4), strict=True):
        torch.testing.assert_close(a.nan_to_num(), b.cpu().nan_to_num(), atol=1e-4, rtol=1e-4)
