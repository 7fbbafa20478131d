"""``neuralsync bench adaptation``: how fast each way of adapting recovers from regime changes.

Four methods replay the same stream with the same seed and the same live model:

- ``meta``: regime recall (:class:`~neuralsync.recall.RegimeRecall`, at the detection) then
  meta-adaptation (:class:`~neuralsync.meta.MetaAdapter`, a little later), proposals through
  the canary gate, as ``neuralsync replay`` runs by default;
- ``meta_no_recall``: meta-adaptation alone, to show what each part is worth;
- ``online_sgd``: no adapter, the live model only keeps learning online (one SGD step per
  sample);
- ``fresh_reset``: at every detection the live model is replaced by a freshly initialised one
  (which forecasts the last value until it has learned), unconditionally.

For each, the adaptation lag of :mod:`neuralsync.lag`: after every change, forecasts until the
rolling error is back within 10 % of its level before the change, and the excess error until
then. On the bundled ``recurring`` scenario the changes are its true change points; on ETTh2
(no known change points) they are the detections of the ``online_sgd`` run, the same for every
method.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from neuralsync.base import Adapter, Gate, GateDecision, Proposal, RegimeChange
from neuralsync.config import Scenario, load_scenario
from neuralsync.lag import lag_from_predictions
from neuralsync.learner import OnlineLearner
from neuralsync.replay import csv_source

__all__ = ["METHODS", "ResetAdapter", "etth2_scenario", "run_adaptation", "run_method"]

METHODS = ("meta", "meta_no_recall", "online_sgd", "fresh_reset")
ETTH2_FEATURES = ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL"]


class ResetAdapter(Adapter):
    """Propose a freshly initialised model, untrained: reset-to-fresh-initialisation."""

    name = "fresh_reset"

    def on_regime_change(
        self,
        change: RegimeChange | None,
        live: OnlineLearner,
        support_x: Any,
        support_y: Any,
    ) -> Proposal:
        fresh = OnlineLearner(
            live.config, live.n_inputs, live.lookback, live.horizon, live.target_index, live.device
        )
        return Proposal(fresh, self.name)


class _AcceptAll(Gate):
    """A reset is unconditional: accept every proposal."""

    def decide(self, proposal, live_errors, canary_x, canary_y) -> GateDecision:
        return GateDecision(True, "reset on every detection", {})


def data_dir() -> Path:
    """The benchmark data: ``$NEURALSYNC_DATA``, else ``../shared/data`` of the checkout."""
    override = os.environ.get("NEURALSYNC_DATA")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[3] / "shared" / "data"


def etth2_scenario(path: Path | None = None) -> Scenario:
    """ETTh2 with the oil temperature ``OT`` as target and the six loads as features."""
    return Scenario(
        name="etth2",
        csv=path or data_dir() / "ETTh2.csv",
        timestamp="date",
        features=ETTH2_FEATURES,
        targets=["OT"],
        lookback=32,
        horizon=1,
        model={"hidden": [32], "lr": 0.01},
        detector={"type": "adwin", "params": {"delta": 0.002}},
        seed=0,
    )


def run_method(scenario: Scenario, method: str, rows: int | None = None) -> dict[str, Any]:
    """Replay ``rows`` rows of ``scenario`` with one method; its forecasts and figures."""
    from neuralsync.meta import MetaAdapter
    from neuralsync.pipeline import Pipeline
    from neuralsync.recall import RegimeRecall

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    adapters: list[Adapter] = []
    gate: Gate | None = None
    if method == "meta":
        adapters = [RegimeRecall.from_scenario(scenario), MetaAdapter.from_scenario(scenario)]
    elif method == "meta_no_recall":
        adapters = [MetaAdapter.from_scenario(scenario)]
    elif method == "fresh_reset":
        adapters, gate = [ResetAdapter()], _AcceptAll()
    pipeline = Pipeline(scenario, adapters=adapters, gate=gate)
    seconds = {"adapter": 0.0}
    for adapter in adapters:
        consult = adapter.on_regime_change

        def timed(*args: Any, consult: Callable[..., Any] = consult) -> Proposal | None:
            started = time.perf_counter()
            proposal = consult(*args)
            seconds["adapter"] += time.perf_counter() - started
            return proposal

        adapter.on_regime_change = timed  # type: ignore[method-assign]
    predictions = []
    started = time.perf_counter()
    for batch in csv_source(scenario, paced=False):
        if rows is not None:
            batch = batch.slice(0, max(0, rows - pipeline.position_))
            if not len(batch):
                break
        predictions += pipeline.process(batch)
    wall = time.perf_counter() - started
    metrics = pipeline.metrics()
    frame = pd.DataFrame(
        {
            "timestamp": [p.timestamp for p in predictions],
            "step": [p.step for p in predictions],
            "prediction": [p.prediction for p in predictions],
            "truth": [p.truth for p in predictions],
        }
    )
    return {
        "frame": frame,
        "mse": metrics["mse"],
        "last_value_mse": metrics["baseline_last_value"]["mse"],
        "detections": metrics["regime_changes"],
        "swaps": metrics["swaps"],
        "rows": metrics["rows"],
        "wall_seconds": wall,
        "adapter_seconds": seconds["adapter"],
    }


def _compare(
    scenario: Scenario,
    rows: int | None,
    change_points: list[Any] | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    runs = {}
    for method in METHODS:
        runs[method] = run_method(scenario, method, rows)
        log(f"  {scenario.name} {method}: {runs[method]['wall_seconds']:.1f} s")
    if change_points is not None:
        changes, basis = change_points, "true"
    else:
        changes, basis = runs["online_sgd"]["detections"], "detected (online_sgd run)"
    result: dict[str, Any] = {"rows": runs["online_sgd"]["rows"], "basis": basis, "methods": {}}
    result["frames"] = {method: run["frame"] for method, run in runs.items()}
    result["changes"] = list(changes)
    for method, run in runs.items():
        lag = lag_from_predictions(run.pop("frame"), changes, basis=basis)
        result["methods"][method] = {
            "median_lag": lag["median_lag"],
            "total_excess_error": lag["total_excess_error"],
            "recovered": lag["recovered"],
            "changes": lag["changes"],
            "mse": run["mse"],
            "last_value_mse": run["last_value_mse"],
            "detections": len(run["detections"]),
            "swaps": run["swaps"],
            "wall_seconds": run["wall_seconds"],
            "adapter_seconds": run["adapter_seconds"],
            "lags": [r["lag"] for r in lag["per_change"]],
        }
    return result


def run_adaptation(
    quick: bool = False,
    log: Callable[[str], None] = print,
    seed: int = 0,
    plot: Path | None = None,
) -> dict[str, Any]:
    """Compare the three methods on ``recurring`` and on ETTh2 (when the data is there).

    With ``plot``, also draw the error of each method around one change of ``recurring``.
    """
    from neuralsync.scenarios import load_change_points, resolve_scenario

    figures: dict[str, Any] = {"quick": quick, "seed": seed, "scenarios": {}}
    recurring = load_scenario(resolve_scenario("recurring"), {"seed": seed})
    rows = 2400 if quick else None
    points = load_change_points(recurring)
    if rows is not None and points is not None:
        limit = pd.read_csv(recurring.csv, usecols=[recurring.timestamp], nrows=rows)
        last = pd.Timestamp(limit[recurring.timestamp].iloc[-1]).value
        points = [p for p in points if p <= last]
    figures["scenarios"]["recurring"] = _compare(recurring, rows, points, log)
    if plot is not None:
        plot_recovery(figures["scenarios"]["recurring"], plot)
    etth2 = etth2_scenario().model_copy(update={"seed": seed})
    if Path(etth2.csv).is_file():
        figures["scenarios"]["etth2"] = _compare(etth2, 3000 if quick else None, None, log)
    else:
        log(f"  ETTh2 skipped: no {etth2.csv} (set NEURALSYNC_DATA to the data folder)")
    for result in figures["scenarios"].values():
        del result["frames"], result["changes"]
    return figures


def plot_recovery(
    result: dict[str, Any], path: Path, *, change: int = 5, before: int = 100, after: int = 400
) -> Path:
    """Rolling squared error (25 forecasts) of each method around the ``change``-th change."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from neuralsync.lag import _times

    fig = Figure(figsize=(9.0, 4.2), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    change = min(change, len(result["changes"]) - 1)
    colours = {
        "meta": "tab:blue",
        "meta_no_recall": "tab:cyan",
        "online_sgd": "tab:gray",
        "fresh_reset": "tab:red",
    }
    for method, frame in result["frames"].items():
        scored = frame[(frame["step"] == 1) & frame["truth"].notna()]
        times = _times(scored["timestamp"].to_numpy())
        at = int(np.searchsorted(times, float(result["changes"][change])))
        errors = ((scored["prediction"] - scored["truth"]) ** 2).to_numpy()
        rolling = pd.Series(errors).rolling(25, min_periods=1).mean().to_numpy()
        lo, hi = max(0, at - before), min(len(errors), at + after)
        lag = result["methods"][method]["lags"][change]
        ax.plot(
            np.arange(lo, hi) - at,
            rolling[lo:hi],
            color=colours[method],
            linewidth=1.2,
            linestyle="--" if method == "meta_no_recall" else "-",
            label=f"{method} (lag {lag})",
        )
    ax.axvline(0, color="tab:green", linestyle="--", linewidth=1.2, label="true change point")
    ax.set_xlabel("forecasts since the regime change")
    ax.set_ylabel("squared error, rolling mean of 25")
    ax.set_title(f"Recovery from regime change {change + 1} of 'recurring'", loc="left")
    ax.grid(True, alpha=0.3, linewidth=0.5)
    ax.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def format_table(figures: dict[str, Any]) -> str:
    """The figures as a Markdown table: one row per scenario and method."""
    lines = [
        "| scenario | method | median lag | total excess error | recovered | MSE | swaps |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, result in figures["scenarios"].items():
        for method, m in result["methods"].items():
            lag = "—" if m["median_lag"] is None else f"{m['median_lag']:.0f}"
            excess = "—" if m["total_excess_error"] is None else f"{m['total_excess_error']:.4g}"
            lines.append(
                f"| {name} | {method} | {lag} | {excess} | {m['recovered']}/{m['changes']} "
                f"| {m['mse']:.4g} | {m['swaps']} |"
            )
    return "\n".join(lines)
