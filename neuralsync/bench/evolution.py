"""``neuralsync bench evolution``: the evolution engine's ablation, measured side by side.

The same replay, same seed, five ways: the full engine; without the surrogate (no prefilter,
no risk check); without Lamarckian inheritance (every candidate starts from a fresh
initialisation); without multi-scale mutation (every child at 1σ); and without evolution at
all. Meta-adaptation, the detector and the rest of the pipeline are the same in every run, so
the differences are the engine's. Each run reports its MSE, its ratio to the run without
evolution, the searches, candidates trained and prefiltered, the swaps evolution made (and
how many probation rolled back), and wall seconds.

Scenarios: the bundled ``default`` and ETTh2 (``../shared/data``, or ``$NEURALSYNC_DATA``;
skipped with a note when absent).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neuralsync.config import Scenario, load_scenario
from neuralsync.scenarios import bundled_dir

__all__ = ["VARIANTS", "format_table", "run_ablation", "run_variant"]

#: Variant name → the ``adaptation.evolution`` settings it changes.
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "no surrogate": {"surrogate": False},
    "no Lamarckian": {"lamarckian": False},
    "no multi-scale": {"multiscale": False},
    "no evolution": {"enabled": False},
}


def _scenarios(quick: bool, log: Callable[[str], None]) -> list[tuple[Scenario, int | None]]:
    from neuralsync.bench.adaptation import etth2_scenario

    found = [(load_scenario(bundled_dir() / "default.yaml"), 2500 if quick else None)]
    if quick:
        return found
    etth2 = etth2_scenario()
    if Path(etth2.csv).is_file():
        found.append((etth2, None))
    else:
        log(f"  ETTh2 skipped: no {etth2.csv} (set NEURALSYNC_DATA to the data folder)")
    return found


def run_variant(scenario: Scenario, settings: dict[str, Any], rows: int | None) -> dict[str, Any]:
    """Replay ``scenario`` (its first ``rows`` rows) with these evolution settings."""
    from neuralsync.replay import replay

    scenario = scenario.model_copy(deep=True)
    for name, value in settings.items():
        setattr(scenario.adaptation.evolution, name, value)
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        metrics = replay(scenario, Path(folder), limit=rows, report=False)
        seconds = time.perf_counter() - started
        lines = (Path(folder) / "events.jsonl").read_text(encoding="utf-8").splitlines()
    events = [json.loads(line) for line in lines]
    evolution = metrics.get("evolution", {})
    return {
        "mse": metrics["mse"],
        "mae": metrics["mae"],
        "searches": evolution.get("searches", 0),
        "evaluated": evolution.get("evaluated", 0),
        "prefiltered": evolution.get("prefiltered", 0),
        "surrogate_kendall_tau": evolution.get("surrogate_kendall_tau"),
        "swaps": sum(e["type"] == "swap" and e["source"] == "evolution" for e in events),
        "rolled_back": sum(e["type"] == "rollback" and e["source"] == "evolution" for e in events),
        "seconds": seconds,
        "rows": metrics["rows_this_run"],
        "events_per_second": metrics["events_per_second"],
    }


def run_ablation(
    *,
    quick: bool = False,
    variants: list[str] | None = None,
    out: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every variant on every scenario; the figures as a dict (and ``out/results.json``)."""
    names = variants or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; expected some of {list(VARIANTS)}")
    results: dict[str, dict[str, Any]] = {}
    for scenario, rows in _scenarios(quick, log):
        runs = results[scenario.name] = {}
        for name in names:
            runs[name] = run_variant(scenario, VARIANTS[name], rows)
            r = runs[name]
            log(
                f"  {scenario.name:<8} {name:<15} MSE {r['mse']:.5f}, {r['searches']} searches, "
                f"{r['evaluated']} trained, {r['swaps']} swaps ({r['rolled_back']} rolled back), "
                f"{r['seconds']:.1f} s"
            )
        if "no evolution" in runs:
            for r in runs.values():
                r["mse_over_no_evolution"] = r["mse"] / runs["no evolution"]["mse"]
    report = {"quick": quick, "results": results}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def format_table(report: dict[str, Any]) -> str:
    """A markdown table, one row per scenario and variant."""
    lines = [
        "| scenario | variant | MSE | vs no evolution | searches | trained | prefiltered "
        "| swaps (rolled back) | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for scenario, runs in report["results"].items():
        for name, r in runs.items():
            ratio = r.get("mse_over_no_evolution")
            lines.append(
                f"| {scenario} | {name} | {r['mse']:.5f} | "
                f"{'' if ratio is None else f'{ratio:.4f}'} | {r['searches']} | "
                f"{r['evaluated']} | {r['prefiltered']} | {r['swaps']} ({r['rolled_back']}) | "
                f"{r['seconds']:.1f} |"
            )
    return "\n".join(lines)
