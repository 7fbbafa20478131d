"""``neuralsync bench population``: how fast a population of candidates trains, side by side.

Sixteen window MLPs of the default scenario's shape (lookback 32, one input, 32 hidden units,
horizon 1), each with its own learning rate, train 200 within-life SGD steps of 16 samples on
the same data, three ways (:class:`~neuralsync.evolution.population.PopulationTrainer`'s
backends): a Python loop over the modules with ``torch.optim.SGD`` each (the reference),
``torch.func`` (stacked parameters, ``vmap(grad)``), and hand-batched matrix products with the
backward pass written out. The repetitions are interleaved (loop, vmap, hand, loop, vmap, hand,
...) and the medians reported, so noise from a shared machine hits every backend alike.

The figures come from one torch thread: at these sizes (batches of 16, 32 × 32 weights) a
second thread costs more in synchronisation than it gains, and makes the timings erratic on a
small, shared CPU. The caller's thread count is restored afterwards.

The second section, :func:`measure_replay`, replays the default scenario with evolution on
and off (meta-adaptation on in both, deterministic mode, the torch threads the machine gives):
the stream keeps flowing while a search runs in its worker thread, and waits only where a
search is due and not done, so the cost shows as a lower events/s.

The sections are assembled by :func:`run_population`; each measures one thing and returns a
dict.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from neuralsync.evolution.population import PopulationTrainer
from neuralsync.models import WindowMLP

__all__ = ["format_table", "measure_replay", "measure_training", "run_population"]

TRAIN_BACKENDS = ("loop", "vmap", "hand")
LOOKBACK, HIDDEN = 32, 32
TARGET_RATIO = 5.0


def _windows(n: int, lookback: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` windows of a noisy sine with a drifting level, and the next value of each."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.arange(n + lookback, dtype=torch.float32)
    level = torch.randn(n + lookback, generator=generator).mul(0.05).cumsum(0)
    series = torch.sin(t * 0.2) + level + 0.1 * torch.randn(n + lookback, generator=generator)
    x = series.unfold(0, lookback, 1)[:n].unsqueeze(-1)
    y = series[lookback : n + lookback].view(n, 1, 1)
    return x.contiguous(), y.contiguous()


def _population(n_models: int, lookback: int, hidden: int, seed: int) -> list[WindowMLP]:
    # The models initialise from torch's global RNG: fork it so the caller's stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return [
            WindowMLP(n_inputs=1, lookback=lookback, horizon=1, target_index=[0], hidden=[hidden])
            for _ in range(n_models)
        ]


def measure_training(
    *,
    n_models: int = 16,
    steps: int = 200,
    batch_size: int = 16,
    reps: int = 5,
    lookback: int = LOOKBACK,
    hidden: int = HIDDEN,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Median wall time of training ``n_models`` MLPs ``steps`` steps with each backend.

    Every backend trains copies of the same initial modules on the same minibatches, with the
    same per-model learning rates (log-spaced 1e-3..3e-2), momentum 0.9 and learning-rate
    decay, so their results agree and only the time differs. Returns the seconds of every
    repetition, the medians, the ratios of the loop's median to the others', and each
    backend's held-out loss before and after training.
    """
    x, y = _windows(2048, lookback, seed)
    x_test, y_test = _windows(512, lookback, seed + 1)
    initial = _population(n_models, lookback, hidden, seed)
    settings = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": torch.logspace(-3, -1.5, n_models).tolist(),
        "momentum": 0.9,
        "lr_decay": 0.995,
        # No gradient clipping: the reference is the plain loop (clipping, a norm per model and
        # step, would slow the loop more than the batched paths and flatter the ratios).
        "grad_clip": None,
    }
    before = PopulationTrainer(copy.deepcopy(initial), "loop").evaluate(x_test, y_test)

    def train(backend: str, train_steps: int) -> tuple[float, PopulationTrainer]:
        trainer = PopulationTrainer(copy.deepcopy(initial), backend)
        generator = torch.Generator().manual_seed(seed)
        start = time.perf_counter()
        trainer.train(x, y, **{**settings, "steps": train_steps}, generator=generator)
        return time.perf_counter() - start, trainer

    for backend in TRAIN_BACKENDS:  # warm up: first-call costs (imports, kernels) are not timed
        train(backend, 3)
    seconds: dict[str, list[float]] = {backend: [] for backend in TRAIN_BACKENDS}
    trained: dict[str, PopulationTrainer] = {}
    for rep in range(reps):
        for backend in TRAIN_BACKENDS:
            elapsed, trained[backend] = train(backend, steps)
            seconds[backend].append(elapsed)
        log(
            f"  rep {rep + 1}/{reps}: "
            + ", ".join(f"{b} {seconds[b][-1]:.3f} s" for b in TRAIN_BACKENDS)
        )
    median = {backend: statistics.median(times) for backend, times in seconds.items()}
    after = {backend: trainer.evaluate(x_test, y_test) for backend, trainer in trained.items()}
    ratios = {f"loop_over_{b}": median["loop"] / median[b] for b in TRAIN_BACKENDS if b != "loop"}
    auto = PopulationTrainer(copy.deepcopy(initial[:1]), "auto").backend_
    return {
        "n_models": n_models,
        "steps": steps,
        "batch_size": batch_size,
        "reps": reps,
        "model": f"WindowMLP lookback {lookback}, 1 input, hidden [{hidden}], horizon 1",
        "seconds": seconds,
        "median_seconds": median,
        "ratios": ratios,
        "auto_backend": auto,
        "loop_over_auto": median["loop"] / median[auto],
        "target_ratio": TARGET_RATIO,
        "meets_target": median["loop"] / median[auto] >= TARGET_RATIO,
        "loss_before": float(before.mean()),
        "loss_after": {backend: float(loss.mean()) for backend, loss in after.items()},
        "loss_after_each": {backend: loss.tolist() for backend, loss in after.items()},
        "loss_before_each": before.tolist(),
    }


def measure_replay(rows: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Replay the default scenario (its first ``rows`` rows) with evolution on, then off:
    events/s, MSE, searches and evolution swaps of each."""
    from neuralsync.bench.evolution import run_variant
    from neuralsync.config import load_scenario
    from neuralsync.scenarios import bundled_dir

    scenario = load_scenario(bundled_dir() / "default.yaml")
    runs: dict[str, dict[str, Any]] = {}
    for label, enabled in (("on", True), ("off", False)):
        run = run_variant(scenario, {"enabled": enabled}, rows)
        runs[label] = {
            "rows": run["rows"],
            "seconds": run["seconds"],
            "events_per_second": run["events_per_second"],
            "mse": run["mse"],
            "searches": run["searches"],
            "evolution_swaps": run["swaps"],
        }
        log(
            f"  replay default, evolution {label}: {run['events_per_second']:.0f} "
            f"events/s, MSE {run['mse']:.4f}, {run['searches']} searches"
        )
    on, off = runs["on"]["events_per_second"], runs["off"]["events_per_second"]
    return {"scenario": "default", "rows_limit": rows, **runs, "on_over_off": on / off}


def run_population(*, quick: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every section of the benchmark, logging as it goes; returns the figures as a dict."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps, reps = (30, 1) if quick else (200, 5)
        log(f"population training: 16 MLPs x {steps} SGD steps of 16, {reps} interleaved reps")
        training = measure_training(steps=steps, reps=reps, log=log)
    finally:
        torch.set_num_threads(threads)
    log("replay events/s, evolution on and off")
    try:
        replay = measure_replay(rows=2500 if quick else None, log=log)
    finally:  # replay picks its own torch threads
        torch.set_num_threads(threads)
    return {"quick": quick, "torch_threads": 1, "training": training, "replay": replay}


def format_table(figures: dict[str, Any]) -> Any:
    """The training section as a rich table: median seconds, speed-up and loss per backend."""
    from rich.table import Table

    training = figures["training"]
    table = Table(
        title=(
            f"{training['n_models']} models x {training['steps']} SGD steps "
            f"(median of {training['reps']})"
        )
    )
    for column in ("backend", "median s", "loop / backend", "held-out MSE after"):
        table.add_column(column, justify="left" if column == "backend" else "right")
    for backend in TRAIN_BACKENDS:
        median = training["median_seconds"][backend]
        ratio = training["median_seconds"]["loop"] / median
        name = backend + (" (auto)" if backend == training["auto_backend"] else "")
        table.add_row(
            name, f"{median:.3f}", f"{ratio:.1f}x", f"{training['loss_after'][backend]:.4f}"
        )
    table.caption = (
        f"MSE before training {training['loss_before']:.4f}; target loop / auto >= "
        f"{training['target_ratio']:.0f}x: {'met' if training['meets_target'] else 'NOT met'}"
    )
    replay = figures.get("replay")
    if replay is None:
        return table
    from rich.console import Group

    rows = Table(title="Replay of the default scenario, evolution on and off")
    for column in ("evolution", "events/s", "seconds", "MSE", "searches", "evolution swaps"):
        rows.add_column(column, justify="left" if column == "evolution" else "right")
    for label in ("on", "off"):
        run = replay[label]
        rows.add_row(
            label,
            f"{run['events_per_second']:.0f}",
            f"{run['seconds']:.1f}",
            f"{run['mse']:.4f}",
            str(run["searches"]),
            str(run["evolution_swaps"]),
        )
    rows.caption = f"events/s with evolution / without: {replay['on_over_off']:.2f}"
    return Group(table, rows)
