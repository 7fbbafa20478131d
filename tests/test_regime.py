"""Tests for :mod:`neuralsync.regime`: river drift detectors behind one snapshot-able interface."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from neuralsync.config import DetectorConfig
from neuralsync.errors import ConfigError
from neuralsync.regime import RegimeDetector

DETECTOR_TYPES = ["adwin", "page_hinkley", "kswin"]


def _mean_shift(seed: int = 0, calm: int = 1000, shifted: int = 500) -> list[float]:
    """Errors around 0.2, then around 1.0: the error of a model whose regime just changed."""
    rng = np.random.default_rng(seed)
    errors = np.concatenate([rng.normal(0.2, 0.05, calm), rng.normal(1.0, 0.05, shifted)])
    return errors.tolist()


def _alternating(seed: int = 0, period: int = 120, repeats: int = 4) -> list[float]:
    """Regimes flipping every ``period`` errors: many detections, some close together."""
    rng = np.random.default_rng(seed)
    levels = [0.2, 1.0] * repeats
    return np.concatenate([rng.normal(m, 0.05, period) for m in levels]).tolist()


def _detections(detector: RegimeDetector, errors: list[float]) -> list[int]:
    return [i for i, e in enumerate(errors) if detector.update(e)]


def _detector(kind: str, cooldown: int = 0, **params) -> RegimeDetector:
    return RegimeDetector(DetectorConfig(type=kind, cooldown=cooldown, params=params))


@pytest.mark.parametrize("kind", DETECTOR_TYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_detects_a_clear_mean_shift_soon_after_it_happens(kind, seed):
    errors = _mean_shift(seed)
    found = _detections(_detector(kind), errors)
    after = [i for i in found if i >= 1000]
    assert after, f"{kind} missed a shift from 0.2 to 1.0 ({found})"
    assert after[0] < 1150, f"{kind} took {after[0] - 1000} errors to see the shift"
    if kind != "kswin":  # KSWIN tests at level alpha, so it may raise the odd false alarm
        assert all(i >= 1000 for i in found), f"{kind} false alarm in a calm stream: {found}"


def test_none_never_detects_and_has_an_empty_state():
    detector = _detector("none")
    assert _detections(detector, _mean_shift()) == []
    state = json.loads(json.dumps(detector.state_dict()))
    assert state == {"n": 0, "last_detection": 0, "attributes": {}}
    restored = _detector("none")
    restored.load_state_dict(state)
    assert _detections(restored, _alternating()) == []


@pytest.mark.parametrize("kind", DETECTOR_TYPES)
def test_detection_is_deterministic(kind):
    errors = _alternating(seed=3)
    assert _detections(_detector(kind), errors) == _detections(_detector(kind), errors)


@pytest.mark.parametrize("kind", DETECTOR_TYPES)
def test_cooldown_ignores_detections_too_close_to_the_previous_one_or_to_the_start(kind):
    errors = _alternating()
    raw = _detections(_detector(kind), errors)
    assert len(raw) >= 4
    min_gap = min(b - a for a, b in itertools.pairwise(raw))
    for cooldown in (0, 90, min_gap, 2 * min_gap):
        # The underlying detector sees every error either way; the cooldown only filters what
        # it reports: a detection counts when more than `cooldown` errors follow the previous
        # reported one (or the start).
        expected, last = [], 0
        for i in raw:
            if (i + 1) - last > cooldown:
                expected.append(i)
                last = i + 1
        found = _detections(_detector(kind, cooldown=cooldown), errors)
        assert found == expected, f"cooldown {cooldown}"
        assert all(b - a > cooldown for a, b in itertools.pairwise(found))
        if cooldown >= min_gap:
            assert len(found) < len(raw)  # the filter really dropped some


def test_cooldown_applies_from_the_start_of_the_stream():
    errors = _mean_shift(calm=60, shifted=300)
    raw = _detections(_detector("adwin"), errors)
    assert raw and raw[0] < 120
    found = _detections(_detector("adwin", cooldown=raw[0] + 1), errors)
    assert raw[0] not in found


def _cut_points(kind: str, errors: list[float], cooldown: int) -> list[int]:
    raw = _detections(_detector(kind, cooldown=cooldown), errors)
    assert len(raw) >= 2
    return sorted(
        {
            1,
            50,
            raw[0],  # the update that raised the detection: drift_detected is still set
            raw[0] + 1,
            raw[0] + cooldown // 2,  # inside the cooldown
            raw[1] - 3,
            len(errors) - 100,
        }
    )


@pytest.mark.parametrize("kind", DETECTOR_TYPES)
def test_state_round_trip_through_json_mid_stream_keeps_future_detections(kind):
    errors = _alternating(seed=5)
    cooldown = 40
    whole = _detections(_detector(kind, cooldown=cooldown), errors)
    for cut in _cut_points(kind, errors, cooldown):
        first = _detector(kind, cooldown=cooldown)
        head = _detections(first, errors[:cut])
        state = json.loads(json.dumps(first.state_dict()))
        restored = _detector(kind, cooldown=cooldown)
        restored.load_state_dict(state)
        tail_restored = [cut + i for i in _detections(restored, errors[cut:])]
        tail_original = [cut + i for i in _detections(first, errors[cut:])]
        assert tail_restored == tail_original, f"{kind}: diverged after a restore at {cut}"
        assert head + tail_restored == whole
        assert json.dumps(restored.state_dict()) == json.dumps(first.state_dict())


@pytest.mark.parametrize("kind", DETECTOR_TYPES)
def test_state_is_plain_json_data(kind):
    detector = _detector(kind, cooldown=10)
    _detections(detector, _alternating()[:400])
    state = detector.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert state["n"] == 400
    assert state["attributes"], "the river detector's own state must be in the snapshot"


def test_a_fresh_detector_is_not_a_restored_one():
    """The round trip test can fail: a detector that skipped the history behaves differently."""
    errors = _alternating(seed=5)
    cut = 300
    first = _detector("adwin")
    _detections(first, errors[:cut])
    assert _detections(_detector("adwin"), errors[cut:]) != _detections(first, errors[cut:])


def test_kswin_seed_is_part_of_the_state():
    errors = _alternating(seed=2)
    a, b = _detector("kswin", seed=1), _detector("kswin", seed=1)
    _detections(a, errors[:250])
    _detections(b, errors[:250])
    state = json.loads(json.dumps(a.state_dict()))
    # Advance b's random generator, then restore a's state over it: the RNG must come back.
    b.detector_._rng.random()
    b.load_state_dict(state)
    assert _detections(b, errors[250:]) == _detections(a, errors[250:])


def test_unknown_parameter_is_a_clear_config_error():
    with pytest.raises(ConfigError, match=r"detector\.params\.delt.*did you mean 'delta'"):
        _detector("adwin", delt=0.01)


def test_parameters_reach_the_river_detector():
    errors = _mean_shift(seed=4)
    sensitive = _detections(_detector("page_hinkley", threshold=5.0), errors)
    sluggish = _detections(_detector("page_hinkley", threshold=500.0), errors)
    assert sensitive and sensitive[0] >= 1000
    assert not sluggish or sluggish[0] > sensitive[0]
