"""What the backtest adapters share: the forecaster they build from their parameters.

Kept free of any backtest library, so that each adapter needs only its own optional extra.
"""

from __future__ import annotations

from typing import Any

from neuralsync.config import Scenario
from neuralsync.forecaster import OnlineForecaster

__all__ = ["FORECASTER_SETTINGS", "forecaster_from", "freeze_bar", "make_forecaster"]


def make_forecaster(
    *,
    target: str = "Close",
    features: tuple[str, ...] | list[str] = (),
    lookback: int = 32,
    horizon: int = 1,
    hidden: int = 32,
    lr: float = 0.01,
    seed: int = 0,
    normalization: str = "running",
    halflife: float = 250.0,
    detector: str = "adwin",
    scenario: Scenario | str | None = None,
    options: dict[str, Any] | None = None,
) -> OnlineForecaster:
    """The forecaster the backtest adapters build from their parameters."""
    settings: dict[str, Any] = {
        "name": "backtest",
        "timestamp": "time",
        "targets": [target],
        "features": [f for f in features if f != target],
        "lookback": lookback,
        "horizon": horizon,
        "model": {"type": "mlp" if hidden else "linear", "hidden": [hidden or 1], "lr": lr},
        "normalization": {"mode": normalization, "halflife": halflife},
        "detector": {"type": detector},
        "seed": seed,
    }
    if scenario is not None:  # the scenario's own settings, columns included
        settings = {}
    forecaster = OnlineForecaster(scenario, **{**settings, **(options or {})})
    if len(forecaster.scenario.targets) != 1:
        raise ValueError(
            f"a backtest trades one target; the scenario has {forecaster.scenario.targets}"
        )
    return forecaster


#: The parameters of :func:`make_forecaster`, which every adapter exposes under these names.
FORECASTER_SETTINGS = ("target", "features", "lookback", "horizon", "hidden", "lr", "seed",
                       "normalization", "halflife", "detector", "scenario", "options")  # fmt: skip


def forecaster_from(holder: Any) -> OnlineForecaster:
    """:func:`make_forecaster` with each setting read from ``holder``'s attribute of that name
    (a backtesting.py strategy's class parameters, a backtrader strategy's ``params``)."""
    return make_forecaster(**{name: getattr(holder, name) for name in FORECASTER_SETTINGS})


def freeze_bar(freeze_after: int | float | None, bars: int) -> int | None:
    """The bar from which a model frozen ``freeze_after`` stops learning.

    >>> freeze_bar(0.3, 1000), freeze_bar(250, 1000), freeze_bar(None, 1000)
    (300, 250, None)

    """
    if freeze_after is None:
        return None
    if isinstance(freeze_after, float) and 0.0 < freeze_after < 1.0:
        return int(bars * freeze_after)
    if isinstance(freeze_after, int) and not isinstance(freeze_after, bool) and freeze_after >= 0:
        return freeze_after
    raise ValueError(
        f"freeze_after={freeze_after!r}: expected a share of the bars in (0, 1), a bar count, "
        "or None"
    )
