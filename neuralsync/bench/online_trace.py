"""Traces of ``neuralsync bench online --trace``: each method's error window by window, and the
pipelines' events, so that a figure in ``results.json`` can be taken apart.

A run's MSE is one number over thousands of test windows. Where a method gains or loses (an
episode of extreme levels, a swap that went wrong) only shows window by window. With a trace
directory each test pass writes:

- ``METHOD/windows.csv``: one row per scored test window: ``origin`` (the row the forecast was
  issued at, the window's last row), ``mse`` and ``mae`` over its horizon x columns entries;
- ``METHOD/events.jsonl``: for the pipeline methods, every event of the test pass's pipeline
  (regime changes, adaptations, gate decisions, swaps, rollbacks), one JSON object a line,
  from the first row streamed (the warm-up rows included);

and :func:`plot_trace` draws every method's rolling MSE over the test windows relative to
last-value's, with the swaps marked.

Examples
--------
>>> import tempfile
>>> from pathlib import Path
>>> trace = Path(tempfile.mkdtemp())
>>> errors = np.array([0.5, 0.25, 1.0])
>>> write_windows(trace / "last_value", [59, 60, 61], errors, np.sqrt(errors)).name
'windows.csv'
>>> read_windows(trace / "last_value")["mse"].tolist()
[0.5, 0.25, 1.0]

"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["plot_trace", "read_events", "read_windows", "write_events", "write_windows"]

WINDOWS = "windows.csv"
EVENTS = "events.jsonl"


def write_windows(directory: str | Path, origins: Any, mse: Any, mae: Any) -> Path:
    """Write one pass's per-window errors to ``directory/windows.csv``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / WINDOWS
    frame = pd.DataFrame({"origin": np.asarray(origins, dtype=np.int64), "mse": mse, "mae": mae})
    frame.to_csv(path, index=False, float_format="%.9g")
    return path


def read_windows(directory: str | Path) -> pd.DataFrame:
    """One method's ``windows.csv`` (``origin``, ``mse``, ``mae``)."""
    return pd.read_csv(
        Path(directory) / WINDOWS, dtype={"origin": np.int64, "mse": float, "mae": float}
    )


def read_events(directory: str | Path) -> pd.DataFrame:
    """One pipeline method's ``events.jsonl`` as a frame (empty where there is none)."""
    path = Path(directory) / EVENTS
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=["type", "position", "stream_time"])
    # Not convert_dates: stream_time is a row number here, not a date.
    return pd.read_json(path, lines=True, convert_dates=False)


def write_events(directory: str | Path, events: Iterable[Any]) -> Path:
    """Write a pass's events (:class:`~neuralsync.events.Event`) to ``directory/events.jsonl``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / EVENTS
    path.write_text("".join(event.to_json() + "\n" for event in events), encoding="utf-8")
    return path


def plot_trace(
    trace: str | Path, path: str | Path, smoothing: int | None = None, title: str = ""
) -> Path:
    """Every traced method's MSE over the test windows, relative to last-value's, as a rolling
    mean of ``smoothing`` windows (default: a fiftieth of the test windows); the pipelines'
    swaps as ticks along the bottom, in each method's colour.

    The ratio is of rolling means (a method's errors over last-value's in the same windows),
    so a stretch where every method errs a lot weighs as it does in the run's MSE. Without a
    ``last_value`` trace the rolling MSE itself is drawn, on a log scale.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neuralsync.report import save_figure

    trace = Path(trace)
    methods = sorted(p.parent.name for p in trace.glob(f"*/{WINDOWS}"))
    if not methods:
        raise FileNotFoundError(f"{trace}: no METHOD/{WINDOWS} here; run with --trace first")
    frames = {m: read_windows(trace / m).set_index("origin") for m in methods}
    n = max(len(f) for f in frames.values())
    smoothing = smoothing or max(1, n // 50)
    reference = frames.get("last_value")
    fig, ax = plt.subplots(figsize=(10, 4.2))
    for i, method in enumerate(methods):
        colour = f"C{i}"
        rolling = frames[method]["mse"].rolling(smoothing, min_periods=1).mean()
        label = "MSE"
        if reference is not None:
            rolling = rolling / reference["mse"].rolling(smoothing, min_periods=1).mean()
            label = "MSE / last-value MSE"
        style = "-" if method.startswith("neuralsync") else "--"
        ax.plot(rolling.index, rolling.to_numpy(), style, color=colour, label=method, lw=1.2)
        events = read_events(trace / method)
        if len(events):
            swaps = events.loc[events["type"] == "swap", "stream_time"].astype(float)
            swaps = swaps[swaps >= frames[method].index.min()]
            ax.plot(
                swaps,
                np.zeros(len(swaps)),
                "|",
                color=colour,
                ms=14,
                mew=1.5,
                transform=ax.get_xaxis_transform(),
            )
    if reference is not None:
        ax.axhline(1.0, color="grey", lw=0.8)
    else:  # errors span orders of magnitude between calm and extreme stretches
        ax.set_yscale("log")
    ax.set_xlabel("row the forecast was issued at (ticks at the bottom: swaps)")
    ax.set_ylabel(f"{label}, rolling {smoothing} windows")
    ax.set_title(title or trace.name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    path = save_figure(fig, path)
    plt.close(fig)
    return path
