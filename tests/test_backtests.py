"""Tests for the backtest adapters in connectors/ and their worked example, on small slices of
the data bundled with backtesting.py.

The central one: a backtest never trades on the future. Rewrite every bar after bar k with
noise, and every trade opened up to bar k stays exactly as it was.
"""

from __future__ import annotations

import doctest
import importlib
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

pytest.importorskip("backtesting", reason="the backtesting extra is not installed")

from backtesting import Backtest
from backtesting.test import GOOG

from connectors import backtest_example
from connectors.backtest_forecaster import make_forecaster
from connectors.backtesting_py import NeuralSyncStrategy, forecast_series
from neuralsync.cli import app

SMALL = {"lookback": 8, "hidden": 16}


def _run(data: pd.DataFrame, **params) -> pd.Series:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        backtest = Backtest(
            data, NeuralSyncStrategy, cash=100_000, commission=0.002, finalize_trades=True
        )
        return backtest.run(**{**SMALL, **params})


def _noise_after(data: pd.DataFrame, k: int, seed: int = 1) -> pd.DataFrame:
    """``data`` with every bar after bar ``k`` replaced by a random walk of OHLC bars."""
    rng = np.random.default_rng(seed)
    noisy = data.copy()
    n = len(data) - k - 1
    close = data["Close"].iloc[k] * np.exp(np.cumsum(rng.normal(0, 0.03, n)))
    spread = np.abs(rng.normal(0, 0.01, n)) * close
    noisy.iloc[k + 1 :, noisy.columns.get_loc("Open")] = close * (1 + rng.normal(0, 0.01, n))
    noisy.iloc[k + 1 :, noisy.columns.get_loc("Close")] = close
    high = np.maximum(noisy["Open"].iloc[k + 1 :], close) + spread
    low = np.minimum(noisy["Open"].iloc[k + 1 :], close) - spread
    noisy.iloc[k + 1 :, noisy.columns.get_loc("High")] = high
    noisy.iloc[k + 1 :, noisy.columns.get_loc("Low")] = low
    noisy.iloc[k + 1 :, noisy.columns.get_loc("Volume")] = rng.integers(1_000, 10**6, n)
    return noisy


def test_no_look_ahead_trades_up_to_bar_k_survive_noise_after_it():
    data, k = GOOG.iloc[:320], 200
    original, rewritten = _run(data), _run(_noise_after(data, k))
    columns = ["Size", "EntryBar", "EntryPrice", "EntryTime"]

    def opened_by_k(stats):
        trades = stats._trades
        return trades.loc[trades["EntryBar"] <= k, columns].reset_index(drop=True)

    before = opened_by_k(original)
    assert len(before) >= 5  # the test is not vacuous
    pd.testing.assert_frame_equal(before, opened_by_k(rewritten))
    # the forecasts issued up to bar k are bit-identical; later ones see the noise
    ours, theirs = forecast_series(original._strategy), forecast_series(rewritten._strategy)
    cut = data.index[k]
    pd.testing.assert_series_equal(ours[:cut], theirs[:cut], check_exact=True)
    assert not ours[cut:].iloc[2:].equals(theirs[cut:].iloc[2:])
    assert not original._trades.equals(rewritten._trades)


def test_strategy_forecasts_equal_the_facade_fed_the_same_bars():
    data = GOOG.iloc[:150]
    stats = _run(data, horizon=2, threshold=0.001, freeze_after=0.5)
    strategy = stats._strategy
    model = make_forecaster(horizon=2, **SMALL)
    expected = []
    for i, (time, close) in enumerate(data["Close"].items()):
        if i == 75:
            model.freeze()
        model.learn_one(close, t=time)
        value = model.forecast()[-1] / close - 1.0
        if not math.isnan(value) and i >= 1:  # backtesting.py calls next() from bar 1
            expected.append((time, value))
    assert strategy.forecasts_ == expected
    assert strategy.forecaster.frozen
    assert strategy.forecaster.metrics()["learn_steps"] == 75 - 8 + 1 - 2


def test_strategy_parameters_features_and_short_side():
    stats = _run(GOOG.iloc[:160], features=("Volume",), short=True, lookback=10)
    forecaster = stats._strategy.forecaster
    assert forecaster.scenario.features == ["Volume"] and forecaster.lookback == 10
    assert (stats._trades["Size"] < 0).any() and (stats._trades["Size"] > 0).any()
    with pytest.raises(ValueError, match=r"freeze_after=2\.5"):
        _run(GOOG.iloc[:50], freeze_after=2.5)


def test_worked_example_runs_on_small_slices(tmp_path, capsys):
    out = tmp_path / "backtest.png"
    assert backtest_example.main(["--bars", "160", "--lookback", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert printed.count("| | online | frozen | buy & hold |") == 2
    assert "Forecast MSE / last-value MSE" in printed and "EURUSD hourly" in printed
    results = backtest_example.compare(
        backtest_example.load_dataset("EURUSD", 150), commission=0.0002, lookback=8
    )
    table = backtest_example.stats_table(results)
    assert list(table.columns) == ["online", "frozen", "buy & hold"]
    assert table.loc["# Trades", "buy & hold"] == 1
    assert math.isnan(table.loc["Forecast MSE / last-value MSE", "buy & hold"])


def test_backtrader_strategy_forecasts_each_closed_bar():
    bt = pytest.importorskip("backtrader")
    from connectors.backtrader_strategy import NeuralSyncBacktraderStrategy

    data = GOOG.iloc[:150]
    cerebro = bt.Cerebro(stdstats=False)
    cerebro.adddata(bt.feeds.PandasData(dataname=data))
    cerebro.addstrategy(NeuralSyncBacktraderStrategy, freeze_after=100, **SMALL)
    cerebro.broker.setcash(100_000)
    strategy = cerebro.run()[0]
    model = make_forecaster(target="close", **SMALL)
    expected = []
    for i, (time, close) in enumerate(data["Close"].items()):
        if i == 100:
            model.freeze()
        model.learn_one(close, t=time)
        value = model.forecast()[-1] / close - 1.0
        if not math.isnan(value):
            expected.append((time, value))
    assert strategy.forecasts_ == expected
    assert cerebro.broker.getvalue() != 100_000  # it traded


def test_vectorbt_signals_are_causal_and_shifted_one_bar():
    from connectors import vectorbt_signals
    from connectors.vectorbt_signals import forecast_signals

    close = GOOG["Close"].iloc[:200]
    signals = forecast_signals(close, threshold=0.001, **SMALL)
    expected = signals.forecast_return
    assert expected.iloc[:7].isna().all() and expected.iloc[7:].notna().all()
    pd.testing.assert_series_equal(
        signals.entries, (expected > 0.001).shift(1, fill_value=False), check_names=False
    )
    assert not signals.entries.iloc[0] and signals.exits.sum() > 0
    noisy = close.copy()
    noisy.iloc[121:] = noisy.iloc[120] * np.exp(np.random.default_rng(0).normal(0, 0.05, 79))
    again = forecast_signals(noisy, threshold=0.001, **SMALL)
    pd.testing.assert_series_equal(
        again.forecast_return.iloc[:121], expected.iloc[:121], check_exact=True
    )
    # many symbols: one column each, sharing one model; a NaN is a bar not traded
    wide = pd.DataFrame({"A": close, "B": close.iloc[::-1].to_numpy() / 2})
    wide.iloc[50, 1] = np.nan
    many = forecast_signals(wide, **SMALL)
    assert list(many.entries.columns) == ["A", "B"] and math.isnan(many.forecast_return.iloc[50, 1])
    assert doctest.testmod(vectorbt_signals).failed == 0


def test_vectorbt_portfolio_from_the_signals():
    vbt = pytest.importorskip("vectorbt")
    from connectors.vectorbt_signals import forecast_signals

    close = GOOG["Close"].iloc[:120]
    signals = forecast_signals(close, **SMALL)
    portfolio = vbt.Portfolio.from_signals(
        close, signals.entries, signals.exits, init_cash=100_000, fees=0.002
    )
    assert portfolio.orders.count() > 0 and math.isfinite(portfolio.total_return())


def test_connector_docstring_examples_run():
    for name in ("connectors.backtest_forecaster", "connectors.backtesting_py"):
        assert doctest.testmod(importlib.import_module(name)).failed == 0


def test_bench_library_quick():
    result = CliRunner().invoke(app, ["bench", "library", "--quick", "--json", "--lookback", "8"])
    assert result.exit_code == 0, result.output
    figures = result.output[result.output.index("{") :]
    import json

    parsed = json.loads(figures)
    assert parsed["bars"] == 300 and parsed["data"] == "GOOG daily"
    assert 0 < parsed["backtesting_bare_loop_us"] < parsed["backtesting_with_forecaster_us"]
    assert parsed["learn_one_plus_forecast_us"] > parsed["forecast_us"] > 0
