"""ForecastMetrics: the array update is the scalar update on each value in turn."""

from __future__ import annotations

import numpy as np
import pytest

from neuralsync.metrics import ForecastMetrics


def test_update_many_equals_update_on_each_value_in_turn():
    rng = np.random.default_rng(0)
    predictions, truths, lasts = rng.normal(size=(3, 6, 5))
    truths[0, :2] = lasts[0, :2]  # flat moves: the last value's direction is right there
    predictions[1, 0] = lasts[1, 0]  # a forecast of no move
    one_by_one, at_once = ForecastMetrics(), ForecastMetrics()
    for p, y, last in zip(predictions.ravel(), truths.ravel(), lasts.ravel(), strict=True):
        one_by_one.update(float(p), float(y), float(last))
    at_once.update_many(predictions[:2], truths[:2], lasts[:2])  # any shape, in parts
    at_once.update_many(predictions[2:], truths[2:], lasts[2:])
    expected, got = one_by_one.summary(), at_once.summary()
    assert got["n_predictions"] == expected["n_predictions"] == 30
    for name in ("mse", "mae", "directional_accuracy"):
        assert got[name] == pytest.approx(expected[name], rel=1e-12)
        assert got["baseline_last_value"][name] == pytest.approx(
            expected["baseline_last_value"][name], rel=1e-12
        )
    assert got["baseline_last_value"]["directional_accuracy"] == 2 / 30
    errors = predictions - truths
    assert got["mse"] == pytest.approx(float(np.mean(errors**2)), rel=1e-12)


def test_update_many_with_arrays_of_different_sizes_says_which():
    with pytest.raises(ValueError, match="as many values, got 3, 2 and 3"):
        ForecastMetrics().update_many([1.0, 2.0, 3.0], [1.0, 2.0], [0.0, 0.0, 0.0])
