"""Tests for :mod:`neuralsync.scaling`: online per-column normalisation from the past only."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
import torch

from neuralsync.scaling import OnlineScaler


def _rows(n: int = 300, seed: int = 0) -> np.ndarray:
    """Three columns at very different levels and scales."""
    rng = np.random.default_rng(seed)
    return np.column_stack(
        [rng.normal(5.0, 2.0, n), rng.normal(-1000.0, 50.0, n), rng.exponential(0.01, n)]
    )


def _feed(scaler: OnlineScaler, rows: np.ndarray) -> None:
    for row in rows:
        scaler.learn_one(row)


# -- running ------------------------------------------------------------------------------------


def test_running_matches_prefix_mean_and_population_std_after_every_row():
    rows = _rows(200)
    scaler = OnlineScaler(3, "running")
    for n, row in enumerate(rows, start=1):
        scaler.learn_one(row)
        np.testing.assert_allclose(scaler.mean_, rows[:n].mean(axis=0), rtol=1e-12, atol=1e-12)
        if n >= 2:
            np.testing.assert_allclose(scaler.std, rows[:n].std(axis=0), rtol=1e-9)
    assert scaler.n_ == 200


def test_running_transform_is_z_score_with_current_statistics():
    rows = _rows(100)
    scaler = OnlineScaler(3)
    _feed(scaler, rows)
    window = rows[-8:]
    expected = (window - rows.mean(axis=0)) / rows.std(axis=0)
    np.testing.assert_allclose(scaler.transform(window), expected, rtol=1e-9)
    # any leading shape: a batch of windows
    batch = np.stack([window, window * 2])
    assert scaler.transform(batch).shape == (2, 8, 3)
    np.testing.assert_allclose(scaler.transform(batch)[1], (window * 2 - scaler.mean_) / scaler.std)


def test_std_is_one_before_two_rows_and_for_constant_columns():
    scaler = OnlineScaler(2)
    np.testing.assert_array_equal(scaler.std, [1.0, 1.0])
    scaler.learn_one(np.array([3.0, 7.0]))
    np.testing.assert_array_equal(scaler.std, [1.0, 1.0])
    np.testing.assert_array_equal(scaler.center, [3.0, 7.0])
    for value in (4.0, 5.0, 6.0):
        scaler.learn_one(np.array([value, 7.0]))  # second column stays constant
    assert scaler.std[0] == pytest.approx(np.std([3.0, 4.0, 5.0, 6.0]))
    assert scaler.std[1] == 1.0  # a zero std would divide by zero; it is floored to 1
    assert np.isfinite(scaler.transform(np.array([[1.0, 7.0]]))).all()


def test_running_does_not_lose_precision_at_a_large_offset():
    rng = np.random.default_rng(1)
    rows = 1e9 + rng.normal(0.0, 1.0, (500, 1))
    scaler = OnlineScaler(1)
    _feed(scaler, rows)
    assert scaler.std[0] == pytest.approx(rows.std(), rel=1e-6)


# -- ewm ----------------------------------------------------------------------------------------


def test_ewm_with_halflife_one_matches_pandas_ewm_alpha_half():
    rows = _rows(200)
    scaler = OnlineScaler(3, "ewm", halflife=1.0)
    means, variances = [], []
    for row in rows:
        scaler.learn_one(row)
        means.append(scaler.mean_.copy())
        variances.append(scaler.m2_.copy())
    frame = pd.DataFrame(rows)
    reference = frame.ewm(alpha=0.5, adjust=False)
    np.testing.assert_allclose(means, reference.mean().to_numpy(), rtol=1e-12)
    np.testing.assert_allclose(
        np.array(variances)[1:], reference.var(bias=True).to_numpy()[1:], rtol=1e-9, atol=1e-15
    )
    np.testing.assert_allclose(scaler.std, np.sqrt(variances[-1]), rtol=1e-12)


def test_ewm_with_a_huge_halflife_is_the_running_statistics():
    rows = _rows(150)
    ewm, running = OnlineScaler(3, "ewm", halflife=1e12), OnlineScaler(3, "running")
    for row in rows:
        ewm.learn_one(row)
        running.learn_one(row)
        np.testing.assert_allclose(ewm.mean_, running.mean_, rtol=1e-9)
    np.testing.assert_allclose(ewm.std, running.std, rtol=1e-6)


def test_ewm_first_row_sets_the_mean_and_zero_variance():
    scaler = OnlineScaler(2, "ewm", halflife=10.0)
    scaler.learn_one(np.array([4.0, -2.0]))
    np.testing.assert_array_equal(scaler.mean_, [4.0, -2.0])
    np.testing.assert_array_equal(scaler.m2_, [0.0, 0.0])
    np.testing.assert_array_equal(scaler.std, [1.0, 1.0])


def test_ewm_follows_a_level_shift_that_running_averages_away():
    rng = np.random.default_rng(2)
    rows = np.concatenate([rng.normal(0.0, 1.0, 500), rng.normal(10.0, 1.0, 200)])[:, None]
    ewm, running = OnlineScaler(1, "ewm", halflife=20.0), OnlineScaler(1, "running")
    _feed(ewm, rows)
    _feed(running, rows)
    assert ewm.mean_[0] == pytest.approx(10.0, abs=0.5)
    assert running.mean_[0] == pytest.approx(10.0 * 200 / 700, abs=0.5)
    assert ewm.std[0] < 2.0 < running.std[0]  # the shift inflates the cumulative std only


# -- warmup -------------------------------------------------------------------------------------


def test_warmup_freezes_after_warmup_rows():
    rows = _rows(300)
    warm = OnlineScaler(3, "warmup", warmup_rows=50)
    _feed(warm, rows[:50])
    frozen_mean, frozen_std = warm.mean_.copy(), warm.std.copy()
    np.testing.assert_allclose(frozen_mean, rows[:50].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(frozen_std, rows[:50].std(axis=0), rtol=1e-9)
    _feed(warm, rows[50:] * 100 + 7)  # wildly different later rows change nothing
    assert warm.n_ == 50
    np.testing.assert_array_equal(warm.mean_, frozen_mean)
    np.testing.assert_array_equal(warm.std, frozen_std)
    running = OnlineScaler(3, "running")
    _feed(running, rows[:49])
    assert not np.array_equal(running.mean_, frozen_mean)  # row 50 still counted


# -- none ---------------------------------------------------------------------------------------


def test_none_is_the_identity():
    rows = _rows(50)
    scaler = OnlineScaler(3, "none")
    _feed(scaler, rows)
    assert scaler.n_ == 0
    np.testing.assert_array_equal(scaler.center, np.zeros(3))
    np.testing.assert_array_equal(scaler.std, np.ones(3))
    out = scaler.transform(rows)
    assert out.tobytes() == rows.tobytes()


# -- state --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["running", "ewm", "warmup", "none"])
def test_state_round_trip_through_json_continues_bit_identically(mode):
    rows = _rows(240)
    original = OnlineScaler(3, mode, warmup_rows=150, halflife=30.0)
    _feed(original, rows[:100])
    state = json.loads(json.dumps(original.state_dict()))
    restored = OnlineScaler(3, mode, warmup_rows=150, halflife=30.0)
    restored.load_state_dict(state)
    assert restored.transform(rows[:10]).tobytes() == original.transform(rows[:10]).tobytes()
    _feed(original, rows[100:])
    _feed(restored, rows[100:])
    assert restored.n_ == original.n_
    assert restored.mean_.tobytes() == original.mean_.tobytes()
    assert restored.m2_.tobytes() == original.m2_.tobytes()
    assert restored.std.tobytes() == original.std.tobytes()


@pytest.mark.parametrize("mode", ["running", "ewm"])
def test_state_round_trip_through_a_weights_only_torch_load(mode):
    scaler = OnlineScaler(3, mode, halflife=5.0)
    _feed(scaler, _rows(40))
    buffer = io.BytesIO()
    torch.save({"scaler": scaler.state_dict()}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)  # what a checkpoint resume does
    restored = OnlineScaler(3, mode, halflife=5.0)
    restored.load_state_dict(loaded["scaler"])
    assert restored.mean_.tobytes() == scaler.mean_.tobytes()
    assert restored.m2_.tobytes() == scaler.m2_.tobytes()


def test_state_dict_is_a_snapshot_not_a_view():
    scaler = OnlineScaler(2)
    _feed(scaler, _rows(20)[:, :2])
    state = scaler.state_dict()
    saved = json.dumps(state)
    scaler.learn_one(np.array([1e6, -1e6]))
    assert json.dumps(state) == saved
    restored = OnlineScaler(2)
    restored.load_state_dict(state)
    restored.mean_ += 1.0  # and loading copies, too
    assert json.dumps(state) == saved
