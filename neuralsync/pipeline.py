"""The streaming pipeline.

window → forecast → wait for the truth → score → learn → watch the regime.

One :class:`Pipeline` turns batches of rows into forecasts, one row at a time, in stream
order, and keeps the contracts of DESIGN.md:

- no look-ahead: the forecast issued at a row uses only that row and earlier ones, and a
  forecast is learned from only ``label_delay`` rows later, once its truth has arrived;
- determinism: everything that changes lives in :meth:`Pipeline.state_dict`, RNG states
  included, so a run restored from a snapshot continues exactly as one never stopped;
- every decision is an :class:`~neuralsync.events.Event` on :attr:`Pipeline.events`.

Replay, the Kafka daemon and the library facade all drive this same class.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from neuralsync.base import (
    Adapter,
    Batch,
    Deferred,
    Gate,
    Prediction,
    PredictionColumns,
    Proposal,
    RegimeChange,
)
from neuralsync.config import Scenario
from neuralsync.errors import ConfigError, DataError, StreamOrderError, suggest
from neuralsync.events import Event, EventBus, format_stream_time
from neuralsync.fast import as_fast, live_path, make_learner
from neuralsync.gates import StabilityGate
from neuralsync.learner import resolve_device
from neuralsync.metrics import ForecastMetrics, match_detections
from neuralsync.regime import RegimeDetector
from neuralsync.rls import learner_from_state_dict
from neuralsync.scaling import OnlineScaler

__all__ = ["Pipeline"]


#: Values a row completes from which they are scored as arrays (Pipeline._score).
SCORE_AS_ARRAYS = 12


class _ColumnsOut:
    """Collects the values a batch scores as column blocks (:meth:`Pipeline.process_columns`),
    one block a row, instead of one :class:`Prediction` per value."""

    def __init__(self, targets: Sequence[str]) -> None:
        self._targets = np.asarray(targets, dtype=object)
        self._blocks: list[tuple] = []

    def __bool__(self) -> bool:
        return bool(self._blocks)

    def add(
        self,
        issued_at: list[Any],
        observed_at: Any,
        key: str | None,
        steps: list[int],
        values: np.ndarray,
        truth: np.ndarray,
        lasts: np.ndarray,
    ) -> None:
        """``values`` and ``lasts`` ``(forecasts, targets)``; ``truth`` ``(targets,)``."""
        self._blocks.append((issued_at, observed_at, key, steps, values, truth, lasts))

    def columns(self) -> PredictionColumns:
        if not self._blocks:
            return PredictionColumns.from_records([])
        # Per forecast, then repeated over its targets: a value's issue time, stream time, key
        # and step are its forecast's.
        issued, observed, keys, steps, values, truths, lasts = [], [], [], [], [], [], []
        for issued_at, observed_at, key, step, value, truth, last in self._blocks:
            issued += issued_at
            observed += [observed_at] * len(step)
            keys += [key] * len(step)
            steps += step
            values.append(value)
            truths.append(np.broadcast_to(truth, value.shape))
            lasts.append(last)
        n_targets = len(self._targets)

        def per_value(column: list[Any], dtype: Any = object) -> np.ndarray:
            return np.repeat(np.array(column, dtype=dtype), n_targets)

        return PredictionColumns(
            issued_at=per_value(issued),
            timestamp=per_value(observed),
            key=per_value(keys),
            target=np.tile(self._targets, len(steps)),
            step=per_value(steps, np.int64),
            prediction=np.concatenate(values, dtype=np.float64).ravel(),
            truth=np.concatenate(truths, dtype=np.float64).ravel(),
            last_value=np.concatenate(lasts, dtype=np.float64).ravel(),
        )


@dataclass
class _Pending:
    """A forecast waiting for its truth, with what is needed to score it and learn from it."""

    row: int  # the key's row count when it was issued
    position: int
    issued_at: Any
    window: np.ndarray  # (lookback, inputs) float32, normalised with the issue-time statistics
    center: np.ndarray  # (targets,) issue-time statistics of the targets
    scale: np.ndarray
    last: np.ndarray  # (targets,) raw last observed values
    forecast: np.ndarray  # (horizon, targets) normalised
    truth: np.ndarray  # (horizon, targets) raw, NaN until observed

    def to_state(self) -> dict[str, Any]:
        return {
            k: (torch.from_numpy(v.copy()) if isinstance(v, np.ndarray) else v)
            for k, v in vars(self).items()
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> _Pending:
        return cls(
            **{
                k: (v.numpy().copy() if isinstance(v, torch.Tensor) else v)
                for k, v in state.items()
            }
        )


class _SeriesState:
    """Everything the pipeline keeps for one key: its window, scaler, detector and forecasts."""

    def __init__(self, scenario: Scenario, n_inputs: int):
        norm = scenario.normalization
        self.window = np.zeros((scenario.lookback, n_inputs))  # ring buffer of raw rows
        self.rows = 0
        self.last_timestamp: Any = None
        self.last_values: np.ndarray | None = None  # for forward fill
        self.scaler = OnlineScaler(n_inputs, norm.mode, norm.warmup_rows, norm.halflife)
        self.detector = RegimeDetector(scenario.detector)
        self.pending: collections.deque[_Pending] = collections.deque()
        self.metrics = ForecastMetrics()

    def ordered_window(self) -> np.ndarray:
        start = self.rows % len(self.window)
        return np.concatenate([self.window[start:], self.window[:start]])

    def state_dict(self) -> dict[str, Any]:
        return {
            "window": torch.from_numpy(self.window.copy()),
            "rows": self.rows,
            "last_timestamp": self.last_timestamp,
            "last_values": None
            if self.last_values is None
            else torch.from_numpy(self.last_values.copy()),
            "scaler": self.scaler.state_dict(),
            "detector": self.detector.state_dict(),
            "pending": [p.to_state() for p in self.pending],
            "metrics": self.metrics.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.window = state["window"].numpy().copy()
        self.rows = int(state["rows"])
        self.last_timestamp = state["last_timestamp"]
        values = state["last_values"]
        self.last_values = None if values is None else values.numpy().copy()
        self.scaler.load_state_dict(state["scaler"])
        self.detector.load_state_dict(state["detector"])
        self.pending = collections.deque(_Pending.from_state(p) for p in state["pending"])
        self.metrics.load_state_dict(state["metrics"])


class Pipeline:
    """Forecast, score, learn and adapt over a stream of :class:`~neuralsync.base.Batch` es.

    Parameters
    ----------
    scenario
        Columns, window, model, detector and policies.
    adapters
        Components that react to a regime change and may propose a new live model.
    gate
        Decides on proposals; by default a canary comparison with the live model on the most
        recent labelled samples, which proposals never train on.

    Examples
    --------
    >>> import numpy as np
    >>> from neuralsync.config import Scenario
    >>> from neuralsync.sources import DataFrameSource
    >>> import pandas as pd
    >>> frame = pd.DataFrame({"t": np.arange(300), "y": np.sin(np.arange(300) / 5)})
    >>> pipeline = Pipeline(Scenario(name="sine", csv="-", timestamp="t", targets="y",
    ...                              lookback=8, detector={"type": "none"}))
    >>> for batch in DataFrameSource(frame, timestamp="t", columns=["y"]):
    ...     _ = pipeline.process(batch)
    >>> summary = pipeline.metrics()
    >>> summary["n_predictions"], summary["mse"] < summary["baseline_last_value"]["mse"]
    (292, True)

    """

    def __init__(
        self,
        scenario: Scenario,
        adapters: Sequence[Adapter] = (),
        gate: Gate | None = None,
    ):
        self.scenario = scenario
        self.adapters = list(adapters)
        adaptation = scenario.adaptation
        evolution = adaptation.evolution
        self.gate = gate or StabilityGate(
            adaptation.margin,
            evolution.risk_threshold,
            min_z=evolution.min_z,
            horizon=scenario.horizon,
            canary_min_z=adaptation.min_z,
        )
        self.events = EventBus()
        self.device = resolve_device(scenario.device)
        self.inputs = scenario.inputs
        self.targets = scenario.targets
        self.target_index = [self.inputs.index(t) for t in self.targets]
        self.label_delay = scenario.effective_label_delay
        if scenario.num_threads is not None and self.device.type == "cpu":
            torch.set_num_threads(scenario.num_threads)
        self._rng = _seeded_rng_states(scenario.seed, self.device)
        with self._own_rng():
            self.learner = make_learner(
                scenario.model,
                n_inputs=len(self.inputs),
                lookback=scenario.lookback,
                horizon=scenario.horizon,
                target_index=self.target_index,
                device=self.device,
            )
        self.series: dict[str, _SeriesState] = {}
        self.metrics_ = ForecastMetrics()
        self.position_ = 0  # rows consumed, bad ones included
        self.stream_time_: Any = None
        self.time_kind = "datetime"
        self.counts_ = collections.Counter()
        self.detections_: list[dict[str, Any]] = []
        #: Every swap: position, stream time, source, and whether probation rolled it back.
        self.swaps_: list[dict[str, Any]] = []
        self._learn_buffer: list[tuple[np.ndarray, np.ndarray]] = []
        #: Adapters waiting for their ``support_delay``: [due sample count, position, stream
        #: time, key, detector, adapter name], in due order (see :meth:`_schedule`).
        self._scheduled: list[list[Any]] = []
        #: Background work of adapters (:class:`~neuralsync.base.Deferred`): [due sample count,
        #: samples labelled at its start, adapter name, the change's fields, the deferred].
        self._deferred: list[list[Any]] = []
        #: After a swap: the replaced learner, learning in the shadow until the probation
        #: window ends, and both models' errors over it (see :meth:`_probation_step`).
        self._probation: dict[str, Any] | None = None
        canary_size = scenario.adaptation.canary_size
        # Enough for every adapter's window, and for a deferred result to catch up on all
        # the samples that arrived while it was being made.
        memory = max(
            [scenario.adaptation.support_size + canary_size]
            + [a.history_size for a in self.adapters]
            + [a.result_delay + canary_size for a in self.adapters if a.result_delay > 0]
        )
        self._recent: collections.deque[tuple[np.ndarray, np.ndarray, float]] = collections.deque(
            maxlen=memory
        )
        self._column_map: np.ndarray | None = None
        self._columns: list[str] | None = None
        self._change_points = None
        self.change_point_positions_: list[int | None] = []
        self._change_point_keys: list[str] | None = None
        self.change_point_key_rows_: list[int | None] = []
        self.on_prediction: Callable[[list[Prediction]], None] | None = None
        #: While true, forecasts are still issued and scored and the detector still watches
        #: them, but the live model takes no learning step and no adapter is consulted: the
        #: model stays as it is (a frozen baseline). Not part of :meth:`state_dict`.
        self.frozen = False
        #: Values a row completes from which they are scored as arrays, not one at a time
        #: (``SCORE_AS_ARRAYS``; ``math.inf`` scores every value alone, as ``neuralsync bench
        #: throughput`` does to measure the difference). Not part of :meth:`state_dict`.
        self.score_as_arrays: float = SCORE_AS_ARRAYS

    # -- set-up -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _own_rng(self) -> Iterator[None]:
        """Run with this pipeline's random generator in place of the process's.

        Weight initialisation, dropout and adapters draw from torch's process-wide generator;
        swapping this pipeline's state in and out around its work keeps two pipelines in one
        process (two backtests side by side) from disturbing each other, and keeps the caller's
        generator where it was. On a CUDA device the device's generator is swapped too, since
        dropout draws there. Only torch's: nothing here draws from NumPy's or Python's
        global generators (an adapter that needs randomness takes it from torch, or keeps a
        seeded generator of its own in its state), and swapping those cost about 90 µs a call.
        """
        outside = _rng_states(self.device)
        _set_rng_states(self._rng, self.device)
        try:
            yield
        finally:
            self._rng = _rng_states(self.device)
            _set_rng_states(outside, self.device)

    def set_change_points(
        self, timestamps: Sequence[Any], keys: Sequence[str | None] | None = None
    ) -> None:
        """Tell the pipeline the true change points (in the stream's time) to score detection.

        With ``keys`` (the key each change happens to), each change is scored against its own
        key's detections, with delays and the tolerance counted in that key's rows rather than
        in rows of the whole stream; without them (or if any is ``None``), against all.
        """
        order = sorted(range(len(timestamps)), key=lambda j: timestamps[j])
        self._change_points = np.asarray([timestamps[j] for j in order])
        keyed = keys is not None and all(k is not None for k in keys)
        self._change_point_keys = [str(keys[j]) for j in order] if keyed else None
        self.change_point_positions_ = [None] * len(self._change_points)
        self.change_point_key_rows_: list[int | None] = [None] * len(self._change_points)

    def _bind_columns(self, batch: Batch) -> None:
        missing = [c for c in self.inputs if c not in batch.columns]
        if missing:
            hint = suggest(missing[0], batch.columns)
            raise ConfigError(
                f"{batch.source_name}: column '{missing[0]}' named in the scenario is not in the "
                f"data{hint}; columns present: {', '.join(batch.columns)}"
            )
        self._columns = list(batch.columns)
        self._column_map = np.asarray([batch.columns.index(c) for c in self.inputs])
        self.time_kind = batch.time_kind

    # -- the per-row loop -------------------------------------------------------------------

    def process(self, batch: Batch) -> list[Prediction]:
        """Consume a batch; return the forecasts whose truth arrived (and new forecasts'
        values are held until theirs does)."""
        out: list[Prediction] = []
        self._process(batch, out)
        if out and self.on_prediction is not None:
            self.on_prediction(out)
        return out

    def process_columns(self, batch: Batch) -> PredictionColumns:
        """:meth:`process`, returning the scored values as columns rather than records.

        The same values in the same order (``process_columns(batch).records()`` equals what
        :meth:`process` returns), without building a record per value: at WTH's 48 steps of
        12 columns that is 576 records a row, and most of the pipeline's own work
        (docs/performance.md, "Long horizons: scored values as columns"). For callers that
        aggregate, or that do not read the values at all.

        Examples
        --------
        >>> import numpy as np, pandas as pd
        >>> from neuralsync.config import Scenario
        >>> from neuralsync.sources import DataFrameSource
        >>> frame = pd.DataFrame({"t": np.arange(40.0), "y": np.sin(np.arange(40.0) / 4)})
        >>> scenario = Scenario(name="sine", timestamp="t", targets="y", lookback=8,
        ...                     horizon=3, detector={"type": "none"})
        >>> pipeline = Pipeline(scenario)
        >>> columns = [pipeline.process_columns(b) for b in DataFrameSource.for_scenario(
        ...     frame, scenario, chunk_size=20)]
        >>> [len(c) for c in columns], columns[1].step[:4].tolist()
        ([33, 60], [3, 2, 1, 3])
        """
        out = _ColumnsOut(self.targets)
        self._process(batch, out)
        columns = out.columns()
        if out and self.on_prediction is not None:
            self.on_prediction(columns.records())
        return columns

    def _process(self, batch: Batch, out: list[Prediction] | _ColumnsOut) -> None:
        if self._column_map is None or batch.columns != self._columns:
            self._bind_columns(batch)
        values = batch.values[:, self._column_map]
        with self._own_rng():
            for i in range(len(batch)):
                self.position_ += 1
                timestamp = batch.timestamps[i].item()
                key = "" if batch.keys is None else str(batch.keys[i])
                self._process_row(batch, i, key, timestamp, values[i], out)

    def _stream_time(self, timestamp: Any) -> Any:
        return format_stream_time(timestamp, self.time_kind)

    def _emit(self, kind: str, /, **data: Any) -> None:
        self.events.emit(Event(kind, self.position_, self._stream_time(self.stream_time_), data))

    def _bad_record(
        self,
        batch: Batch,
        i: int,
        reason: str,
        column: str | None = None,
        error: type[DataError] = DataError,
        raw: str | None = None,
    ) -> None:
        origin = batch.origin(i, column)
        if self.scenario.bad_records == "error":
            raise error(
                f"{reason} (set bad_records: dead_letter in the scenario to set such rows "
                "aside and go on)",
                origin,
            )
        self.counts_["bad_records"] += 1
        if raw is None:  # the row parsed, then failed a check: keep it whole, its time included
            record: dict[str, Any] = {self.scenario.timestamp: self._record_time(batch, i)}
            if batch.keys is not None and self.scenario.key:
                record[self.scenario.key] = str(batch.keys[i])
            # JSON has no NaN or inf: such cells are kept as the strings "nan", "inf", "-inf".
            values = (float(v) if math.isfinite(v) else str(float(v)) for v in batch.values[i])
            record.update(zip(batch.columns, values, strict=True))
            raw = json.dumps(record)
        self._emit("bad_record", origin=origin, reason=reason, raw=raw)

    def _record_time(self, batch: Batch, i: int) -> Any:
        """A row's own timestamp as it is written in events, or None where it did not parse."""
        value = batch.timestamps[i].item()
        if isinstance(value, float) and not math.isfinite(value):
            return None
        try:
            return format_stream_time(value, batch.time_kind)
        except (TypeError, ValueError, OverflowError):
            return None

    def _process_row(
        self,
        batch: Batch,
        i: int,
        key: str,
        timestamp: Any,
        row: np.ndarray,
        out: list[Prediction] | _ColumnsOut,
    ) -> None:
        if i in batch.errors:
            reason, raw = batch.errors[i]
            self._bad_record(batch, i, reason, raw=raw)
            return
        state = self.series.get(key)
        if state is None:
            state = self.series[key] = _SeriesState(self.scenario, len(self.inputs))
        if state.last_timestamp is not None and timestamp <= state.last_timestamp:
            what = "duplicate" if timestamp == state.last_timestamp else "out-of-order"
            self._bad_record(
                batch,
                i,
                f"{what} timestamp {self._stream_time(timestamp)}"
                + (f" for key '{key}'" if key else "")
                + f": expected a time after {self._stream_time(state.last_timestamp)}",
                column=self.scenario.timestamp,
                error=StreamOrderError,
            )
            return
        if not np.isfinite(row).all():
            row = self._handle_non_finite(batch, i, state, row)
            if row is None:
                return
        self.stream_time_ = timestamp
        state.last_timestamp = timestamp
        state.last_values = row
        state.rows += 1
        self._track_change_points(timestamp, key, state.rows)
        self._observe_truths(state, key, row, out)
        state.scaler.learn_one(row)
        state.window[(state.rows - 1) % len(state.window)] = row
        if state.rows >= self.scenario.lookback:
            self._issue_forecast(state, timestamp)

    def _handle_non_finite(
        self, batch: Batch, i: int, state: _SeriesState, row: np.ndarray
    ) -> np.ndarray | None:
        infinite = np.isinf(row)
        if infinite.any():
            column = self.inputs[int(np.argmax(infinite))]
            self._bad_record(
                batch,
                i,
                f"infinite value {row[infinite][0]} in column '{column}'; expected a finite number",
                column=column,
            )
            return None
        missing = np.isnan(row)
        column = self.inputs[int(np.argmax(missing))]
        policy = self.scenario.missing
        if policy == "error":
            raise DataError(
                f"missing value in column '{column}'; expected a number (set missing: drop or "
                "missing: ffill in the scenario to skip or fill such cells)",
                batch.origin(i, column),
            )
        if policy == "ffill" and state.last_values is not None:
            self.counts_["filled_cells"] += int(missing.sum())
            return np.where(missing, state.last_values, row)
        self.counts_["dropped_rows"] += 1
        return None

    def _track_change_points(self, timestamp: Any, key: str, key_rows: int) -> None:
        if self._change_points is None:
            return
        keys = self._change_point_keys
        for j, change in enumerate(self._change_points):
            if timestamp < change:
                break  # sorted: the later ones are not reached either
            if self.change_point_positions_[j] is None:
                self.change_point_positions_[j] = self.position_
            if keys is not None and keys[j] == key and self.change_point_key_rows_[j] is None:
                self.change_point_key_rows_[j] = key_rows

    def _observe_truths(
        self, state: _SeriesState, key: str, row: np.ndarray, out: list[Prediction] | _ColumnsOut
    ) -> None:
        horizon = self.scenario.horizon
        # Pending forecasts are in issue order: those this row is a step of their horizon to are
        # the newest, the one issued a row ago (step 1) last.
        observing = [p for p in state.pending if state.rows - p.row <= horizon]
        if observing:
            self._score(state, key, row[self.target_index], observing, out)
        # The learnable ones (label_delay rows old, their whole horizon observed since
        # label_delay >= horizon) are at the front.
        while state.pending and state.rows - state.pending[0].row >= self.label_delay:
            self._learn_from(state.pending.popleft())

    def _score(
        self,
        state: _SeriesState,
        key: str,
        truth_now: np.ndarray,
        observing: list[_Pending],
        out: list[Prediction] | _ColumnsOut,
    ) -> None:
        """Score the pending forecasts that ``truth_now`` is a step of, emit their predictions,
        and feed the newest one's error to the detector."""
        steps = [state.rows - p.row for p in observing]
        forecasts = [
            p.forecast[s - 1] * p.scale + p.center for p, s in zip(observing, steps, strict=True)
        ]
        as_arrays = len(observing) * len(self.targets) >= self.score_as_arrays
        as_columns = isinstance(out, _ColumnsOut)
        if as_arrays or as_columns:
            values, lasts = np.stack(forecasts), np.stack([p.last for p in observing])
        if as_arrays:
            # A stream forecasting many steps of many targets scores horizon * targets values a
            # row; a Python call per value was half of the pipeline's time at WTH's 48 steps of
            # 12 columns. Below that, the arrays' fixed cost is the larger (docs/performance.md).
            truths = np.broadcast_to(truth_now, values.shape)
            self.metrics_.update_many(values, truths, lasts)
            state.metrics.update_many(values, truths, lasts)
        observed_at, series = self._stream_time(state.last_timestamp), key or None
        if as_columns:
            issued = [self._stream_time(p.issued_at) for p in observing]
            out.add(issued, observed_at, series, steps, values, truth_now, lasts)
        truth_values = truth_now.tolist()
        for pending, step, forecast in zip(observing, steps, forecasts, strict=True):
            pending.truth[step - 1] = truth_now
            if as_arrays and as_columns:
                continue
            row_values = (forecast.tolist(), truth_values, pending.last.tolist())
            if not as_arrays:
                for value, truth, last in zip(*row_values, strict=True):
                    self.metrics_.update(value, truth, last)
                    state.metrics.update(value, truth, last)
            if not as_columns:
                issued_at = self._stream_time(pending.issued_at)
                out.extend(
                    Prediction(issued_at, observed_at, series, target, step, value, truth, last)
                    for target, value, truth, last in zip(self.targets, *row_values, strict=True)
                )
        if steps[-1] == 1:
            newest = observing[-1]
            normalised = (truth_now - newest.center) / newest.scale
            error = float(np.abs(newest.forecast[0] - normalised).mean())
            if state.detector.update(error):
                self._on_regime_change(key)

    def _issue_forecast(self, state: _SeriesState, timestamp: Any) -> None:
        # The scaler's statistics once: each property call recomputes them.
        center, std = state.scaler.center, state.scaler.std
        window = ((state.ordered_window() - center) / std).astype(np.float32)
        forecast = self.learner.predict(window[None])[0]
        center = center[self.target_index].copy()
        scale = std[self.target_index].copy()
        state.pending.append(
            _Pending(
                row=state.rows,
                position=self.position_,
                issued_at=timestamp,
                window=window,
                center=center,
                scale=scale,
                last=state.last_values[self.target_index].copy(),
                forecast=forecast,
                truth=np.full_like(forecast, np.nan, dtype=np.float64),
            )
        )
        self.counts_["forecasts"] += 1

    def _learn_from(self, pending: _Pending) -> None:
        if self.frozen:
            return
        if self._scheduled and self.counts_["labelled"] >= self._scheduled[0][0]:
            self._run_scheduled()
        if self._deferred:
            self._collect_deferred()
        target = ((pending.truth - pending.center) / pending.scale).astype(np.float32)
        live_error = float(((pending.forecast - target) ** 2).mean())
        if self._probation is not None:
            self._probation_step(pending.window, target, live_error)
        self._recent.append((pending.window, target, live_error))
        self.counts_["labelled"] += 1
        self._learn_buffer.append((pending.window, target))
        if len(self._learn_buffer) >= self.scenario.model.batch_size:
            if len(self._learn_buffer) == 1:  # the common batch of one: no stacking
                windows, targets = self._learn_buffer[0][0][None], self._learn_buffer[0][1][None]
            else:
                windows = np.stack([w for w, _ in self._learn_buffer])
                targets = np.stack([t for _, t in self._learn_buffer])
            self._learn_buffer.clear()
            loss = self.learner.learn(windows, targets)
            if not np.isfinite(loss):
                self.counts_["skipped_steps"] += 1
                self._emit(
                    "learn_skipped",
                    reason="loss or gradient not finite; step rolled back",
                    loss=loss,
                )
            else:
                self.counts_["learn_steps"] += 1

    # -- adaptation -------------------------------------------------------------------------

    def _on_regime_change(self, key: str) -> None:
        detection = {
            "position": self.position_,
            "stream_time": self._stream_time(self.stream_time_),
            "key": key or None,
            "key_row": self.series[key].rows,  # the key's own row count, for keyed scoring
        }
        self.detections_.append(detection)
        self._emit("regime_change", key=key or None, detector=self.scenario.detector.type)
        if self.adapters and not self.frozen:
            self._adapt(
                RegimeChange(
                    self.position_,
                    detection["stream_time"],
                    key or None,
                    self.scenario.detector.type,
                )
            )

    def _schedule(self, change: RegimeChange) -> list[Adapter]:
        """Queue the adapters that wait ``support_delay`` samples; return the others."""
        now = []
        for adapter in self.adapters:
            delay = int(getattr(adapter, "support_delay", 0))
            if delay <= 0:
                now.append(adapter)
                continue
            due = self.counts_["labelled"] + delay
            where = [change.position, change.stream_time, change.key, change.detector]
            self._scheduled.append([due, *where, adapter.name])
            self._scheduled.sort(key=lambda entry: entry[0])  # stable: ties keep their order
            self._emit("adaptation_scheduled", adapter=adapter.name, after_samples=delay)
        return now

    def _run_scheduled(self) -> None:
        """Consult the queued adapters whose wait is over (at a sample count, hence at the
        same stream position in every run, resumed or not)."""
        while self._scheduled and self._scheduled[0][0] <= self.counts_["labelled"]:
            _, position, stream_time, key, detector, name = self._scheduled.pop(0)
            adapters = [a for a in self.adapters if a.name == name]
            if adapters:
                self._adapt(RegimeChange(position, stream_time, key, detector), adapters)

    def _adapt(self, change: RegimeChange, adapters: list[Adapter] | None = None) -> None:
        if adapters is None:
            adapters = self._schedule(change)
            if not adapters:
                return
        canary_size = self.scenario.adaptation.canary_size
        gap = self._overlap()
        if len(self._recent) < canary_size + gap + 1:
            self._emit(
                "adaptation_skipped",
                reason=(
                    f"{len(self._recent)} labelled samples since the start; the canary check needs "
                    f"more than {canary_size + gap}"
                ),
            )
            return
        samples = list(self._recent)
        everything_x = torch.from_numpy(np.stack([s[0] for s in samples]))
        everything_y = torch.from_numpy(np.stack([s[1] for s in samples]))
        # With a label delay d, the d - 1 samples labelled just before the canary have targets
        # that the canary's forecasts were issued without: a proposal that trained on them
        # would be judged with hindsight the live model did not have. They sit out as a gap.
        end = len(samples) - canary_size - gap
        support = slice(max(0, end - self.scenario.adaptation.support_size), end)
        support_x, support_y = everything_x[support], everything_y[support]
        between = slice(end, len(samples) - canary_size)
        canary_x, canary_y = everything_x[-canary_size:], everything_y[-canary_size:]
        live_errors = torch.tensor([s[2] for s in samples[-canary_size:]])
        for adapter in adapters:
            if any(entry[2] == adapter.name for entry in self._deferred):
                self._emit(
                    "adaptation_skipped",
                    adapter=adapter.name,
                    reason="its previous work is still running",
                )
                continue
            if adapter.result_delay > 0:
                # Background work is judged at delivery, on samples that arrive meanwhile:
                # it may use every recent sample, the current canary window included.
                size = adapter.history_size or len(samples)
                proposal = adapter.on_regime_change(
                    change, self.learner, everything_x[-size:], everything_y[-size:]
                )
            else:
                proposal = adapter.on_regime_change(change, self.learner, support_x, support_y)
            if isinstance(proposal, Deferred):
                self._defer(adapter, change, proposal)
            elif proposal is not None:
                self._offer(
                    proposal,
                    live_errors,
                    torch.cat([everything_x[between], canary_x]),
                    torch.cat([everything_y[between], canary_y]),
                    scored_from=gap,
                )

    def _defer(self, adapter: Adapter, change: RegimeChange, deferred: Deferred) -> None:
        labelled = self.counts_["labelled"]
        delay = max(int(adapter.result_delay), self._earliest_delivery())
        where = [change.position, change.stream_time, change.key, change.detector]
        self._deferred.append([labelled + delay, labelled, adapter.name, *where, deferred])
        self._deferred.sort(key=lambda entry: entry[0])
        self._emit("adaptation_started", adapter=adapter.name, deliver_after_samples=delay)

    def _collect_deferred(self) -> None:
        """Offer the background results that are due (or ready, for adapters that deliver
        as soon as they can). A due result that is still running is waited for."""
        labelled = self.counts_["labelled"]
        for entry in list(self._deferred):
            due, started, name, *_, deferred = entry
            adapter = next((a for a in self.adapters if a.name == name), None)
            early = (
                adapter is not None
                and adapter.deliver_when_ready
                and labelled - started >= self._earliest_delivery()
                and deferred.future.done()
            )
            if labelled < due and not early:
                continue
            self._deferred.remove(entry)
            try:
                proposal = adapter.collect(deferred) if adapter else deferred.future.result()
            except Exception as error:  # a failed search must not stop the stream
                self.counts_["adaptation_failures"] += 1
                self._emit("adaptation_failed", adapter=name, reason=repr(error))
                continue
            if proposal is None:
                continue
            samples = list(self._recent)
            fresh = samples[len(samples) - min(labelled - started, len(samples)) :]
            # The samples that arrived while the work ran are the canary: the work never saw
            # them. The candidate catches up on them in order, test-then-train as the live
            # model did, and the gate compares the two models' errors on each one it can
            # forecast as the live model did (with a label delay, the first few were issued
            # before the work started).
            gap = min(self._overlap(), len(fresh))
            scored = fresh[gap:]
            if not scored:
                self._emit(
                    "adaptation_skipped",
                    adapter=name,
                    reason=(
                        f"{len(fresh)} samples arrived while it ran, all issued before it "
                        f"started (label delay {self.label_delay}): nothing to judge it on"
                    ),
                )
                continue
            proposal.canary_errors = torch.tensor(self._catch_up(proposal.learner, fresh, gap))
            self._offer(
                proposal,
                torch.tensor([s[2] for s in scored]),
                torch.from_numpy(np.stack([s[0] for s in scored])),
                torch.from_numpy(np.stack([s[1] for s in scored])),
                learned=True,
            )

    def _earliest_delivery(self) -> int:
        """Labelled samples after its start before deferred work may be delivered: a full
        canary window past the gap of forecasts issued before the work started (label delay).
        The gate then judges the result on as many samples as a synchronous proposal's, none
        of which the work can have seen."""
        return self.scenario.adaptation.canary_size + self._overlap()

    def _overlap(self) -> int:
        """Labelled samples between a forecast's issue and its label: with a label delay of d
        steps per series, a forecast was issued before the d - 1 samples (per series)
        labelled just before it. 0 for one-step-ahead test-then-train."""
        return (self.label_delay - 1) * max(1, len(self.series))

    @staticmethod
    def _catch_up(learner: Any, samples: list[tuple], gap: int) -> list[float]:
        """Let ``learner``, as the live model was when ``samples`` began to arrive, learn them
        in order; return its errors on all but the first ``gap``, each forecast knowing what
        the live model knew when it issued that forecast: the samples labelled ``gap + 1`` or
        more before it."""
        if gap == 0:
            return [learner.learn(w[None], t[None]) for w, t, _ in samples]
        errors = []
        for k in range(gap, len(samples)):
            if k > gap:
                learner.learn(samples[k - gap - 1][0][None], samples[k - gap - 1][1][None])
            window, target, _ = samples[k]
            errors.append(float(learner.squared_errors(window[None], target[None])[0]))
        for window, target, _ in samples[max(0, len(samples) - gap - 1) :]:
            learner.learn(window[None], target[None])
        return errors

    def _offer(
        self,
        proposal: Proposal,
        live_errors: torch.Tensor,
        canary_x: torch.Tensor,
        canary_y: torch.Tensor,
        learned: bool = False,
        scored_from: int = 0,
    ) -> None:
        """Let the gate judge ``proposal`` on the canary, ``canary_x[scored_from:]`` (the
        samples before it are the gap it learns, unscored, when it goes live)."""
        decision = self.gate.decide(
            proposal, live_errors, canary_x[scored_from:], canary_y[scored_from:]
        )
        # One dict, not two keyword spreads: a detail named like a gate figure (or like
        # `accepted`) must not stop the stream with a TypeError; the gate's own fields win.
        details = {**proposal.details, **decision.figures, "accepted": decision.accepted}
        for kind, fields in proposal.events:
            self._emit(kind, **fields)
        if proposal.event is not None:
            self._emit(proposal.event, **details)
        self._emit(
            "gate_decision", **{**details, "source": proposal.source, "reason": decision.reason}
        )
        if not decision.accepted:
            return
        if not learned:
            # The gap and canary samples are past data the new model has not seen: learn them.
            for x, y in zip(canary_x, canary_y, strict=True):
                proposal.learner.learn(x[None], y[None])
        previous = self.learner
        self.learner = as_fast(proposal.learner)
        self.counts_["swaps"] += 1
        self._emit("swap", source=proposal.source, live_path=live_path(self.learner))
        self.swaps_.append(
            {
                "position": self.position_,
                "stream_time": self._stream_time(self.stream_time_),
                "source": proposal.source,
                "rolled_back": False,
            }
        )
        rollback = self.scenario.adaptation.rollback
        if rollback.enabled:
            self._probation = {
                "previous": previous,
                "source": proposal.source,
                "remaining": rollback.window,
                # With a label delay, the first forecasts labelled after the swap were issued
                # by the replaced model: they judge neither.
                "skip": self._overlap(),
                "unlearned": [],
                "live": 0.0,
                "previous_error": 0.0,
                "samples": 0,
            }

    def _probation_step(self, window: np.ndarray, target: np.ndarray, live_error: float) -> None:
        """Score the replaced model beside the new one on a labelled sample, let it learn
        too, and at the end of the window keep the better one (a rollback if the old)."""
        probation = self._probation
        previous = probation["previous"]
        # The replaced model learns each sample only once the next forecasts it is scored on
        # were issued (label delay), as the live model did: else it would forecast with
        # hindsight. One-step-ahead, that is at once.
        unlearned = probation["unlearned"]
        if probation.get("skip", 0) > 0:  # absent from snapshots taken before it existed
            probation["skip"] -= 1
            unlearned.append((window, target))
            return
        forecast = previous.predict(window[None])[0]
        probation["previous_error"] += float(((forecast - target) ** 2).mean())
        probation["live"] += live_error
        probation["samples"] += 1
        unlearned.append((window, target))
        while len(unlearned) > self._overlap():
            w, t = unlearned.pop(0)
            previous.learn(w[None], t[None])
        probation["remaining"] -= 1
        if probation["remaining"] > 0:
            return
        self._probation = None
        for w, t in unlearned:
            previous.learn(w[None], t[None])
        n = probation["samples"]
        live, old = probation["live"] / n, probation["previous_error"] / n
        margin = self.scenario.adaptation.rollback.margin
        figures = {"live_mse": live, "previous_mse": old, "samples": n, "margin": margin}
        if math.isfinite(live) and live <= old * (1.0 + margin):
            self._emit("swap_confirmed", source=probation["source"], **figures)
            return
        self.learner = previous
        if self.swaps_:
            self.swaps_[-1]["rolled_back"] = True
        self.counts_["rollbacks"] += 1
        self._emit(
            "rollback",
            source=probation["source"],
            reason="the swap made the live error worse over the probation window",
            **figures,
        )

    # -- results ----------------------------------------------------------------------------

    def finish(self) -> list[Prediction]:
        """Forecasts still waiting for their truth at the end of the stream (truth NaN)."""
        out = []
        for key, state in self.series.items():
            for pending in state.pending:
                forecast = pending.forecast * pending.scale + pending.center
                for step in range(1, self.scenario.horizon + 1):
                    if not np.isnan(pending.truth[step - 1]).any():
                        continue
                    for t, target in enumerate(self.targets):
                        out.append(
                            Prediction(
                                self._stream_time(pending.issued_at),
                                None,
                                key or None,
                                target,
                                step,
                                float(forecast[step - 1, t]),
                                float("nan"),
                                float(pending.last[t]),
                            )
                        )
        return out

    def latest_forecast(self, key: str | None = None) -> tuple[Any, np.ndarray] | None:
        """The forecast issued at ``key``'s newest row, in the targets' own units.

        Returns ``(issued_at, values)``: the stream time of that row and a ``(horizon,
        targets)`` float64 array, bit-identical to the ``prediction`` values a replay writes
        for that forecast. ``None`` while the key has fewer than ``lookback`` rows (or none).
        """
        state = self.series.get(key or "")
        if state is None or not state.pending or state.pending[-1].row != state.rows:
            return None
        pending = state.pending[-1]
        values = np.stack(
            [
                pending.forecast[step] * pending.scale + pending.center
                for step in range(len(pending.forecast))
            ]
        )
        return self._stream_time(pending.issued_at), values

    def metrics(self) -> dict[str, Any]:
        """Prequential figures overall and per key, counts, regime changes and detection."""
        summary = self.metrics_.summary()
        summary["rows"] = self.position_
        summary["forecasts"] = self.counts_["forecasts"]
        summary["regime_changes"] = [d["stream_time"] for d in self.detections_]
        summary["regime_change_keys"] = [d["key"] for d in self.detections_]
        summary["missing"] = {
            "policy": self.scenario.missing,
            "dropped_rows": self.counts_["dropped_rows"],
            "filled_cells": self.counts_["filled_cells"],
        }
        summary["bad_records"] = self.counts_["bad_records"]
        # The pipeline's own count: the live model's would restart at every swap.
        summary["learn_steps"] = self.counts_["learn_steps"]
        summary["live_path"] = live_path(self.learner)
        summary["skipped_steps"] = self.counts_["skipped_steps"]
        summary["swaps"] = self.counts_["swaps"]
        summary["rollbacks"] = self.counts_["rollbacks"]
        summary["swap_log"] = [dict(swap) for swap in self.swaps_]
        summary["adaptation_failures"] = self.counts_["adaptation_failures"]
        for adapter in self.adapters:
            report = getattr(adapter, "metrics", None)
            if report is not None:
                summary[adapter.name] = report()
        if self.scenario.key is not None:
            summary["per_key"] = {k: s.metrics.summary() for k, s in sorted(self.series.items())}
        if self._change_points is not None:
            summary["detection"] = self._score_detections()
        return summary

    def _score_detections(self) -> dict[str, Any]:
        tolerance = self.scenario.change_point_tolerance
        keys = self._change_point_keys
        if keys is None:
            reached = [p for p in self.change_point_positions_ if p is not None]
            result = match_detections(reached, [d["position"] for d in self.detections_], tolerance)
            result["tolerance_rows"] = tolerance
            return result
        # Per key, in that key's own rows; detections on keys without a change are false alarms.
        result = {"true_change_points": 0, "detected": 0, "missed": 0, "false_alarms": 0}
        delays: dict[int, int | None] = {}  # by change point, in stream-time order
        for key in sorted({*keys, *(d["key"] or "" for d in self.detections_)}):
            reached = [
                (j, rows)
                for j, (k, rows) in enumerate(zip(keys, self.change_point_key_rows_, strict=True))
                if k == key and rows is not None
            ]
            found = [d["key_row"] for d in self.detections_ if (d["key"] or "") == key]
            part = match_detections([rows for _, rows in reached], found, tolerance)
            for name in result:
                result[name] += part[name]
            delays.update(zip((j for j, _ in reached), part["delays"], strict=True))
        measured = [d for d in delays.values() if d is not None]
        result["delays"] = [delays[j] for j in sorted(delays)]
        result["mean_delay"] = sum(measured) / len(measured) if measured else None
        result["tolerance_rows"] = tolerance
        result["per_key_rows"] = True
        return result

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything that changes, as tensors and plain values (no code is pickled)."""
        return {
            "position": self.position_,
            "stream_time": self.stream_time_,
            "time_kind": self.time_kind,
            "columns": self._columns,
            "learner": self.learner.state_dict(),
            "series": {k: s.state_dict() for k, s in self.series.items()},
            "metrics": self.metrics_.state_dict(),
            "counts": dict(self.counts_),
            "detections": list(self.detections_),
            "swaps": [dict(swap) for swap in self.swaps_],
            "change_point_positions": list(self.change_point_positions_),
            "change_point_key_rows": list(self.change_point_key_rows_),
            "learn_buffer": [
                (torch.from_numpy(w), torch.from_numpy(t)) for w, t in self._learn_buffer
            ],
            "recent": [(torch.from_numpy(w), torch.from_numpy(t), e) for w, t, e in self._recent],
            "adapters": {a.name: a.state_dict() for a in self.adapters},
            "scheduled": [list(entry) for entry in self._scheduled],
            "deferred": [[*entry[:-1], entry[-1].job] for entry in self._deferred],
            "probation": None
            if self._probation is None
            else {
                **self._probation,
                "previous": self._probation["previous"].state_dict(),
                "unlearned": [
                    (torch.from_numpy(w), torch.from_numpy(t))
                    for w, t in self._probation["unlearned"]
                ],
            },
            "rng": {name: state.clone() for name, state in self._rng.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position_ = int(state["position"])
        self.stream_time_ = state["stream_time"]
        self.time_kind = state["time_kind"]
        self.learner = learner_from_state_dict(state["learner"], self.device)
        self.series = {}
        for key, series_state in state["series"].items():
            series = self.series[key] = _SeriesState(self.scenario, len(self.inputs))
            series.load_state_dict(series_state)
        self.metrics_.load_state_dict(state["metrics"])
        self.counts_ = collections.Counter(state["counts"])
        self.detections_ = list(state["detections"])
        self.swaps_ = [dict(swap) for swap in state.get("swaps", [])]
        self.change_point_positions_ = list(state["change_point_positions"])
        self.change_point_key_rows_ = list(state["change_point_key_rows"])
        self._learn_buffer = [(w.numpy(), t.numpy()) for w, t in state["learn_buffer"]]
        self._recent.clear()
        self._recent.extend((w.numpy(), t.numpy(), float(e)) for w, t, e in state["recent"])
        for adapter in self.adapters:
            adapter.load_state_dict(state["adapters"].get(adapter.name, {}))
        self._scheduled = [list(entry) for entry in state.get("scheduled", [])]
        self._deferred = []
        for *entry, job in state.get("deferred", []):
            adapter = next(a for a in self.adapters if a.name == entry[2])
            self._deferred.append([*entry, adapter.resume(job)])
        probation = state.get("probation")
        self._probation = None
        if probation is not None:
            previous = learner_from_state_dict(probation["previous"], self.device)
            self._probation = {
                **probation,
                "previous": as_fast(previous),
                "unlearned": [(w.numpy(), t.numpy()) for w, t in probation.get("unlearned", [])],
            }
        self._rng = {name: saved.clone() for name, saved in state["rng"].items()}
        if self.device.type == "cuda" and "cuda" not in self._rng:
            # A snapshot taken on the CPU carries no CUDA generator: seed one, as a new run would.
            self._rng["cuda"] = _seeded_rng_states(self.scenario.seed, self.device)["cuda"]


def _rng_states(device: torch.device) -> dict[str, Any]:
    """torch's CPU generator state and, on a CUDA device, that device's (dropout draws there)."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(states["cuda"], device)


def _seeded_rng_states(seed: int, device: torch.device) -> dict[str, Any]:
    """The generator states for ``seed``, without touching the process's generators."""
    states = {"torch": torch.Generator().manual_seed(seed).get_state()}
    if device.type == "cuda":
        states["cuda"] = torch.Generator(device).manual_seed(seed).get_state()
    return states
