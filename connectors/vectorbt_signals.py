"""vectorbt helper: causal NeuralSync signals computed outside vectorbt, shifted one bar.

vectorbt evaluates whole arrays at once, so a model run inside it could see the future. Here
the forecaster runs bar by bar in plain pandas (each forecast from its bar and earlier ones
only), and the signals are shifted one bar later: a forecast made at a bar's close can be
acted on at the next bar at the earliest. Feed the result to vectorbt yourself::

    signals = forecast_signals(close, threshold=0.001)
    portfolio = vbt.Portfolio.from_signals(close, signals.entries, signals.exits)

This module does not import vectorbt (its licence restricts commercial use, so it is an
optional extra, ``pip install -e ".[vectorbt]"``); it only needs pandas.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from connectors.backtest_forecaster import make_forecaster
from neuralsync.forecaster import OnlineForecaster

__all__ = ["Signals", "forecast_returns", "forecast_signals"]


class Signals(NamedTuple):
    """Boolean entry and exit signals, already shifted one bar, and the forecast returns."""

    #: True at the bar after a forecast return above the threshold.
    entries: pd.Series | pd.DataFrame
    #: True at the bar after a forecast return below minus the threshold.
    exits: pd.Series | pd.DataFrame
    #: The forecast return issued at each bar (not shifted; NaN before the first forecast).
    forecast_return: pd.Series | pd.DataFrame


def forecast_returns(
    close: pd.Series | pd.DataFrame, forecaster: OnlineForecaster | None = None, **params: Any
) -> pd.Series | pd.DataFrame:
    """The return forecast at each bar over the forecaster's horizon, from that bar and earlier.

    ``close`` is a price Series, or a DataFrame with one column per symbol: the symbols then
    share one model (each with its own window, normaliser and detector), and a NaN price is a
    bar the symbol did not trade. ``params`` build the forecaster as the backtest adapters do
    (``lookback``, ``horizon``, ``hidden``, ``lr``, ``seed``, ...); or pass your own
    ``forecaster`` (its target is fed the prices, so it must have one target and no features).
    """
    frame = close.to_frame() if isinstance(close, pd.Series) else close
    if forecaster is None:
        forecaster = make_forecaster(target="close", **params)
    elif params:
        raise TypeError("pass either a forecaster or the parameters to build one, not both")
    keyed = isinstance(close, pd.DataFrame)
    values = frame.to_numpy(dtype=np.float64)
    out = np.full(values.shape, np.nan)
    times = frame.index
    for i, t in enumerate(times):
        bar_time = t if isinstance(times, pd.DatetimeIndex) else float(i)
        for j, column in enumerate(frame.columns):
            price = values[i, j]
            if np.isnan(price):
                continue
            key = str(column) if keyed else None
            forecaster.learn_one(price, t=bar_time, key=key)
            out[i, j] = forecaster.forecast(key=key)[-1] / price - 1.0
    result = pd.DataFrame(out, index=frame.index, columns=frame.columns)
    return result if keyed else result.iloc[:, 0].rename("forecast_return")


def forecast_signals(
    close: pd.Series | pd.DataFrame,
    threshold: float = 0.0,
    forecaster: OnlineForecaster | None = None,
    **params: Any,
) -> Signals:
    """Entries where the forecast return beats ``threshold``, exits where it is below
    ``-threshold``, each moved to the bar after the forecast.

    Examples
    --------
    >>> import numpy as np, pandas as pd
    >>> prices = pd.Series(100 * np.exp(np.cumsum(np.full(60, 0.01))))
    >>> signals = forecast_signals(prices, lookback=8, detector="none")
    >>> bool(signals.entries.iloc[8]), bool(signals.entries.iloc[7])  # forecast at bar 7
    (True, False)
    >>> bool((signals.entries & signals.exits).any())
    False

    """
    expected = forecast_returns(close, forecaster, **params)
    entries = (expected > threshold).shift(1, fill_value=False).astype(bool)
    exits = (expected < -threshold).shift(1, fill_value=False).astype(bool)
    return Signals(entries, exits, expected)
