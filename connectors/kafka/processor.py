"""One partition's stream processing, without Kafka: records in, output messages out.

A :class:`PartitionProcessor` owns the partition's :class:`~neuralsync.pipeline.Pipeline`
(whose per-key windows, scalers and detectors route records by key) and turns each record,
in offset order, into the messages the daemon publishes. Its state after offsets ``[0, n)``
depends only on those records, which is what makes recovery from a checkpoint exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from connectors.kafka.records import PoisonRecord, RecordDecoder
from neuralsync.adaptation import build_adapters
from neuralsync.base import Batch
from neuralsync.config import Scenario
from neuralsync.events import Event, format_stream_time, json_safe
from neuralsync.pipeline import Pipeline

__all__ = ["Output", "PartitionProcessor", "prediction_id"]

NON_FINITE_LOSS = "training step loss not finite; the step was rolled back"


def prediction_id(topic: str, partition: int, offset: int, step: int) -> str:
    """The deterministic id of a prediction: a consumer drops duplicates after a crash by it.

    >>> prediction_id("prices", 2, 1041, 1)
    'prices:2:1041:1'

    """
    return f"{topic}:{partition}:{offset}:{step}"


@dataclass
class Output:
    """A message to publish: ``kind`` is ``predictions``, ``events`` or ``dead_letter``."""

    kind: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    #: For predictions: the input record's Kafka timestamp (ms), to measure latency.
    record_time_ms: int | None = None


class PartitionProcessor:
    """Process one partition's records in offset order.

    Parameters
    ----------
    scenario
        The pipeline settings and the record's field names.
    topic, partition
        Where the records come from (in prediction ids and dead-letter headers).
    time_kind
        ``datetime`` (ISO 8601 strings) or ``number`` timestamps.
    max_record_bytes
        Larger records are dead-lettered unread.

    Examples
    --------
    >>> from neuralsync.config import Scenario
    >>> scenario = Scenario(name="s", timestamp="t", targets="y", lookback=2,
    ...                     model={"hidden": [4]}, detector={"type": "none"},
    ...                     adaptation={"meta": {"enabled": False}})
    >>> p = PartitionProcessor(scenario, "in", 0, time_kind="number")
    >>> [o.kind for o in p.process(0, None, b'{"t": 0, "y": 1.0}')]
    []
    >>> out = p.process(1, None, b'{"t": 1, "y": 2.0}')
    >>> json.loads(out[0].value)["id"]
    'in:0:1:1'
    >>> bad = p.process(2, None, b'{"t": 0, "y": 3.0}')[0]
    >>> bad.kind, dict(bad.headers)["reason"].decode()[:24]
    ('dead_letter', 'out-of-order timestamp 0')

    """

    def __init__(
        self,
        scenario: Scenario,
        topic: str,
        partition: int,
        *,
        time_kind: str = "datetime",
        max_record_bytes: int = 1_000_000,
    ):
        self.scenario = scenario
        self.topic = topic
        self.partition = partition
        self.time_kind = time_kind
        self.decoder = RecordDecoder(scenario, time_kind, max_record_bytes)
        self.pipeline = Pipeline(scenario, adapters=build_adapters(scenario))
        self.pipeline.events.subscribe(self._on_event)
        self.next_offset_ = 0
        self.last_timestamp_: dict[str, int | float] = {}
        self.counts_: dict[str, int] = {"records": 0, "dead_letters": 0, "predictions": 0}
        self._outputs: list[Output] = []
        self._current: tuple[int, bytes | None, bytes | None, int | None] | None = None
        self._row_rejected = False

    # -- one record -------------------------------------------------------------------------

    def process(
        self, offset: int, key: bytes | None, value: bytes | None, timestamp_ms: int | None = None
    ) -> list[Output]:
        """Process the record at ``offset``; return the messages it yields, in order."""
        # Offsets only grow within a partition: recovery relies on the state covering exactly
        # [0, next_offset_), so a record from before it must never be applied twice.
        if offset < self.next_offset_:
            raise ValueError(
                f"{self.topic}:{self.partition}: offset {offset} was already processed "
                f"(next is {self.next_offset_})"
            )
        self._outputs = []
        self._current = (offset, key, value, timestamp_ms)
        self._row_rejected = False
        self.counts_["records"] += 1
        try:
            row = self.decoder(value)
        except PoisonRecord as exc:
            self._dead_letter(str(exc))
        else:
            self._apply(row, offset, timestamp_ms)
        self.next_offset_ = offset + 1
        self._current = None
        return self._outputs

    def _apply(self, row: Any, offset: int, timestamp_ms: int | None) -> None:
        last = self.last_timestamp_.get(row.key)
        if last is not None and row.timestamp <= last:
            what = "duplicate" if row.timestamp == last else "out-of-order"
            where = f" for key '{row.key}'" if row.key else ""
            self._dead_letter(
                f"{what} timestamp {self._time(row.timestamp)}{where}: expected a time after "
                f"{self._time(last)}"
            )
            return
        kind = "datetime" if self.time_kind == "datetime" else "number"
        dtype = np.int64 if kind == "datetime" else np.float64
        batch = Batch(
            columns=self.scenario.inputs,
            values=row.values[None],
            timestamps=np.asarray([row.timestamp], dtype=dtype),
            keys=np.asarray([row.key]) if self.scenario.key else None,
            origins=np.asarray([offset]),
            source_name=f"{self.topic}:{self.partition}",
            time_kind=kind,
        )
        self.pipeline.process_columns(batch)  # the values are not read: no records
        if self._row_rejected:
            return
        self.last_timestamp_[row.key] = row.timestamp
        latest = self.pipeline.latest_forecast(row.key or None)
        if latest is None or latest[0] != self._time(row.timestamp):
            return
        issued_at, values = latest
        targets = self.scenario.targets
        for step in range(1, len(values) + 1):
            message = {
                "id": prediction_id(self.topic, self.partition, offset, step),
                "key": row.key or None,
                "issued_at": issued_at,
                "step": step,
                "forecast": {t: float(values[step - 1, j]) for j, t in enumerate(targets)},
            }
            self.counts_["predictions"] += 1
            self._outputs.append(
                Output(
                    "predictions",
                    row.key.encode() if row.key else None,
                    json.dumps(message).encode(),
                    record_time_ms=timestamp_ms,
                )
            )

    def _time(self, timestamp: int | float) -> Any:
        return format_stream_time(timestamp, self.time_kind)

    def _on_event(self, event: Event) -> None:
        if self._current is None:
            return
        offset = self._current[0]
        if event.type == "bad_record":
            # The decoder and the order check catch what the pipeline would reject; should the
            # pipeline still refuse a row, it goes to the dead letters like the others.
            self._row_rejected = True
            self._dead_letter(str(event.data.get("reason")))
            return
        record = event.to_dict()
        record.update({"topic": self.topic, "partition": self.partition, "offset": offset})
        self._outputs.append(Output("events", None, json.dumps(json_safe(record)).encode()))
        if event.type == "learn_skipped":
            self._dead_letter(NON_FINITE_LOSS)

    def _dead_letter(self, reason: str) -> None:
        assert self._current is not None
        offset, key, value, _ = self._current
        self.counts_["dead_letters"] += 1
        headers = [
            ("reason", reason.encode()),
            ("topic", self.topic.encode()),
            ("partition", str(self.partition).encode()),
            ("offset", str(offset).encode()),
        ]
        self._outputs.append(Output("dead_letter", key, value or b"", headers))

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The pipeline's state and the daemon's own per-key bookkeeping."""
        return {
            "next_offset": self.next_offset_,
            "pipeline": self.pipeline.state_dict(),
            "daemon": {
                "last_timestamp": dict(self.last_timestamp_),
                "counts": dict(self.counts_),
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pipeline.load_state_dict(state["pipeline"])
        self.next_offset_ = int(state["next_offset"])
        self.last_timestamp_ = dict(state["daemon"]["last_timestamp"])
        self.counts_ = dict(state["daemon"]["counts"])
