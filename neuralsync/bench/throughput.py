"""``neuralsync bench throughput``: how fast the live path forecasts and learns, side by side.

Every figure comes from the same run on the same machine, so the ratios are meaningful even
where the absolute numbers are not (shared, noisy machines). Measured:

- one series, one forecast and one SGD step per event, for a tiny MLP (8 → 32 → 1): a plain
  eager torch loop, the reference path (:class:`~neuralsync.learner.OnlineLearner`) and the
  fast path (:class:`~neuralsync.fast.FastLearner`);
- many series, one model per key (:class:`~neuralsync.stacked.StackedForecaster`): key-events
  per second with 1,000 and 10,000 keys all ticking, each in a fresh process so its peak RSS is
  its own, with the state bytes per key;
- long horizons: a pipeline forecasting 48 steps of 12 columns (each row completes 576 forecast
  values), rows per second with those values scored as arrays (the default) and one at a time;
- end to end: ``neuralsync replay`` of the default scenario on the fast and reference paths.
"""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from neuralsync.config import ModelConfig
from neuralsync.fast import FastLearner
from neuralsync.learner import OnlineLearner

__all__ = [
    "fleet_throughput",
    "long_horizon_throughput",
    "run_throughput",
    "single_series_throughput",
]

N_INPUTS, HIDDEN = 8, 32


def _events(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` windows of one row of 8 inputs, and a learnable target for each."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, 1, N_INPUTS)).astype(np.float32)
    y = (x[:, :, :, :1] * 0.5 + x[:, :, :, 1:2] * 0.25).astype(np.float32)
    return x, y


def _rate(loop: Callable[[], None], events: int) -> float:
    start = time.perf_counter()
    loop()
    return events / (time.perf_counter() - start)


def single_series_throughput(n_events: int) -> dict[str, float]:
    """Events per second of forecast + learn on one series, for the three implementations."""
    x, y = _events(n_events)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(N_INPUTS, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 1)
    )
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)

    def eager() -> None:
        for i in range(n_events):
            with torch.no_grad():
                net(xt[i, 0])
            loss = torch.nn.functional.mse_loss(net(xt[i, 0]), yt[i, 0])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    def online(learner: OnlineLearner) -> Callable[[], None]:
        def loop() -> None:
            for i in range(n_events):
                learner.predict(x[i])
                learner.learn(x[i], y[i])

        return loop

    def make(fast: bool) -> OnlineLearner:
        config = ModelConfig(hidden=[HIDDEN], fast_path=fast)
        cls = FastLearner if fast else OnlineLearner
        return cls(config, n_inputs=N_INPUTS, lookback=1, horizon=1, target_index=[0])

    warm = make(True)  # compile (or load the cached kernels) before timing
    warm.predict(x[0])
    warm.learn(x[0], y[0])
    return {
        "eager_torch": _rate(eager, n_events),
        "reference": _rate(online(make(False)), n_events),
        "fast": _rate(online(make(True)), n_events),
    }


def fleet_throughput(n_keys: int, ticks: int, device: str = "cpu") -> dict[str, Any]:
    """Key-events per second of :class:`StackedForecaster`, every key ticking; peak RSS."""
    from neuralsync.stacked import StackedForecaster

    def build(keys: int) -> StackedForecaster:
        return StackedForecaster(
            ModelConfig(hidden=[HIDDEN]), n_keys=keys, n_inputs=N_INPUTS, lookback=1, horizon=1,
            target_index=[0], device=device,
        )  # fmt: skip

    warm = build(2)  # load the kernels first: their code is not the fleet's memory
    for _ in range(3):
        warm.step(torch.zeros(2, N_INPUTS))
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(ticks + 2, n_keys, N_INPUTS, generator=generator).to(device)
    rss_before = _current_rss_bytes()
    forecaster = build(n_keys)
    for t in range(2):  # the first ticks allocate the working memory
        forecaster.step(rows[t])
    if device != "cpu":
        torch.cuda.synchronize()

    def loop() -> None:
        for t in range(2, ticks + 2):
            forecaster.step(rows[t])
        if device != "cpu":
            torch.cuda.synchronize()

    rate = _rate(loop, ticks * n_keys)
    state = _state_bytes_per_key(forecaster, n_keys)
    return {
        "keys": n_keys,
        "device": device,
        "key_events_per_second": rate,
        "peak_rss_mib": _peak_rss_bytes() / 2**20,
        # Resident memory the fleet added, its working memory included, divided by its keys.
        "rss_growth_per_key_bytes": (_current_rss_bytes() - rss_before) / n_keys,
        **state,
    }


def _state_bytes_per_key(forecaster: Any, n_keys: int) -> dict[str, float]:
    """Bytes per key of the forecaster's state, split as the issue's budget asks."""

    def size(tensors: list[torch.Tensor]) -> float:
        return sum(t.numel() * t.element_size() for t in tensors) / n_keys

    learners = forecaster.learners
    params = size(learners.params_)
    optimiser = size(learners.momentum_)
    window = size([forecaster.window_])
    # Every tensor the forecaster and its models hold, each storage once (parameters are
    # reachable through several views of one storage).
    storages = {}
    for holder in (forecaster, learners):
        for value in vars(holder).values():
            if isinstance(value, torch.Tensor):
                storage = value.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    everything = sum(storages.values()) / n_keys
    return {
        "params_bytes_per_key": params,
        "optimizer_bytes_per_key": optimiser,
        "window_bytes_per_key": window,
        "overhead_bytes_per_key": everything - params - optimiser - window,
    }


def _current_rss_bytes() -> int:
    """Resident set size now (Linux /proc); 0 where that is not available."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux (bytes on macOS).
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _fleet_in_subprocess(n_keys: int, ticks: int, device: str) -> dict[str, Any]:
    """Run :func:`fleet_throughput` in a fresh interpreter, so its peak RSS is its own."""
    code = (
        "import json, torch; from neuralsync.bench.throughput import fleet_throughput; "
        f"torch.set_num_threads({torch.get_num_threads()}); "
        f"print(json.dumps(fleet_throughput({n_keys}, {ticks}, {device!r})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"fleet benchmark with {n_keys} keys failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def long_horizon_throughput(
    n_rows: int, horizon: int = 48, n_columns: int = 12
) -> dict[str, dict[str, float]]:
    """Rows per second of a pipeline that forecasts ``horizon`` steps of ``n_columns`` targets
    (a linear model, no detector, no adaptation: the pipeline's own work shows), with each row's
    ``horizon * n_columns`` completed values returned as columns (``process_columns``), and as
    records scored as arrays and one at a time; with the figures each way scored (the same up
    to rounding; columns and arrays to the bit)."""
    import pandas as pd

    from neuralsync.config import Scenario
    from neuralsync.pipeline import SCORE_AS_ARRAYS, Pipeline
    from neuralsync.sources import DataFrameSource

    rng = np.random.default_rng(0)
    columns = [f"c{i}" for i in range(n_columns)]
    frame = pd.DataFrame(np.cumsum(rng.normal(size=(n_rows, n_columns)), axis=0), columns=columns)
    frame.insert(0, "t", np.arange(n_rows, dtype=np.float64))
    off = {name: {"enabled": False} for name in ("recall", "meta", "evolution")}
    scenario = Scenario(
        name="long-horizon",
        timestamp="t",
        targets=columns,
        lookback=16,
        horizon=horizon,
        model={"type": "linear"},
        detector={"type": "none"},
        adaptation=off,
    )
    figures = {}
    ways = (
        ("as_columns", SCORE_AS_ARRAYS, "process_columns"),
        ("as_arrays", SCORE_AS_ARRAYS, "process"),
        ("one_at_a_time", math.inf, "process"),
    )
    for name, threshold, method in ways:
        pipeline = Pipeline(scenario)
        pipeline.score_as_arrays = threshold
        process = getattr(pipeline, method)
        source = DataFrameSource(frame, timestamp="t", columns=columns, chunk_size=256)
        start = time.perf_counter()
        for batch in source:
            process(batch)
        seconds = time.perf_counter() - start
        summary = pipeline.metrics()
        figures[name] = {
            "rows_per_second": n_rows / seconds,
            "values_scored": summary["n_predictions"],
            "mse": summary["mse"],
        }
    return figures


def _replay_rate(fast: bool, limit: int | None) -> float:
    import tempfile

    from neuralsync.config import load_scenario
    from neuralsync.replay import replay
    from neuralsync.scenarios import resolve_scenario

    # On the CPU both ways: "auto" would put the reference path on a GPU where there is one,
    # and the fast path with it (it is a CPU kernel), so "fast" would not be the fast path.
    overrides = {"model.fast_path": fast, "device": "cpu"}
    scenario = load_scenario(resolve_scenario("default"), overrides)
    with tempfile.TemporaryDirectory() as out:
        metrics = replay(scenario, out, limit=limit, report=False)
    return float(metrics["events_per_second"])


def run_throughput(
    *, quick: bool = False, devices: list[str] | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """All the throughput figures, logging each as it is measured; returns them as a dict."""
    n_events = 3_000 if quick else 30_000
    ticks = 20 if quick else 200
    # A GPU pays off only with many keys per launch: the full run goes to 100,000.
    key_counts = [1_000, 10_000] if quick else [1_000, 10_000, 100_000]
    devices = devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    log(f"one series, 8 → {HIDDEN} → 1 MLP, forecast + SGD step per event, {n_events} events")
    single = single_series_throughput(n_events)
    for name, rate in single.items():
        log(f"  {name:<12} {rate:>12,.0f} events/s")
    ratios = {
        "fast_over_eager_torch": single["fast"] / single["eager_torch"],
        "fast_over_reference": single["fast"] / single["reference"],
        "reference_over_eager_torch": single["reference"] / single["eager_torch"],
    }
    for name, ratio in ratios.items():
        log(f"  {name:<28} {ratio:>8.1f}x")
    fleets = []
    for device in devices:
        for n_keys in key_counts:
            log(f"many series: {n_keys:,} keys on {device}, one model each, {ticks} ticks")
            fleet = _fleet_in_subprocess(n_keys, ticks, device)
            fleets.append(fleet)
            log(
                f"  {fleet['key_events_per_second']:>12,.0f} key-events/s, peak RSS "
                f"{fleet['peak_rss_mib']:.0f} MiB; per key: params "
                f"{fleet['params_bytes_per_key']:.0f} B, optimiser "
                f"{fleet['optimizer_bytes_per_key']:.0f} B, window "
                f"{fleet['window_bytes_per_key']:.0f} B, other state "
                f"{fleet['overhead_bytes_per_key']:.0f} B; RSS growth "
                f"{fleet['rss_growth_per_key_bytes']:.0f} B"
            )
    fleet_ratios = {}
    if "cpu" in devices:
        for device in (d for d in devices if d != "cpu"):
            for n_keys in key_counts:
                rate = {
                    f["device"]: f["key_events_per_second"]
                    for f in fleets
                    if f["keys"] == n_keys and f["device"] in ("cpu", device)
                }
                ratio = rate[device] / rate["cpu"]
                fleet_ratios[f"{device}_over_cpu_{n_keys}_keys"] = ratio
                log(f"  {device} over cpu, {n_keys:,} keys: {ratio:.1f}x")
    n_rows = 600 if quick else 3_000
    log(f"long horizons: 48 steps of 12 columns (576 values a row), {n_rows} rows")
    long_horizon = long_horizon_throughput(n_rows)
    for name, figures in long_horizon.items():
        log(f"  {name:<14} {figures['rows_per_second']:>10,.0f} rows/s")
    rates = {name: figures["rows_per_second"] for name, figures in long_horizon.items()}
    arrays_ratio = rates["as_arrays"] / rates["one_at_a_time"]
    columns_ratio = rates["as_columns"] / rates["as_arrays"]
    log(f"  {'as_arrays_over_one_at_a_time':<28} {arrays_ratio:>8.1f}x")
    log(f"  {'as_columns_over_as_arrays':<28} {columns_ratio:>8.1f}x")
    limit = 1_500 if quick else None
    log(f"end to end: replay of the default scenario ({limit or 'all'} rows)")
    replay_rates = {"fast": _replay_rate(True, limit), "reference": _replay_rate(False, limit)}
    for name, rate in replay_rates.items():
        log(f"  {name:<12} {rate:>12,.0f} rows/s")
    return {
        "quick": quick,
        "torch_threads": torch.get_num_threads(),
        "single_series_events_per_second": single,
        "ratios": ratios,
        "many_series": fleets,
        "many_series_ratios": fleet_ratios,
        "long_horizon": {
            **long_horizon,
            "as_arrays_over_one_at_a_time": arrays_ratio,
            "as_columns_over_as_arrays": columns_ratio,
        },
        "replay_default_rows_per_second": {
            **replay_rates,
            "fast_over_reference": replay_rates["fast"] / replay_rates["reference"],
        },
    }
