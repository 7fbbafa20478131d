"""Recursive least squares and the ``rls`` live model (neuralsync.rls)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuralsync import OnlineForecaster
from neuralsync.config import ModelConfig
from neuralsync.rls import CANDIDATES, RLS, RLSLearner, learner_from_state_dict


def _series(n: int, d: int = 3, seed: int = 0) -> np.ndarray:
    """Noisy coupled oscillations with a slow drift: learnable, not trivial."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None]
    phases = rng.uniform(0, 6, d)
    base = np.sin(t / (6.0 + np.arange(d)) + phases) + 0.002 * t
    return base + 0.1 * rng.normal(size=(n, d))


def _windows(n: int, lookback: int = 12, horizon: int = 2):
    series = _series(n + lookback + horizon, d=3).astype(np.float32)
    x = np.stack([series[i : i + lookback] for i in range(n)])
    y = np.stack([series[i + lookback : i + lookback + horizon] for i in range(n)])
    return x, y


def test_rls_is_exact_discounted_ridge():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(120, 5)), rng.normal(size=(120, 2))
    alpha, forgetting = 2.0, 0.97
    rls = RLS(5, 2, alpha, forgetting)
    for i in range(0, 120, 3):  # blocks of 3 rows, one forgetting step each
        rls.learn(x[i : i + 3], y[i : i + 3])
    blocks = np.repeat(np.arange(40), 3)
    weights = forgetting ** (39 - blocks)
    gram = (x * weights[:, None]).T @ x + alpha * forgetting**40 * np.eye(5)
    expected = np.linalg.solve(gram, (x * weights[:, None]).T @ y)
    np.testing.assert_allclose(rls.W_, expected, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(rls.covariance_, np.linalg.inv(gram), rtol=1e-6, atol=1e-10)
    with pytest.raises(ValueError, match="forgetting"):
        RLS(2, 1, forgetting=1.5)


def test_rls_stays_exact_over_a_long_run_with_forgetting():
    # With forgetting, rounding that makes P asymmetric grows by 1 / forgetting a step: an
    # update of the full matrix drifted to errors of order 1 here after 6,000 rows.
    rng = np.random.default_rng(2)
    n, forgetting = 6000, 0.99
    x = rng.normal(size=(n, 6))
    y = x @ rng.normal(size=(6, 2)) + 0.1 * rng.normal(size=(n, 2))
    rls = RLS(6, 2, alpha=1.0, forgetting=forgetting)
    for i in range(n):
        rls.learn(x[i : i + 1], y[i : i + 1])
    weights = forgetting ** np.arange(n - 1, -1, -1)[:, None]
    expected = np.linalg.solve((x * weights).T @ x, (x * weights).T @ y)
    np.testing.assert_allclose(rls.W_, expected, rtol=1e-9, atol=1e-12)
    covariance = rls.covariance_
    assert np.array_equal(covariance, covariance.T)


def test_rls_caps_the_variance_of_what_the_inputs_stop_exciting():
    # Column 1 is zero, column 2 stops moving half-way: without a cap their variances grow
    # by 1 / forgetting a block, and overflow (0.9 ** -8000 is beyond float64).
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8000, 3))
    x[:, 1] = 0.0
    x[4000:, 2] = 0.0
    y = x @ np.array([[1.0], [0.0], [-1.0]])
    rls = RLS(3, 1, alpha=4.0, forgetting=0.9)
    for i in range(0, 8000, 2):
        rls.learn(x[i : i + 2], y[i : i + 2])
    variances = np.diagonal(rls.covariance_)
    assert np.isfinite(rls.covariance_).all() and variances[0] < 0.1
    np.testing.assert_allclose(variances[1:], 0.25)  # the prior's, 1 / alpha
    assert np.all(np.linalg.eigvalsh(rls.covariance_) > 0)
    np.testing.assert_allclose(rls.W_.ravel(), [1.0, 0.0, -1.0], atol=1e-9)
    np.testing.assert_allclose(rls.predict(x[-5:]), y[-5:], atol=1e-9)


# -- the RLS live model ------------------------------------------------------------------------


def test_rls_learner_state_round_trip_and_clone():
    x, y = _windows(160)
    _, learner = _stream_mixture(x[:100], y[:100], 2, ModelConfig(type="rls"), 0)
    twin = learner_from_state_dict(learner.state_dict(), "cpu")
    clone = learner.clone()
    assert isinstance(twin, RLSLearner) and twin.issued_.keys() == learner.issued_.keys()
    for model in (learner, twin, clone):
        for i in range(100, 160):
            model.predict(x[i : i + 1])
            model.learn(x[i - 2 : i - 1], y[i - 2 : i - 1])
    for other in (twin, clone):
        np.testing.assert_array_equal(other.predict(x[:4]), learner.predict(x[:4]))
        np.testing.assert_array_equal(other.weights_, learner.weights_)
    assert learner.weights_.shape == (2, 3, 3)
    errors = learner.squared_errors(torch.from_numpy(x[:4]), torch.from_numpy(y[:4]))
    expected = ((learner.predict(x[:4]) - y[:4]) ** 2).reshape(4, -1).mean(1)
    np.testing.assert_allclose(errors.numpy(), expected, rtol=1e-5)
    assert np.isnan(learner.learn(x[:1] * np.nan, y[:1])) and learner.skipped_steps_ == 1


def test_rls_learner_beats_its_network_alone_and_never_looks_ahead():
    series = _series(1500, d=1)[:, 0]

    def run(values, model_type):
        model = OnlineForecaster(
            lookback=16, horizon=2, detector={"type": "none"}, model={"type": model_type}
        )
        out = []
        for value in values:
            model.learn_one(float(value))
            out.append(model.forecast())
        return out, model.metrics()["mse"]

    original, mse_rls = run(series, "rls")
    _, mse_mlp = run(series, "mlp")
    assert mse_rls < 0.8 * mse_mlp
    changed = series.copy()
    changed[1000:] += 3.0
    rewritten, _ = run(changed, "rls")
    before, after = np.array(original, dtype=float), np.array(rewritten, dtype=float)
    np.testing.assert_array_equal(after[:1000], before[:1000])  # NaN until the first forecast
    assert not np.array_equal(after[1000:], before[1000:], equal_nan=True)


def test_relative_window_expert_ignores_a_level_shift():
    """With ``rls_window: relative`` every expert sees the window relative to its last value: a
    level the past never reached (ETTh2's test period) shifts the forecast by that level and
    changes nothing else."""
    torch.manual_seed(0)
    x, y = _windows(200)
    learner = RLSLearner(ModelConfig(type="rls", rls_window="relative"), 3, 12, 2, [0, 1, 2])
    for i in range(150):
        learner.learn(x[i : i + 1], y[i : i + 1])
    shifted = learner.predict(x[150:160] + 50.0) - 50.0
    np.testing.assert_allclose(shifted, learner.predict(x[150:160]), atol=1e-3)


def test_window_expert_over_levels_learns_a_pull_towards_a_level():
    # AR(1) around a level of 2, halfway back each step: the next change is -(x - 2) / 2 plus
    # noise. Relative to its last value a window of two shows only x[t-1] - x[t], which tells
    # a quarter of that pull's variance.
    rng = np.random.default_rng(0)
    series = np.empty(3000)
    series[0] = 2.0
    for t in range(1, 3000):
        series[t] = 2.0 + 0.5 * (series[t - 1] - 2.0) + 0.5 * rng.normal()
    x = np.stack([series[i : i + 2] for i in range(2990)])[..., None]
    y = series[2:2992, None, None]
    errors = {}
    for inputs in ("levels", "relative"):
        torch.manual_seed(0)
        learner = RLSLearner(ModelConfig(type="rls", rls_window=inputs), 1, 2, 1, [0])
        window_errors = []
        for i in range(2990):
            if i >= 2000:
                change = learner.candidates(x[i : i + 1])[0, 0, 0, CANDIDATES.index("window")]
                window_errors.append((x[i, -1, 0] + change - y[i, 0, 0]) ** 2)
            learner.learn(x[i : i + 1], y[i : i + 1])
        errors[inputs] = np.mean(window_errors)
    # The best forecast's error is the noise's variance, 0.25; without the level, 0.3125.
    assert errors["levels"] < 0.26 < 0.28 < errors["relative"]


def test_the_window_expert_has_its_own_forgetting_and_penalty_when_told():
    def window(**settings):
        config = ModelConfig(type="rls", rls_forgetting=0.99, rls_alpha=2.0, **settings)
        learner = RLSLearner(config, n_inputs=4, lookback=3, horizon=2, target_index=[0])
        twin = learner_from_state_dict(learner.state_dict(), "cpu")
        assert twin.window_.forgetting == learner.window_.forgetting  # kept by a checkpoint
        assert twin.window_.alpha == learner.window_.alpha
        assert learner.channel_.forgetting == 0.99 and learner.channel_.alpha == 2.0
        return learner.window_.forgetting, learner.window_.alpha

    # By default a ridge penalty of 100 and no forgetting; unset, it forgets n_inputs times
    # slower than the channel expert, with its penalty.
    assert window() == (1.0, 100.0)
    assert window(rls_window_forgetting=None, rls_window_alpha=None) == (
        pytest.approx(1 - 0.01 / 4),
        2.0,
    )
    assert window(rls_window_forgetting=0.9, rls_window_alpha=5.0) == (0.9, 5.0)
    with pytest.raises(ValueError, match="rls_window_forgetting"):
        ModelConfig(type="rls", rls_window_forgetting=1.5)
    with pytest.raises(ValueError, match="rls_window_alpha"):
        ModelConfig(type="rls", rls_window_alpha=0.0)


def _window_change(learner: RLSLearner, windows: np.ndarray) -> np.ndarray:
    return learner.candidates(windows)[..., CANDIDATES.index("window")]


def test_the_window_expert_does_not_extrapolate_a_level_far_outside_what_it_learned():
    """ETTh2's test period goes 51 standard deviations outside its train rows, where a linear
    map over levels extrapolates. Clipped (the default), the window expert's forecast for a
    window shifted far out saturates; unclipped, it goes on moving with the shift."""
    x, y = _windows(200)

    def trained(clip: float | None) -> RLSLearner:
        torch.manual_seed(0)
        config = ModelConfig(type="rls", rls_window_clip=clip)
        learner = RLSLearner(config, n_inputs=3, lookback=12, horizon=2, target_index=[0, 1, 2])
        for i in range(150):
            learner.learn(x[i : i + 1], y[i : i + 1])
        return learner

    clipped, unclipped = trained(3.0), trained(None)
    far, farther = x[150:151] + 50.0, x[150:151] + 100.0
    np.testing.assert_allclose(
        _window_change(clipped, far), _window_change(clipped, farther), atol=1e-9
    )
    drift = np.abs(_window_change(unclipped, farther) - _window_change(unclipped, far)).max()
    assert drift > 1.0
    # Inside the rows it learned from the clip changes little.
    inside = np.abs(_window_change(clipped, x[150:151]) - _window_change(unclipped, x[150:151]))
    assert inside.max() < 0.1 * drift


def test_the_window_clip_scale_is_that_of_the_rows_learned_from():
    x, y = _windows(200)
    learner = RLSLearner(ModelConfig(type="rls"), 3, 12, 2, [0, 1, 2])
    for i in range(150):  # consecutive windows: rows 0 to 160 of the series
        learner.learn(x[i : i + 1], y[i : i + 1])
    rows = np.concatenate([x[0], x[1:150, -1]]).astype(np.float64)
    assert learner.levels_.n_ == len(rows) == 161
    np.testing.assert_allclose(learner.levels_.mean_, rows.mean(0), rtol=1e-12)
    np.testing.assert_allclose(
        np.sqrt(learner.levels_.m2_ / learner.levels_.n_), rows.std(0), rtol=1e-10
    )
    with pytest.raises(ValueError, match="rls_window_clip"):
        ModelConfig(type="rls", rls_window_clip=0.0)


def _first_order(n: int, lookback: int = 24, horizon: int = 4, seed: int = 0):
    """Windows of a first-order system with an observed driver (``scenarios/recurring.csv``'s
    form): the last row holds all the window says about the future."""
    rng = np.random.default_rng(seed)
    rows = n + lookback + horizon
    driver, value = np.zeros(rows), np.zeros(rows)
    for t in range(1, rows):
        driver[t] = 0.8 * driver[t - 1] + rng.normal()
        value[t] = 0.9 * value[t - 1] + 0.5 * driver[t - 1] + 0.5 * rng.normal()
    series = np.stack([driver, value], axis=1).astype(np.float32)
    x = np.stack([series[i : i + lookback] for i in range(n)])
    y = np.stack([series[i + lookback : i + lookback + horizon] for i in range(n)])
    return x, y


def test_the_window_expert_over_the_last_row_has_fewer_weights_to_learn():
    x, y = _first_order(600)
    errors = {}
    for lags in (None, 1):
        config = ModelConfig(type="rls", rls_window_lags=lags)
        _, learner = _stream_mixture(x[:400], y[:400], 4, config, 0)
        assert learner.window_.W_.shape == ((lags or 24) * 2 + 1, 4 * 2)
        change = _window_change(learner, x[400:])
        errors[lags] = float(((x[400:, -1:, :] + change - y[400:]) ** 2).mean())
    # 49 weights per output against 3, from 400 samples: the whole window's map is noisier.
    assert errors[1] < 0.95 * errors[None]


def test_the_window_expert_reads_only_its_last_rows():
    x, y = _first_order(60, lookback=8)
    torch.manual_seed(0)
    config = ModelConfig(type="rls", rls_window_lags=2)
    learner = RLSLearner(config, n_inputs=2, lookback=8, horizon=4, target_index=[0, 1])
    for i in range(50):
        learner.learn(x[i : i + 1], y[i : i + 1])
    earlier_rows_changed = x[50:51].copy()
    earlier_rows_changed[:, :-2] += 10.0
    np.testing.assert_array_equal(
        _window_change(learner, earlier_rows_changed), _window_change(learner, x[50:51])
    )
    twin = learner_from_state_dict(learner.state_dict(), "cpu")
    assert twin.config.rls_window_lags == 2
    np.testing.assert_array_equal(twin.predict(x[50:55]), learner.predict(x[50:55]))
    assert (
        learner.with_network(learner.module_, ModelConfig(type="mlp")).config.rls_window_lags == 2
    )
    with pytest.raises(
        ValueError, match=r"rls_window_lags: expected at most the lookback \(8 rows\), got 9"
    ):
        RLSLearner(ModelConfig(type="rls", rls_window_lags=9), 2, 8, 4, [0, 1])
    with pytest.raises(ValueError, match="rls_window_lags"):
        ModelConfig(type="rls", rls_window_lags=0)


def test_a_checkpoint_from_before_the_window_settings_keeps_its_window_expert():
    """Written before ``rls_window_alpha``, ``rls_window_forgetting`` and ``rls_window_clip``
    existed: its window expert goes on with the penalty, forgetting and unclipped inputs it
    was written with."""
    x, y = _windows(140)
    then = {"rls_window_alpha": None, "rls_window_forgetting": None, "rls_window_clip": None}
    config = ModelConfig(type="rls", **then)
    _, learner = _stream_mixture(x[:100], y[:100], 2, config, 0)
    state = learner.state_dict()
    for key in then:
        del state["spec"]["config"][key]
    del state["rls"]["levels"]
    old = learner_from_state_dict(state, "cpu")
    assert {key: getattr(old.config, key) for key in then} == then
    assert old.window_.forgetting == learner.window_.forgetting < 1.0
    for model in (learner, old):
        for i in range(100, 140):
            model.predict(x[i : i + 1])
            model.learn(x[i - 2 : i - 1], y[i - 2 : i - 1])
    np.testing.assert_array_equal(old.predict(x[:4]), learner.predict(x[:4]))


def test_a_checkpoint_from_before_rls_window_keeps_relative_inputs():
    torch.manual_seed(0)
    x, y = _windows(60)
    learner = RLSLearner(ModelConfig(type="rls", rls_window="relative"), 3, 12, 2, [0, 1, 2])
    for i in range(50):
        learner.learn(x[i : i + 1], y[i : i + 1])
    state = learner.state_dict()
    del state["spec"]["config"]["rls_window"]  # as written before the setting existed
    twin = learner_from_state_dict(state, "cpu")
    assert twin.config.rls_window == "relative"
    np.testing.assert_array_equal(twin.predict(x[50:60]), learner.predict(x[50:60]))


def test_with_network_keeps_the_experts_and_survives_a_checkpoint():
    torch.manual_seed(0)
    x, y = _windows(120)
    live = RLSLearner(ModelConfig(type="rls"), 3, 12, 2, [0, 1, 2])
    for i in range(100):
        live.learn(x[i : i + 1], y[i : i + 1])
    # A proposal with another network (here: no hidden layer, as a "linear" genome gives).
    linear = ModelConfig(type="linear")
    other = RLSLearner(ModelConfig(type="rls", hidden=[]), 3, 12, 2, [0, 1, 2]).module_
    proposal = live.with_network(other, linear)
    assert proposal.config.type == "rls" and proposal.config.hidden == []
    np.testing.assert_array_equal(proposal.channel_.W_, live.channel_.W_)
    np.testing.assert_array_equal(proposal.weights_, live.weights_)
    proposal.learn(x[100:101], y[100:101])  # learning changes the proposal, not the live model
    assert not np.array_equal(proposal.channel_.W_, live.channel_.W_)
    twin = learner_from_state_dict(proposal.state_dict(), "cpu")
    np.testing.assert_array_equal(twin.predict(x[101:105]), proposal.predict(x[101:105]))


def test_a_pipeline_with_an_rls_model_resumes_bit_identically_with_adaptation_on():
    """The pipeline rebuilds an ``rls`` live model (and a probation shadow) with its experts:
    stopped halfway, snapshot, restored, it ends where an uninterrupted run ends."""
    import copy

    import pandas as pd

    from neuralsync.adaptation import build_adapters
    from neuralsync.config import Scenario
    from neuralsync.pipeline import Pipeline
    from neuralsync.sources import DataFrameSource
    from neuralsync.state import state_digest

    rng = np.random.default_rng(0)
    t = np.arange(900, dtype=float)
    y = np.where(t < 450, np.sin(t / 7.0), 2.0 + np.sin(t / 3.0)) + rng.normal(0, 0.05, 900)
    frame = pd.DataFrame({"t": t, "y": y})
    scenario = Scenario(
        name="rls",
        timestamp="t",
        targets="y",
        lookback=8,
        model={"type": "rls", "hidden": [8]},
        detector={"type": "adwin", "params": {"delta": 0.01}},
        adaptation={
            "canary_size": 16,
            "evolution": {"population": 3, "generations": 1, "window": 64, "result_delay": 32},
        },
    )

    def feed(pipeline, start=0, stop=None):
        source = DataFrameSource(frame.iloc[:stop], timestamp="t", columns=["y"], chunk_size=50)
        source.seek(start)
        return [p.prediction for batch in source for p in pipeline.process(batch)]

    straight = Pipeline(scenario, adapters=build_adapters(scenario))
    expected = feed(straight)
    first = Pipeline(scenario, adapters=build_adapters(scenario))
    head = feed(first, stop=500)
    snapshot = copy.deepcopy(first.state_dict())
    second = Pipeline(scenario, adapters=build_adapters(scenario))
    second.load_state_dict(snapshot)
    assert type(second.learner).__name__ == "RLSLearner"
    tail = feed(second, start=500)
    assert head + tail == expected
    assert state_digest(second.state_dict()) == state_digest(straight.state_dict())


def test_track_records_score_each_candidate_as_it_was_issued():
    """With no forgetting, the last value's record is the plain sum of its squared errors, and
    the mixture's the sum of the losses `learn` reported while the mixture forecast."""
    torch.manual_seed(0)
    x, y = _windows(120)
    config = ModelConfig(type="rls", mixture_forgetting=1.0, rls_selection="mixture")
    learner = RLSLearner(config, 3, 12, 2, [0, 1, 2])
    losses = []
    for i in range(120):
        learner.predict(x[i : i + 1])
        if i >= 2:  # learned two steps late, as a horizon of 2 is
            losses.append(learner.learn(x[i - 2 : i - 1], y[i - 2 : i - 1]))
    last = x[:118, -1:, :].astype(np.float64)
    last_value_errors = ((y[:118] - last) ** 2).sum(0)
    np.testing.assert_allclose(learner.track_[..., -1], last_value_errors, rtol=1e-6)
    np.testing.assert_allclose(learner.track_[..., 0].sum(), sum(losses) * 2 * 3, rtol=1e-9)


def test_the_leader_falls_back_to_the_last_value_on_a_random_walk():
    """On a random walk nothing beats the last value; the mixture of noisy experts does worse,
    and the leader and best selections learn to forecast the last value."""
    rng = np.random.default_rng(1)
    walk = np.cumsum(rng.normal(size=(1400, 2)), axis=0).astype(np.float32)
    lookback, horizon = 8, 4
    x = np.stack([walk[i : i + lookback] for i in range(1400 - lookback - horizon)])
    y = np.stack([walk[i + lookback : i + lookback + horizon] for i in range(len(x))])
    scores = {}
    for selection in ("mixture", "leader", "best"):
        torch.manual_seed(0)
        config = ModelConfig(type="rls", rls_selection=selection, lr=0.05)
        learner = RLSLearner(config, 2, lookback, horizon, [0, 1])
        errors = []
        for i in range(len(x)):
            forecast = learner.predict(x[i : i + 1])
            if i >= 600:
                errors.append(float(((forecast - y[i : i + 1]) ** 2).mean()))
            if i >= horizon:
                learner.learn(x[i - horizon : i - horizon + 1], y[i - horizon : i - horizon + 1])
        scores[selection] = np.mean(errors)
        if selection == "leader":
            leaders = learner.track_.argmin(-1)
    last_value = float(((y[600:] - x[600:, -1:, :]) ** 2).mean())
    assert scores["mixture"] > last_value  # the case the selection is for
    assert scores["leader"] < scores["mixture"]
    assert scores["leader"] < 1.02 * last_value
    assert (leaders == CANDIDATES.index("last_value")).mean() >= 0.5
    assert scores["best"] < scores["mixture"] and scores["best"] < 1.02 * last_value


def test_best_forecasts_one_candidate_by_records_of_their_own_memory():
    """``best`` forecasts, for every step and target, the one candidate whose records summed
    over them are lowest; those records forget at ``selection_forgetting`` per window, not at
    the mixture's memory (``horizon`` times slower)."""
    x, y = _windows(200)
    horizon = 2
    learners = {}
    for memory in (None, 0.9):
        torch.manual_seed(0)
        config = ModelConfig(type="rls", rls_selection="best", selection_forgetting=memory)
        learner = RLSLearner(config, 3, 12, horizon, [0, 1, 2])
        issued = []
        for i in range(150):
            issued.append(learner.issue(x[i : i + 1])[1][0])
            if i >= horizon:
                before = learner.track_.copy()
                j = i - horizon
                learner.learn(x[j : j + 1], y[j : j + 1])
        errors = (issued[j] - (y[j] - x[j, -1])[..., None]) ** 2
        decay = 1 - (1 - 0.999) / horizon if memory is None else memory
        np.testing.assert_allclose(learner.track_, decay * before + errors, rtol=1e-6)
        forecast, candidates = learner.issue(x[150:151])
        best = int(learner.track_.sum((0, 1)).argmin())
        np.testing.assert_allclose(forecast[0], x[150, -1] + candidates[0, ..., best], rtol=1e-6)
        learners[memory] = learner
    # A record that forgets in ten windows ranks the candidates on recent windows only.
    assert not np.allclose(learners[None].track_, learners[0.9].track_)


def _random_walk(n: int = 1400, lookback: int = 8, horizon: int = 4, seed: int = 1):
    rng = np.random.default_rng(seed)
    walk = np.cumsum(rng.normal(size=(n, 2)), axis=0).astype(np.float32)
    x = np.stack([walk[i : i + lookback] for i in range(n - lookback - horizon)])
    y = np.stack([walk[i + lookback : i + lookback + horizon] for i in range(len(x))])
    return x, y


def _stream_mixture(x, y, horizon, config, score_from):
    """Test-then-train with a label delay of ``horizon``; the mean squared error from
    ``score_from`` on, and the learner."""
    torch.manual_seed(0)
    learner = RLSLearner(config, x.shape[2], x.shape[1], horizon, list(range(x.shape[2])))
    errors = []
    for i in range(len(x)):
        forecast = learner.predict(x[i : i + 1])
        if i >= score_from:
            errors.append(float(((forecast - y[i : i + 1]) ** 2).mean()))
        if i >= horizon:
            learner.learn(x[i - horizon : i - horizon + 1], y[i - horizon : i - horizon + 1])
    return float(np.mean(errors)), learner


def test_the_mixture_shrinks_towards_the_last_value_where_the_experts_do_not_forecast():
    """On a random walk the strongest shrinkage leads and the forecast stays within 1 % of
    the last value's error; where the experts forecast well the weakest leads."""
    x, y = _random_walk()
    mse, learner = _stream_mixture(x, y, 4, ModelConfig(type="rls", lr=0.05), 600)
    last_value = float(((y[600:] - x[600:, -1:, :]) ** 2).mean())
    assert learner.shrinkage_track_.argmin() == len(learner.shrinkage_) - 1
    assert mse < 1.01 * last_value
    # With the weakest prior alone (no choice) the mixture follows its noisy experts further.
    weak, _ = _stream_mixture(
        x, y, 4, ModelConfig(type="rls", lr=0.05, mixture_shrinkage=[1.0]), 600
    )
    assert weak > mse

    x, y = _windows(600)
    _, learner = _stream_mixture(x, y, 2, ModelConfig(type="rls"), 0)
    assert learner.shrinkage_track_.argmin() == 0
    np.testing.assert_array_equal(learner.weights_, learner.shrunk_weights_[0])


def test_the_mixture_prior_is_measured_in_samples_of_the_target_scale():
    """The same setting means the same on every scale: statistics of a series multiplied by
    ``c`` give the same weights."""
    rng = np.random.default_rng(0)
    learner = RLSLearner(ModelConfig(type="rls"), 2, 6, 3, [0, 1])
    changes = rng.normal(size=(50, 3, 2, 3))
    target = changes @ np.array([0.6, 0.3, 0.0]) + rng.normal(size=(50, 3, 2))
    weights = []
    for c in (1.0, 1e-3, 1e3):
        learner.gram_ = np.einsum("bhte,bhtf->htef", c * changes, c * changes)
        learner.moment_ = np.einsum("bhte,bht->hte", c * changes, c * target)
        learner.target_square_ = ((c * target) ** 2).sum(0)
        learner.target_count_ = 50.0
        weights.append(learner._mixture_weights())
    np.testing.assert_allclose(weights[1], weights[0], rtol=1e-9)
    np.testing.assert_allclose(weights[2], weights[0], rtol=1e-9)
    # One set per strength, each shrunk further towards zero than the one before.
    norms = np.linalg.norm(weights[0].reshape(len(weights[0]), -1), axis=1)
    assert weights[0].shape == (4, 3, 2, 3) and (np.diff(norms) < 0).all()


def test_the_shrinkage_record_scores_every_strength_as_issued():
    """With one strength and no forgetting its record is the mixture's own: the sum of its
    squared errors over every step and target."""
    torch.manual_seed(0)
    x, y = _windows(120)
    config = ModelConfig(type="rls", mixture_forgetting=1.0, mixture_shrinkage=[10.0])
    _, learner = _stream_mixture(x, y, 2, config, 0)
    np.testing.assert_allclose(learner.shrinkage_track_[0], learner.track_[..., 0].sum(), rtol=1e-9)


def test_mixture_shrinkage_must_name_positive_strengths():
    with pytest.raises(ValueError, match="mixture_shrinkage"):
        ModelConfig(type="rls", mixture_shrinkage=[])
    with pytest.raises(ValueError, match="mixture_shrinkage"):
        ModelConfig(type="rls", mixture_shrinkage=[10.0, 0.0])


def test_a_checkpoint_from_before_the_online_shrinkage_loads_and_learns():
    """Written before the setting existed: no shrinkage statistics, forecasts pending with the
    candidates only. It forecasts with its weights as saved and goes on learning."""
    x, y = _windows(140)
    _, learner = _stream_mixture(x[:100], y[:100], 2, ModelConfig(type="rls"), 0)
    state = learner.state_dict()
    for key in ("target_square", "target_count", "shrunk_weights", "shrinkage_track"):
        del state["rls"][key]
    state["rls"]["weights"] = torch.from_numpy(learner.weights_.copy())  # the one set then
    state["rls"]["issued"] = state["rls"]["issued"][..., : len(CANDIDATES)]
    del state["spec"]["config"]["mixture_shrinkage"]
    old = learner_from_state_dict(state, "cpu")
    np.testing.assert_array_equal(old.predict(x[100:104]), learner.predict(x[100:104]))
    for i in range(100, 140):
        old.predict(x[i : i + 1])
        assert np.isfinite(old.learn(x[i - 2 : i - 1], y[i - 2 : i - 1]))
    assert old.target_count_ > 0 and np.isfinite(old.predict(x[:4])).all()


def _glitched_walk(n: int = 700, lookback: int = 16, glitch: int = 600):
    """A 4-column random walk with one bad row: every column 40 of its moves away for that
    row only (exchange_rate.csv has such rows). Windows, and the row after each."""
    rng = np.random.default_rng(0)
    walk = np.cumsum(rng.normal(0.0, 0.05, size=(n, 4)), axis=0).astype(np.float32)
    walk[glitch] += 2.0
    x = np.stack([walk[i : i + lookback] for i in range(n - lookback)])
    return x, walk[lookback:, None, :]


def test_the_mixture_never_forecasts_beyond_every_expert_and_the_last_value():
    """The sample that ended on a bad row taught the unbounded mixture a weight far from what
    every other sample says, and it forecast the next row ~7 away where no expert erred by
    more than 1.6; bounded to the span of the experts and the last value, it cannot."""
    x, y = _glitched_walk()
    after = 600 - 15 + 1  # the window whose last-but-one row is the bad one
    worst = {}
    for hull in (False, True):
        torch.manual_seed(0)
        config = ModelConfig(type="rls", lr=0.01, mixture_hull=hull)
        learner = RLSLearner(config, 4, 16, 1, [0, 1, 2, 3])
        for i in range(after + 1):
            if i >= 1:
                learner.learn(x[i - 1 : i], y[i - 1 : i])
            forecast, candidates = learner.issue(x[i : i + 1])
        last = x[after, -1]
        change = forecast[0] - last
        experts = candidates[0][..., 1:]  # each expert, and the last value (zero change)
        inside = (change >= experts.min(-1) - 1e-6) & (change <= experts.max(-1) + 1e-6)
        assert inside.all() == hull
        worst[hull] = float(np.abs(forecast[0] - y[after]).max())
        expert_worst = float(np.abs(last[None, :, None] + experts - y[after][..., None]).max())
    assert worst[False] > 3 * expert_worst
    assert worst[True] <= expert_worst + 1e-6


def test_a_checkpoint_from_before_the_bound_forecasts_unbounded():
    """Written before ``mixture_hull`` existed: it goes on forecasting as it was written, the
    mixture unbounded, exactly as a learner told ``mixture_hull: false``."""
    x, y = _glitched_walk()
    unbounded = ModelConfig(type="rls", lr=0.01, mixture_hull=False)
    torch.manual_seed(0)
    learner = RLSLearner(unbounded, 4, 16, 1, [0, 1, 2, 3])
    for i in range(586):  # up to the sample that ends on the bad row
        learner.learn(x[i : i + 1], y[i : i + 1])
    state = learner.state_dict()
    del state["spec"]["config"]["mixture_hull"]
    old = learner_from_state_dict(state, "cpu")
    assert old.config.mixture_hull is False
    np.testing.assert_array_equal(old.predict(x[586:587]), learner.predict(x[586:587]))
    # The window after the bad row: the unbounded forecast is what a bounded one cannot be.
    bounded = learner_from_state_dict(learner.state_dict(), "cpu")
    bounded.config = bounded.config.model_copy(update={"mixture_hull": True})
    assert np.abs(bounded.predict(x[586:587]) - old.predict(x[586:587])).max() > 1.0
