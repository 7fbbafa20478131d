"""Adaptation lag: how long the model takes to recover from a regime change, and what it costs.

For each change (the true change points when the scenario names them, else the detected
ones), over the step-1 squared errors in stream order:

- the **level before** is the mean error over the ``baseline`` forecasts before the change
  (not reaching back past the previous change);
- the **lag** is the number of forecasts from the change until the error is back within
  ``tolerance`` (10 %) of that level: the first ``t`` from which the mean error of the next
  ``window`` forecasts is at most ``(1 + tolerance) * level``. A model that never recovers
  before the next change (or the end) gets the whole span, marked ``recovered: false``;
- the **excess error** is the sum of ``error - level`` over those lag forecasts, in the
  target's squared units.

A replay writes the result to ``metrics.json`` as ``adaptation_lag``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["adaptation_lag", "lag_from_predictions", "summarise"]


def adaptation_lag(
    errors: Sequence[float] | np.ndarray,
    changes: Sequence[int],
    *,
    window: int = 50,
    baseline: int = 200,
    tolerance: float = 0.1,
) -> list[dict[str, Any]]:
    """The lag and excess error after each change.

    Parameters
    ----------
    errors
        Squared errors, one per forecast, in stream order.
    changes
        Indices into ``errors`` where the regimes change (ascending).
    window
        Forecasts averaged to decide that the error is back to its level.
    baseline
        Forecasts before a change that set its level.
    tolerance
        Recovered means at most ``(1 + tolerance)`` times the level.

    Returns
    -------
    list of dict
        Per change: ``index``, ``level_before``, ``lag``, ``excess_error``, ``recovered``
        (``lag`` and ``excess_error`` are ``None`` for a change without forecasts before it).

    Examples
    --------
    >>> errors = [1.0] * 100 + [5.0] * 30 + [1.0] * 100
    >>> records = adaptation_lag(errors, [100], window=10)
    >>> [(r["lag"], r["excess_error"], r["recovered"]) for r in records]
    [(30, 120.0, True)]

    """
    e = np.asarray(errors, dtype=float)
    out = []
    sums = np.concatenate([[0.0], np.cumsum(e)])
    changes = sorted(int(c) for c in changes)
    for i, change in enumerate(changes):
        previous = changes[i - 1] if i else 0
        end = changes[i + 1] if i + 1 < len(changes) else len(e)
        start = max(previous, change - baseline)
        record: dict[str, Any] = {"index": change}
        if change - start < 1 or change >= len(e):
            record.update(level_before=None, lag=None, excess_error=None, recovered=False)
            out.append(record)
            continue
        level = float(e[start:change].mean())
        width = max(1, min(window, end - change))
        starts = np.arange(change, end - width + 1)
        means = (sums[starts + width] - sums[starts]) / width
        ok = np.flatnonzero(means <= (1.0 + tolerance) * level)
        recovered = bool(len(ok))
        lag = int(starts[ok[0]] - change) if recovered else int(end - change)
        record.update(
            level_before=level,
            lag=lag,
            excess_error=float((e[change : change + lag] - level).sum()),
            recovered=recovered,
        )
        out.append(record)
    return out


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Median lag, total excess error and the share of changes recovered from.

    >>> summarise([{"lag": 10, "excess_error": 2.0, "recovered": True},
    ...            {"lag": 30, "excess_error": 1.0, "recovered": False}])
    {'median_lag': 20.0, 'total_excess_error': 3.0, 'recovered': 1, 'changes': 2}

    """
    scored = [r for r in records if r.get("lag") is not None]
    return {
        "median_lag": float(np.median([r["lag"] for r in scored])) if scored else None,
        "total_excess_error": float(sum(r["excess_error"] for r in scored)) if scored else None,
        "recovered": sum(bool(r["recovered"]) for r in scored),
        "changes": len(records),
    }


def _times(values: Any) -> np.ndarray:
    """Stream times (ISO text, numbers, or nanoseconds) as comparable float64."""
    series = pd.Series(values, dtype=object)
    numbers = pd.to_numeric(series, errors="coerce")
    if numbers.notna().all():
        return numbers.to_numpy(dtype=float)
    parsed = pd.to_datetime(series.astype(str), format="ISO8601", errors="coerce", utc=True)
    return parsed.dt.tz_localize(None).to_numpy().astype("datetime64[ns]").astype(float)


def lag_from_predictions(
    predictions: str | Path | pd.DataFrame,
    changes: Sequence[Any],
    *,
    basis: str = "true",
    **options: Any,
) -> dict[str, Any]:
    """``adaptation_lag`` of a run from its ``predictions.csv`` (or that frame).

    Uses the scored step-1 forecasts (all keys and targets, in time order); ``changes`` are
    stream times (as written in ``metrics.json``, or numbers). A change is placed at the first
    forecast at or after it. Returns the summary, ``basis`` and a record per change with its
    ``stream_time`` and the stream time it recovered at (``recovered_at``).
    """
    frame = predictions
    if not isinstance(frame, pd.DataFrame):
        frame = pd.read_csv(predictions, usecols=["timestamp", "step", "prediction", "truth"])
    frame = frame[(frame["step"] == 1) & frame["truth"].notna() & frame["timestamp"].notna()]
    if frame.empty or not len(changes):
        return {**summarise([]), "basis": basis, "per_change": []}
    times = _times(frame["timestamp"].to_numpy())
    order = np.argsort(times, kind="stable")
    times = times[order]
    stamps = frame["timestamp"].to_numpy()[order]
    errors = ((frame["prediction"] - frame["truth"]).to_numpy(dtype=float) ** 2)[order]
    # Change points: ISO text like the predictions' timestamps, or nanoseconds since the epoch.
    raw = list(changes)
    if all(isinstance(c, int | float) for c in raw) and not np.issubdtype(
        np.asarray(frame["timestamp"]).dtype, np.number
    ):
        change_times = np.asarray(raw, dtype=float)  # nanoseconds, as the scenario loads them
    else:
        change_times = _times(raw)
    indices = sorted(set(np.searchsorted(times, change_times, side="left").tolist()))
    indices = [i for i in indices if i < len(times)]
    records = adaptation_lag(errors, indices, **options)
    for record in records:
        record["stream_time"] = str(stamps[record["index"]])
        lag = record["lag"]
        end = record["index"] + (lag or 0)
        record["recovered_at"] = (
            str(stamps[end]) if record["recovered"] and end < len(stamps) else None
        )
        record["until"] = str(stamps[min(end, len(stamps) - 1)])  # recovered, or charged to
    return {**summarise(records), "basis": basis, "per_change": records}
