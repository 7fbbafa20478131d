"""Tests for :mod:`neuralsync.fast`: the compiled live path against the reference learner.

The reference :class:`~neuralsync.learner.OnlineLearner` is the specification: started from the
same state, the fast path must forecast and learn the same numbers (within float32 rounding),
read and write the same checkpoints, skip the same bad steps, and the pipeline must say which
path it runs on.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
import pytest
import torch

from neuralsync.adaptation import build_adapters
from neuralsync.base import Prediction
from neuralsync.config import ModelConfig, Scenario
from neuralsync.fast import FastLearner, as_fast, fast_path_reason, live_path, make_learner
from neuralsync.learner import OnlineLearner
from neuralsync.pipeline import Pipeline
from neuralsync.sources import DataFrameSource

LOOKBACK = 6
N_INPUTS = 3
TOL = 1e-4


# -- helpers ------------------------------------------------------------------------------------


def _fast(horizon: int = 1, target_index=(0,), seed: int = 0, **settings) -> FastLearner:
    torch.manual_seed(seed)
    config = ModelConfig(**{"hidden": [16], **settings})
    return FastLearner(config, N_INPUTS, LOOKBACK, horizon, list(target_index))


def _reference_twin(learner: OnlineLearner) -> OnlineLearner:
    twin = OnlineLearner.from_state_dict(learner.state_dict(), "cpu")
    assert type(twin) is OnlineLearner
    return twin


def _stream(learner: OnlineLearner, steps: int, seed: int = 1, batch: int | None = None):
    """``steps`` batches of windows and a learnable, noisy truth for ``learner``'s shape."""
    rng = np.random.default_rng(seed)
    batch = batch or learner.config.batch_size
    index = learner.target_index
    for _ in range(steps):
        x = rng.normal(size=(batch, learner.lookback, learner.n_inputs)).astype(np.float32)
        signal = 0.6 * x[:, -1, index] - 0.3 * x[:, -2, index] + 0.2 * x[:, 0, index]
        noise = rng.normal(0.0, 0.1, size=(batch, learner.horizon, len(index)))
        y = (signal[:, None, :] + noise).astype(np.float32)
        yield x, y


def _weights(learner: OnlineLearner) -> dict[str, bytes]:
    return {k: v.detach().numpy().tobytes() for k, v in learner.module_.state_dict().items()}


def _momentum(learner: OnlineLearner) -> list[np.ndarray]:
    state = learner.state_dict()["optimizer"]["state"]
    return [state[i]["momentum_buffer"].numpy().copy() for i in sorted(state)]


def _run_together(a: OnlineLearner, b: OnlineLearner, steps: int, seed: int, *, exact: bool):
    """Forecast and learn the same batches with both; compare every forecast and loss."""
    for x, y in _stream(a, steps, seed):
        pa, pb = a.predict(x), b.predict(x)
        assert pa.shape == pb.shape == (len(x), a.horizon, len(a.target_index))
        la, lb = a.learn(x, y), b.learn(x, y)
        assert np.isfinite(la) and np.isfinite(lb)
        if exact:
            assert pa.tobytes() == pb.tobytes()
            assert la == lb
        else:
            np.testing.assert_allclose(pa, pb, rtol=0, atol=TOL)
            assert abs(la - lb) <= TOL, (la, lb)
    assert a.steps_ == b.steps_


# -- the fast path computes what the reference computes ----------------------------------------

AGREEMENT_CASES = {
    "mlp relu (default)": ({}, 1, [0]),
    "tanh": ({"activation": "tanh"}, 1, [0]),
    "silu": ({"activation": "silu"}, 1, [0]),
    "gelu": ({"activation": "gelu"}, 1, [0]),
    "linear": ({"type": "linear"}, 1, [0]),
    "momentum 0.9 and weight decay": ({"momentum": 0.9, "weight_decay": 0.01}, 1, [0]),
    "batches of 4": ({"batch_size": 4}, 1, [0]),
    "subtract_last off": ({"subtract_last": False}, 1, [0]),
    "no gradient clipping": ({"grad_clip": None}, 1, [0]),
    "tiny gradient clip (always active)": ({"grad_clip": 0.05}, 1, [0]),
    "horizon 3, two targets": ({}, 3, [2, 0]),
    "horizon 3, two targets, tanh, momentum, batches of 4": (
        {"activation": "tanh", "momentum": 0.5, "batch_size": 4},
        3,
        [2, 0],
    ),
}


@pytest.mark.parametrize("case", list(AGREEMENT_CASES))
def test_fast_path_agrees_with_the_reference_step_by_step(case):
    settings, horizon, target_index = AGREEMENT_CASES[case]
    fast = _fast(horizon, target_index, **settings)
    reference = _reference_twin(fast)
    before = _weights(fast)
    losses = []
    for x, y in _stream(fast, 300, seed=1):
        pf, pr = fast.predict(x), reference.predict(x)
        assert pf.dtype == np.float32
        assert pf.shape == pr.shape == (len(x), horizon, len(target_index))
        np.testing.assert_allclose(pf, pr, rtol=0, atol=TOL)
        lf, lr = fast.learn(x, y), reference.learn(x, y)
        assert np.isfinite(lf) and abs(lf - lr) <= TOL, (lf, lr)
        losses.append(lf)
    assert fast.steps_ == reference.steps_ == 300
    assert fast.skipped_steps_ == reference.skipped_steps_ == 0
    # Both really learned: the weights moved, and (unless clipped to a crawl) the loss fell.
    assert _weights(fast) != before
    if settings.get("grad_clip", 1.0) != 0.05:
        assert np.mean(losses[-50:]) < np.mean(losses[:50])
    for name, value in reference.module_.state_dict().items():
        np.testing.assert_allclose(
            fast.module_.state_dict()[name].numpy(), value.numpy(), rtol=0, atol=TOL
        )
    if settings.get("momentum"):
        for mf, mr in zip(_momentum(fast), _momentum(reference), strict=True):
            np.testing.assert_allclose(mf, mr, rtol=0, atol=TOL)


def test_the_tiny_gradient_clip_really_changes_the_steps():
    """The clipping case above is only a test of clipping if clipping makes a difference."""
    clipped, unclipped = _fast(grad_clip=0.05), _fast(grad_clip=None)
    assert _weights(clipped) == _weights(unclipped)
    for x, y in _stream(clipped, 30, seed=1):
        clipped.learn(x, y)
        unclipped.learn(x, y)
    probe = next(_stream(clipped, 1, seed=5))[0]
    assert np.abs(clipped.predict(probe) - unclipped.predict(probe)).max() > 100 * TOL


def test_a_linear_model_qualifies_whatever_its_unused_hidden_settings():
    settings = {"type": "linear", "hidden": [16, 8], "activation": "gelu"}
    assert fast_path_reason(ModelConfig(**settings)) is None
    fast = _fast(**settings)
    _run_together(fast, _reference_twin(fast), 100, seed=2, exact=False)


# -- checkpoints --------------------------------------------------------------------------------


def _through_bytes(state: dict) -> dict:
    """A state dict saved and loaded the way checkpoints are: through torch.save."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_fast_checkpoint_continues_on_the_reference_path():
    fast = _fast(momentum=0.9, weight_decay=0.01)
    for x, y in _stream(fast, 100, seed=1):
        fast.learn(x, y)
    state = _through_bytes(fast.state_dict())
    reference = OnlineLearner.from_state_dict(state, "cpu")
    assert reference.steps_ == fast.steps_ == 100
    _run_together(fast, reference, 150, seed=2, exact=False)
    # The momentum buffer travelled too: without it the continuation is clearly different.
    resumed = OnlineLearner.from_state_dict(state, "cpu")
    forgetful = OnlineLearner.from_state_dict(state, "cpu")
    forgetful.optimizer_ = forgetful._make_optimizer()
    drift = 0.0
    for x, y in _stream(forgetful, 20, seed=2):
        drift = max(drift, float(np.abs(forgetful.predict(x) - resumed.predict(x)).max()))
        forgetful.learn(x, y)
        resumed.learn(x, y)
    assert drift > 10 * TOL


def test_reference_checkpoint_continues_on_the_fast_path():
    torch.manual_seed(0)
    config = ModelConfig(hidden=[16], momentum=0.9, weight_decay=0.01)
    reference = OnlineLearner(config, N_INPUTS, LOOKBACK, 1, [0])
    for x, y in _stream(reference, 100, seed=1):
        reference.learn(x, y)
    fast = FastLearner.from_state_dict(_through_bytes(reference.state_dict()), "cpu")
    assert isinstance(fast, FastLearner) and fast.steps_ == 100
    for mf, mr in zip(_momentum(fast), _momentum(reference), strict=True):
        assert mf.tobytes() == mr.tobytes()
    _run_together(reference, fast, 150, seed=2, exact=False)


def test_fast_checkpoint_reloaded_on_the_fast_path_continues_bit_identically():
    settings = {"momentum": 0.9, "weight_decay": 0.01, "activation": "tanh"}
    uninterrupted = _fast(horizon=3, target_index=[2, 0], **settings)
    for x, y in _stream(uninterrupted, 100, seed=1):
        uninterrupted.learn(x, y)
    state = uninterrupted.state_dict()
    saved_momentum = [b.tobytes() for b in _momentum(uninterrupted)]
    resumed = FastLearner.from_state_dict(_through_bytes(state), "cpu")
    assert [b.tobytes() for b in _momentum(resumed)] == saved_momentum
    _run_together(uninterrupted, resumed, 150, seed=2, exact=True)
    assert _weights(uninterrupted) == _weights(resumed)
    assert [b.tobytes() for b in _momentum(uninterrupted)] == [
        b.tobytes() for b in _momentum(resumed)
    ]
    assert (uninterrupted.steps_, uninterrupted.skipped_steps_) == (250, 0)
    assert (resumed.steps_, resumed.skipped_steps_) == (250, 0)


def test_a_fresh_fast_checkpoint_without_steps_round_trips_bit_identically():
    """Before the first step there is no momentum buffer yet; the first step seeds it."""
    fresh = _fast(momentum=0.9)
    resumed = FastLearner.from_state_dict(fresh.state_dict(), "cpu")
    _run_together(fresh, resumed, 50, seed=3, exact=True)
    reference = _reference_twin(_fast(momentum=0.9))
    _run_together(_fast(momentum=0.9), reference, 50, seed=3, exact=False)


# -- clone --------------------------------------------------------------------------------------


def test_clone_starts_equal_and_is_independent():
    original = _fast(momentum=0.9)
    for x, y in _stream(original, 50, seed=1):
        original.learn(x, y)
    probe = next(_stream(original, 1, batch=8, seed=9))[0]
    twin = original.clone()
    assert isinstance(twin, FastLearner) and twin is not original
    assert twin.predict(probe).tobytes() == original.predict(probe).tobytes()
    assert _weights(twin) == _weights(original)
    assert twin.steps_ == original.steps_ == 50
    frozen = original.predict(probe).tobytes()
    for x, y in _stream(twin, 30, seed=2):
        twin.learn(x, y)
    assert original.predict(probe).tobytes() == frozen
    assert twin.predict(probe).tobytes() != frozen
    assert original.steps_ == 50 and twin.steps_ == 80
    # ...and the other way round: learning on the original leaves the clone alone.
    second = original.clone()
    mine = second.predict(probe).tobytes()
    for x, y in _stream(original, 30, seed=3):
        original.learn(x, y)
    assert second.predict(probe).tobytes() == mine


def test_clone_continues_exactly_like_the_original_momentum_included():
    original = _fast(momentum=0.9)
    for x, y in _stream(original, 50, seed=1):
        original.learn(x, y)
    _run_together(original, original.clone(), 50, seed=2, exact=True)


# -- steps that must be skipped -----------------------------------------------------------------


def _spoil(kind: str, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y = x.copy(), y.copy()
    if kind == "nan truth":
        y[0, 0, 0] = np.nan
    elif kind == "inf input, last row":
        x[0, -1, 1] = np.inf
    else:
        x[0, 2, 0] = np.inf
    return x, y


@pytest.mark.parametrize("kind", ["nan truth", "inf input, last row", "inf input, early row"])
@pytest.mark.parametrize("grad_clip", [1.0, None])
def test_a_non_finite_batch_is_skipped_and_changes_nothing(kind, grad_clip):
    fast = _fast(momentum=0.9, grad_clip=grad_clip)
    batches = list(_stream(fast, 40, seed=1))
    for x, y in batches[:20]:
        fast.learn(x, y)
    reference = _reference_twin(fast)
    before, momentum_before = _weights(fast), [b.tobytes() for b in _momentum(fast)]
    bad_x, bad_y = _spoil(kind, *batches[20])
    loss = fast.learn(bad_x, bad_y)
    assert not np.isfinite(loss)
    assert not np.isfinite(reference.learn(bad_x, bad_y))
    assert fast.skipped_steps_ == reference.skipped_steps_ == 1
    assert fast.steps_ == 20
    assert _weights(fast) == before
    assert [b.tobytes() for b in _momentum(fast)] == momentum_before
    # Both paths go on from the same place.
    for x, y in batches[21:]:
        np.testing.assert_allclose(fast.predict(x), reference.predict(x), rtol=0, atol=TOL)
        assert abs(fast.learn(x, y) - reference.learn(x, y)) <= TOL
    assert fast.steps_ == reference.steps_ == 39


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_a_finite_loss_with_an_overflowing_gradient_is_skipped(grad_clip):
    torch.manual_seed(0)
    fast = FastLearner(ModelConfig(grad_clip=grad_clip), 1, 8, 1, [0])
    x = np.zeros((1, 8, 1), dtype=np.float32)
    x[0, :-1, 0] = 1e30  # huge activations, yet the (last-value) forecast is finite
    y = np.full((1, 1, 1), 1e10, dtype=np.float32)
    assert fast.predict(x).tolist() == [[[0.0]]]  # so the loss itself is finite (1e20)
    before = _weights(fast)
    assert not np.isfinite(fast.learn(x, y))
    assert fast.skipped_steps_ == 1 and fast.steps_ == 0
    assert _weights(fast) == before
    assert all(torch.isfinite(v).all() for v in fast.module_.state_dict().values())
    # Still a working learner afterwards.
    good = np.ones((1, 8, 1), dtype=np.float32)
    assert np.isfinite(fast.learn(good, np.full((1, 1, 1), 2.0, dtype=np.float32)))
    assert fast.steps_ == 1


# -- the torch module is the fast path's state --------------------------------------------------


def test_the_module_always_shows_the_current_weights():
    fast = _fast(momentum=0.5, horizon=3, target_index=[2, 0])
    for i, (x, y) in enumerate(_stream(fast, 60, seed=1, batch=3)):
        fast.learn(x, y)
        with torch.no_grad():
            seen = fast.module_(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(seen, fast.predict(x), rtol=0, atol=1e-6)
        if i == 0:
            first = seen
    assert np.abs(seen - first).max() > 0  # (the weights did move)
    # And the other way: weights written through the module are what the kernels use.
    with torch.no_grad():
        for parameter in fast.module_.parameters():
            parameter.add_(0.01)
    with torch.no_grad():
        expected = fast.module_(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(fast.predict(x), expected, rtol=0, atol=1e-6)
    assert np.abs(expected - seen).max() > 1e-3
    # squared_errors (the canary gate's score) runs on the module and sees the same model.
    truths = fast.predict(x) + 1.0
    np.testing.assert_allclose(fast.squared_errors(x, truths).numpy(), 1.0, atol=1e-5)


# -- which path, and why not --------------------------------------------------------------------

UNSUPPORTED = {
    "adam": ({"optimizer": "adam"}, "optimizer 'adam'"),
    "two hidden layers": ({"hidden": [16, 8]}, "2 hidden layers"),
    "dropout": ({"dropout": 0.1}, "dropout"),
    "switched off": ({"fast_path": False}, "fast_path is off"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_models_stay_on_the_reference_path_with_a_reason(case):
    settings, expected = UNSUPPORTED[case]
    config = ModelConfig(**settings)
    reason = fast_path_reason(config)
    assert isinstance(reason, str) and expected in reason
    learner = make_learner(config, N_INPUTS, LOOKBACK, 1, [0])
    assert type(learner) is OnlineLearner
    assert live_path(learner) == {"path": "reference", "reason": reason}
    assert as_fast(learner) is learner
    with pytest.raises(ValueError, match=re.escape(reason)):
        FastLearner(config, N_INPUTS, LOOKBACK, 1, [0])


def test_a_cuda_device_is_a_reason_for_the_reference_path():
    for device in ("cuda", torch.device("cuda"), "cuda:0"):
        reason = fast_path_reason(ModelConfig(), device)
        assert isinstance(reason, str) and "cuda" in reason
    assert fast_path_reason(ModelConfig(), "cpu") is None
    assert fast_path_reason(ModelConfig(), torch.device("cpu")) is None


def test_supported_models_get_the_fast_path_and_as_fast_keeps_their_state():
    assert fast_path_reason(ModelConfig()) is None
    learner = make_learner(ModelConfig(), N_INPUTS, LOOKBACK, 1, [0])
    assert isinstance(learner, FastLearner)
    assert live_path(learner)["path"] == "fast"
    assert as_fast(learner) is learner
    torch.manual_seed(0)
    reference = OnlineLearner(ModelConfig(hidden=[16], momentum=0.9), N_INPUTS, LOOKBACK, 1, [0])
    for x, y in _stream(reference, 30, seed=1):
        reference.learn(x, y)
    moved = as_fast(reference)
    assert isinstance(moved, FastLearner) and moved is not reference
    assert moved.steps_ == 30 and _weights(moved) == _weights(reference)
    _run_together(reference, moved, 50, seed=2, exact=False)


# -- in the pipeline ----------------------------------------------------------------------------

PIPELINE_LOOKBACK = 8


def _scenario(**settings) -> Scenario:
    options = {
        "name": "fast",
        "csv": "-",
        "timestamp": "t",
        "features": ["x"],
        "targets": "y",
        "lookback": PIPELINE_LOOKBACK,
        "model": {"hidden": [16]},
        "detector": {"type": "none"},
        "device": "cpu",  # "auto" would pick CUDA where there is one: not the fast path
    }
    options.update(settings)
    return Scenario(**options)


def _smooth_frame(n: int = 400) -> pd.DataFrame:
    t = np.arange(n, dtype=float)
    y = np.sin(t / 10.0) + 0.5 * np.sin(t / 23.0) + 0.01 * t
    x = np.roll(y, -1) * 0.5  # a peek at the next target
    return pd.DataFrame({"t": t, "x": x, "y": y})


def _alternation_then_walk(n: int = 600, change: int = 300, seed: int = 0) -> pd.DataFrame:
    """A strict alternation, then a random walk ten units higher: the old model is wrong."""
    rng = np.random.default_rng(seed)
    y = (-1.0) ** np.arange(n) + rng.normal(0.0, 0.05, n)
    y[change:] = 10.0 + np.cumsum(rng.normal(0.0, 0.3, n - change))
    return pd.DataFrame({"t": np.arange(n, dtype=float), "y": y})


def _run(scenario: Scenario, frame: pd.DataFrame, adapters=()):
    pipeline = Pipeline(scenario, adapters=adapters)
    events: list[dict] = []
    pipeline.events.subscribe(lambda e: events.append(e.to_dict()))
    source = DataFrameSource(
        frame,
        timestamp="t",
        columns=[c for c in frame.columns if c != "t"],
        chunk_size=64,
    )
    predictions: list[Prediction] = []
    for batch in source:
        predictions += pipeline.process(batch)
    predictions += pipeline.finish()
    return pipeline, predictions, events


def test_pipeline_reports_the_fast_path_by_default():
    pipeline, predictions, _ = _run(_scenario(), _smooth_frame(80))
    assert isinstance(pipeline.learner, FastLearner)
    metrics = pipeline.metrics()
    assert metrics["live_path"]["path"] == "fast"
    assert "reason" not in metrics["live_path"]
    assert metrics["learn_steps"] > 0 and predictions


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ({"hidden": [16], "fast_path": False}, "fast_path is off"),
        ({"hidden": [16], "optimizer": "adam", "lr": 0.003}, "optimizer 'adam'"),
    ],
)
def test_pipeline_reports_the_reference_path_and_why(model, expected):
    pipeline, _, _ = _run(_scenario(model=model), _smooth_frame(80))
    assert type(pipeline.learner) is OnlineLearner
    path = pipeline.metrics()["live_path"]
    assert path["path"] == "reference"
    assert expected in path["reason"]
    assert pipeline.metrics()["learn_steps"] > 0


def test_fast_and_reference_pipelines_forecast_the_same():
    frame = _smooth_frame(400)
    fast, fast_predictions, _ = _run(_scenario(horizon=2), frame)
    reference, reference_predictions, _ = _run(
        _scenario(horizon=2, model={"hidden": [16], "fast_path": False}), frame
    )
    assert fast.metrics()["live_path"]["path"] == "fast"
    assert reference.metrics()["live_path"]["path"] == "reference"

    def by_index(predictions):
        return {(p.key, p.issued_at, p.target, p.step): p.prediction for p in predictions}

    a, b = by_index(fast_predictions), by_index(reference_predictions)
    assert len(a) == len(fast_predictions) and a.keys() == b.keys()
    assert len(a) == (400 - PIPELINE_LOOKBACK + 1) * 2
    worst = max(abs(a[i] - b[i]) for i in a)
    assert worst <= 1e-3, worst
    fm, rm = fast.metrics(), reference.metrics()
    for count in ("rows", "forecasts", "learn_steps", "skipped_steps"):
        assert fm[count] == rm[count], count
    assert fm["learn_steps"] == 400 - PIPELINE_LOOKBACK + 1 - 2  # learnable once 2 rows later
    assert fm["mse"] == pytest.approx(rm["mse"], rel=1e-3)
    # The model learned something (the comparison above is not of two untouched models).
    assert fm["mse"] < 0.7 * fm["baseline_last_value"]["mse"]


@pytest.mark.parametrize("fast_path", [True, False])
def test_a_fresh_start_swap_says_which_path_went_live(fast_path):
    scenario = _scenario(
        features=[],
        model={"hidden": [16], "fast_path": fast_path},
        detector={"type": "adwin"},
        adaptation={"adapters": ["fresh_start"], "support_size": 48, "canary_size": 16},
    )
    pipeline, _, events = _run(scenario, _alternation_then_walk(), build_adapters(scenario))
    assert [e for e in events if e["type"] == "regime_change"]
    swaps = [e for e in events if e["type"] == "swap"]
    assert swaps, [e for e in events if e["type"] == "gate_decision"]
    assert pipeline.metrics()["swaps"] == len(swaps)
    for swap in swaps:
        assert swap["source"] == "fresh_start"
        assert swap["position"] > 300
        if fast_path:
            assert swap["live_path"]["path"] == "fast"
        else:
            assert swap["live_path"]["path"] == "reference"
            assert "fast_path is off" in swap["live_path"]["reason"]
    # The adapter proposed a reference learner; the swap moved it onto the fast path.
    assert isinstance(pipeline.learner, FastLearner) == fast_path
    assert pipeline.metrics()["live_path"] == swaps[-1]["live_path"]
    assert pipeline.learner.steps_ >= scenario.adaptation.canary_size


def test_a_pipeline_restored_from_its_state_is_on_the_fast_path_again():
    scenario = _scenario()
    frame = _smooth_frame(200)
    pipeline, _, _ = _run(scenario, frame.iloc[:100])
    restored = Pipeline(scenario)
    restored.load_state_dict(pipeline.state_dict())
    assert isinstance(restored.learner, FastLearner)
    assert restored.metrics()["live_path"]["path"] == "fast"
    probe = np.random.default_rng(0).normal(size=(4, PIPELINE_LOOKBACK, 2)).astype(np.float32)
    assert restored.learner.predict(probe).tobytes() == pipeline.learner.predict(probe).tobytes()
