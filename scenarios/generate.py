"""Generate the bundled replay scenarios' data, deterministically.

Run ``python scenarios/generate.py`` to rewrite, next to this script:

``default.csv`` and ``default.changepoints.json``
    An hourly electricity-market-like series: ``temperature`` (daily cycle plus weather drift)
    drives ``load``, and ``price`` (the target) mean-reverts around a level set by the previous
    hour's load. Three regime changes of different kinds: a mean shift, a volatility jump and
    a dynamics shift.
``symbols.csv`` and ``symbols.changepoints.json``
    Three symbols at very different price levels, interleaved by timestamp, each with a
    mean-reverting price nudged by volume shocks and one regime change of its own.
``recurring.csv`` and ``recurring.changepoints.json``
    Three regimes of the dynamics that come back in turn (A, B, C, A, B, C, ...), with the
    same noise level: after a change, a model that has adapted is as good as before it.

Every series comes from :func:`numpy.random.default_rng` with a fixed seed and every float is
written as ``%.6f``, so the files are byte-identical on every run.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
START = pd.Timestamp("2024-01-01 00:00:00")
FLOAT_FORMAT = "%.6f"
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"

DEFAULT_ROWS = 6000
#: Row (0-based, header excluded) where each default regime starts, and its kind.
DEFAULT_CHANGES = [(1500, "mean_shift"), (3000, "volatility_jump"), (4500, "dynamics_shift")]

SYMBOL_STEPS = 2000
#: Per symbol: price level, typical volume, and (row within the symbol, kind) of its change.
SYMBOLS = {
    "AAA": (20.0, 5000.0, (700, "mean_shift")),
    "BBB": (150.0, 1200.0, (1000, "volatility_jump")),
    "CCC": (900.0, 300.0, (1300, "dynamics_shift")),
}

RECURRING_ROWS = 7200
RECURRING_SEGMENT = 600
#: Per regime: (name, coefficient on the last value, coefficient on the driver's last value).
RECURRING_REGIMES = [("persistent", 0.9, 0.5), ("alternating", -0.8, 0.5), ("inverse", 0.3, -1.0)]


def hourly(n: int) -> pd.DatetimeIndex:
    """Return ``n`` hourly timestamps from :data:`START`.

    Parameters
    ----------
    n : int
        Number of timestamps.

    Returns
    -------
    pandas.DatetimeIndex
        ``START``, ``START + 1h``, ...

    """
    return pd.date_range(START, periods=n, freq="h")


def ar1(rng: np.random.Generator, n: int, phi: float, sigma: float) -> np.ndarray:
    """Simulate a zero-mean AR(1) process started at zero.

    Parameters
    ----------
    rng : numpy.random.Generator
        Source of the Gaussian innovations.
    n : int
        Length of the series.
    phi : float
        Autoregressive coefficient.
    sigma : float
        Standard deviation of the innovations.

    Returns
    -------
    numpy.ndarray
        The series, shape ``(n,)``.

    """
    eps = rng.normal(0.0, sigma, n)
    out = np.zeros(n)
    for t in range(1, n):
        out[t] = phi * out[t - 1] + eps[t]
    return out


def make_default(seed: int = 0) -> tuple[pd.DataFrame, list[dict]]:
    """Build the ``default`` scenario: temperature -> load -> price, with three regime changes.

    ``price[t] = level[t] + phi * (price[t-1] - level[t-1]) + sigma * eps[t]`` with
    ``level[t] = base + beta * (load[t-1] - 100)``. The regimes change one thing at a time:

    ====  ================  ==============================================
    row   kind              change
    ====  ================  ==============================================
    1500  mean_shift        ``base`` 50 -> 65
    3000  volatility_jump   ``sigma`` 1 -> 3
    4500  dynamics_shift    ``phi`` 0.6 -> -0.5 and ``beta`` 0.5 -> -0.5
    ====  ================  ==============================================

    Parameters
    ----------
    seed : int
        Seed of the random generator.

    Returns
    -------
    frame : pandas.DataFrame
        Columns ``timestamp, load, temperature, price``.
    change_points : list of dict
        ``{"timestamp", "kind", "row"}`` for each regime change.

    """
    rng = np.random.default_rng(seed)
    n = DEFAULT_ROWS
    stamps = hourly(n)
    hour = stamps.hour.to_numpy()

    temperature = 12.0 + 7.0 * np.sin(2 * np.pi * (hour - 9) / 24) + ar1(rng, n, 0.995, 0.3)
    business = np.where((hour >= 8) & (hour < 20), 8.0, 0.0)
    load = 100.0 + 2.5 * (temperature - 12.0) + business + ar1(rng, n, 0.9, 2.0)

    base = np.full(n, 50.0)
    sigma = np.full(n, 1.0)
    phi = np.full(n, 0.6)
    beta = np.full(n, 0.5)
    base[1500:] = 65.0
    sigma[3000:] = 3.0
    phi[4500:] = -0.5
    beta[4500:] = -0.5

    lagged_load = np.concatenate([[100.0], load[:-1]])
    level = base + beta * (lagged_load - 100.0)
    eps = rng.normal(0.0, 1.0, n)
    price = np.empty(n)
    price[0] = level[0]
    for t in range(1, n):
        price[t] = level[t] + phi[t] * (price[t - 1] - level[t - 1]) + sigma[t] * eps[t]

    frame = pd.DataFrame(
        {
            "timestamp": stamps.strftime(TIME_FORMAT),
            "load": load,
            "temperature": temperature,
            "price": price,
        }
    )
    change_points = [
        {"timestamp": stamps[row].strftime(TIME_FORMAT), "kind": kind, "row": row}
        for row, kind in DEFAULT_CHANGES
    ]
    return frame, change_points


def make_symbols(seed: int = 1) -> tuple[pd.DataFrame, list[dict]]:
    """Build the ``symbols`` scenario: three keyed series, one regime change each.

    Per symbol, with ``z`` the volume's log-shock (AR(1)) and ``L`` the price level::

        price[t] = L + phi * (price[t-1] - L) + gamma * 0.004 * L * z[t-1] + 0.004 * L * eps[t]

    ``phi = 0.8`` and ``gamma = 1``; AAA's level rises 15 % at its change, BBB's noise triples,
    CCC's ``phi`` drops to 0.2 and its response to volume flips sign (``gamma = -1``).

    Parameters
    ----------
    seed : int
        Seed of the random generator.

    Returns
    -------
    frame : pandas.DataFrame
        Columns ``timestamp, symbol, volume, price``, all symbols for one timestamp together.
    change_points : list of dict
        ``{"timestamp", "kind", "row", "key"}`` for each change; ``row`` counts that symbol's
        rows from 0.

    """
    rng = np.random.default_rng(seed)
    n = SYMBOL_STEPS
    stamps = hourly(n)
    hour = stamps.hour.to_numpy()
    parts = []
    change_points = []
    for key, (price_level, typical_volume, (row, kind)) in SYMBOLS.items():
        shock = ar1(rng, n, 0.7, 0.3)
        volume = typical_volume * np.exp(0.4 * np.sin(2 * np.pi * (hour - 14) / 24) + shock)

        level = np.full(n, price_level)
        noise = np.full(n, 0.004 * price_level)
        phi = np.full(n, 0.8)
        gamma = np.full(n, 1.0)
        if kind == "mean_shift":
            level[row:] *= 1.15
        elif kind == "volatility_jump":
            noise[row:] *= 3.0
        else:
            phi[row:] = 0.2
            gamma[row:] = -1.0

        eps = rng.normal(0.0, 1.0, n)
        price = np.empty(n)
        price[0] = level[0]
        for t in range(1, n):
            push = gamma[t] * 0.004 * level[t] * shock[t - 1]
            price[t] = level[t] + phi[t] * (price[t - 1] - level[t - 1]) + push
            price[t] += noise[t] * eps[t]

        parts.append(
            pd.DataFrame(
                {
                    "step": np.arange(n),
                    "timestamp": stamps.strftime(TIME_FORMAT),
                    "symbol": key,
                    "volume": volume,
                    "price": price,
                }
            )
        )
        change_points.append(
            {"timestamp": stamps[row].strftime(TIME_FORMAT), "kind": kind, "row": row, "key": key}
        )
    frame = pd.concat(parts).sort_values(["step", "symbol"], kind="stable")
    change_points.sort(key=lambda c: (c["timestamp"], c["key"]))
    return frame.drop(columns="step").reset_index(drop=True), change_points


def make_recurring(seed: int = 2) -> tuple[pd.DataFrame, list[dict]]:
    """Build the ``recurring`` scenario: three regimes that come back in turn.

    ``driver`` is an observed AR(1) series; ``value`` (the target) follows the regime of its
    segment (``RECURRING_SEGMENT`` rows, regimes in the order of :data:`RECURRING_REGIMES`,
    then again)::

        value[t] = a * value[t-1] + b * driver[t-1] + 0.5 * eps[t]

    Parameters
    ----------
    seed : int
        Seed of the random generator.

    Returns
    -------
    frame : pandas.DataFrame
        Columns ``timestamp, driver, value``.
    change_points : list of dict
        ``{"timestamp", "kind", "row"}`` for each change; ``kind`` names the new regime.

    """
    rng = np.random.default_rng(seed)
    n = RECURRING_ROWS
    stamps = hourly(n)
    driver = ar1(rng, n, 0.8, 1.0)
    regime = (np.arange(n) // RECURRING_SEGMENT) % len(RECURRING_REGIMES)
    eps = rng.normal(0.0, 0.5, n)
    value = np.zeros(n)
    for t in range(1, n):
        _, a, b = RECURRING_REGIMES[regime[t]]
        value[t] = a * value[t - 1] + b * driver[t - 1] + eps[t]
    frame = pd.DataFrame(
        {"timestamp": stamps.strftime(TIME_FORMAT), "driver": driver, "value": value}
    )
    change_points = [
        {
            "timestamp": stamps[row].strftime(TIME_FORMAT),
            "kind": RECURRING_REGIMES[regime[row]][0],
            "row": row,
        }
        for row in range(RECURRING_SEGMENT, n, RECURRING_SEGMENT)
    ]
    return frame, change_points


def write(name: str, frame: pd.DataFrame, change_points: list[dict]) -> None:
    """Write ``<name>.csv`` and ``<name>.changepoints.json`` next to this script.

    Parameters
    ----------
    name : str
        Scenario name, the files' stem.
    frame : pandas.DataFrame
        The data; floats are written with :data:`FLOAT_FORMAT`.
    change_points : list of dict
        The true regime changes.

    """
    frame.to_csv(HERE / f"{name}.csv", index=False, float_format=FLOAT_FORMAT, lineterminator="\n")
    text = json.dumps({"change_points": change_points}, indent=2) + "\n"
    (HERE / f"{name}.changepoints.json").write_text(text, encoding="utf-8")


def main() -> None:
    """Regenerate every bundled scenario's CSV and change-point file."""
    write("default", *make_default())
    write("symbols", *make_symbols())
    write("recurring", *make_recurring())


if __name__ == "__main__":
    main()
