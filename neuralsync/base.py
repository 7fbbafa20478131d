"""The interfaces every component implements: sources, sinks, adapters and gates.

The pipeline talks to its parts only through these. Connectors (CSV files, Kafka, backtests)
implement :class:`Source` and :class:`PredictionSink`; adaptation strategies (meta-adaptation,
evolution) implement :class:`Adapter`; a :class:`Gate` decides whether a proposal goes live.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from neuralsync.learner import OnlineLearner

__all__ = [
    "Adapter",
    "Batch",
    "Deferred",
    "Gate",
    "GateDecision",
    "Prediction",
    "PredictionColumns",
    "PredictionSink",
    "Proposal",
    "RegimeChange",
    "Source",
]


@dataclass
class Batch:
    """Consecutive rows of a stream, already parsed into numbers.

    Parameters
    ----------
    columns
        Names of the value columns, in order.
    values
        ``(n, len(columns))`` float64; NaN marks a missing cell.
    timestamps
        ``(n,)`` int64 nanoseconds since the epoch (datetimes) or float64 (plain numbers).
    keys
        ``(n,)`` series keys (e.g. symbols), or ``None`` for a single series.
    origins
        ``(n,)`` line numbers (or offsets) the rows came from, for error messages.
    errors
        Row index → (reason, raw text) for rows that could not be parsed; their ``values`` are
        NaN and they are handed to the bad-record policy, not to the model.

    """

    columns: list[str]
    values: np.ndarray
    timestamps: np.ndarray
    keys: np.ndarray | None = None
    origins: np.ndarray | None = None
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)
    source_name: str = "stream"
    #: ``"datetime"`` when timestamps are nanoseconds since the epoch, else ``"number"``.
    time_kind: str = "datetime"

    def __len__(self) -> int:
        return len(self.values)

    def slice(self, start: int, stop: int) -> Batch:
        """Rows ``start:stop`` as a batch of their own."""
        return Batch(
            columns=self.columns,
            values=self.values[start:stop],
            timestamps=self.timestamps[start:stop],
            keys=None if self.keys is None else self.keys[start:stop],
            origins=None if self.origins is None else self.origins[start:stop],
            errors={i - start: e for i, e in self.errors.items() if start <= i < stop},
            source_name=self.source_name,
            time_kind=self.time_kind,
        )

    def origin(self, row: int, column: str | None = None) -> str:
        where = self.source_name
        if self.origins is not None:
            where += f":{int(self.origins[row])}"
        if column is not None:
            where += f", column '{column}'"
        return where


class Source(abc.ABC):
    """Yields a stream as :class:`Batch` es, in stream order, and can resume mid-stream."""

    @abc.abstractmethod
    def __iter__(self) -> Iterator[Batch]:
        """Yield the rows not yet consumed, in batches."""

    @abc.abstractmethod
    def seek(self, position: int) -> None:
        """Skip the first ``position`` rows, so that iteration resumes after them."""

    def total_rows(self) -> int | None:
        """Rows in the whole stream when known in advance (for progress bars), else ``None``."""
        return None


class Prediction(NamedTuple):
    """One forecast value once its truth is known (or at the end of the stream).

    An immutable record, a named tuple rather than a frozen dataclass: a pipeline emits
    ``horizon * targets`` of them a row, and a frozen dataclass takes about three times as long
    to build (docs/performance.md).
    """

    issued_at: str | float | None
    timestamp: str | float | None
    key: str | None
    target: str
    step: int
    prediction: float
    truth: float
    #: The last value observed when the forecast was issued: the last-value baseline's forecast.
    last_value: float


@dataclass(frozen=True)
class PredictionColumns:
    """Scored forecast values as columns: the fields of :class:`Prediction`, one array each.

    What :meth:`Pipeline.process_columns <neuralsync.pipeline.Pipeline.process_columns>`
    returns. A row at horizon ``H`` with ``T`` targets completes ``H * T`` values; building a
    record for each is most of the pipeline's own work at long horizons, and a caller that
    aggregates (a backtest, a benchmark) wants arrays anyway. Entry ``i`` of every column is
    record ``i`` of :meth:`records`, in the order :meth:`Pipeline.process` returns them.

    Examples
    --------
    >>> import numpy as np
    >>> columns = PredictionColumns.from_records(
    ...     [Prediction(0.0, 1.0, None, "y", 1, 0.5, 0.75, 0.25)]
    ... )
    >>> len(columns), columns.prediction - columns.truth
    (1, array([-0.25]))
    >>> columns.records()[0] == Prediction(0.0, 1.0, None, "y", 1, 0.5, 0.75, 0.25)
    True
    """

    issued_at: np.ndarray  # object: stream times (str, float or None)
    timestamp: np.ndarray  # object
    key: np.ndarray  # object: str or None
    target: np.ndarray  # object: the target's name
    step: np.ndarray  # int64
    prediction: np.ndarray  # float64
    truth: np.ndarray  # float64
    last_value: np.ndarray  # float64

    def __len__(self) -> int:
        return len(self.step)

    @classmethod
    def from_records(cls, records: list[Prediction]) -> PredictionColumns:
        """The columns of ``records`` (any number, none included)."""
        fields = list(zip(*records, strict=True)) if records else [()] * len(Prediction._fields)
        dtypes = (object, object, object, object, np.int64, np.float64, np.float64, np.float64)
        return cls(*(np.array(f, dtype=d) for f, d in zip(fields, dtypes, strict=True)))

    def records(self) -> list[Prediction]:
        """The same values as :class:`Prediction` records."""
        rows = zip(
            self.issued_at.tolist(),
            self.timestamp.tolist(),
            self.key.tolist(),
            self.target.tolist(),
            self.step.tolist(),
            self.prediction.tolist(),
            self.truth.tolist(),
            self.last_value.tolist(),
            strict=True,
        )
        return [Prediction(*row) for row in rows]

    def to_frame(self) -> pd.DataFrame:
        """A pandas DataFrame with one column per field, one row per value."""
        import pandas as pd

        return pd.DataFrame({name: getattr(self, name) for name in Prediction._fields})


class PredictionSink(abc.ABC):
    """Receives forecasts. Sinks that survive a restart report and restore their position."""

    @abc.abstractmethod
    def write(self, predictions: list[Prediction]) -> None: ...

    def flush(self) -> None:  # noqa: B027 - optional hook
        """Make what was written durable (called before every checkpoint)."""

    def position(self) -> int:
        """An opaque position that :meth:`truncate` can return to (e.g. a byte offset)."""
        return 0

    def truncate(self, position: int) -> None:  # noqa: B027 - optional hook
        """Drop what was written after ``position`` (on resume from a checkpoint)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release files or connections."""


@dataclass(frozen=True)
class RegimeChange:
    """A detected change of regime, as adapters receive it."""

    position: int
    stream_time: str | float | None
    key: str | None
    detector: str


@dataclass
class Proposal:
    """A replacement for the live model, offered by an adapter to the gate."""

    learner: OnlineLearner
    source: str
    details: dict[str, Any] = field(default_factory=dict)
    #: An event the pipeline emits, with ``details`` and the gate's figures, just before the
    #: ``gate_decision`` (e.g. ``meta_adapt``); ``None`` for none.
    event: str | None = None
    #: More events, ``(type, fields)``, emitted before that one (e.g. each candidate
    #: evaluated and each generation of a search).
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: The errors the proposal made on the canary samples, forecasting each before learning
    #: it (test-then-train, as the live model did); the gate compares these with the live
    #: errors instead of forecasting the canary afterwards. ``None``: the gate forecasts.
    canary_errors: torch.Tensor | None = None
    #: Relative improvement over the live model's canary error this proposal must reach, on
    #: top of the gate's own (the larger applies): e.g. a recalled model, which should be far
    #: better when its regime has truly come back.
    margin: float = 0.0
    #: Paired z-score (``gates.advantage_z``) this proposal's advantage must reach, on top of
    #: the gate's own (the larger applies).
    min_z: float = 0.0


@dataclass(frozen=True)
class GateDecision:
    """The gate's verdict on a proposal, with the figures behind it."""

    accepted: bool
    reason: str
    figures: dict[str, float]


@dataclass
class Deferred:
    """A proposal being worked out in the background.

    An adapter returns one from :meth:`Adapter.on_regime_change` when its work is too slow
    for the stream's thread (evolution), or when its proposal cannot be judged on the canary
    window at once (meta-adaptation of an rls live model, whose copied experts learned it).
    The pipeline collects the result after the adapter's ``result_delay`` more labelled
    samples (at least a canary window past the label delay's gap) — waiting there if it is
    not ready, so every run swaps at the same position — and offers it to the gate on samples
    the work never saw.
    """

    future: Future[Proposal | None]
    #: Everything :meth:`Adapter.resume` needs to start the same work again after a restore
    #: from a snapshot taken while it ran (tensors and plain values).
    job: dict[str, Any]


class Adapter(abc.ABC):
    """Reacts to a regime change, and may propose a replacement for the live model.

    ``support_x``/``support_y`` are recent labelled samples (oldest first, normalised) the
    adapter may train on; the gate scores proposals on samples after them that it never saw.
    """

    name: str = "adapter"
    #: Labelled samples the pipeline waits after a regime change before consulting this
    #: adapter, so that its support window holds data from the new regime; 0 consults it at
    #: once. The wait counts samples, so it ends at the same stream position on every run.
    support_delay: int = 0
    #: For adapters that answer with a :class:`Deferred`: labelled samples between the start
    #: of the work and the delivery of its result.
    result_delay: int = 0
    #: Deliver a :class:`Deferred` as soon as it is ready instead of at ``result_delay``
    #: (lower latency; runs are then no longer reproducible).
    deliver_when_ready: bool = False
    #: Labelled samples this adapter's background work learns from (the newest ones); the
    #: pipeline keeps at least that many. 0: the support window (``adaptation.support_size``).
    history_size: int = 0

    @abc.abstractmethod
    def on_regime_change(
        self,
        change: RegimeChange,
        live: OnlineLearner,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
    ) -> Proposal | Deferred | None:
        """Return a proposal, a :class:`Deferred` one, or ``None`` to keep the live model."""

    def collect(self, deferred: Deferred) -> Proposal | None:
        """The result of a :class:`Deferred`, on the stream's thread (waits if not ready):
        where an adapter commits what the background work learned."""
        return deferred.future.result()

    def resume(self, job: dict[str, Any]) -> Deferred:
        """Start again the background work a :class:`Deferred` described (after a restore)."""
        raise NotImplementedError(f"adapter '{self.name}' does not defer its work")

    def state_dict(self) -> dict[str, Any]:
        """What the adapter learned, for the state snapshot (tensors and plain values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore :meth:`state_dict`."""


class Gate(abc.ABC):
    """Decides whether a proposal may replace the live model."""

    @abc.abstractmethod
    def decide(
        self,
        proposal: Proposal,
        live_errors: torch.Tensor,
        canary_x: torch.Tensor,
        canary_y: torch.Tensor,
    ) -> GateDecision:
        """``live_errors`` are the live model's prequential squared errors on the canary
        samples, measured before it learned from them; ``canary_x``/``canary_y`` are those
        samples, which the proposal has not trained on."""
