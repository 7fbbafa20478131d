"""``neuralsync bench kafka``: records/s through a broker and produce-to-prediction latency."""

from __future__ import annotations

import json
import tempfile
import threading
import time
import uuid
from typing import Any

import numpy as np

from connectors.kafka.config import DaemonConfig
from connectors.kafka.daemon import Daemon

__all__ = ["run_bench"]


def run_bench(records: int = 5000, bootstrap_servers: str | None = None) -> dict[str, Any]:
    """Send ``records`` sine-wave records (4 keys, 2 partitions) while a daemon serves them.

    Records/s: a burst of ``records``, from the first record sent to the last one processed.
    Latency: from each input record's Kafka timestamp to its prediction being handed to the
    daemon's producer, over a further stream paced at half that rate (at most 500/s).
    """
    from connectors.kafka.broker import TansuBroker

    broker = TansuBroker() if bootstrap_servers is None else None
    bootstrap = broker.bootstrap if broker is not None else bootstrap_servers
    try:
        return _run(records, bootstrap)
    finally:
        if broker is not None:
            broker.stop()


def _run(records: int, bootstrap: str) -> dict[str, Any]:
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

    run = uuid.uuid4().hex[:8]
    topics = {k: f"bench-{run}-{k}" for k in ("input", "predictions", "events", "dead_letter")}
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    admin.create_topics([NewTopic(t, 2 if k == "input" else 1, 1) for k, t in topics.items()])
    admin.close()
    config = DaemonConfig.model_validate(
        {
            "bootstrap_servers": bootstrap,
            "group_id": f"bench-{run}",
            "topics": topics,
            "time_kind": "number",
            "scenario": {
                "timestamp": "t",
                "key": "k",
                "targets": "y",
                "lookback": 16,
                "model": {"hidden": [16]},
                "detector": {"type": "none"},
                "adaptation": {"meta": {"enabled": False}},
            },
            "checkpoint": {"url": tempfile.mkdtemp(), "every_records": 1000, "every_seconds": 5},
            "metrics": {"enabled": False},
            "session_timeout_ms": 6000,
            "max_poll_records": 500,
        }
    )
    daemon = Daemon(config)
    thread = threading.Thread(target=daemon.run, kwargs={"handle_signals": False}, daemon=True)
    thread.start()
    while not daemon.partitions:  # joined the group: from now on records flow at once
        time.sleep(0.05)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=1)
    # Throughput: a burst, from the first record sent to the last one processed.
    started = time.monotonic()
    for i in range(records):
        _send(producer, topics["input"], i)
    producer.flush()
    while daemon.records_done < records:
        time.sleep(0.01)
    seconds = time.monotonic() - started
    # Latency: a paced stream at half that rate, so it measures the daemon, not a queue.
    paced = max(200, records // 5)
    rate = min(records / seconds / 2, 500.0)
    daemon.metrics.reset_latency()
    begin = time.monotonic()
    for j in range(paced):
        _send(producer, topics["input"], records + j)
        time.sleep(max(begin + (j + 1) / rate - time.monotonic(), 0))
    producer.flush()
    while daemon.records_done < records + paced:
        time.sleep(0.01)
    daemon.stop_requested.set()
    thread.join(30)
    producer.close()
    return {
        "records": records,
        "seconds": seconds,
        "records_per_second": records / seconds,
        "latency_records": paced,
        "latency_rate": rate,
        "latency_p50_ms": daemon.metrics.latency_quantile(0.5) * 1000,
        "latency_p99_ms": daemon.metrics.latency_quantile(0.99) * 1000,
    }


def _send(producer: Any, topic: str, i: int) -> None:
    key = f"s{i % 4}"
    value = {"t": i // 4, "k": key, "y": float(np.sin(i / 40))}
    producer.send(topic, key=key.encode(), value=json.dumps(value).encode())
