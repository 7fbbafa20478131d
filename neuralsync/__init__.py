"""NeuralSync: online continual adaptation for streaming time series."""

from typing import Any

from neuralsync.config import Scenario, load_scenario

__all__ = ["OnlineForecaster", "Pipeline", "Scenario", "load_scenario"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # The pipeline and the OnlineForecaster facade over it pull in torch, river and numba
    # (seconds of start-up): load them on first use, so `neuralsync scenarios` and config
    # checks stay instant.
    if name == "Pipeline":
        from neuralsync.pipeline import Pipeline

        return Pipeline
    if name == "OnlineForecaster":
        from neuralsync.forecaster import OnlineForecaster

        return OnlineForecaster
    raise AttributeError(f"module 'neuralsync' has no attribute {name!r}")
