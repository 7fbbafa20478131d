"""Tests for :mod:`neuralsync.learner`: the live model and its optimiser, really training."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from neuralsync.config import ModelConfig
from neuralsync.learner import OnlineLearner


def _learner(seed: int = 0, *, n_inputs=3, lookback=8, horizon=2, target_index=(2,), **config):
    torch.manual_seed(seed)
    return OnlineLearner(
        ModelConfig(**config),
        n_inputs=n_inputs,
        lookback=lookback,
        horizon=horizon,
        target_index=list(target_index),
    )


def _batch(seed: int = 0, n: int = 16, lookback=8, n_inputs=3, horizon=2, targets=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, (n, lookback, n_inputs)).astype(np.float32)
    y = rng.normal(0.0, 1.0, (n, horizon, targets)).astype(np.float32)
    return x, y


def _weights(learner: OnlineLearner) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in learner.module_.state_dict().items()}


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _sine_windows(n: int, lookback: int, horizon: int, offset: int = 0):
    """Windows of a sum of two sines and the values that follow them: learnable, not trivial."""
    t = np.arange(offset, offset + n + lookback + horizon, dtype=np.float64)
    series = np.sin(t / 3.0) + 0.5 * np.sin(t / 7.0)
    x = np.stack([series[i : i + lookback] for i in range(n)])[:, :, None]
    y = np.stack([series[i + lookback : i + lookback + horizon] for i in range(n)])[:, :, None]
    return x.astype(np.float32), y.astype(np.float32)


# -- the untrained model is the last-value forecast ---------------------------------------------


@pytest.mark.parametrize(
    ("model_type", "hidden", "activation"),
    [("mlp", [32], "relu"), ("mlp", [16, 8], "tanh"), ("linear", [32], "relu")],
)
def test_untrained_model_forecasts_exactly_the_last_value(model_type, hidden, activation):
    learner = _learner(
        n_inputs=4,
        horizon=3,
        target_index=(2, 0),
        type=model_type,
        hidden=hidden,
        activation=activation,
    )
    x = np.random.default_rng(1).normal(5.0, 3.0, (10, 8, 4)).astype(np.float32)
    forecast = learner.predict(x)
    assert forecast.shape == (10, 3, 2)
    expected = np.repeat(x[:, -1:, [2, 0]], 3, axis=1)
    assert forecast.tobytes() == expected.tobytes()
    head = learner.module_.net[-1]
    assert not head.weight.any() and not head.bias.any()


def test_without_subtract_last_the_model_is_not_the_last_value():
    learner = _learner(subtract_last=False)
    x, _ = _batch()
    assert not np.allclose(learner.predict(x), np.repeat(x[:, -1:, [2]], 2, axis=1))


# -- learning -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"lr": 0.05, "momentum": 0.9},
        {"optimizer": "adam", "lr": 0.003},
        {"type": "linear", "lr": 0.05},
    ],
)
def test_online_learning_reduces_the_error_on_a_learnable_series(config):
    lookback, horizon = 12, 2
    learner = _learner(n_inputs=1, lookback=lookback, horizon=horizon, target_index=(0,), **config)
    train_x, train_y = _sine_windows(600, lookback, horizon)
    test_x, test_y = _sine_windows(100, lookback, horizon, offset=5000)
    before = float(learner.squared_errors(test_x, test_y).mean())
    losses = []
    for start in range(0, 600, 4):  # one pass, small batches, in stream order
        losses.append(learner.learn(train_x[start : start + 4], train_y[start : start + 4]))
    after = float(learner.squared_errors(test_x, test_y).mean())
    assert learner.steps_ == 150
    assert after < 0.35 * before, (before, after)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])


def test_learn_returns_the_loss_before_the_step():
    learner = _learner()
    x, y = _batch()
    expected = float(learner.squared_errors(x, y).mean())
    assert learner.learn(x, y) == pytest.approx(expected, rel=1e-6)
    assert float(learner.squared_errors(x, y).mean()) < expected


def test_squared_errors_do_not_learn():
    learner = _learner()
    x, y = _batch()
    before = _weights(learner)
    errors = learner.squared_errors(torch.from_numpy(x), torch.from_numpy(y))
    assert errors.shape == (16,)
    assert _same_weights(before, _weights(learner)) and learner.steps_ == 0


# -- non-finite batches -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["window_nan", "window_inf", "truth_nan", "truth_inf"])
def test_non_finite_batch_is_skipped_without_touching_weights_or_optimiser(where):
    learner = _learner(momentum=0.9)
    x, y = _batch(seed=1)
    learner.learn(x, y)  # a real step first, so there is a momentum buffer to protect
    twin = learner.clone()
    bad_x, bad_y = _batch(seed=2)
    array, value = {
        "window_nan": (bad_x, np.nan),
        "window_inf": (bad_x, np.inf),
        "truth_nan": (bad_y, np.nan),
        "truth_inf": (bad_y, -np.inf),
    }[where]
    array[3, 0, 0] = value
    before = _weights(learner)
    loss = learner.learn(bad_x, bad_y)
    assert not np.isfinite(loss)
    assert _same_weights(before, _weights(learner))
    assert learner.steps_ == 1 and learner.skipped_steps_ == 1
    # The optimiser state survived too: the next good step equals the twin's, which never saw
    # the bad batch.
    x2, y2 = _batch(seed=3)
    assert learner.learn(x2, y2) == twin.learn(x2, y2)
    assert _same_weights(_weights(learner), _weights(twin))


def test_finite_loss_with_an_overflowing_gradient_is_skipped_by_gradient_clipping():
    learner = _learner(n_inputs=1, horizon=1, target_index=(0,))  # grad_clip defaults to 1.0
    x = np.zeros((1, 8, 1), dtype=np.float32)
    x[0, :-1, 0] = 1e30  # huge activations, yet the (last-value) forecast is finite
    y = np.full((1, 1, 1), 1e10, dtype=np.float32)
    before = _weights(learner)
    loss = learner.learn(x, y)
    assert not np.isfinite(loss)  # reported as not finite so the pipeline counts the skip
    assert learner.skipped_steps_ == 1 and learner.steps_ == 0
    assert _same_weights(before, _weights(learner))


def test_overflowing_gradient_without_clipping_is_skipped_too():
    learner = _learner(n_inputs=1, horizon=1, target_index=(0,), grad_clip=None)
    x = np.zeros((1, 8, 1), dtype=np.float32)
    x[0, :-1, 0] = 1e30
    y = np.full((1, 1, 1), 1e10, dtype=np.float32)
    # The loss itself is finite (1e20) but the gradient overflows: skipped, reported as such.
    assert not np.isfinite(learner.learn(x, y))
    assert learner.skipped_steps_ == 1 and learner.steps_ == 0
    assert all(torch.isfinite(v).all() for v in learner.module_.state_dict().values())


def test_dropout_is_off_when_predicting():
    learner = _learner(dropout=0.5)
    x, y = _batch()
    for _ in range(5):
        learner.learn(x, y)
    assert not learner.module_.training
    assert learner.predict(x).tobytes() == learner.predict(x).tobytes()


def test_dropout_is_off_when_predicting_after_a_skipped_step():
    learner = _learner(dropout=0.5)
    x, y = _batch()
    learner.learn(x, y)
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    learner.learn(bad, y)
    assert not learner.module_.training
    assert learner.predict(x).tobytes() == learner.predict(x).tobytes()


# -- clone --------------------------------------------------------------------------------------


def test_clone_is_independent_and_starts_equal():
    learner = _learner(optimizer="adam", lr=0.01)
    x, y = _batch(seed=4)
    for _ in range(3):
        learner.learn(x, y)
    twin = learner.clone()
    assert twin.module_ is not learner.module_ and twin.optimizer_ is not learner.optimizer_
    assert learner.predict(x).tobytes() == twin.predict(x).tobytes()
    original = _weights(learner)
    x2, y2 = _batch(seed=5)
    twin.learn(x2, y2)
    assert _same_weights(original, _weights(learner))  # training the clone leaves the original
    assert not _same_weights(original, _weights(twin))
    # Same optimiser state (Adam moments and step): the same step gives the same weights.
    learner.learn(x2, y2)
    assert _same_weights(_weights(learner), _weights(twin))
    twin_before = _weights(twin)
    learner.learn(x, y)
    assert _same_weights(twin_before, _weights(twin))  # and the other way round


# -- state --------------------------------------------------------------------------------------


def _round_trip(learner: OnlineLearner) -> OnlineLearner:
    buffer = io.BytesIO()
    torch.save(learner.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # as a checkpoint is loaded
    torch.manual_seed(12345)  # the rebuilt network's random init must not matter
    return OnlineLearner.from_state_dict(state, "cpu")


@pytest.mark.parametrize(
    "config",
    [
        {"optimizer": "adam", "lr": 0.01, "weight_decay": 1e-4},
        {"momentum": 0.9, "hidden": [16, 16], "activation": "gelu"},
        {"type": "linear", "grad_clip": None},
    ],
)
def test_state_round_trip_gives_identical_predictions_and_next_step(config):
    learner = _learner(**config)
    for seed in range(4):
        learner.learn(*_batch(seed=seed))
    restored = _round_trip(learner)
    assert restored.steps_ == learner.steps_ == 4
    assert restored.config == learner.config
    x, _ = _batch(seed=10)
    assert restored.predict(x).tobytes() == learner.predict(x).tobytes()
    for seed in (11, 12):
        assert restored.learn(*_batch(seed=seed)) == learner.learn(*_batch(seed=seed))
    assert _same_weights(_weights(restored), _weights(learner))
    assert restored.predict(x).tobytes() == learner.predict(x).tobytes()


def test_state_round_trip_without_the_optimiser_state_would_differ():
    """The round trip test can fail: weights alone do not continue the same run."""
    learner = _learner(optimizer="adam", lr=0.01)
    for seed in range(4):
        learner.learn(*_batch(seed=seed))
    weights_only = _learner(seed=1, optimizer="adam", lr=0.01)
    weights_only.module_.load_state_dict(learner.module_.state_dict())
    learner.learn(*_batch(seed=11))
    weights_only.learn(*_batch(seed=11))
    assert not _same_weights(_weights(learner), _weights(weights_only))


# -- determinism --------------------------------------------------------------------------------


def test_same_seed_same_weights_after_many_steps():
    a, b = _learner(seed=7, hidden=[16]), _learner(seed=7, hidden=[16])
    for seed in range(30):
        x, y = _batch(seed=seed)
        assert a.learn(x, y) == b.learn(x, y)
    assert _same_weights(_weights(a), _weights(b))
    c = _learner(seed=8, hidden=[16])
    assert not _same_weights(_weights(a), _weights(c))
    for seed in range(30):
        c.learn(*_batch(seed=seed))
    x, _ = _batch(seed=99)
    assert a.predict(x).tobytes() != c.predict(x).tobytes()


def test_spec_rebuilds_the_same_architecture():
    learner = _learner(hidden=[5, 7], n_inputs=2, target_index=(1,))
    spec = learner.spec()
    assert spec["n_inputs"] == 2 and spec["lookback"] == 8 and spec["horizon"] == 2
    assert spec["config"]["hidden"] == [5, 7] and spec["target_index"] == [1]
    shapes = {k: tuple(v.shape) for k, v in learner.module_.state_dict().items()}
    assert shapes["net.0.weight"] == (5, 16) and shapes["net.4.weight"] == (2, 7)
