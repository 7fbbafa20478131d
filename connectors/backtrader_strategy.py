"""backtrader adapter: a ``Strategy`` that forecasts at each bar with NeuralSync and trades.

Needs the optional extra ``pip install -e ".[backtrader]"`` (backtrader is GPL-3.0, so it is
never a core dependency). The same rule as :class:`connectors.backtesting_py.NeuralSyncStrategy`:
at every bar, the forecaster observes the bar that has just closed, then the forecast issued at
that bar decides the order, which backtrader fills at the next bar's open.
"""

from __future__ import annotations

from typing import Any

import backtrader as bt
import numpy as np
import pandas as pd

from connectors.backtest_forecaster import forecaster_from, freeze_bar

__all__ = ["NeuralSyncBacktraderStrategy"]


class NeuralSyncBacktraderStrategy(bt.Strategy):
    """Long when the forecast return beats ``threshold``, flat (or short) below ``-threshold``.

    The parameters (``cerebro.addstrategy(NeuralSyncBacktraderStrategy, threshold=0.001)``)
    are those of :class:`connectors.backtesting_py.NeuralSyncStrategy`; ``target`` and
    ``features`` name lines of the data feed (``close``, ``volume``, ...). ``freeze_after`` as
    a share needs the feed's length, which backtrader knows for a preloaded feed (the default).
    """

    params = (
        ("target", "close"),
        ("features", ()),
        ("lookback", 32),
        ("horizon", 1),
        ("hidden", 32),
        ("lr", 0.01),
        ("seed", 0),
        ("normalization", "running"),
        ("halflife", 250.0),
        ("detector", "adwin"),
        ("scenario", None),
        ("options", None),
        ("threshold", 0.0),
        ("short", False),
        ("freeze_after", None),
    )

    def __init__(self) -> None:
        p = self.params
        self.forecaster = forecaster_from(p)
        self._target = self.forecaster.scenario.targets[0]
        self._features = list(self.forecaster.scenario.features)
        # Only the feed's length is read here, to place the freeze; no price is.
        self._freeze_at = freeze_bar(p.freeze_after, self.data.buflen())
        self._bar = 0
        self.forecasts_: list[tuple[Any, float]] = []

    def prenext(self) -> None:  # bars before the indicators of a subclass are ready
        self.next()

    def next(self) -> None:
        data = self.data
        if self._freeze_at is not None and self._bar == self._freeze_at:
            self.forecaster.freeze()
        self._bar += 1
        value = float(getattr(data, self._target)[0])
        x = {f: float(getattr(data, f)[0]) for f in self._features}
        when = pd.Timestamp(data.datetime.datetime(0))
        self.forecaster.learn_one(value, x or None, t=when)
        expected = self.forecaster.forecast()[-1] / value - 1.0
        if np.isnan(expected):
            return
        self.forecasts_.append((when, expected))
        size = self.position.size
        if expected > self.p.threshold:
            if size < 0:
                self.close()
            if size <= 0:
                self.order_target_percent(target=0.95)
        elif expected < -self.p.threshold:
            if size > 0:
                self.close()
            if self.p.short and size >= 0:
                self.order_target_percent(target=-0.95)
