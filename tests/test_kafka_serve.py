"""``neuralsync serve`` end to end against a real broker: predictions, state, operations.

A daemon subprocess consumes a topic; what it publishes and the state it checkpoints are
compared with an in-process run of the same records that was never interrupted.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from kafka_support import (
    KAFKA,
    SCENARIO,
    KafkaRun,
    broker_fixture,  # noqa: F401 - the fixture `broker`
    expected_state,
    good_records,
)
from typer.testing import CliRunner

from connectors.kafka.daemon import BATCH_DELAY_ENV
from neuralsync.cli import app

pytestmark = KAFKA


def _metrics_port(run: KafkaRun, process: subprocess.Popen, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in run.log_events(process):
            if "metrics_port" in entry:
                return int(entry["metrics_port"])
        time.sleep(0.05)
    pytest.fail(f"no metrics port logged\n{run.logs()}")


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _metric(text: str, name: str) -> float:
    found = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def test_serve_matches_an_uninterrupted_in_process_run(broker, tmp_path):
    """Predictions carry deterministic ids, the final state equals the in-process run's,
    SIGTERM exits 0 after a checkpoint, and metrics, health and inspect describe the run."""
    run = KafkaRun(broker, tmp_path)
    run.produce_good(good_records(120))
    reference = run.reference()
    try:
        daemon = run.start()
        port = _metrics_port(run, daemon)
        run.wait_for_offsets({p: ref.records for p, ref in reference.items()}, 180, [daemon])
        status, body = _get(f"http://127.0.0.1:{port}/healthz")
        assert status == 200, body
        health = json.loads(body)
        assert health["status"] == "ok"
        assert len(health["partitions"]) == 2
        _, text = _get(f"http://127.0.0.1:{port}/metrics")
        assert _metric(text, "neuralsync_records_total") == 480
        assert _metric(text, "neuralsync_dead_letters_total") == 0
        assert _metric(text, "neuralsync_assigned_partitions") == 2
        assert _metric(text, "neuralsync_prediction_latency_p99_seconds") > 0
        assert run.stop(daemon) == 0
    finally:
        run.kill_all()
    assert run.final_state() == expected_state(run)

    predictions = [json.loads(m.value) for m in run.read("predictions")]
    ids = [p["id"] for p in predictions]
    expected_ids = set().union(*(ref.prediction_ids for ref in reference.values()))
    assert len(ids) == len(set(ids)) == len(expected_ids)  # no crash: no duplicates either
    assert set(ids) == expected_ids
    # An id names the record (topic:partition:offset:step) and the record's key routes it.
    # Partition 0 holds AAA and CCC, interleaved: AAA's first full window (lookback 8) ends
    # at offset 14.
    first = min(
        (p for p in predictions if p["id"].startswith(f"{run.topics['input']}:0:")),
        key=lambda p: int(p["id"].split(":")[2]),
    )
    assert first["id"] == f"{run.topics['input']}:0:14:1"
    assert first["key"] == "AAA" and first["step"] == 1 and set(first["forecast"]) == {"y"}
    assert run.read("dead_letter") == []
    stopped = [e for e in run.log_events(daemon) if e.get("event") == "stopped"]
    assert len(stopped) == 1

    result = CliRunner().invoke(app, ["inspect", str(run.checkpoints), "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["partition"]: row for row in json.loads(result.output)}
    for p, (offset, digest) in expected_state(run).items():
        row = rows[f"{run.topics['input']}-{p}"]
        assert (row["offset"], row["state_digest"], row["keys"]) == (offset, digest, 2)


def test_slow_training_does_not_cause_a_rebalance(broker, tmp_path):
    """Each batch takes longer than max_poll_interval_ms; the poll loop keeps polling, so
    the daemon keeps its partitions (one assignment, no revocation) and loses nothing."""
    run = KafkaRun(
        broker, tmp_path, max_poll_interval_ms=2000, max_poll_records=30, max_buffered_records=30
    )
    run.produce_good(good_records(30))  # 2 batches a partition; each fills the backlog (pause)
    try:
        daemon = run.start(env={BATCH_DELAY_ENV: "2.5"})
        run.wait_for_offsets({p: len(v) for p, v in run.values.items()}, 180, [daemon])
        assert run.stop(daemon) == 0
    finally:
        run.kill_all()
    events = [e.get("event") for e in run.log_events(daemon)]
    assert events.count("assigned") == 2  # both partitions, once
    assert "revoked" not in events
    assert run.final_state() == expected_state(run)


def test_a_bad_configuration_exits_2_naming_the_option(tmp_path):
    config = tmp_path / "daemon.yaml"
    config.write_text(
        "bootstrap_servers: 127.0.0.1:1\ngroup_id: g\n"
        "topics: {input: i, predictions: p, events: e, dead_letter: d}\n"
        f"scenario: {json.dumps(SCENARIO)}\n"
        "checkpoint: {url: ck, every_records: 0}\n"
    )
    result = CliRunner().invoke(app, ["serve", "--config", str(config)])
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert "daemon.yaml:5" in result.output and "checkpoint.every_records" in result.output


def test_bench_kafka_quick_prints_throughput_and_latency():
    result = CliRunner().invoke(app, ["bench", "kafka", "--quick"])
    assert result.exit_code == 0, result.output
    found = re.search(
        r"(\d+) records in [\d.]+ s: (\d+) records/s end to end; "
        r"latency p50 ([\d.]+) ms, p99 ([\d.]+) ms",
        result.output,
    )
    assert found, result.output
    records, rate, p50, p99 = (float(g) for g in found.groups())
    assert records > 0 and rate > 0 and 0 < p50 <= p99


def test_the_operations_guide_shows_the_example_configuration():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    example = (root / "connectors" / "kafka" / "daemon.example.yaml").read_text()
    guide = (root / "docs" / "operations.md").read_text()
    assert f"```yaml\n{example}```" in guide
