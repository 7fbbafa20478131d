"""``neuralsync bench library``: what NeuralSync adds to each bar of a backtest, side by side.

Measured on the same bars in the same process:

- ``learn_one`` + ``forecast`` of :class:`~neuralsync.forecaster.OnlineForecaster` alone, in a
  plain Python loop over the closes (the part split into its two verbs);
- the bare backtesting.py loop: ``Backtest.run`` of a strategy whose ``next`` does nothing;
- both together: backtesting.py calling ``learn_one`` + ``forecast`` from ``next`` and trading
  on the forecast return.

The bars are GOOG daily from backtesting.py when it is installed (the ``backtesting`` extra),
else a random walk of the same length, and then only the facade is timed. Each figure is the
best of a few repeats, so a busy machine disturbs it less.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from neuralsync.forecaster import OnlineForecaster

__all__ = ["run_library"]

SETTINGS: dict[str, Any] = {"name": "bench", "timestamp": "time", "targets": ["Close"]}


def _bars(n: int | None) -> tuple[pd.DataFrame, str]:
    try:
        from backtesting.test import GOOG
    except ImportError:
        rng = np.random.default_rng(0)
        close = 100 * np.exp(np.cumsum(rng.normal(0, 0.02, n or 2148)))
        index = pd.date_range("2004-08-19", periods=len(close), freq="B")
        frame = pd.DataFrame({"Open": close, "High": close, "Low": close, "Close": close})
        return frame.set_index(index), "a random walk (backtesting.py not installed)"
    data = GOOG.iloc[:n] if n else GOOG
    return data, "GOOG daily"


def _facade(data: pd.DataFrame, options: dict[str, Any]) -> dict[str, float]:
    """Seconds per bar of learn_one and of forecast over ``data``'s closes."""
    forecaster = OnlineForecaster(**SETTINGS, **options)
    closes = data["Close"].to_numpy(dtype=float)
    times = data.index
    learn = forecast = 0.0
    clock = time.perf_counter
    for i in range(len(closes)):
        start = clock()
        forecaster.learn_one(closes[i], t=times[i])
        middle = clock()
        forecaster.forecast()
        end = clock()
        if i >= options.get("lookback", 32):  # time only bars that issue a forecast
            learn += middle - start
            forecast += end - middle
    bars = max(len(closes) - options.get("lookback", 32), 1)
    return {"learn_one": learn / bars, "forecast": forecast / bars}


def _backtests(data: pd.DataFrame, options: dict[str, Any]) -> dict[str, float]:
    """Seconds per bar of the bare backtesting.py loop, and of that loop with NeuralSync."""
    import backtesting.backtesting as engine
    from backtesting import Backtest, Strategy

    class Bare(Strategy):
        def init(self) -> None:
            pass

        def next(self) -> None:
            pass

    class WithForecaster(Strategy):
        def init(self) -> None:
            self.forecaster = OnlineForecaster(**SETTINGS, **options)
            self.seen = 0

        def next(self) -> None:
            for bar in range(self.seen, len(self.data)):  # the first call catches up bar 0
                self.forecaster.learn_one(float(self.data.Close[bar]), t=self.data.index[bar])
            self.seen = len(self.data)
            expected = self.forecaster.forecast()[-1] / self.data.Close[-1] - 1.0
            if expected > 0 and not self.position:
                self.buy()
            elif expected < 0 and self.position:
                self.position.close()

    figures = {}
    progress_bar = engine._tqdm
    engine._tqdm = lambda bars, **_: bars  # no progress bar on the terminal (nor its cost)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, strategy in (("bare", Bare), ("with_forecaster", WithForecaster)):
                backtest = Backtest(data, strategy, cash=100_000, commission=0.002)
                start = time.perf_counter()
                backtest.run()
                figures[name] = (time.perf_counter() - start) / max(len(data) - 1, 1)
    finally:
        engine._tqdm = progress_bar
    return figures


def _best(measure: Callable[[], dict[str, float]], repeats: int) -> dict[str, float]:
    runs = [measure() for _ in range(repeats)]
    return {name: min(run[name] for run in runs) for name in runs[0]}


def run_library(
    *, quick: bool = False, log: Callable[[str], None] = print, **options: Any
) -> dict[str, Any]:
    """Per-bar costs in microseconds, logged as a table; returns them as a dict.

    ``options`` are scenario options of the forecaster (default: the scenario defaults, i.e.
    lookback 32, one hidden layer of 32, ADWIN).
    """
    data, source = _bars(300 if quick else None)
    repeats = 1 if quick else 3
    OnlineForecaster(**SETTINGS, **options).learn_one(1.0)  # load the compiled kernels first
    facade = _best(lambda: _facade(data, options), repeats)
    try:
        import backtesting  # noqa: F401
    except ImportError:
        loops = None
    else:
        loops = _best(lambda: _backtests(data, options), repeats)
    micro = 1e6
    figures: dict[str, Any] = {
        "bars": len(data),
        "data": source,
        "quick": quick,
        "learn_one_us": facade["learn_one"] * micro,
        "forecast_us": facade["forecast"] * micro,
        "learn_one_plus_forecast_us": (facade["learn_one"] + facade["forecast"]) * micro,
        "backtesting_bare_loop_us": None if loops is None else loops["bare"] * micro,
        "backtesting_with_forecaster_us": None
        if loops is None
        else loops["with_forecaster"] * micro,
    }
    live = OnlineForecaster(**SETTINGS, **options).metrics()["live_path"]["path"]
    log(f"per-bar cost on {source} ({len(data)} bars), {live} live path, best of {repeats}")
    both = figures["learn_one_plus_forecast_us"]
    log(f"  {'OnlineForecaster learn_one + forecast':<40} {_us(both)}")
    log(f"  {'  of which learn_one':<40} {_us(figures['learn_one_us'])}")
    log(f"  {'  of which forecast':<40} {_us(figures['forecast_us'])}")
    if loops is None:
        log("  backtesting.py not installed: pip install -e '.[backtesting]' to time its loop")
    else:
        bare = figures["backtesting_bare_loop_us"]
        log(f"  {'bare backtesting.py loop':<40} {_us(bare)}")
        together = figures["backtesting_with_forecaster_us"]
        log(f"  {'backtesting.py + learn_one + forecast':<40} {_us(together)}")
        figures["forecaster_over_bare_loop"] = figures["learn_one_plus_forecast_us"] / bare
        log(f"  {'forecaster / bare loop':<40} {figures['forecaster_over_bare_loop']:>9.1f}x")
    return figures


def _us(value: float) -> str:
    return f"{value:>9.1f} µs" if math.isfinite(value) else "        —"
