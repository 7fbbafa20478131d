"""``neuralsync bench online``: the online forecasting benchmark of FSNet and OneNet, honestly.

One dataset, one horizon, one protocol; every method in the same run, on the same windows:

- ``last_value``: persistence;
- ``linear_window``: a linear map over the flattened window forecasting ``y - last`` (ridge on the
  train windows, then recursive least squares on each test window);
- ``nlinear_channel``: per-channel NLinear, one map shared by every channel (ridge, then RLS);
- ``sgd_network``: the pipeline with the default network learned by online SGD, no detector, no
  adaptation;
- ``neuralsync``: the pipeline with its default settings (detector, regime recall,
  meta-adaptation, evolution)
  and the ``rls`` live model (:mod:`neuralsync.rls`);
- ``neuralsync_no_adapt``: the same without regime recall, meta-adaptation and evolution.

The protocol (``../shared/data/README.md``): lookback 60, every column in and out (the target
last), z-score with the train rows' mean and population std, metrics on that scale over every
H x D entry of every test window. ETT files: train rows [0, 2880), validation [2880 - L, 3600),
test [3600 - L, 14400); other files 20 / 5 / 75 %, validation and test starting L rows early.
Settings are chosen on the validation windows only; then one test-then-train pass over the
test windows with batch 1. Every method has learned the same rows before the test pass: the
pipelines stream every row from the first, and the linear baselines (a ridge fit on the train
windows) learn the validation windows online before the test windows.

``delayed`` learns from a window once its whole horizon has been observed; ``fsnet`` learns
from it right after forecasting it, which for H > 1 trains on targets of the windows forecast
next (a label leak). The pipeline never does that, so under ``fsnet`` with H > 1 only the
linear baselines run; at H = 1 both protocols are the same run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from neuralsync.bench.online_baselines import ChannelRLS, LastValue, WindowRLS
from neuralsync.bench.online_trace import plot_trace, write_events, write_windows
from neuralsync.errors import ConfigError

__all__ = [
    "METHODS",
    "NEURALSYNC_MODEL",
    "PUBLISHED",
    "Dataset",
    "format_table",
    "grid_table",
    "load_dataset",
    "plot_grid",
    "rls_components",
    "run_online",
]

LOOKBACK = 60
#: Train / validation / test borders of the ETT files, in rows, whatever the sampling rate.
ETT_BORDERS = (2880, 3600, 14400)
LINEAR_METHODS = ("last_value", "linear_window", "nlinear_channel")
METHODS = (
    "last_value",
    "linear_window",
    "nlinear_channel",
    "sgd_network",
    "neuralsync_no_adapt",
    "neuralsync",
)
#: The live model of both NeuralSync rows: one configuration for every dataset and horizon,
#: spelled out (and written to results.json) so that a change of the library's defaults does
#: not move the benchmark unseen.
NEURALSYNC_MODEL: dict[str, Any] = {
    "type": "rls",
    "rls_alpha": 1.0,
    "rls_forgetting": 0.999,
    "rls_window": "levels",
    "rls_window_alpha": 100.0,
    "rls_window_forgetting": 1.0,
    "rls_window_clip": 3.0,
    "rls_window_lags": None,
    "mixture_forgetting": 0.999,
    "mixture_shrinkage": [1.0, 10.0, 100.0, 1000.0],
    "mixture_hull": True,
    "rls_selection": "mixture",
    "selection_forgetting": 0.999,
}
#: Choices made on the validation windows. Linear baselines: ridge penalty and forgetting
#: factor. Pipelines: the network's SGD learning rate.
LINEAR_GRID = [(alpha, f) for alpha in (1.0, 100.0) for f in (1.0, 0.9999, 0.999)]
LR_GRID = (0.01, 0.03)
#: The NeuralSync rows' live-model settings chosen on validation after the learning rate, one
#: after another, each at the rate and the settings chosen before it. A setting's first value is
#: NEURALSYNC_MODEL's: the passes before it ran with it, and it wins ties.
MODEL_CHOICES: tuple[tuple[str, tuple[Any, ...]], ...] = (
    # The window expert over the whole window, or over its last row only: the state of a
    # first-order system, with the lookback's times fewer weights (docs/benchmarks.md, "the
    # window expert over the last row").
    ("rls_window_lags", (None, 1)),
    # The window expert's clip width, in standard deviations. Every width bounds the levels
    # (no "off"): a stream that leaves the rows learned from (ETTh2's test period) cannot be
    # seen on validation rows inside them.
    ("rls_window_clip", (3.0, 2.0, 6.0)),
    # The mixture, or the one candidate with the best recent record (docs/benchmarks.md, "the
    # best candidate"): where an expert alone beats the mixture (WTH's window expert at long
    # horizons), and where it does not (ETTh2).
    ("rls_selection", ("mixture", "best")),
)
#: The pipeline methods whose live model is NEURALSYNC_MODEL (MODEL_CHOICES apply).
RLS_METHODS = ("neuralsync_no_adapt", "neuralsync")
_TIME = "__row__"


@dataclasses.dataclass
class Dataset:
    """A benchmark file, z-scored with its train rows' statistics, and its split borders."""

    name: str
    columns: list[str]
    values: np.ndarray
    #: Rows: end of train, end of validation, end of test (train starts at 0; validation and
    #: test start ``lookback`` rows before the previous border).
    borders: tuple[int, int, int]

    def windows(self, split: str, horizon: int, lookback: int = LOOKBACK):
        """``(inputs (n, L, D), targets (n, H, D))`` of the split's windows, in time order."""
        start, stop = self.rows(split, lookback)
        origins = np.arange(start, stop - lookback - horizon + 1)
        x = np.stack([self.values[i : i + lookback] for i in origins])
        y = np.stack([self.values[i + lookback : i + lookback + horizon] for i in origins])
        return x, y

    def rows(self, split: str, lookback: int = LOOKBACK) -> tuple[int, int]:
        train, valid, test = self.borders
        return {
            "train": (0, train),
            "valid": (train - lookback, valid),
            "test": (valid - lookback, test),
            # Validation then test, one stream: what a model that keeps learning sees.
            "valid+test": (train - lookback, test),
        }[split]


def load_dataset(
    path: str | Path, target: str | None = None, rows: int | None = None, date: str = "date"
) -> Dataset:
    """Read a benchmark CSV: a date column and numeric columns, the target moved last.

    Parameters
    ----------
    path
        The CSV. Files whose name starts with ``ETT`` use the ETT borders, others 20/5/75 %.
    target
        The target column, moved last; default ``OT``.
    rows
        Keep only the first rows (a quick run); the borders are those of the shortened file.
    date
        The date (or timestamp) column, dropped: the rows are taken in file order.

    Examples
    --------
    >>> import tempfile
    >>> frame = pd.DataFrame({"date": range(1000), "a": np.sin(np.arange(1000.0)),
    ...                       "OT": np.arange(1000.0)})
    >>> path = Path(tempfile.mkdtemp()) / "toy.csv"
    >>> frame.to_csv(path, index=False)
    >>> data = load_dataset(path)
    >>> data.columns, data.borders, round(float(data.values[:200].std()), 6)
    (['a', 'OT'], (200, 250, 1000), 1.0)

    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: data file not found")
    frame = pd.read_csv(path)
    if date not in frame.columns:
        raise ConfigError(
            f"{path}: no '{date}' column; expected a CSV with a date column and numeric columns, "
            f"pass --date COL for another name (columns found: "
            f"{', '.join(map(str, frame.columns))})"
        )
    frame = frame.drop(columns=date)
    target = "OT" if target is None else target
    if target not in frame.columns:
        raise ConfigError(
            f"{path}: target column '{target}' not found; pass --target COL "
            f"(columns: {', '.join(map(str, frame.columns))})"
        )
    columns = [str(c) for c in frame.columns if c != target] + [target]
    frame = frame[[c for c in frame.columns if c != target] + [target]]
    bad = [str(c) for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if bad:
        raise ConfigError(f"{path}: columns {bad} are not numeric; expected numbers")
    values = frame.to_numpy(dtype=np.float64)
    if rows is not None:
        values = values[:rows]
    if not np.isfinite(values).all():
        row, col = np.argwhere(~np.isfinite(values))[0]
        raise ConfigError(f"{path}: row {row + 2}, column '{columns[col]}': not a finite number")
    n = len(values)
    if path.name.startswith("ETT") and rows is None:
        borders = ETT_BORDERS
        if n < borders[-1]:
            raise ConfigError(f"{path}: an ETT file needs {borders[-1]} rows, it has {n}")
    else:
        train, test = int(0.2 * n), int(0.75 * n)
        borders = (train, n - test, n)
    # Validation and test start lookback rows early: a split needs rows of its own only for
    # its targets; run_online checks that every split holds a window of the horizon asked.
    if borders[0] < 2 * LOOKBACK or borders[1] <= borders[0]:
        raise ConfigError(
            f"{path}: {n} rows are too few for lookback {LOOKBACK} and the splits "
            f"(train rows [0, {borders[0]}), validation up to row {borders[1]})"
        )
    train = values[: borders[0]]
    mean, std = train.mean(axis=0), train.std(axis=0)
    std = np.where(std > 0, std, 1.0)  # a constant column stays constant (zero)
    return Dataset(path.stem, columns, (values - mean) / std, borders)


# -- the linear baselines ----------------------------------------------------------------------


class _Scored(NamedTuple):
    """A test-then-train pass's figures: over the scored windows, and window by window."""

    mse: float
    mae: float
    #: Seconds of the scored part.
    seconds: float
    window_mse: list[float]
    window_mae: list[float]


def _stream(model: Any, x: np.ndarray, y: np.ndarray, delay: int, score_from: int = 0) -> _Scored:
    """Test-then-train over windows; ``model`` learns window ``k - delay`` before forecasting
    window ``k``; windows from ``score_from`` on are scored."""
    se = ae = 0.0
    window_mse, window_mae = [], []
    started = time.perf_counter()
    for k in range(len(x)):
        if k == score_from:
            started = time.perf_counter()
        if k >= delay:
            model.learn(x[k - delay], y[k - delay])
        error = model.predict(x[k]) - y[k]
        if k >= score_from:
            window_mse.append(float((error * error).mean()))
            window_mae.append(float(np.abs(error).mean()))
            se += window_mse[-1]
            ae += window_mae[-1]
    n = len(x) - score_from
    return _Scored(se / n, ae / n, time.perf_counter() - started, window_mse, window_mae)


def _linear(
    make: Callable[[float, float], Any],
    data: Dataset,
    horizon: int,
    delay: int,
    grid: list,
    trace: Path | None = None,
) -> dict[str, Any]:
    started = time.perf_counter()
    train, valid, test = (data.windows(s, horizon) for s in ("train", "valid", "test"))
    scores = {}
    for alpha, forgetting in grid:
        model = make(alpha, forgetting).fit(*train)
        scores[(alpha, forgetting)] = _stream(model, *valid, delay)[0]
    alpha, forgetting = min(scores, key=scores.get)
    # The chosen model learns the validation windows too before the test pass, as the
    # pipelines (which stream every row from the first) do: the same data for every method.
    model = make(alpha, forgetting).fit(*train)
    x, y = data.windows("valid+test", horizon)
    n_test = len(test[0])
    mse, mae, seconds, window_mse, window_mae = _stream(
        model, x, y, delay, score_from=len(x) - n_test
    )
    if trace is not None:
        first = data.rows("test")[0] + LOOKBACK - 1  # the first test window's last row
        write_windows(trace, np.arange(first, first + n_test), window_mse, window_mae)
    return {
        "mse": mse,
        "mae": mae,
        "wall_s": time.perf_counter() - started,
        "events_per_s": n_test / seconds,
        "test_windows": n_test,
        "selected": {"alpha": alpha, "forgetting": forgetting},
        "valid_mse": {f"alpha={a},forgetting={f}": v for (a, f), v in scores.items()},
    }


# -- the pipeline -----------------------------------------------------------------------------


def _scenario(
    data: Dataset, horizon: int, method: str, lr: float, seed: int, model: dict | None = None
):
    from neuralsync.config import Scenario

    settings: dict[str, Any] = {
        "name": f"bench-{data.name}-{method}",
        "timestamp": _TIME,
        "targets": data.columns,
        "lookback": LOOKBACK,
        "horizon": horizon,
        "label_delay": horizon,
        # The benchmark z-scores with the train rows' statistics itself.
        "normalization": {"mode": "none"},
        "seed": seed,
    }
    off = {name: {"enabled": False} for name in ("recall", "meta", "evolution")}
    rls = {**NEURALSYNC_MODEL, "lr": lr, **(model or {})}
    if method == "sgd_network":
        settings |= {"model": {"lr": lr}, "detector": {"type": "none"}, "adaptation": off}
    elif method == "neuralsync":
        settings |= {"model": rls}
    elif method == "neuralsync_no_adapt":
        settings |= {"model": rls, "adaptation": off}
    else:
        raise ValueError(f"unknown pipeline method {method!r}")
    return Scenario.model_validate(settings)


def _run_pipeline(
    data: Dataset,
    horizon: int,
    method: str,
    lr: float,
    stop_split: str,
    seed: int,
    trace: Path | None = None,
    model: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Stream rows 0 .. the end of ``stop_split`` through a pipeline; score the windows of
    ``stop_split`` (their origin is the window's last row). With ``trace``, the pipeline's
    events and the per-window errors are written there (:mod:`.online_trace`); ``model``
    overrides settings of NEURALSYNC_MODEL (the NeuralSync rows' choices)."""
    from neuralsync.adaptation import build_adapters
    from neuralsync.pipeline import Pipeline
    from neuralsync.sources import DataFrameSource

    scenario = _scenario(data, horizon, method, lr, seed, model)
    pipeline = Pipeline(scenario, adapters=build_adapters(scenario))
    events: list[Any] = []
    if trace is not None:
        pipeline.events.subscribe(events.append)
    start, stop = data.rows(stop_split)
    first, last = start + LOOKBACK - 1, stop - horizon - 1  # origins of the scored windows
    frame = pd.DataFrame(data.values[:stop], columns=data.columns)
    frame.insert(0, _TIME, np.arange(stop, dtype=np.float64))
    n_windows = last - first + 1
    se = np.zeros(n_windows)
    ae = np.zeros(n_windows)
    counts = np.zeros(n_windows, dtype=np.int64)
    seconds = {"warmup": 0.0, "scored": 0.0}
    for part, rows in (("warmup", slice(0, first + 1)), ("scored", slice(first + 1, stop))):
        source = DataFrameSource(
            frame.iloc[rows], timestamp=_TIME, columns=data.columns, chunk_size=512
        )
        started = time.perf_counter()
        for batch in source:
            # As columns, not records: a row scores horizon * targets values (576 on WTH at
            # H = 48), and a record for each was about a fifth of a pass (docs/performance.md).
            scored_values = pipeline.process_columns(batch)
            if not len(scored_values):
                continue
            k = scored_values.issued_at.astype(np.float64).astype(np.int64) - first
            error = scored_values.prediction - scored_values.truth
            scored = (k >= 0) & (k < n_windows)
            k, error = k[scored], error[scored]
            np.add.at(se, k, error * error)
            np.add.at(ae, k, np.abs(error))
            np.add.at(counts, k, 1)
        seconds[part] = time.perf_counter() - started
    expected = horizon * len(data.columns)
    if not (counts == expected).all():
        raise RuntimeError(
            f"{method}: {int((counts != expected).sum())} windows were not scored on all "
            f"{expected} entries; the pipeline's windows do not match the protocol's"
        )
    if trace is not None:
        write_windows(trace, np.arange(first, last + 1), se / expected, ae / expected)
        write_events(trace, events)
    summary = pipeline.metrics()
    return {
        "lr": lr,
        "model": dict(model or {}) if method in RLS_METHODS else {},
        "mse": float((se / expected).mean()),
        "mae": float((ae / expected).mean()),
        "seconds": seconds,
        "windows": n_windows,
        "swaps": int(summary.get("swaps", pipeline.counts_.get("swaps", 0))),
        "regime_changes": len(pipeline.detections_),
    }


def _linear_method(
    method: str, data: Dataset, horizon: int, delay: int, grid: list, trace: Path | None = None
) -> dict[str, Any]:
    d = len(data.columns)
    makers: dict[str, Callable[[float, float], Any]] = {
        "last_value": lambda a, f: LastValue(horizon),
        "linear_window": lambda a, f: WindowRLS(LOOKBACK, horizon, d, a, f),
        "nlinear_channel": lambda a, f: ChannelRLS(LOOKBACK, horizon, a, f),
    }
    if method == "last_value":
        result = _linear(makers[method], data, horizon, delay, [(1.0, 1.0)], trace)
        result.pop("selected"), result.pop("valid_mse")
        return result
    return _linear(makers[method], data, horizon, delay, grid, trace)


def _timed(function: Callable[..., dict[str, Any]], *args: Any) -> tuple[dict[str, Any], float]:
    """``function(*args)`` on one thread (batch-1 updates: BLAS threads only contend, a
    721-wide RLS step is 30 times slower with them), and its wall seconds."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(1)
    started = time.perf_counter()
    with threadpool_limits(1):
        result = function(*args)
    return result, time.perf_counter() - started


@dataclasses.dataclass
class _Task:
    """One run of the benchmark: a linear method, or one pipeline pass (a validation pass for
    one learning rate, or the test pass)."""

    key: tuple
    #: Lower runs first among the ready tasks: the long chains start early.
    rank: int
    needs: tuple[tuple, ...]
    #: The function and its arguments, given the finished tasks' results.
    call: Callable[[dict[tuple, Any]], tuple[Callable[..., Any], tuple]]


def _plan(
    data: Dataset,
    horizon: int,
    delay: int,
    methods: Sequence[str],
    linear_grid: list,
    lr_grid: Sequence[float],
    seed: int,
    trace: Path | None = None,
    choices: Sequence[tuple[str, Sequence[Any]]] = (),
) -> list[_Task]:
    """Every run the methods need, with what each waits for.

    A pipeline method's validation passes choose its learning rate (one pass per rate in
    ``lr_grid``); for the NeuralSync rows, further passes then choose each live-model setting
    of ``choices`` in turn, at the chosen rate and the settings chosen before it (one pass per
    value after its first, which the passes before it ran with). ``neuralsync`` takes the
    choices ``neuralsync_no_adapt`` made when both run (same live model; the adapters' searches
    would make a grid of full runs too slow). With ``trace``, each test pass traces itself to
    ``trace/METHOD``."""
    tasks: list[_Task] = []
    for method in methods:
        traced = None if trace is None else trace / method
        if method in LINEAR_METHODS:
            args = (method, data, horizon, delay, linear_grid, traced)
            tasks.append(_Task(("linear", method), 6, (), lambda _, a=args: (_linear_method, a)))
            continue
        chooser = _rate_chooser(method, methods)
        settings = list(choices) if method in RLS_METHODS else []
        # A setting's first value needs a rate pass to be compared with, even with one rate.
        chosen_later = any(len(values) > 1 for _, values in settings)
        rates = list(lr_grid) if len(lr_grid) > 1 or chosen_later else []
        rate_needs = tuple(("valid", chooser, lr) for lr in rates)
        needs = rate_needs
        if chooser == method:
            rank = 0 if method == "neuralsync_no_adapt" else 3
            first = {name: values[0] for name, values in settings}
            for lr in rates:
                args = (data, horizon, method, lr, "valid", seed, None, first)
                tasks.append(
                    _Task(("valid", method, lr), rank, (), lambda _, a=args: (_run_pipeline, a))
                )
        for stage, (name, values) in enumerate(settings):
            stage_needs = tuple(("valid_model", chooser, name, v) for v in values[1:])
            if chooser == method:
                for value in values[1:]:
                    before = settings[:stage]
                    args = (data, horizon, method, seed, lr_grid, rate_needs, first, before)
                    setting_pass = functools.partial(_setting_pass, *args, {name: value})
                    key = ("valid_model", method, name, value)
                    tasks.append(_Task(key, rank, needs, setting_pass))
            needs += stage_needs

        def call(done, method=method, by=chooser, rates=rate_needs, settings=settings, to=traced):
            lr = _chosen_lr(done, rates, lr_grid)
            model = _chosen_model(done, by, lr, settings) if settings else None
            return _run_pipeline, (data, horizon, method, lr, "test", seed, to, model)

        rank = {"neuralsync": 1, "neuralsync_no_adapt": 2}.get(method, 4)
        tasks.append(_Task(("test", method), rank, needs, call))
    return tasks


def _setting_pass(
    data: Dataset,
    horizon: int,
    method: str,
    seed: int,
    lr_grid: Sequence[float],
    rate_needs: Sequence[tuple],
    first: dict[str, Any],
    before: Sequence[tuple[str, Sequence[Any]]],
    setting: dict[str, Any],
    done: dict[tuple, Any],
) -> tuple[Callable[..., Any], tuple]:
    """A validation pass of one value of a live-model setting: at the chosen rate, the values
    chosen for the settings ``before`` it, and the first value of those after it."""
    lr = _chosen_lr(done, rate_needs, lr_grid)
    model = {**first, **_chosen_model(done, method, lr, before), **setting}
    return _run_pipeline, (data, horizon, method, lr, "valid", seed, None, model)


def _rate_chooser(method: str, methods: Sequence[str]) -> str:
    """Whose validation passes choose ``method``'s learning rate (and live-model settings)."""
    if method == "neuralsync" and "neuralsync_no_adapt" in methods:
        return "neuralsync_no_adapt"
    return method


def _chosen_lr(done: dict[tuple, Any], needs: Sequence[tuple], lr_grid: Sequence[float]) -> float:
    """The rate with the lowest validation MSE (ties: the first in the grid)."""
    if not needs:
        return lr_grid[0]
    scores = {key[2]: done[key][0]["mse"] for key in needs}
    return min(scores, key=scores.get)


def _chosen_model(
    done: dict[tuple, Any],
    chooser: str,
    lr: float,
    settings: Sequence[tuple[str, Sequence[Any]]],
) -> dict[str, Any]:
    """Each setting's value with the lowest validation MSE among ``chooser``'s passes, in
    turn, at the rate ``lr`` and the values chosen before it. A setting's first value is
    scored by the pass that ran with the choices so far (the chosen rate's own pass, or the
    pass of the value chosen last), and wins ties."""
    chosen: dict[str, Any] = {}
    reference = ("valid", chooser, lr)
    for name, values in settings:
        if len(values) == 1:
            chosen[name] = values[0]
            continue
        keys = {values[0]: reference} | {v: ("valid_model", chooser, name, v) for v in values[1:]}
        chosen[name] = min(values, key=lambda v: done[keys[v]][0]["mse"])
        reference = keys[chosen[name]]
    return chosen


def _execute(
    tasks: list[_Task], jobs: int, on_done: Callable[[tuple, dict[tuple, Any]], None]
) -> dict[tuple, Any]:
    """Run every task, at most ``jobs`` at a time (in worker processes when ``jobs`` > 1),
    each as soon as what it needs is done; the ready one with the lowest rank first.

    Every run is deterministic and independent of the others, so the figures do not depend
    on ``jobs``; only the wall time does."""
    done: dict[tuple, Any] = {}
    pending = sorted(tasks, key=lambda t: t.rank)

    def ready() -> list[_Task]:
        return [t for t in pending if all(n in done for n in t.needs)]

    if jobs <= 1:
        while pending:
            task = ready()[0]
            pending.remove(task)
            function, args = task.call(done)
            done[task.key] = _timed(function, *args)
            on_done(task.key, done)
        return done
    import concurrent.futures
    import multiprocessing

    # spawn: a forked child of a process that has run torch can hang in its thread pools.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        running: dict[concurrent.futures.Future, _Task] = {}
        while pending or running:
            for task in ready()[: jobs - len(running)]:
                pending.remove(task)
                function, args = task.call(done)
                running[pool.submit(_timed, function, *args)] = task
            finished, _ = concurrent.futures.wait(
                running, return_when=concurrent.futures.FIRST_COMPLETED
            )
            for future in finished:
                task = running.pop(future)
                done[task.key] = future.result()
                on_done(task.key, done)
    return done


def _pipeline_result(done: dict[tuple, Any], method: str) -> dict[str, Any]:
    run, seconds = done[("test", method)]
    valid = {k: done[k] for k in done if k[0] in ("valid", "valid_model") and k[1] == method}
    # The rate passes ran with every setting's first value; a setting's passes, at the chosen
    # rate and the values chosen before it.
    selected = {"lr": run["lr"], **run["model"]}
    return {
        "mse": run["mse"],
        "mae": run["mae"],
        # Its own runs: its validation passes (if it made its choices) and its test pass.
        "wall_s": seconds + sum(s for _, s in valid.values()),
        "events_per_s": run["windows"] / run["seconds"]["scored"],
        "test_windows": run["windows"],
        # The test pass ran with the settings chosen on validation (its own, or its variant's).
        "selected": selected,
        "valid_mse": {
            f"lr={k[2]}" if k[0] == "valid" else f"{k[2]}={k[3]}": r["mse"]
            for k, (r, _) in valid.items()
        },
        "swaps": run["swaps"],
        "regime_changes": run["regime_changes"],
    }


def rls_components(
    data: str | Path | Dataset,
    horizon: int,
    *,
    target: str | None = None,
    rows: int | None = None,
    lr: float = 0.01,
    seed: int = 0,
    **model: Any,
) -> dict[str, dict[str, float]]:
    """Validation and test MSE of the ``rls`` live model's forecast and of every candidate it
    is made of (the mixture, each expert alone, the last value), under the delayed protocol.

    The learner is driven directly, without the pipeline (no detector, no adaptation): every
    row from the first is a window it forecasts, and it learns each window once its horizon
    is observed, before the forecast from that row, as in the pipeline; the forecast's figures
    are those of ``neuralsync_no_adapt`` at the same learning rate and clip width. ``model``
    overrides :data:`NEURALSYNC_MODEL` (e.g. ``rls_selection="leader"``); ``lr`` is the
    network's. This is how the live model's settings are compared on the validation rows
    (docs/benchmarks.md): the figures of one candidate say where the mixture gains on its
    experts or loses to them.

    Returns ``{"valid": {...}, "test": {...}}``, each ``{"forecast": mse, "mixture": mse, ...}``.
    """
    import torch
    from threadpoolctl import threadpool_limits

    from neuralsync.config import ModelConfig
    from neuralsync.rls import CANDIDATES, RLSLearner

    dataset = data if isinstance(data, Dataset) else load_dataset(data, target, rows)
    values = dataset.values.astype(np.float32)
    n_columns = values.shape[1]
    config = ModelConfig.model_validate({**NEURALSYNC_MODEL, "lr": lr, **model})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        learner = RLSLearner(config, n_columns, LOOKBACK, horizon, list(range(n_columns)))
    spans = {split: dataset.rows(split) for split in ("valid", "test")}
    sums = {split: np.zeros(len(CANDIDATES) + 1) for split in spans}
    counts = dict.fromkeys(spans, 0)
    # One window at a time, as in run_online: BLAS threads would only contend.
    with threadpool_limits(1):
        for origin in range(LOOKBACK - 1, len(values) - horizon):
            window = values[origin - LOOKBACK + 1 : origin + 1][None]
            scored = [
                split
                for split, (start, stop) in spans.items()
                if start + LOOKBACK - 1 <= origin < stop - horizon
            ]
            # As the pipeline does: the window whose horizon this row completes is learned
            # before the forecast from this row is issued.
            learned = origin - horizon
            if learned >= LOOKBACK - 1:
                learner.learn(
                    values[learned - LOOKBACK + 1 : learned + 1][None],
                    values[learned + 1 : learned + 1 + horizon][None],
                )
            forecast, candidates = (a[0] for a in learner.issue(window))
            for split in scored:
                truth = values[origin + 1 : origin + 1 + horizon]
                each = window[0, -1][None, :, None] + candidates - truth[..., None]
                sums[split][:-1] += (each**2).mean((0, 1))
                sums[split][-1] += float(((forecast - truth) ** 2).mean())
                counts[split] += 1
    names = [*CANDIDATES, "forecast"]
    return {
        split: {
            name: float(total / counts[split])
            for name, total in zip(names, sums[split], strict=True)
        }
        for split in spans
    }


# -- the benchmark -----------------------------------------------------------------------------


def run_online(
    data: str | Path,
    horizon: int,
    protocol: str = "delayed",
    out: str | Path | None = None,
    target: str | None = None,
    quick: bool = False,
    seed: int = 0,
    methods: Sequence[str] = METHODS,
    log: Callable[[str], None] | None = None,
    date: str = "date",
    jobs: int = 1,
    trace: bool = False,
) -> dict[str, Any]:
    """Run every method on one dataset, horizon and protocol; write ``out/results.json``.

    ``quick`` keeps the first 1,500 rows and one candidate per choice: a smoke run. ``jobs``
    runs that many passes at once, in worker processes (the figures are the same for any
    ``jobs``; each pass runs on one thread). ``trace`` (needs ``out``) also writes each
    method's errors window by window, the pipelines' events and their plot under
    ``out/trace`` (:mod:`neuralsync.bench.online_trace`).
    """
    if protocol not in ("fsnet", "delayed"):
        raise ConfigError(f"protocol {protocol!r}: expected 'fsnet' or 'delayed'")
    if horizon < 1:
        raise ConfigError(f"horizon must be at least 1, got {horizon}")
    if jobs < 1:
        raise ConfigError(f"jobs must be at least 1, got {jobs}")
    if trace and out is None:
        raise ConfigError("trace: expected an output directory (out) to write the trace to")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown methods {unknown}; available: {', '.join(METHODS)}")
    dataset = load_dataset(data, target, rows=1500 if quick else None, date=date)
    delay = 1 if protocol == "fsnet" else horizon
    skipped = protocol == "fsnet" and horizon > 1
    run = [m for m in methods if m in LINEAR_METHODS or not skipped]
    linear_grid = LINEAR_GRID[:1] if quick else LINEAR_GRID
    lr_grid = (0.01,) if quick else LR_GRID
    choices = [(name, values[:1] if quick else values) for name, values in MODEL_CHOICES]
    started = time.perf_counter()
    traced = Path(out) / "trace" if trace and out is not None else None
    tasks = _plan(dataset, horizon, delay, run, linear_grid, lr_grid, seed, traced, choices)
    results: dict[str, Any] = {}

    def finish(key: tuple, done: dict[tuple, Any]) -> None:
        method = key[-1] if key[0] in ("linear", "test") else None
        if method is None:
            return
        # A linear method's wall_s is _linear's own (its grid included).
        result = done[key][0] if key[0] == "linear" else _pipeline_result(done, method)
        results[method] = result
        if log is not None:
            log(f"{method}: {_fmt(result.get('mse'))} ({result.get('wall_s', 0):.0f} s)")

    _execute(tasks, jobs, finish)
    for method in methods:
        if method not in run:
            results[method] = {
                "skipped": "the pipeline learns from a window only once its whole horizon "
                "is observed; the fsnet protocol's label leak at H > 1 cannot be expressed"
            }
    results = {method: results[method] for method in methods}
    report = {
        "dataset": dataset.name,
        "path": str(data),
        "horizon": horizon,
        "protocol": protocol,
        "lookback": LOOKBACK,
        "columns": dataset.columns,
        "borders": list(dataset.borders),
        "quick": quick,
        "seed": seed,
        "neuralsync_model": NEURALSYNC_MODEL,
        "jobs": jobs,
        "elapsed_s": time.perf_counter() - started,
        "methods": results,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    if traced is not None and run:
        title = f"{dataset.name}, H = {horizon}, protocol {protocol}: test windows"
        plot_trace(traced, traced / "trace.png", title=title)
    return report


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    # Small errors (exchange rates) keep four significant digits: the methods differ there.
    return f"{value:.{digits}f}" if abs(value) >= 0.1 or value == 0 else f"{value:#.{digits}g}"


def format_table(report: dict[str, Any]) -> str:
    """The results as a markdown table, best MSE in bold.

    >>> print(format_table({"dataset": "toy", "horizon": 1, "protocol": "delayed",
    ...     "methods": {"last_value": {"mse": 0.5, "mae": 0.4, "wall_s": 0.1,
    ...                                "events_per_s": 9000.0}}}))
    toy, H = 1, protocol delayed
    <BLANKLINE>
    | method | MSE | MAE | wall s | events/s |
    |---|---:|---:|---:|---:|
    | last_value | **0.5000** | 0.4000 | 0.1 | 9000 |

    """
    rows = report["methods"]
    scored = {m: r["mse"] for m, r in rows.items() if "mse" in r}
    best = min(scored, key=scored.get) if scored else None
    lines = [
        f"{report['dataset']}, H = {report['horizon']}, protocol {report['protocol']}",
        "",
        "| method | MSE | MAE | wall s | events/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for method, r in rows.items():
        if "mse" not in r:
            lines.append(f"| {method} | not run | | | |")
            continue
        mse = _fmt(r["mse"])
        mse = f"**{mse}**" if method == best else mse
        lines.append(
            f"| {method} | {mse} | {_fmt(r['mae'])} | {r['wall_s']:.1f} | {r['events_per_s']:.0f} |"
        )
    return "\n".join(lines)


#: Published test MSE beside which ours are read, by (dataset, protocol, horizon):
#: (source, MSE). fsnet: OneNet (NeurIPS 2023) Table 2; delayed: DSOF (ICLR 2025), no leak.
PUBLISHED: dict[tuple[str, str, int], list[tuple[str, float]]] = {
    ("ETTh2", "fsnet", 1): [("FSNet", 0.466), ("OneNet", 0.380)],
    ("WTH", "fsnet", 1): [("FSNet", 0.162), ("OneNet", 0.156)],
    ("ETTh2", "delayed", 1): [("DSOF", 0.365)],
    ("ETTh2", "delayed", 24): [("DSOF", 1.701)],
    ("ETTh2", "delayed", 48): [("DSOF", 3.082)],
}


def grid_table(reports: Sequence[dict[str, Any]]) -> str:
    """Every report as one row of a markdown table: each method's MSE, the published figures
    beside them, and whether NeuralSync (full) has the lowest MSE of the run.

    >>> report = {"dataset": "ETTh2", "protocol": "fsnet", "horizon": 1, "methods": {
    ...     "last_value": {"mse": 0.404}, "neuralsync": {"mse": 0.33}}}
    >>> row = grid_table([report]).splitlines()[-1].split(" | ")
    >>> row[1], row[3], row[-3], row[-2], row[-1]
    ('fsnet = delayed', '0.4040', '**0.3300**', 'FSNet 0.466, OneNet 0.380, DSOF 0.365', 'yes |')

    """
    header = ["dataset", "protocol", "H", *METHODS, "published", "NeuralSync lowest"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|---|---|---:|" + "---:|" * len(METHODS) + "---|---|",
    ]
    order = {name: i for i, name in enumerate(("ETTh2", "WTH", "exchange_rate"))}

    def position(r: dict[str, Any]) -> tuple:
        # H = 1 first (the two protocols' shared run), then each protocol by horizon.
        name = r["dataset"]
        return (order.get(name, 9), name, r["horizon"] > 1, r["protocol"], r["horizon"])

    for r in sorted(reports, key=position):
        scores = {m: v["mse"] for m, v in r["methods"].items() if "mse" in v}
        best = min(scores, key=scores.get) if scores else None
        cells = []
        for method in METHODS:
            value = scores.get(method)
            text = _fmt(value)
            cells.append(f"**{text}**" if method == best and value is not None else text)
        protocol = r["protocol"]
        if r["horizon"] == 1:  # a label delay of one step either way: the same run
            protocol = "fsnet = delayed"
            published = [
                p for k in ("fsnet", "delayed") for p in PUBLISHED.get((r["dataset"], k, 1), [])
            ]
        else:
            published = PUBLISHED.get((r["dataset"], protocol, r["horizon"]), [])
        ours = scores.get("neuralsync")
        lowest = "—" if ours is None else ("yes" if ours <= min(scores.values()) else "no")
        row = [r["dataset"], protocol, str(r["horizon"]), *cells]
        row += [", ".join(f"{name} {mse:.3f}" for name, mse in published) or "—", lowest]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_grid(reports: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One panel per dataset and protocol: each method's test MSE relative to last-value's,
    by horizon (below 1 beats persistence), the published figures as black crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neuralsync.report import save_figure

    panels = sorted({(r["dataset"], r["protocol"]) for r in reports})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.8), squeeze=False)
    for ax, (name, protocol) in zip(axes[0], panels, strict=True):
        chosen = sorted(
            (r for r in reports if (r["dataset"], r["protocol"]) == (name, protocol)),
            key=lambda r: r["horizon"],
        )
        horizons = [r["horizon"] for r in chosen]
        reference = [r["methods"].get("last_value", {}).get("mse") for r in chosen]
        for method in METHODS:
            points = [
                (i, r["methods"][method]["mse"] / ref)
                for i, (r, ref) in enumerate(zip(chosen, reference, strict=True))
                if ref and "mse" in r["methods"].get(method, {})
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                style = "-" if method.startswith("neuralsync") else "--"
                ax.plot(xs, ys, style, marker="o", label=method, linewidth=1.5)
        for i, (r, ref) in enumerate(zip(chosen, reference, strict=True)):
            # At H = 1 the protocols are the same run: both sets of published figures apply.
            protocols = ("fsnet", "delayed") if r["horizon"] == 1 else (protocol,)
            published = [p for k in protocols for p in PUBLISHED.get((name, k, r["horizon"]), [])]
            for source, mse in published:
                if ref:
                    ax.plot(i, mse / ref, "kx")
                    ax.annotate(
                        source,
                        (i, mse / ref),
                        fontsize=7,
                        xytext=(4, 0),
                        textcoords="offset points",
                    )
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(range(len(horizons)), [str(h) for h in horizons])
        ax.set_title(f"{name}, {protocol}")
        ax.set_xlabel("horizon H")
        ax.set_ylabel("test MSE / last-value MSE")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = save_figure(fig, path)
    plt.close(fig)
    return path
