"""The ``neuralsync`` command line: replay scenarios, list them, redraw reports."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from neuralsync.config import Scenario, load_scenario, parse_override
from neuralsync.errors import ConfigError, NeuralSyncError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Online continual adaptation for streaming time series.",
)
console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(command: F) -> F:
    """Print a user's mistake as one message and exit 2, without a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except NeuralSyncError as exc:
            console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


def _overrides(settings: list[str], **named: Any) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for text in settings:
        path, value = parse_override(text)
        overrides[".".join(path)] = value
    overrides.update({k: v for k, v in named.items() if v is not None})
    return overrides


def _scenario_for(name: str | None, resume: Path | None, overrides: dict[str, Any]) -> Scenario:
    from neuralsync.scenarios import resolve_scenario

    if resume is not None and name is None:
        saved = resume / "scenario.json"
        if not saved.is_file():
            raise ConfigError(f"{resume}: no scenario.json here; is this a replay's --out folder?")
        scenario = Scenario.model_validate_json(saved.read_text(encoding="utf-8"))
        if overrides:
            raise ConfigError(
                "--resume continues a run with its own settings; options that "
                f"change them are not allowed ({', '.join(overrides)})"
            )
        return scenario
    return load_scenario(resolve_scenario(name or "default"), overrides)


@app.command()
@_user_errors
def replay(
    scenario: Annotated[
        str | None,
        typer.Argument(
            help="Scenario YAML, or the name of a bundled one (see `neuralsync scenarios`)."
        ),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory \\[default: runs/NAME].")] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue the stopped run in this directory from its last checkpoint."),
    ] = None,
    set_: Annotated[
        list[str],
        typer.Option(
            "--set", help="Override any option: KEY=VALUE, e.g. --set model.lr=0.05 (repeatable)."
        ),
    ] = [],  # noqa: B006
    lookback: Annotated[int | None, typer.Option(help="Rows in the input window.")] = None,
    horizon: Annotated[int | None, typer.Option(help="Steps ahead to forecast.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    model: Annotated[str | None, typer.Option(help="Model type: mlp or linear.")] = None,
    detector: Annotated[
        str | None, typer.Option(help="Regime detector: adwin, page_hinkley, kswin or none.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu or cuda.")] = None,
    meta: Annotated[
        bool | None,
        typer.Option(
            "--meta/--no-meta",
            help="Meta-adaptation at regime changes (on by default; same as "
            "--set adaptation.meta.enabled=...).",
        ),
    ] = None,
    recall: Annotated[
        bool | None,
        typer.Option(
            "--recall/--no-recall",
            help="Regime recall at regime changes (on by default; same as "
            "--set adaptation.recall.enabled=...).",
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(help="Stop after this many rows (checkpointed; continue with --resume)."),
    ] = None,
    report: Annotated[bool, typer.Option(help="Draw report.png.")] = True,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Replay a scenario through the live model; write metrics, events, predictions, report."""
    from neuralsync.replay import replay as run_replay

    named = {
        "lookback": lookback,
        "horizon": horizon,
        "seed": seed,
        "model.type": model,
        "detector.type": detector,
        "device": device,
        "adaptation.meta.enabled": meta,
        "adaptation.recall.enabled": recall,
    }
    config = _scenario_for(scenario, resume, _overrides(set_, **named))
    out_dir = resume or out or Path("runs") / config.name
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume is None:  # a resumed run keeps the settings it was started with
        (out_dir / "scenario.json").write_text(config.model_dump_json(indent=2) + "\n")
    console.print(f"replaying [bold]{config.name}[/] → {out_dir}", highlight=False, soft_wrap=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
        transient=False,
    ) as bar:
        task = bar.add_task(config.name, total=None)

        def advance(done: int, total: int | None) -> None:
            bar.update(task, completed=done, total=total)

        metrics = run_replay(
            config,
            out_dir,
            resume=resume is not None,
            limit=limit,
            progress=advance,
            report=report,
            handle_signals=True,
        )
    _print_summary(metrics, out_dir)
    if not metrics["completed"]:
        console.print(
            f"stopped at row {metrics['rows']}; continue with "
            f"[bold]neuralsync replay --resume {out_dir}[/]",
            highlight=False,
            soft_wrap=True,
        )


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _print_summary(metrics: dict[str, Any], out_dir: Path) -> None:
    out = Console()
    table = Table(
        title=f"{metrics['name']}: {metrics['rows']} rows, "
        f"{metrics['n_predictions']} scored forecasts"
    )
    table.add_column("metric")
    table.add_column("model", justify="right")
    table.add_column("last value", justify="right")
    base = metrics["baseline_last_value"]
    for name in ("mse", "mae", "directional_accuracy"):
        table.add_row(name, _fmt(metrics[name]), _fmt(base[name]))
    out.print(table)
    lines = [f"regime changes detected: {len(metrics['regime_changes'])}"]
    if "detection" in metrics:
        d = metrics["detection"]
        lines.append(
            f"true change points: {d['true_change_points']}, detected {d['detected']}, "
            f"missed {d['missed']}, false alarms {d['false_alarms']}, "
            f"mean delay {_fmt(d['mean_delay'])} rows"
        )
    lines.append(
        f"bad records: {metrics['bad_records']}, dropped rows: "
        f"{metrics['missing']['dropped_rows']}, filled cells: "
        f"{metrics['missing']['filled_cells']}, swaps: {metrics['swaps']}"
    )
    live = metrics["live_path"]
    why = f": {live['reason']}" if live.get("reason") else ""
    lines.append(
        f"{_fmt(metrics['events_per_second'], 5)} rows/s on {metrics['device']}, "
        f"{live['path']} live path{why}; outputs in {out_dir}"
    )
    for line in lines:
        out.print(line, highlight=False, soft_wrap=True)
    per_key = metrics.get("per_key")
    if per_key:
        keys = Table(title="per key")
        for column in ("key", "scored", "mse", "last-value mse", "directional acc."):
            keys.add_column(column, justify="right")
        for key, m in list(per_key.items())[:20]:
            keys.add_row(
                key,
                str(m["n_predictions"]),
                _fmt(m["mse"]),
                _fmt(m["baseline_last_value"]["mse"]),
                _fmt(m["directional_accuracy"]),
            )
        out.print(keys)


@app.command()
def scenarios() -> None:
    """List the bundled scenarios."""
    from neuralsync.scenarios import list_scenarios

    for name, description, _ in list_scenarios():
        typer.echo(f"{name:<16} {description}")


@app.command()
@_user_errors
def report(run_dir: Annotated[Path, typer.Argument(help="A replay's run directory.")]) -> None:
    """Redraw report.png (and evolution.png, when the run evolved) of a run directory."""
    from neuralsync.report import write_evolution_report, write_report

    if not (run_dir / "predictions.csv").is_file():
        raise ConfigError(f"{run_dir}: no predictions.csv here; is this a replay's --out folder?")
    typer.echo(write_report(run_dir))
    evolution = write_evolution_report(run_dir)
    if evolution is not None:
        typer.echo(evolution)


@app.command()
@_user_errors
def inspect(
    run_dir: Annotated[
        Path, typer.Argument(help="A replay's run directory, or a daemon's checkpoint directory.")
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="JSON, for a checkpoint directory too.")
    ] = False,
) -> None:
    """Print the newest checkpoint's position and state digest, as JSON.

    Given the checkpoint directory of ``neuralsync serve`` (one folder per partition), print
    each partition's offset, key count and state digest.
    """
    from neuralsync.state import CheckpointStore, state_digest

    if not (run_dir / "checkpoints").is_dir() and run_dir.is_dir():
        _inspect_partitions(run_dir, as_json)
        return
    snapshot = CheckpointStore(run_dir / "checkpoints").latest()
    pipeline = snapshot["pipeline"]
    typer.echo(
        json.dumps(
            {
                "path": snapshot["path"],
                "position": pipeline["position"],
                "keys": len(pipeline["series"]),
                "state_digest": state_digest(pipeline),
            },
            indent=2,
        )
    )


def _inspect_partitions(directory: Path, as_json: bool) -> None:
    """One line (or JSON object) per partition folder holding snapshots."""
    from neuralsync.state import CheckpointStore, state_digest

    rows = []
    for folder in sorted(p for p in directory.iterdir() if p.is_dir()):
        store = CheckpointStore(folder)
        if not store.paths():
            continue
        snapshot = store.latest()
        pipeline = snapshot["pipeline"]
        rows.append(
            {
                "partition": folder.name,
                "path": snapshot["path"],
                "offset": snapshot.get("offset"),
                "position": pipeline["position"],
                "keys": len(pipeline["series"]),
                "state_digest": state_digest(pipeline),
                "skipped": store.skipped_,
            }
        )
    if not rows:
        raise ConfigError(
            f"{directory}: no checkpoints here; expected a replay's run directory or a "
            "checkpoint directory of `neuralsync serve` (one folder per partition)"
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        typer.echo(
            f"{row['partition']}: offset {row['offset']}, {row['keys']} keys, "
            f"digest {row['state_digest'][:16]}"
        )


bench = typer.Typer(no_args_is_help=True, help="Benchmarks: figures measured side by side.")
app.add_typer(bench, name="bench")


@bench.command()
@_user_errors
def online(
    data: Annotated[Path, typer.Option(help="A CSV with a 'date' column, e.g. ETTh2.csv.")],
    horizon: Annotated[int, typer.Option(help="Steps ahead (H).")] = 1,
    protocol: Annotated[
        str, typer.Option(help="fsnet (learns right after forecasting) or delayed (no leak).")
    ] = "delayed",
    out: Annotated[Path | None, typer.Option(help="Write results.json here.")] = None,
    target: Annotated[str | None, typer.Option(help="Target column [default: OT].")] = None,
    quick: Annotated[bool, typer.Option(help="First 1,500 rows, no grids: a smoke run.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the pipelines.")] = 0,
    date: Annotated[str, typer.Option(help="The date (or timestamp) column.")] = "date",
    method: Annotated[
        list[str] | None,
        typer.Option(
            help="Run only these methods (repeat the option), e.g. neuralsync; default: all six."
        ),
    ] = None,
    jobs: Annotated[
        int,
        typer.Option(
            min=1,
            help="Passes run at once, in worker processes, one thread each (the figures do not "
            "depend on it).",
        ),
    ] = 2,
    trace: Annotated[
        bool,
        typer.Option(
            help="Also write each method's error window by window, the pipelines' events and a "
            "plot of both to OUT/trace.",
        ),
    ] = False,
) -> None:
    """Online forecasting benchmark (FSNet/OneNet protocol): NeuralSync beside strong baselines."""
    from neuralsync.bench.online import METHODS, format_table, run_online

    report = run_online(
        data,
        horizon,
        protocol,
        out=out,
        target=target,
        quick=quick,
        seed=seed,
        methods=tuple(method) if method else METHODS,
        log=lambda line: console.print(line, highlight=False),
        date=date,
        jobs=jobs,
        trace=trace,
    )
    typer.echo(format_table(report))


@bench.command()
@_user_errors
def throughput(
    quick: Annotated[bool, typer.Option(help="Fewer events and ticks: a smoke run.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    threads: Annotated[int | None, typer.Option(help="torch threads [default: torch's].")] = None,
) -> None:
    """Events/s of eager torch, the reference and the fast path; many-series key-events/s."""
    import torch

    from neuralsync.bench.throughput import run_throughput

    if threads is not None:
        torch.set_num_threads(threads)
    figures = run_throughput(quick=quick, log=lambda line: console.print(line, highlight=False))
    if as_json:
        typer.echo(json.dumps(figures, indent=2))


@bench.command()
@_user_errors
def library(
    quick: Annotated[bool, typer.Option(help="300 bars, one repeat: a smoke run.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    lookback: Annotated[int, typer.Option(help="Bars in the forecaster's window.")] = 32,
) -> None:
    """Per-bar cost of OnlineForecaster learn_one + forecast and of the bare backtesting.py loop."""
    from neuralsync.bench.library import run_library

    figures = run_library(
        quick=quick, log=lambda line: console.print(line, highlight=False), lookback=lookback
    )
    if as_json:
        typer.echo(json.dumps(figures, indent=2))


@bench.command()
@_user_errors
def adaptation(
    quick: Annotated[
        bool, typer.Option(help="Shorter streams (2,400 and 3,000 rows): a smoke run.")
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of every run.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Also write the JSON to this file.")] = None,
    plot: Annotated[
        Path | None,
        typer.Option(help="Draw the error around one change of 'recurring' to this PNG."),
    ] = None,
) -> None:
    """Recovery from regime changes: meta-adaptation, online SGD and reset, side by side.

    Prints the median adaptation lag and the total excess error per method as a table (on
    stderr) and the figures as JSON (on stdout).
    """
    import torch

    from neuralsync.bench.adaptation import format_table, run_adaptation

    torch.set_num_threads(1)
    figures = run_adaptation(
        quick=quick, seed=seed, plot=plot, log=lambda line: console.print(line, highlight=False)
    )
    console.print(format_table(figures), highlight=False, soft_wrap=True)
    text = json.dumps(figures, indent=2)
    if out is not None:
        out.write_text(text + "\n", encoding="utf-8")
    typer.echo(text)


@bench.command()
@_user_errors
def population(
    quick: Annotated[bool, typer.Option(help="30 steps, one repeat: a smoke run.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Training 16 MLPs x 200 SGD steps: a loop over modules, torch.func vmap, hand-batched."""
    from neuralsync.bench.population import format_table, run_population

    figures = run_population(quick=quick, log=lambda line: console.print(line, highlight=False))
    console.print(format_table(figures), highlight=False)
    if as_json:
        typer.echo(json.dumps(figures, indent=2))


@bench.command()
@_user_errors
def evolution(
    quick: Annotated[
        bool, typer.Option(help="The default scenario's first 2,500 rows only: a smoke run.")
    ] = False,
    variant: Annotated[
        list[str] | None,
        typer.Option(help="Run only these variants (repeat the option); default: all five."),
    ] = None,
    scenario: Annotated[
        list[str] | None,
        typer.Option(
            help="Replay these scenarios (default, etth2, recurring; repeat the option); "
            "default: default and etth2."
        ),
    ] = None,
    seeds: Annotated[
        int,
        typer.Option(
            min=1,
            help="Replay every variant with this many seeds (the scenario's and the ones "
            "after it) and print the ratio to no evolution per seed.",
        ),
    ] = 1,
    out: Annotated[Path | None, typer.Option(help="Write results.json here.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Evolution ablation: full, no surrogate, no Lamarckian, no multi-scale, no evolution."""
    from neuralsync.bench.evolution import format_seeds_table, format_table, run_ablation

    report = run_ablation(
        quick=quick,
        variants=variant,
        scenarios=scenario,
        seeds=seeds,
        out=out,
        log=lambda line: console.print(line, highlight=False),
    )
    typer.echo(format_table(report))
    if seeds > 1:
        typer.echo("")
        typer.echo(format_seeds_table(report))
    if as_json:
        typer.echo(json.dumps(report, indent=2))


seeds = typer.Typer(
    no_args_is_help=True, help="The seed optimisers reproduced: hybrid ES+SGD, resonance HPO."
)
bench.add_typer(seeds, name="seeds")


@seeds.command("hybrid-es")
@_user_errors
def hybrid_es(
    quick: Annotated[bool, typer.Option(help="A few small generations: a smoke run.")] = False,
    out: Annotated[Path, typer.Option(help="Write results.json and the plots here.")] = Path(
        "runs/seeds-hybrid-es"
    ),
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """HybridES on MNIST in the three published configurations, beside plain SGD."""
    from neuralsync.bench.seeds import format_hybrid_es, run_hybrid_es

    report = run_hybrid_es(
        quick=quick, out=out, log=lambda line: console.print(line, highlight=False)
    )
    console.print(format_hybrid_es(report), highlight=False)
    if as_json:
        typer.echo(json.dumps(report, indent=2))


@seeds.command("resonance-gpt")
@_user_errors
def resonance_gpt(
    quick: Annotated[bool, typer.Option(help="A tiny model and budget: a smoke run.")] = False,
    seeds_: Annotated[int, typer.Option("--seeds", help="Repeats, each with its own seed.")] = 3,
    out: Annotated[Path, typer.Option(help="Write results.json and the plots here.")] = Path(
        "runs/seeds-resonance-gpt"
    ),
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """ResonanceHPO vs random search vs defaults on a character-level GPT, equal budget."""
    from neuralsync.bench.seeds import format_resonance_gpt, run_resonance_gpt

    report = run_resonance_gpt(
        quick=quick, seeds=seeds_, out=out, log=lambda line: console.print(line, highlight=False)
    )
    console.print(format_resonance_gpt(report), highlight=False)
    if as_json:
        typer.echo(json.dumps(report, indent=2))


def _attach_plugin_commands() -> None:
    """Attach the commands installed packages register (``connectors``' ``serve``, ``produce``
    and ``bench kafka``) under ``neuralsync.commands`` and ``neuralsync.bench``: the core
    offers them without depending on those packages."""
    from importlib.metadata import entry_points

    for group, target in (("neuralsync.commands", app), ("neuralsync.bench", bench)):
        for ep in entry_points(group=group):
            try:
                command = ep.load()
            except Exception as exc:  # a broken plugin must not take the whole CLI down
                console.print(f"[yellow]warning:[/] command '{ep.name}' not loaded: {exc}")
                continue
            target.command(name=ep.name)(_user_errors(command))


_attach_plugin_commands()


def main() -> None:
    """Console entry point."""
    app(prog_name="neuralsync")


if __name__ == "__main__":
    sys.exit(main())
