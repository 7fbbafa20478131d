"""NeuralSync: online continual adaptation for streaming time series."""

from neuralsync.config import Scenario, load_scenario
from neuralsync.pipeline import Pipeline

__all__ = ["Pipeline", "Scenario", "load_scenario"]
__version__ = "0.1.0"
