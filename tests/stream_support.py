"""Helpers for tests that stream a frame through a pipeline: a series whose dynamics switch."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pandas as pd

from neuralsync.adaptation import build_adapters
from neuralsync.config import Scenario
from neuralsync.pipeline import Pipeline
from neuralsync.sources import DataFrameSource


def switching_frame(n: int = 1400) -> pd.DataFrame:
    """``y`` switches between two AR(1) dynamics (0.9 and -0.8) every 350 rows, so each comes
    back every 700; the time column is ``t``."""
    rng = np.random.default_rng(0)
    y = np.zeros(n)
    for t in range(1, n):
        a = 0.9 if (t // 350) % 2 == 0 else -0.8
        y[t] = a * y[t - 1] + rng.normal(0, 0.5)
    return pd.DataFrame({"t": np.arange(n, dtype=float), "y": y})


def switching_scenario(name: str, adaptation: dict[str, Any], /, **settings: Any) -> Scenario:
    """The scenario of the switching stream's tests: a linear live model that learns slowly
    (lr 0.005), ADWIN at delta 0.01, a 16-sample canary and ``adaptation`` beside it;
    ``settings`` replace whole fields (``adaptation`` included, which drops the canary size)."""
    options = {
        "name": name,
        "timestamp": "t",
        "targets": "y",
        "lookback": 8,
        "model": {"type": "linear", "lr": 0.005},
        "detector": {"type": "adwin", "params": {"delta": 0.01}},
        "adaptation": {"canary_size": 16, **adaptation},
    }
    options.update(settings)
    return Scenario(**options)


def feed(pipeline: Pipeline, frame: pd.DataFrame, start: int = 0) -> list:
    """Stream ``frame`` from row ``start`` through ``pipeline`` in chunks of 50; its forecasts."""
    source = DataFrameSource(frame, timestamp="t", columns=["y"], chunk_size=50)
    source.seek(start)
    out = []
    for batch in source:
        out += pipeline.process(batch)
    return out


def stop_and_resume(
    scenario: Scenario, frame: pd.DataFrame, stop: int
) -> tuple[list, Pipeline, dict[str, Any]]:
    """Run ``frame`` up to row ``stop``, snapshot, restore the snapshot into a new pipeline and
    run the rest there: the forecasts of both parts, the resumed pipeline and the snapshot."""
    first = Pipeline(scenario, adapters=build_adapters(scenario))
    head = feed(first, frame.iloc[:stop])
    snapshot = copy.deepcopy(first.state_dict())
    second = Pipeline(scenario, adapters=build_adapters(scenario))
    second.load_state_dict(snapshot)
    return head + feed(second, frame, start=stop), second, snapshot
