"""Online normalisation of a series' columns: statistics learned from the past only."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["OnlineScaler"]

_MIN_STD = 1e-8


class OnlineScaler:
    """Per-column mean and standard deviation, updated one row at a time.

    Parameters
    ----------
    n_columns
        Number of columns.
    mode
        ``running``: cumulative (Welford's algorithm); ``ewm``: exponentially weighted with a
        half-life of ``halflife`` rows, which follows a regime's level; ``warmup``: cumulative
        over the first ``warmup_rows`` rows, then frozen; ``none``: identity.

    Examples
    --------
    >>> import numpy as np
    >>> scaler = OnlineScaler(1)
    >>> for value in [1.0, 2.0, 3.0]:
    ...     scaler.learn_one(np.array([value]))
    >>> scaler.mean_, scaler.std
    (array([2.]), array([0.81649658]))
    >>> scaler.transform(np.array([[3.0]])).round(4)
    array([[1.2247]])

    """

    def __init__(
        self, n_columns: int, mode: str = "running", warmup_rows: int = 200, halflife: float = 1e3
    ):
        self.mode = mode
        self.warmup_rows = warmup_rows
        self.halflife = halflife
        self.n_ = 0
        self.mean_ = np.zeros(n_columns)
        self.m2_ = np.zeros(n_columns)  # sum of squared deviations (running), variance (ewm)

    def learn_one(self, row: np.ndarray) -> None:
        """Fold one row of raw values into the statistics."""
        if self.mode == "none" or (self.mode == "warmup" and self.n_ >= self.warmup_rows):
            return
        self.n_ += 1
        delta = row - self.mean_
        if self.mode == "ewm" and self.n_ > 1:
            alpha = max(1.0 - 0.5 ** (1.0 / self.halflife), 1.0 / self.n_)
            self.mean_ += alpha * delta
            self.m2_ = (1.0 - alpha) * (self.m2_ + alpha * delta * delta)
            return
        self.mean_ += delta / self.n_
        self.m2_ += delta * (row - self.mean_)
        if self.mode == "ewm":  # the first row: the exponential variance starts at zero
            self.m2_[:] = 0.0

    @property
    def std(self) -> np.ndarray:
        if self.mode == "none" or self.n_ < 2:
            return np.ones_like(self.mean_)
        variance = self.m2_ if self.mode == "ewm" else self.m2_ / self.n_
        std = np.sqrt(np.maximum(variance, 0.0))
        return np.where(std > _MIN_STD, std, 1.0)

    @property
    def center(self) -> np.ndarray:
        return np.zeros_like(self.mean_) if self.mode == "none" else self.mean_

    def transform(self, rows: np.ndarray) -> np.ndarray:
        """Normalise rows (any leading shape) with the current statistics."""
        return (rows - self.center) / self.std

    def state_dict(self) -> dict[str, Any]:
        """Plain values only (exact float64 lists): snapshots load with ``weights_only=True``,
        which refuses numpy arrays, and the state stays JSON-serialisable."""
        return {"n": self.n_, "mean": self.mean_.tolist(), "m2": self.m2_.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n_ = int(state["n"])
        self.mean_ = np.asarray(state["mean"], dtype=np.float64).copy()
        self.m2_ = np.asarray(state["m2"], dtype=np.float64).copy()
