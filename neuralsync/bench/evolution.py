"""``neuralsync bench evolution``: the evolution engine's ablation, measured side by side.

The same replay, same seed, five ways: the full engine; without the surrogate (no prefilter,
no risk check); without Lamarckian inheritance (every candidate starts from a fresh
initialisation); without multi-scale mutation (every child at 1σ); and without evolution at
all. Meta-adaptation, the detector and the rest of the pipeline are the same in every run, so
the differences are the engine's. Each run reports its MSE, its ratio to the run without
evolution, the searches, candidates trained and prefiltered, the swaps evolution made (and
how many probation rolled back), and wall seconds.

Scenarios: the bundled ``default`` and ETTh2 (``../shared/data``, or ``$NEURALSYNC_DATA``;
skipped with a note when absent), or any of those and the bundled ``recurring``, by name.

One replay is one path through the stream: a swap changes everything after it, so a single
seed's difference of a percent can be chance. ``seeds=n`` replays every variant with the
scenario's seed and the ``n - 1`` after it (the network's initial weights, the search's draws)
and reports, per variant, the ratio to the run without evolution at each seed, their geometric
mean, and on how many seeds evolution was lower.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neuralsync.config import Scenario, load_scenario
from neuralsync.errors import ConfigError
from neuralsync.scenarios import bundled_dir

__all__ = [
    "SCENARIOS",
    "VARIANTS",
    "format_seeds_table",
    "format_table",
    "run_ablation",
    "run_variant",
]

#: Variant name → the ``adaptation.evolution`` settings it changes.
VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "no surrogate": {"surrogate": False},
    "no Lamarckian": {"lamarckian": False},
    "no multi-scale": {"multiscale": False},
    "no evolution": {"enabled": False},
}


#: Scenarios the ablation can replay; the first two are the default.
SCENARIOS: tuple[str, ...] = ("default", "etth2", "recurring")


def _scenarios(
    quick: bool, names: list[str] | None, log: Callable[[str], None]
) -> list[tuple[Scenario, int | None]]:
    from neuralsync.bench.adaptation import etth2_scenario

    names = names or (["default"] if quick else ["default", "etth2"])
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ConfigError(f"unknown scenarios {unknown}; expected some of {list(SCENARIOS)}")
    found = []
    for name in names:
        if name != "etth2":
            scenario = load_scenario(bundled_dir() / f"{name}.yaml")
            found.append((scenario, 2500 if quick else None))
            continue
        etth2 = etth2_scenario()
        if Path(etth2.csv).is_file():
            found.append((etth2, 2500 if quick else None))
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
    scenarios: list[str] | None = None,
    seeds: int = 1,
    out: Path | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Every variant on every scenario; the figures as a dict (and ``out/results.json``).

    ``results[scenario][variant]`` holds the figures at the scenario's own seed; with
    ``seeds > 1`` also ``per_seed`` (seed, MSE, swaps and the ratio to no evolution at that
    seed), ``geo_mean_ratio`` and ``lower_on`` (seeds where the variant beat no evolution).
    """
    names = variants or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ConfigError(f"unknown variants {unknown}; expected some of {list(VARIANTS)}")
    if seeds < 1:
        raise ConfigError(f"seeds: expected at least 1, got {seeds}")
    results: dict[str, dict[str, Any]] = {}
    for scenario, rows in _scenarios(quick, scenarios, log):
        runs: dict[str, Any] = {}
        for offset in range(seeds):
            seeded = scenario.model_copy(update={"seed": scenario.seed + offset})
            at_seed = {}
            for name in names:
                r = at_seed[name] = run_variant(seeded, VARIANTS[name], rows)
                log(
                    f"  {scenario.name:<8} seed {seeded.seed} {name:<15} MSE {r['mse']:.5f}, "
                    f"{r['searches']} searches, {r['evaluated']} trained, {r['swaps']} swaps "
                    f"({r['rolled_back']} rolled back), {r['seconds']:.1f} s"
                )
            if "no evolution" in at_seed:
                for r in at_seed.values():
                    r["mse_over_no_evolution"] = r["mse"] / at_seed["no evolution"]["mse"]
            if offset == 0:
                runs = at_seed
            if seeds > 1:
                for name, r in at_seed.items():
                    runs[name].setdefault("per_seed", []).append(
                        {
                            "seed": seeded.seed,
                            "mse": r["mse"],
                            "swaps": r["swaps"],
                            "mse_over_no_evolution": r.get("mse_over_no_evolution"),
                        }
                    )
        if seeds > 1 and "no evolution" in runs:
            for r in runs.values():
                ratios = [s["mse_over_no_evolution"] for s in r["per_seed"]]
                r["geo_mean_ratio"] = math.exp(sum(map(math.log, ratios)) / len(ratios))
                r["lower_on"] = sum(ratio < 1.0 for ratio in ratios)
        results[scenario.name] = runs
    report = {"quick": quick, "seeds": seeds, "results": results}
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


def format_seeds_table(report: dict[str, Any]) -> str:
    """A markdown table of the ratio to no evolution at every seed (``seeds > 1`` only)."""
    lines = [
        "| scenario | variant | MSE / no evolution, per seed | geometric mean | lower on |",
        "|---|---|---|---|---|",
    ]
    for scenario, runs in report["results"].items():
        for name, r in runs.items():
            if name == "no evolution" or "geo_mean_ratio" not in r:
                continue
            ratios = ", ".join(f"{s['mse_over_no_evolution']:.4f}" for s in r["per_seed"])
            lines.append(
                f"| {scenario} | {name} | {ratios} | {r['geo_mean_ratio']:.4f} | "
                f"{r['lower_on']} / {len(r['per_seed'])} |"
            )
    return "\n".join(lines)
