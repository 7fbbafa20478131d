"""Worked example: trade on NeuralSync's forecast return in backtesting.py, against two baselines.

On the price data bundled with backtesting.py (GOOG daily, EURUSD hourly), three strategies
run over the same bars with the same costs:

- ``online``: :class:`~connectors.backtesting_py.NeuralSyncStrategy`, learning at every bar;
- ``frozen``: the same model, which stops learning after the first 30 % of the bars;
- ``buy & hold``: buy at the first bar, hold to the end.

It prints a stats table per data set (markdown) and draws their equity curves into one PNG::

    python -m connectors.backtest_example --out docs/images/backtest.png

Needs the optional extra ``pip install -e ".[backtesting]"``.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from backtesting import Backtest

from connectors.backtesting_py import BuyAndHold, NeuralSyncStrategy

__all__ = ["DATASETS", "compare", "load_dataset", "plot_equity", "stats_table"]

#: Data set → (commission per trade, as a share of its value; description).
DATASETS: dict[str, tuple[float, str]] = {
    "GOOG": (0.002, "GOOG daily, 2004-2013"),
    "EURUSD": (0.0002, "EURUSD hourly, 2017-2018"),
}
CASH = 100_000
FREEZE_AFTER = 0.3

#: The stats rows shown, backtesting.py's names.
ROWS = [
    "Return [%]",
    "Return (Ann.) [%]",
    "Volatility (Ann.) [%]",
    "Sharpe Ratio",
    "Max. Drawdown [%]",
    "# Trades",
    "Win Rate [%]",
    "Exposure Time [%]",
]


def load_dataset(name: str, bars: int | None = None) -> pd.DataFrame:
    """A data set bundled with backtesting.py, optionally its first ``bars`` bars."""
    from backtesting import test

    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(DATASETS)}")
    data = getattr(test, name)
    return data.iloc[:bars] if bars else data


def compare(
    data: pd.DataFrame,
    *,
    commission: float,
    cash: float = CASH,
    freeze_after: float | int = FREEZE_AFTER,
    **params: Any,
) -> dict[str, pd.Series]:
    """Run the online, frozen and buy-and-hold strategies on ``data``; their stats by name.

    ``params`` are :class:`NeuralSyncStrategy` parameters for both model strategies.
    """
    results = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # prices above the cash, trades open at the end
        for name, strategy, extra in (
            ("online", NeuralSyncStrategy, params),
            ("frozen", NeuralSyncStrategy, {**params, "freeze_after": freeze_after}),
            ("buy & hold", BuyAndHold, {}),
        ):
            backtest = Backtest(
                data, strategy, cash=cash, commission=commission, finalize_trades=True
            )
            results[name] = backtest.run(**extra)
    return results


def stats_table(results: dict[str, pd.Series]) -> pd.DataFrame:
    """The main figures side by side, plus the model's forecast error against last value."""
    table = pd.DataFrame({name: stats[ROWS] for name, stats in results.items()})
    ratio, accuracy = {}, {}
    for name, stats in results.items():
        forecaster = getattr(stats._strategy, "forecaster", None)
        if forecaster is None:
            continue
        m = forecaster.metrics()
        ratio[name] = m["mse"] / m["baseline_last_value"]["mse"]
        accuracy[name] = 100 * m["directional_accuracy"]
    table.loc["Forecast MSE / last-value MSE"] = pd.Series(ratio)
    table.loc["Forecast direction right [%]"] = pd.Series(accuracy)
    return table


def _markdown(table: pd.DataFrame) -> str:
    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and np.isnan(value)):
            return "—"
        if isinstance(value, int | np.integer):
            return str(value)
        return f"{float(value):.3f}" if abs(float(value)) < 10 else f"{float(value):.1f}"

    lines = ["| | " + " | ".join(table.columns) + " |", "|---" * (len(table.columns) + 1) + "|"]
    for row, values in table.iterrows():
        lines.append(f"| {row} | " + " | ".join(cell(v) for v in values) + " |")
    return "\n".join(lines)


def plot_equity(runs: dict[str, dict[str, pd.Series]], path: str | Path) -> Path:
    """Equity curves (growth of 1) of every strategy, one panel per data set, into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neuralsync.report import save_figure

    colours = {"online": "tab:blue", "frozen": "tab:orange", "buy & hold": "tab:gray"}
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 3.6 * len(runs)), squeeze=False)
    for ax, (title, results) in zip(axes[:, 0], runs.items(), strict=True):
        for name, stats in results.items():
            equity = stats._equity_curve["Equity"]
            ax.plot(equity.index, equity / equity.iloc[0], label=name, color=colours.get(name))
        index = next(iter(results.values()))._equity_curve.index
        ax.axvline(
            index[int(len(index) * FREEZE_AFTER)],
            color="tab:orange",
            ls=":",
            lw=1,
            label="the frozen model stops learning",
        )
        ax.axhline(1.0, color="black", lw=0.6)
        ax.set_title(title, loc="left")
        ax.set_ylabel("equity (growth of 1)")
        ax.legend(loc="upper left", frameon=False)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = save_figure(fig, path)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m connectors.backtest_example", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--out", type=Path, default=Path("backtest.png"), help="PNG to write")
    parser.add_argument("--data", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--bars", type=int, default=None, help="first N bars only (quick run)")
    parser.add_argument("--lookback", type=int, default=NeuralSyncStrategy.lookback)
    args = parser.parse_args(argv)
    runs = {}
    for name in args.data:
        commission, description = DATASETS[name]
        data = load_dataset(name, args.bars)
        results = compare(data, commission=commission, lookback=args.lookback)
        runs[f"{description}, commission {commission:.2%}"] = results
        print(f"\n{description} ({len(data)} bars, commission {commission:.2%}):\n")
        print(_markdown(stats_table(results)))
    print(f"\nequity curves: {plot_equity(runs, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
