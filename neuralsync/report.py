"""Draw a replay run's ``report.png``: forecasts, rolling error and the edge over last value.

The figure has three panels on one time axis:

1. truth and the step-1 forecast of the first target (of the first key, for keyed runs);
2. the rolling MSE of the model and of the last-value baseline, over all forecasts;
3. the cumulative difference of squared error, baseline minus model: rising means the model wins.

Every panel marks the detected regime changes (solid) and the true change points (dashed); the
rolling-error panel also shades each change's adaptation lag (``adaptation_lag`` of
``metrics.json``: from the change until the error is back within 10 % of its level). The
figure is drawn on a private Agg canvas, never through pyplot, so it is thread-safe and needs no
display. Plotted lines are thinned to a bounded number of points, keeping each bucket's minimum
and maximum, so runs with millions of forecasts draw quickly without hiding spikes.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib.dates as mdates
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from neuralsync.errors import DataError

__all__ = ["save_figure", "write_evolution_report", "write_report"]

_COLUMNS = ["timestamp", "key", "target", "step", "prediction", "truth", "last_value"]
_NUMBERS = ["step", "prediction", "truth", "last_value"]
_MODEL = "tab:blue"
_BASELINE = "tab:gray"
_TRUTH = "black"
_DETECTED = "tab:red"
_TRUE_CHANGE = "tab:green"
_LAG = "tab:orange"
_DPI = 110
_SIZE = (12.0, 9.0)


def save_figure(fig: Any, path: str | Path, dpi: int = _DPI) -> Path:
    """Write a matplotlib figure as a PNG at ``path`` (its folder made if need be), atomically:
    a reader never sees half a file, even while a long run redraws it.

    >>> import tempfile
    >>> from matplotlib.figure import Figure
    >>> fig = Figure()
    >>> _ = fig.add_subplot().plot([0, 1], [1, 0])
    >>> save_figure(fig, Path(tempfile.mkdtemp()) / "plots" / "line.png").name
    'line.png'

    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    fig.savefig(partial, format="png", dpi=dpi)
    os.replace(partial, path)
    return path


def write_report(run_dir: Path, *, rolling: int = 200, max_points: int = 20000) -> Path:
    """Draw ``run_dir/report.png`` from the run's ``predictions.csv`` and ``metrics.json``.

    Parameters
    ----------
    run_dir
        A replay run's output folder. A missing ``predictions.csv`` or one without any forecast
        whose truth is known gives a figure that says so; a missing ``metrics.json`` is read as
        empty (no regime changes, no change points, figures computed from the forecasts).
    rolling
        Forecasts in the rolling-MSE window (all keys and targets together, in time order). Runs
        with fewer than ``2 * rolling`` scored forecasts use half their count instead.
    max_points
        The most points drawn per line; longer lines are thinned, keeping each bucket's minimum
        and maximum.

    Returns
    -------
    Path
        The path of the written PNG. It is written to a temporary file first and then moved into
        place, so a viewer never sees a half-written image.

    Raises
    ------
    FileNotFoundError
        If ``run_dir`` is not a folder.
    DataError
        If ``predictions.csv`` lacks one of the expected columns or ``metrics.json`` is not JSON.

    Examples
    --------
    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     write_report(Path(folder)).name
    'report.png'

    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder at {run_dir}")
    if rolling < 1 or max_points < 4:
        raise ValueError(f"need rolling >= 1 and max_points >= 4, got {rolling} and {max_points}")
    metrics = _read_metrics(run_dir / "metrics.json")
    scored = _read_scored(run_dir / "predictions.csv")
    name = metrics.get("name") or run_dir.name

    fig = Figure(figsize=_SIZE, dpi=_DPI)
    FigureCanvasAgg(fig)
    if scored.empty:
        _draw_empty(fig, name, metrics)
    else:
        _draw_report(fig, scored, metrics, name, rolling=rolling, max_points=max_points)

    return save_figure(fig, run_dir / "report.png")


# -- reading ----------------------------------------------------------------------------------


def _read_metrics(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"not valid JSON: {error}", str(path)) from error
    if not isinstance(metrics, dict):
        raise DataError("expected a JSON object", str(path))
    return metrics


def _read_scored(path: Path) -> pd.DataFrame:
    """The forecasts whose truth is known, in time order, with parsed times (column ``time``)."""
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=[*_COLUMNS, "time"])
    header = pd.read_csv(path, nrows=0).columns
    missing = [c for c in _COLUMNS if c not in header]
    if missing:
        raise DataError(
            f"missing column(s) {', '.join(missing)}; expected a header with {', '.join(_COLUMNS)}",
            str(path),
        )
    # Everything as text first, so that a key such as "NA" stays a key and not a missing value.
    frame = pd.read_csv(path, usecols=_COLUMNS, dtype=str, keep_default_na=False)
    for column in _NUMBERS:
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    frame = frame[frame["truth"].notna() & (frame["timestamp"] != "")]
    frame = frame.assign(time=_parse_times(frame["timestamp"]))
    frame = frame[frame["time"].notna()]
    return frame.sort_values("time", kind="stable").reset_index(drop=True)


def _time_kind(values: pd.Series) -> str:
    """``"number"`` when every stream time is a plain number, else ``"datetime"``."""
    return "number" if pd.to_numeric(values, errors="coerce").notna().all() else "datetime"


def _parse_times(values: Any, kind: str | None = None) -> pd.Series:
    """Stream times (ISO strings or numbers) as floats or naive datetimes; unparsable → NaN/NaT."""
    series = pd.Series(values, dtype=object).dropna().astype(str)
    kind = kind or _time_kind(series)
    if kind == "number":
        return pd.to_numeric(series, errors="coerce").astype(float)
    parsed = pd.to_datetime(series, format="ISO8601", errors="coerce", utc=True)
    return parsed.dt.tz_localize(None)


def _change_times(metrics: dict[str, Any], name: str, kind: str) -> np.ndarray:
    values = metrics.get(name) or []
    if not values:
        return np.array([])
    times = _parse_times(values, kind)
    return times[times.notna()].to_numpy()


# -- drawing ----------------------------------------------------------------------------------


def _decimate(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_points`` points of a line: each bucket's minimum and maximum, in order.

    >>> x = np.arange(1000)
    >>> y = np.sin(x / 10.0)
    >>> xs, ys = _decimate(x, y, 100)
    >>> len(xs) <= 100, bool(ys.max() == y.max()), bool(ys.min() == y.min())
    (True, True, True)

    """
    n = len(y)
    if n <= max_points:
        return x, y
    buckets = max_points // 2
    size = math.ceil(n / buckets)
    values = np.full(buckets * size, np.nan)
    values[:n] = y
    values = values.reshape(buckets, size)
    finite = np.isfinite(values)
    lows = np.where(finite, values, np.inf).argmin(axis=1)
    highs = np.where(finite, values, -np.inf).argmax(axis=1)
    starts = np.arange(buckets) * size
    keep = np.unique(np.concatenate([starts + lows, starts + highs]))
    keep = keep[keep < n]
    return x[keep], y[keep]


def _mark_changes(
    ax: Axes, detected: np.ndarray, true_changes: np.ndarray, detected_label: str
) -> None:
    """Vertical lines over the whole height of ``ax``: detections solid, true changes dashed."""
    spans = ax.get_xaxis_transform()
    if len(true_changes):
        ax.vlines(
            true_changes,
            0,
            1,
            transform=spans,
            colors=_TRUE_CHANGE,
            linestyles="--",
            linewidth=1.2,
            alpha=0.9,
            label="true change point",
            zorder=1,
        )
    if len(detected):
        ax.vlines(
            detected,
            0,
            1,
            transform=spans,
            colors=_DETECTED,
            linestyles="-",
            linewidth=0.9,
            alpha=0.6,
            label=detected_label,
            zorder=1,
        )


_SWAP_COLORS = {"evolution": "tab:purple", "meta": "tab:cyan"}


def _mark_swaps(ax: Axes, metrics: dict[str, Any], kind: str) -> None:
    """A triangle at the top of ``ax`` for every swap, coloured by source; hollow when
    probation rolled it back."""
    swaps = metrics.get("swap_log")
    if not isinstance(swaps, list) or not swaps:
        return
    spans = ax.get_xaxis_transform()
    labelled: set[str] = set()
    for swap in swaps:
        when = _parse_times([swap.get("stream_time")], kind)
        if not len(when) or not when.notna().all():
            continue
        source = str(swap.get("source"))
        color = _SWAP_COLORS.get(source, "tab:gray")
        back = bool(swap.get("rolled_back"))
        label = f"swap ({source}{', rolled back' if back else ''})"
        ax.scatter(
            [when.iloc[0]],
            [0.96],
            transform=spans,
            marker="v",
            s=60,
            facecolors="none" if back else color,
            edgecolors=color,
            linewidths=1.4,
            label=None if label in labelled else label,
            zorder=4,
            clip_on=False,
        )
        labelled.add(label)


def write_evolution_report(run_dir: Path) -> Path | None:
    """Draw ``run_dir/evolution.png``: the evolution engine's per-generation history (best and
    mean fitness relative to the live model, σ, diversity, samples seen) from
    ``metrics.json``; ``None`` (nothing written) when the run made no search.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     write_evolution_report(Path(folder)) is None
    True

    """
    run_dir = Path(run_dir)
    metrics = _read_metrics(run_dir / "metrics.json")
    evolution = metrics.get("evolution")
    history = evolution.get("history") if isinstance(evolution, dict) else None
    if not history:
        return None
    frame = pd.DataFrame(history)
    fig = Figure(figsize=(12.0, 6.5), dpi=_DPI)
    FigureCanvasAgg(fig)
    fitness, spread = fig.subplots(2, 1, sharex=True)
    x = np.arange(len(frame))
    incumbent = frame["incumbent_fitness"].to_numpy(dtype=float)
    for column, label, color in (
        ("best_fitness", "best", "tab:purple"),
        ("mean_fitness", "population mean", "tab:gray"),
    ):
        fitness.plot(x, frame[column] / incumbent, marker="o", ms=3, color=color, label=label)
    fitness.axhline(1.0, color="black", linewidth=0.8, alpha=0.6, label="live model (retrained)")
    fitness.set_ylabel("fitness / live model's")
    fitness.set_title(
        "Fitness on the held-out slice, relative to the live model (lower is better)",
        fontsize=10,
        loc="left",
    )
    spread.plot(x, frame["sigma"], marker="o", ms=3, color="tab:orange", label="σ")
    spread.set_yscale("log")
    spread.set_ylabel("σ (log)")
    other = spread.twinx()
    other.plot(x, frame["diversity"], color="tab:green", linewidth=1.0, label="diversity")
    other.set_ylabel("diversity")
    spread.set_title("Mutation scale σ and population diversity", fontsize=10, loc="left")
    spread.set_xlabel("generation (all searches in stream order)")
    starts = [i for i in x if frame["generation"].iloc[i] == 0]
    for ax in (fitness, spread):
        for i in starts:
            ax.axvline(i - 0.5, color="tab:red", linewidth=0.8, alpha=0.4)
        ax.grid(True, alpha=0.3, linewidth=0.5)
    fitness.legend(loc="upper right", fontsize=8)
    lines = spread.get_legend_handles_labels()[0] + other.get_legend_handles_labels()[0]
    spread.legend(lines, [str(line.get_label()) for line in lines], loc="upper right", fontsize=8)
    samples = int(frame["samples_seen"].sum())
    fig.suptitle(
        f"{metrics.get('name') or run_dir.name}: {evolution.get('searches', 0)} searches, "
        f"{evolution.get('evaluated', 0)} candidates trained, {samples:,} samples seen "
        "(red lines: a new search)",
        fontsize=12,
    )
    fig.tight_layout()
    return save_figure(fig, run_dir / "evolution.png")


def _mark_lag(ax: Axes, metrics: dict[str, Any], kind: str, x: np.ndarray) -> str:
    """Shade each change's adaptation lag; return a note for the panel's title."""
    lag = metrics.get("adaptation_lag")
    if not isinstance(lag, dict) or not lag.get("per_change"):
        return ""
    labelled = False
    for record in lag["per_change"]:
        if record.get("lag") is None:
            continue
        start = _parse_times([record.get("stream_time")], kind)
        until = record.get("recovered_at") or record.get("until")
        end = _parse_times([until], kind) if until else []
        if not len(start) or not start.notna().all():
            continue
        stop = end.iloc[0] if len(end) and end.notna().all() else x[-1]
        ax.axvspan(
            start.iloc[0],
            stop,
            color=_LAG,
            alpha=0.15,
            linewidth=0,
            label=None if labelled else "adaptation lag",
            zorder=0,
        )
        labelled = True
    median = lag.get("median_lag")
    if median is None:
        return ""
    return f"; adaptation lag: median {median:.0f} forecasts, excess error " + (
        f"{lag['total_excess_error']:.4g} ({lag.get('basis', 'true')} changes)"
    )


def _legend(ax: Axes) -> None:
    """The legend to the right of the panel, where it cannot cover the data."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8, frameon=False)


def _figure(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _title(name: str, metrics: dict[str, Any], scored: pd.DataFrame | None) -> str:
    mse = _figure(metrics.get("mse"))
    baseline = _figure((metrics.get("baseline_last_value") or {}).get("mse"))
    if scored is not None and not scored.empty:
        if not math.isfinite(mse):
            mse = float(np.mean((scored["prediction"] - scored["truth"]) ** 2))
        if not math.isfinite(baseline):
            baseline = float(np.mean((scored["last_value"] - scored["truth"]) ** 2))
    if not (math.isfinite(mse) or math.isfinite(baseline)):
        return name
    text = f"{name}: MSE {mse:.4g} vs last-value MSE {baseline:.4g}"
    if math.isfinite(mse) and math.isfinite(baseline) and baseline > 0:
        text += f" (ratio {mse / baseline:.3f})"
    return text


def _draw_empty(fig: Figure, name: str, metrics: dict[str, Any]) -> None:
    ax = fig.add_subplot()
    ax.set_axis_off()
    ax.text(
        0.5,
        0.5,
        "no scored forecasts yet",
        ha="center",
        va="center",
        fontsize=20,
        color="dimgray",
        transform=ax.transAxes,
    )
    fig.suptitle(_title(name, metrics, None), fontsize=13)


def _draw_report(
    fig: Figure,
    scored: pd.DataFrame,
    metrics: dict[str, Any],
    name: str,
    *,
    rolling: int,
    max_points: int,
) -> None:
    kind = "number" if scored["time"].dtype.kind == "f" else "datetime"
    detected = _change_times(metrics, "regime_changes", kind)
    true_changes = _change_times(metrics, "change_points", kind)
    detection_keys = metrics.get("regime_change_keys")

    keys = [k for k in pd.unique(scored["key"]) if k != ""]
    target = scored["target"].iloc[0]
    top, middle, bottom = fig.subplots(3, 1, sharex=True)

    # (1) truth and step-1 forecast of the first target (and first key).
    shown = scored[(scored["target"] == target) & (scored["step"] == scored["step"].min())]
    what = f"target '{target}'"
    detected_top, detected_label = detected, "detected regime change"
    if keys:
        shown = shown[shown["key"] == keys[0]]
        what += f", key '{keys[0]}' (1 of {len(keys)} key{'s' if len(keys) > 1 else ''})"
        if isinstance(detection_keys, list) and len(detection_keys) == len(detected):
            own = np.array([k is None or k == keys[0] for k in detection_keys], dtype=bool)
            detected_top = detected[own] if len(detected) else detected
            detected_label = f"detected regime change (key '{keys[0]}')"
    step = int(shown["step"].iloc[0]) if len(shown) else 1
    x = shown["time"].to_numpy()
    for column, label, color, width in (
        ("truth", "truth", _TRUTH, 1.0),
        ("prediction", f"prediction (step {step})", _MODEL, 0.9),
    ):
        xs, ys = _decimate(x, shown[column].to_numpy(dtype=float), max_points)
        top.plot(xs, ys, color=color, linewidth=width, label=label, alpha=0.85, zorder=2)
    top.set_title(f"Step-{step} forecast vs truth: {what}", fontsize=10, loc="left")
    top.set_ylabel(target)

    # (2) rolling MSE, model vs last value, over all keys, targets and steps by time.
    x = scored["time"].to_numpy()
    truth = scored["truth"].to_numpy(dtype=float)
    model_se = (scored["prediction"].to_numpy(dtype=float) - truth) ** 2
    baseline_se = (scored["last_value"].to_numpy(dtype=float) - truth) ** 2
    model_se[~np.isfinite(model_se)] = np.nan
    baseline_se[~np.isfinite(baseline_se)] = np.nan
    window = max(1, min(rolling, len(scored) // 2))
    spans: list[np.ndarray] = []
    for errors, label, color in (
        (model_se, "model", _MODEL),
        (baseline_se, "last value", _BASELINE),
    ):
        mean = pd.Series(errors).rolling(window, min_periods=window).mean().to_numpy()
        xs, ys = _decimate(x, mean, max_points)
        middle.plot(xs, ys, color=color, linewidth=1.0, label=label, zorder=2)
        spans.append(mean[np.isfinite(mean) & (mean > 0)])
    positive = np.concatenate(spans)
    if len(positive) and positive.max() > 100 * positive.min():
        middle.set_yscale("log")
    title = f"Rolling MSE over {window} forecasts (all keys, targets and steps)"
    lag_note = _mark_lag(middle, metrics, kind, x)
    middle.set_title(title + lag_note, fontsize=10, loc="left")
    middle.set_ylabel("MSE")

    # (3) cumulative squared-error difference: rising means the model beats last value.
    edge = np.nancumsum(baseline_se - model_se)
    xs, ys = _decimate(x, edge, max_points)
    bottom.plot(xs, ys, color=_MODEL, linewidth=1.1, label="last-value SE − model SE", zorder=2)
    bottom.axhline(0.0, color="black", linewidth=0.6, alpha=0.5, zorder=1)
    bottom.set_title(
        "Cumulative squared-error advantage over last value (rising: model winning)",
        fontsize=10,
        loc="left",
    )
    bottom.set_ylabel("Σ ΔSE")
    bottom.set_xlabel("stream time" if kind == "datetime" else "stream time (number)")

    _mark_changes(top, detected_top, true_changes, detected_label)
    for ax in (middle, bottom):
        _mark_changes(ax, detected, true_changes, "detected regime change")
    _mark_swaps(middle, metrics, kind)
    for ax in (top, middle, bottom):
        ax.grid(True, alpha=0.3, linewidth=0.5)
        _legend(ax)
    if kind == "datetime":
        locator = mdates.AutoDateLocator()
        bottom.xaxis.set_major_locator(locator)
        bottom.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))

    fig.suptitle(_title(name, metrics, scored), fontsize=13)
    fig.tight_layout()
