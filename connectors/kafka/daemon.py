"""``neuralsync serve``: consume a topic, run the pipeline per partition, lose nothing.

Two threads share the work. The poll thread owns the consumer (kafka-python's consumer is
not thread-safe): it polls, hands records to the worker, pauses a partition whose backlog is
full and resumes it once drained, commits offsets and handles rebalances. Because it never
trains, it keeps polling while a slow training step runs, so the group never sees a missed
poll and never rebalances for it. The worker thread owns the pipelines: it processes records
in offset order, publishes what they yield, and checkpoints (see :meth:`Daemon.checkpoint`).

Recovery rests on one invariant: a partition's checkpoint holds its whole state and the
offset it covers, and is written only after everything that state produced is in Kafka. On
assignment the daemon restores the newest readable checkpoint and seeks to its offset, so
after a crash it redoes exactly the records after the checkpoint and republishes their
predictions under the same deterministic ids.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kafka import ConsumerRebalanceListener

from connectors.kafka.checkpoint import PartitionCheckpoints
from connectors.kafka.config import DaemonConfig
from connectors.kafka.metrics import DaemonMetrics, MetricsServer
from connectors.kafka.processor import Output, PartitionProcessor

__all__ = ["BATCH_DELAY_ENV", "START_WHEN_ENV", "Daemon", "DeliveryError", "JsonLogFormatter"]

log = logging.getLogger("neuralsync.kafka")
#: For tests only: seconds the worker sleeps per batch, standing in for slow training.
BATCH_DELAY_ENV = "NEURALSYNC_KAFKA_BATCH_DELAY_S"
#: For tests only: once warmed up, wait until this file exists before connecting, so a crash
#: test can have the next daemon ready before it kills the running one.
START_WHEN_ENV = "NEURALSYNC_KAFKA_START_WHEN_FILE"


class DeliveryError(RuntimeError):
    """A message could not be delivered to Kafka: the state that produced it is not saved."""


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, message and the record's ``extra`` fields."""

    _PLAIN = frozenset(vars(logging.makeLogRecord({})))

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in self._PLAIN})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


@dataclass(eq=False)
class _Partition:
    """One assigned partition: its processor and the bookkeeping around it."""

    topic: str
    partition: int
    #: Built by the worker on the partition's first batch (a pipeline takes a while to build,
    #: and the rebalance listener must return quickly); until then ``snapshot`` holds the
    #: checkpoint to restore, or ``None`` to start afresh.
    processor: PartitionProcessor | None
    snapshot: dict[str, Any] | None
    start_offset: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    queued: int = 0
    revoked: bool = False
    paused: bool = False
    since_checkpoint: int = 0
    oldest_unsaved: float | None = None
    last_checkpoint: float = field(default_factory=time.monotonic)
    checkpoint_requested: bool = False

    @property
    def next_offset(self) -> int:
        return self.start_offset if self.processor is None else self.processor.next_offset_


class Daemon:
    """The consume → pipeline → publish loop of ``neuralsync serve``.

    Parameters
    ----------
    config
        The daemon configuration (see :class:`~connectors.kafka.config.DaemonConfig`).

    """

    def __init__(self, config: DaemonConfig):
        self.config = config
        self.scenario = config.pipeline_scenario()
        self.store = PartitionCheckpoints(config.checkpoint_url(), keep=config.checkpoint.keep)
        self.metrics = DaemonMetrics()
        self.partitions: dict[Any, _Partition] = {}
        self.stop_requested = threading.Event()
        self._work: queue.Queue[Any] = queue.Queue()
        self._commits: queue.Queue[tuple[Any, int]] = queue.Queue()
        self._count_lock = threading.Lock()
        self._send_errors: list[BaseException] = []
        self._worker_error: BaseException | None = None
        self._last_record = time.monotonic()
        self._stalled = False
        self._rate_mark = (time.monotonic(), 0)
        self.records_done = 0
        self.server: MetricsServer | None = None
        self.consumer: Any = None
        self.producer: Any = None

    # -- set-up and the poll loop -------------------------------------------------------------

    def _connect(self) -> None:
        from kafka import KafkaConsumer, KafkaProducer

        c = self.config
        self.consumer = KafkaConsumer(
            bootstrap_servers=c.bootstrap_servers,
            group_id=c.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=c.session_timeout_ms,
            max_poll_interval_ms=c.max_poll_interval_ms,
            fetch_max_wait_ms=c.fetch_max_wait_ms,
            heartbeat_interval_ms=max(c.session_timeout_ms // 3, 100),
            max_poll_records=c.max_poll_records,
            reconnect_backoff_ms=100,
            reconnect_backoff_max_ms=2000,
            **c.kafka,
        )
        self.producer = KafkaProducer(
            bootstrap_servers=c.bootstrap_servers,
            acks="all",
            linger_ms=5,
            retries=2**31 - 1,
            # Outages shorter than this are ridden out; a message older fails the daemon
            # (exit 1) before its state is checkpointed, so nothing is lost either way.
            delivery_timeout_ms=600_000,
            request_timeout_ms=10_000,
            reconnect_backoff_ms=100,
            reconnect_backoff_max_ms=2000,
            max_in_flight_requests_per_connection=1,  # keep each topic's messages in order
            **c.kafka,
        )

    def run(self, handle_signals: bool = True) -> int:
        """Serve until SIGTERM or SIGINT (or :attr:`stop_requested`); return the exit code."""
        previous: dict[int, Any] = {}
        if handle_signals:
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, self._on_signal)
        try:
            # The first pipeline pays for compiling the fast path: pay it before joining the
            # group, not while partitions wait.
            self._new_processor(self.config.topics.input, 0)
            start_when = os.environ.get(START_WHEN_ENV)
            while start_when and not os.path.exists(start_when):
                if self.stop_requested.wait(0.02):
                    return 0
            self._connect()
            if self.config.metrics.enabled:
                m = self.config.metrics
                self.server = MetricsServer(self.metrics, self.health, m.host, m.port)
                log.info(
                    "metrics on http://%s:%d/metrics",
                    self.server.host,
                    self.server.port,
                    extra={"metrics_port": self.server.port},
                )
            self.consumer.subscribe([self.config.topics.input], listener=_Rebalance(self))
            worker = threading.Thread(target=self._worker, name="worker", daemon=True)
            worker.start()
            log.info("serving %s as group %s", self.config.topics.input, self.config.group_id)
            while not self.stop_requested.is_set():
                self._poll_once()
                if self._worker_error is not None:
                    raise self._worker_error
            log.info("stop requested: finishing the batch, checkpointing, committing")
            self._shutdown(worker)
            log.info("stopped cleanly", extra={"event": "stopped"})
            return 0
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if self.server is not None:
                self.server.close()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.stop_requested.set()

    def _poll_once(self) -> None:
        from kafka.errors import KafkaError

        c = self.config
        batches = self.consumer.poll(timeout_ms=c.poll_timeout_ms)
        now = time.monotonic()
        for tp, records in batches.items():
            part = self.partitions.get(tp)
            if part is None or not records:
                continue
            with self._count_lock:
                part.queued += len(records)
            self._work.put((part, records))
            self._last_record = now
        if batches and self._stalled:
            log.info("records flowing again", extra={"event": "stall_over"})
            self._stalled = False
            self.metrics.stalled.set(0)
        self._commit_pending()
        for tp, part in self.partitions.items():
            # Pausing, not sleeping: the poll loop keeps polling (and the group sees a live
            # member) however long the worker needs for this partition's backlog.
            if not part.paused and part.queued >= c.max_buffered_records:
                self.consumer.pause(tp)
                part.paused = True
            elif part.paused and part.queued < c.max_buffered_records // 2 + 1:
                self._resume(tp)
                part.paused = False
            due = part.oldest_unsaved is not None and now - part.oldest_unsaved >= (
                c.checkpoint.every_seconds
            )
            if due and part.queued == 0 and not part.checkpoint_requested:
                part.checkpoint_requested = True
                self._work.put((part, None))
        try:
            self._update_gauges(now)
        except KafkaError as exc:  # metadata not there during an outage: try again later
            log.debug("gauges not updated: %s", exc)
        if self.partitions and not self._stalled and now - self._last_record > c.stall_timeout_s:
            self._stalled = True
            self.metrics.stalled.set(1)
            log.warning(
                "stalled: no records for %.0f s (broker unreachable, or nothing produced)",
                now - self._last_record,
                extra={"event": "stall"},
            )

    def _resume(self, tp: Any) -> None:
        """Resume a paused partition, working around a kafka-python 3.0 fetcher bug.

        Records fetched for a partition paused before they were returned are parked, and put
        back in line on resume only when the in-line slot is ``None``; after the first poll it
        holds a drained (falsy) record set instead, so the parked records never come back and
        the partition is never fetched again. Emptying the slot lets the next poll restore them.
        """
        self.consumer.resume(tp)
        fetcher = getattr(self.consumer, "_fetcher", None)
        in_line = getattr(fetcher, "_next_partition_records", None)
        if (
            in_line is not None
            and not in_line
            and getattr(fetcher, "_paused_partition_records", None)
        ):
            fetcher._next_partition_records = None

    def _update_gauges(self, now: float) -> None:
        for tp, part in self.partitions.items():
            high = self.consumer.highwater(tp)
            if high is not None:
                self.metrics.lag.labels(str(tp.partition)).set(max(high - part.next_offset, 0))
        if self.partitions:
            oldest = min(p.last_checkpoint for p in self.partitions.values())
            self.metrics.checkpoint_age.set(now - oldest)
        self.metrics.assigned.set(len(self.partitions))
        mark_time, mark_count = self._rate_mark
        if now - mark_time >= 1.0:
            count = self.records_done
            self.metrics.rate.set((count - mark_count) / (now - mark_time))
            self._rate_mark = (now, count)

    def health(self) -> dict[str, Any]:
        """The ``/healthz`` document."""
        status = "ok"
        if self._worker_error is not None:
            status = "failed"
        elif self._stalled:
            status = "stalled"
        return {
            "status": status,
            "partitions": sorted(f"{p.topic}-{p.partition}" for p in self.partitions.values()),
            "seconds_since_last_record": round(time.monotonic() - self._last_record, 3),
        }

    # -- commits, checkpoints and rebalances ---------------------------------------------------

    def _commit(self, offsets: dict[Any, int], blocking: bool = True) -> None:
        """Commit offsets from the poll thread (``blocking``) or from a rebalance listener,
        which runs on kafka-python's IO thread and must not wait on it. A failed commit
        loses nothing: the checkpoint, not the committed offset, is where a partition resumes.
        """
        from kafka.errors import KafkaError
        from kafka.structs import OffsetAndMetadata

        if not offsets:
            return
        committed = {tp: OffsetAndMetadata(o, "", -1) for tp, o in offsets.items()}
        try:
            if blocking:
                self.consumer.commit(committed, timeout_ms=10_000)
            else:
                self.consumer.commit_async(committed, callback=_log_commit)
        except KafkaError as exc:
            log.warning("offset commit failed (the checkpoints have them): %s", exc)

    def _commit_pending(self, blocking: bool = True) -> None:
        offsets: dict[Any, int] = {}
        while True:
            try:
                tp, offset = self._commits.get_nowait()
            except queue.Empty:
                break
            offsets[tp] = max(offset, offsets.get(tp, 0))
        self._commit(offsets, blocking)

    def checkpoint(self, part: _Partition) -> None:
        """Commit a partition's progress (caller holds ``part.lock``); the steps, in order:

        1. flush the producer, so every prediction, event and dead letter of the records
           covered is in Kafka (retrying while the broker is away);
        2. write the partition's state and next offset as one snapshot, atomically;
        3. hand the offset to the poll thread, which commits it to the group.

        A crash before step 2 leaves the previous checkpoint in force: the records after it
        are processed again and their predictions republished with the same ids.
        """
        self._flush()
        processor = self._processor(part)
        offset = processor.next_offset_
        path = self.store.save(part.topic, part.partition, offset, processor.state_dict())
        part.since_checkpoint = 0
        part.oldest_unsaved = None
        part.last_checkpoint = time.monotonic()
        self.metrics.checkpoints.inc()
        log.debug("checkpoint %s", path, extra={"partition": part.partition, "offset": offset})
        self._commits.put((_tp(part), offset))

    def _flush(self) -> None:
        waited = 0.0
        while True:
            try:
                self.producer.flush(timeout=5.0)
                break
            except Exception as exc:  # kafka-python's KafkaTimeoutError: the broker is away
                waited += 5.0
                log.warning(
                    "broker unreachable for %.0f s: messages wait in the producer, state kept (%s)",
                    waited,
                    exc,
                    extra={"event": "broker_unreachable"},
                )
        if waited:
            log.info("broker reachable again", extra={"event": "broker_back"})
        if self._send_errors:
            raise DeliveryError(f"a message could not be delivered: {self._send_errors[0]}")

    def _on_assigned(self, assigned: list[Any]) -> None:
        self.metrics.rebalances.inc()
        for tp in assigned:
            if tp in self.partitions:
                continue  # kept across a cooperative rebalance: its state is here already
            snapshot = self.store.latest(tp.topic, tp.partition)
            offset = int(snapshot["next_offset"]) if snapshot is not None else 0
            if snapshot is not None:
                self.consumer.seek(tp, offset)
            else:
                self.consumer.seek_to_beginning(tp)
            self.partitions[tp] = _Partition(tp.topic, tp.partition, None, snapshot, offset)
            log.info(
                "assigned %s-%d: %s",
                tp.topic,
                tp.partition,
                f"restored at offset {offset}" if snapshot else "from the start",
                extra={"event": "assigned", "partition": tp.partition, "offset": offset},
            )

    def _processor(self, part: _Partition) -> PartitionProcessor:
        """The partition's processor, built (and restored from its snapshot) on first use."""
        if part.processor is None:
            processor = self._new_processor(part.topic, part.partition)
            if part.snapshot is not None:
                processor.load_state_dict(part.snapshot)
            part.processor, part.snapshot = processor, None
        return part.processor

    def _new_processor(self, topic: str, partition: int) -> PartitionProcessor:
        return PartitionProcessor(
            self.scenario,
            topic,
            partition,
            time_kind=self.config.time_kind,
            max_record_bytes=self.config.max_record_bytes,
        )

    def _on_revoked(self, revoked: list[Any]) -> None:
        offsets = {}
        for tp in revoked:
            part = self.partitions.pop(tp, None)
            if part is None:
                continue
            offsets[tp] = self._release(part)
            log.info(
                "revoked %s-%d at offset %d",
                tp.topic,
                tp.partition,
                offsets[tp],
                extra={"event": "revoked", "partition": tp.partition, "offset": offsets[tp]},
            )
        self._commit_pending(blocking=False)
        self._commit(offsets, blocking=False)

    def _release(self, part: _Partition) -> int:
        """Stop a partition after the worker's current batch and checkpoint it."""
        with part.lock:  # waits for the batch in progress; later batches are skipped
            part.revoked = True
            if part.since_checkpoint:
                self.checkpoint(part)
            return part.next_offset

    def _shutdown(self, worker: threading.Thread) -> None:
        offsets = {tp: self._release(part) for tp, part in self.partitions.items()}
        self._work.put(None)
        worker.join()
        self._commit_pending()
        self._commit(offsets)
        self.partitions.clear()
        self.consumer.close(autocommit=False)
        self.producer.close()

    # -- the worker ---------------------------------------------------------------------------

    def _worker(self) -> None:
        try:
            while True:
                item = self._work.get()
                if item is None:
                    return
                part, records = item
                with part.lock:
                    if records is None:
                        part.checkpoint_requested = False
                        if not part.revoked and part.since_checkpoint:
                            self.checkpoint(part)
                        continue
                    if not part.revoked:
                        self._process(part, records)
                with self._count_lock:
                    part.queued -= len(records)
        except BaseException as exc:
            log.exception("the worker failed; exiting without checkpointing")
            self._worker_error = exc
            self.stop_requested.set()

    def _process(self, part: _Partition, records: list[Any]) -> None:
        every = self.config.checkpoint.every_records
        processor = self._processor(part)
        delay = float(os.environ.get(BATCH_DELAY_ENV) or 0)
        if delay:
            time.sleep(delay)
        for record in records:
            if record.offset < processor.next_offset_:
                continue  # fetched before a seek back to the checkpoint
            outputs = processor.process(record.offset, record.key, record.value, record.timestamp)
            self._publish(outputs)
            self.metrics.records.inc()
            self.records_done += 1
            part.since_checkpoint += 1
            if part.oldest_unsaved is None:
                part.oldest_unsaved = time.monotonic()
            if part.since_checkpoint >= every:
                self.checkpoint(part)

    def _publish(self, outputs: list[Output]) -> None:
        topics = self.config.topics
        for out in outputs:
            topic = {
                "predictions": topics.predictions,
                "events": topics.events,
                "dead_letter": topics.dead_letter,
            }[out.kind]
            future = self.producer.send(topic, key=out.key, value=out.value, headers=out.headers)
            future.add_errback(self._send_errors.append)
            if out.kind == "predictions":
                self.metrics.predictions.inc()
                if out.record_time_ms is not None:
                    self.metrics.observe_latency(max(time.time() - out.record_time_ms / 1000, 0))
            elif out.kind == "dead_letter":
                self.metrics.dead_letters.inc()
            elif out.kind == "events":
                kind = json.loads(out.value).get("type")
                if kind == "regime_change":
                    self.metrics.regime_changes.inc()
                elif kind == "swap":
                    self.metrics.swaps.inc()


def _log_commit(offsets: Any, result: Any) -> None:
    if isinstance(result, Exception):
        log.warning("offset commit failed (the checkpoints have them): %s", result)


def _tp(part: _Partition) -> Any:
    from kafka import TopicPartition

    return TopicPartition(part.topic, part.partition)


class _Rebalance(ConsumerRebalanceListener):
    """kafka-python's rebalance listener, forwarding to the daemon."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.daemon._on_revoked(list(revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.daemon._on_assigned(list(assigned))
