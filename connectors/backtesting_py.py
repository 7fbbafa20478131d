"""backtesting.py adapter: a ``Strategy`` that forecasts at each bar with NeuralSync and trades.

Needs the optional extra ``pip install -e ".[backtesting]"`` (backtesting.py is AGPL-3.0, so it
is never a core dependency). At every bar, :class:`NeuralSyncStrategy` first shows the
forecaster the bar that has just closed (its truth completes earlier forecasts, which are
scored and, after the label delay, learned from), then reads the forecast issued at that bar
and places its order, which backtesting.py fills at the next bar's open. Nothing after the
current bar is ever read.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
from backtesting import Strategy

from connectors.backtest_forecaster import forecaster_from, freeze_bar
from neuralsync.config import Scenario

__all__ = ["BuyAndHold", "NeuralSyncStrategy", "forecast_series"]


class NeuralSyncStrategy(Strategy):
    """Go long when the forecast return beats ``threshold``, flat (or short) when it falls below.

    All settings are class parameters, so ``Backtest.run(threshold=0.002)`` and
    ``Backtest.optimize(...)`` set them as for any backtesting.py strategy.

    Parameters
    ----------
    target
        The column the model forecasts; a price, since the forecast return is
        ``forecast / last value - 1``.
    features
        Other columns the model sees as inputs (e.g. ``("Volume",)``).
    lookback, horizon, hidden, lr, seed
        The model: bars in the input window, bars ahead (the trade signal is the return over
        the whole horizon), hidden width (0 for a linear model), SGD learning rate, seed.
    normalization
        ``running``, ``ewm`` (half-life ``halflife`` bars), ``warmup`` or ``none``.
    detector
        River drift detector on the forecast error: ``adwin``, ``page_hinkley``, ``kswin``,
        ``none``.
    scenario
        A :class:`~neuralsync.config.Scenario` (or YAML path, or bundled name) to start from
        instead of the defaults; ``options`` are scenario options set on top of everything.
    threshold
        Forecast return above which to go long, and below minus which to leave (or go short).
    short
        Go short on a forecast below ``-threshold`` instead of only closing the long.
    freeze_after
        Stop learning after this many bars (an int) or this share of the data's bars (a
        float below 1): the frozen-model baseline. ``None``: learn to the end.

    Attributes
    ----------
    forecaster
        The :class:`~neuralsync.forecaster.OnlineForecaster`; ``forecaster.metrics()`` scores
        it against the last-value forecast.
    forecasts_
        ``(bar time, forecast return)`` of every bar that had a forecast.

    """

    target = "Close"
    features: tuple[str, ...] = ()
    lookback = 32
    horizon = 1
    hidden = 32
    lr = 0.01
    seed = 0
    normalization = "running"
    halflife = 250.0
    detector = "adwin"
    scenario: Scenario | str | None = None
    options: dict[str, Any] | None = None
    threshold = 0.0
    short = False
    freeze_after: int | float | None = None

    def init(self) -> None:
        self.forecaster = forecaster_from(self)
        self._target = self.forecaster.scenario.targets[0]
        self._features = list(self.forecaster.scenario.features)
        # Only the number of bars is read here, to place the freeze; no price is.
        self._freeze_at = freeze_bar(self.freeze_after, len(self.data))
        self._seen = 0
        self.forecasts_: list[tuple[Any, float]] = []

    def next(self) -> None:
        self.learn_closed_bars()
        expected = self.expected_return()
        if np.isnan(expected):
            return
        self.forecasts_.append((self.data.index[-1], expected))
        if expected > self.threshold:
            if self.position.is_short:
                self.position.close()
            if not self.position.is_long:
                self.buy()
        elif expected < -self.threshold:
            if self.position.is_long:
                self.position.close()
            if self.short and not self.position.is_short:
                self.sell()

    def learn_closed_bars(self) -> None:
        """Show the forecaster every bar up to the current one it has not seen yet.

        backtesting.py first calls ``next`` at the second bar (later when indicators warm
        up), so the first call catches up; after that it is one bar per call.
        """
        now = len(self.data)
        if self._seen >= now:
            return
        index = self.data.index
        target = self.data[self._target]
        features = [self.data[f] for f in self._features]
        for bar in range(self._seen, now):
            if self._freeze_at is not None and bar == self._freeze_at:
                self.forecaster.freeze()
            x = {f: float(c[bar]) for f, c in zip(self._features, features, strict=True)}
            self.forecaster.learn_one(float(target[bar]), x or None, t=index[bar])
        self._seen = now

    def expected_return(self) -> float:
        """The forecast return over the horizon, issued at the current bar (NaN if none)."""
        forecast = self.forecaster.forecast()[-1]
        return forecast / float(self.data[self._target][-1]) - 1.0


class BuyAndHold(Strategy):
    """Buy at the first bar with all the cash and hold to the end: the benchmark."""

    def init(self) -> None:
        pass

    def next(self) -> None:
        if not self.position:
            self.buy()


def forecast_series(strategy: NeuralSyncStrategy) -> pd.Series:
    """The forecast returns a finished run issued, indexed by bar time."""
    if not strategy.forecasts_:
        return pd.Series(dtype=float, name="forecast_return")
    times, values = zip(*strategy.forecasts_, strict=True)
    return pd.Series(values, index=pd.Index(times), name="forecast_return")
