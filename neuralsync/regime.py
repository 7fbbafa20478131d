"""Regime detection over the live error, built on river's drift detectors.

The detector's whole state round-trips through plain data (numbers, lists, bytes), so it can
live in the state snapshot without pickling code.
"""

from __future__ import annotations

import base64
import collections
import inspect
import random
from typing import Any

from river import drift, stats

from neuralsync.config import DetectorConfig
from neuralsync.errors import ConfigError, suggest

__all__ = ["DETECTORS", "RegimeDetector"]

DETECTORS: dict[str, type] = {
    "adwin": drift.ADWIN,
    "page_hinkley": drift.PageHinkley,
    "kswin": drift.KSWIN,
}


def _encode(value: Any) -> Any:
    """Plain data for one attribute of a river detector."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if hasattr(value, "item") and callable(value.item):  # numpy scalar
        return value.item()
    if isinstance(value, collections.deque):
        return {"deque": [_encode(v) for v in value], "maxlen": value.maxlen}
    if isinstance(value, random.Random):
        version, internal, gauss = value.getstate()
        return {"random": [version, list(internal), gauss]}
    if isinstance(value, stats.Mean):
        return {"mean": {"n": value.n, "_mean": value._mean}}
    state = getattr(value, "__getstate__", None)
    if callable(state) and type(value).__module__.startswith("river._river_rust"):
        # river's Rust helpers (ADWIN's buckets) serialise themselves to bytes.
        return {"rust": base64.b64encode(state()).decode("ascii")}
    raise TypeError(f"cannot snapshot a {type(value).__name__} inside a river detector")


def _decode(current: Any, encoded: Any) -> Any:
    if not isinstance(encoded, dict):
        return encoded
    if "deque" in encoded:
        return collections.deque(encoded["deque"], maxlen=encoded["maxlen"])
    if "random" in encoded:
        version, internal, gauss = encoded["random"]
        rng = random.Random()
        rng.setstate((version, tuple(internal), gauss))
        return rng
    if "mean" in encoded:
        mean = stats.Mean()
        mean.n, mean._mean = encoded["mean"]["n"], encoded["mean"]["_mean"]
        return mean
    if "rust" in encoded:
        current.__setstate__(base64.b64decode(encoded["rust"]))
        return current
    raise ValueError(f"unknown detector state entry {sorted(encoded)}")


class RegimeDetector:
    """Watch a stream of errors and say when its regime changes.

    Parameters
    ----------
    config
        Which river detector (``adwin``, ``page_hinkley``, ``kswin`` or ``none``), its
        parameters, and the cooldown after a detection during which new ones are ignored.

    Examples
    --------
    >>> import random
    >>> rng = random.Random(7)
    >>> detector = RegimeDetector(DetectorConfig(type="adwin", cooldown=0))
    >>> calm = [rng.gauss(0.1, 0.02) for _ in range(500)]
    >>> errors = calm + [rng.gauss(0.5, 0.02) for _ in range(500)]
    >>> [i for i, e in enumerate(errors) if detector.update(e)]
    [543]

    """

    def __init__(self, config: DetectorConfig):
        self.config = config
        self.n_ = 0
        self.last_detection_ = 0
        self.detector_ = self._build()

    def _build(self) -> Any:
        if self.config.type == "none":
            return None
        cls = DETECTORS[self.config.type]
        accepted = [p for p in inspect.signature(cls).parameters if p != "self"]
        for name in self.config.params:
            if name not in accepted:
                raise ConfigError(
                    f"option 'detector.params.{name}': {cls.__name__} has no parameter "
                    f"'{name}'{suggest(name, accepted)}; valid: {', '.join(accepted)}"
                )
        params = dict(self.config.params)
        if "seed" in accepted:
            params.setdefault("seed", 0)  # KSWIN samples at random: keep replays deterministic
        try:
            return cls(**params)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"option 'detector.params': {cls.__name__}: {exc}") from None

    def update(self, error: float) -> bool:
        """Feed one error; ``True`` when a regime change is detected (outside the cooldown)."""
        if self.detector_ is None:
            return False
        self.n_ += 1
        self.detector_.update(error)
        if not self.detector_.drift_detected:
            return False
        if self.n_ - self.last_detection_ <= self.config.cooldown:
            return False
        self.last_detection_ = self.n_
        return True

    def state_dict(self) -> dict[str, Any]:
        attributes = {}
        if self.detector_ is not None:
            for name, value in vars(self.detector_).items():
                if inspect.ismethod(value):  # rebound by the constructor from parameters
                    continue
                attributes[name] = _encode(value)
        return {"n": self.n_, "last_detection": self.last_detection_, "attributes": attributes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n_ = int(state["n"])
        self.last_detection_ = int(state["last_detection"])
        self.detector_ = self._build()
        for name, encoded in state["attributes"].items():
            current = getattr(self.detector_, name, None)
            setattr(self.detector_, name, _decode(current, encoded))
