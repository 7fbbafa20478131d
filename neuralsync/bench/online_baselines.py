"""The strong simple baselines of the online forecasting benchmark, in plain numpy.

Each baseline forecasts ``(horizon, channels)`` from a ``(lookback, channels)`` window of
z-scored values and learns from windows whose horizon has been observed:

- :class:`LastValue`: every step ahead is the last observed value (persistence);
- :class:`WindowRLS`: one linear map over the flattened window predicting ``y - last``
  (a ridge warm start on the train rows, then recursive least squares);
- :class:`ChannelRLS`: per-channel NLinear, each channel's last value subtracted from its own
  window and targets, one linear map shared by all channels (ridge, then RLS).

Recursive least squares (RLS) is exact online least squares: after each update the weights are
the ridge solution over every window seen so far, the older ones discounted by ``forgetting``.
"""

from __future__ import annotations

import numpy as np

from neuralsync.rls import RLS

__all__ = ["RLS", "ChannelRLS", "LastValue", "WindowRLS"]


class LastValue:
    """Persistence: every step ahead is the window's last row.

    >>> LastValue(2).predict(np.arange(6.0).reshape(3, 2)).tolist()
    [[4.0, 5.0], [4.0, 5.0]]

    """

    def __init__(self, horizon: int):
        self.horizon = horizon

    def predict(self, window: np.ndarray) -> np.ndarray:
        return np.repeat(window[-1:], self.horizon, axis=0)

    def learn(self, window: np.ndarray, target: np.ndarray) -> None:
        return None

    def fit(self, windows: np.ndarray, targets: np.ndarray) -> LastValue:
        return self


class WindowRLS:
    """A linear map over the flattened window (and a bias) forecasting ``y - last``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> windows, targets = rng.normal(size=(50, 4, 2)), rng.normal(size=(50, 3, 2))
    >>> model = WindowRLS(lookback=4, horizon=3, channels=2).fit(windows, targets)
    >>> model.predict(windows[0]).shape
    (3, 2)

    """

    def __init__(
        self, lookback: int, horizon: int, channels: int, alpha: float = 1.0, forgetting=1.0
    ):
        self.horizon, self.channels = horizon, channels
        self.rls_ = RLS(lookback * channels + 1, horizon * channels, alpha, forgetting)

    @staticmethod
    def _features(windows: np.ndarray) -> np.ndarray:
        flat = windows.reshape(len(windows), -1)
        return np.concatenate([flat, np.ones((len(windows), 1))], axis=1)

    def fit(self, windows: np.ndarray, targets: np.ndarray) -> WindowRLS:
        change = (targets - windows[:, -1:, :]).reshape(len(windows), -1)
        self.rls_.fit(self._features(windows), change)
        return self

    def predict(self, window: np.ndarray) -> np.ndarray:
        change = self.rls_.predict(self._features(window[None]))[0]
        return change.reshape(self.horizon, self.channels) + window[-1]

    def learn(self, window: np.ndarray, target: np.ndarray) -> None:
        self.rls_.learn(self._features(window[None]), (target - window[-1]).reshape(1, -1))


class ChannelRLS:
    """Per-channel NLinear: one linear map (and bias) over a channel's window minus its last
    value, forecasting its targets minus that value, shared by every channel.

    Examples
    --------
    >>> t = np.arange(80.0)
    >>> series = np.stack([np.sin(t / 3), np.cos(t / 3)], axis=1)
    >>> windows = np.stack([series[i : i + 8] for i in range(70)])
    >>> targets = np.stack([series[i + 8 : i + 10] for i in range(70)])
    >>> model = ChannelRLS(lookback=8, horizon=2, alpha=1e-3).fit(windows, targets)
    >>> bool(np.abs(model.predict(series[70:78]) - series[78:80]).max() < 0.01)
    True

    """

    def __init__(self, lookback: int, horizon: int, alpha: float = 1.0, forgetting: float = 1.0):
        self.lookback, self.horizon = lookback, horizon
        self.rls_ = RLS(lookback + 1, horizon, alpha, forgetting)

    @staticmethod
    def _features(windows: np.ndarray) -> np.ndarray:
        # (n, L, D) -> (n * D, L + 1): one row per channel.
        rel = (windows - windows[:, -1:, :]).transpose(0, 2, 1).reshape(-1, windows.shape[1])
        return np.concatenate([rel, np.ones((len(rel), 1))], axis=1)

    @staticmethod
    def _change(windows: np.ndarray, targets: np.ndarray) -> np.ndarray:
        return (targets - windows[:, -1:, :]).transpose(0, 2, 1).reshape(-1, targets.shape[1])

    def fit(self, windows: np.ndarray, targets: np.ndarray) -> ChannelRLS:
        self.rls_.fit(self._features(windows), self._change(windows, targets))
        return self

    def predict(self, window: np.ndarray) -> np.ndarray:
        change = self.rls_.predict(self._features(window[None]))  # (D, H)
        return change.T + window[-1]

    def learn(self, window: np.ndarray, target: np.ndarray) -> None:
        self.rls_.learn(self._features(window[None]), self._change(window[None], target[None]))
