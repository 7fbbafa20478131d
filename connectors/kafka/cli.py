"""``neuralsync serve``, ``neuralsync produce`` and ``neuralsync bench kafka``.

Registered under the ``neuralsync.commands`` and ``neuralsync.bench`` entry-point groups, which
the core command line attaches without importing this package.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from neuralsync.errors import NeuralSyncError

__all__ = ["bench_kafka", "produce", "serve"]


def _fail(exc: Exception) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(2)


def serve(
    config: Annotated[Path, typer.Option(help="The daemon's YAML configuration.")],
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Consume a Kafka topic through the pipeline; publish predictions, events, dead letters.

    Each partition's state is checkpointed with its offset; SIGTERM or SIGINT finishes the
    batch, checkpoints, commits and exits 0. Logs are JSON lines on stderr.
    """
    from connectors.kafka.config import load_daemon_config
    from connectors.kafka.daemon import Daemon, JsonLogFormatter

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger("neuralsync")
    root.addHandler(handler)
    root.setLevel(log_level.upper())
    logging.getLogger("kafka").addHandler(handler)
    logging.getLogger("kafka").setLevel(logging.ERROR)
    from kafka.errors import KafkaTimeoutError

    try:
        daemon = Daemon(load_daemon_config(config))
    except NeuralSyncError as exc:
        raise _fail(exc) from None
    try:
        code = daemon.run()
    except KafkaTimeoutError as exc:
        if daemon.consumer is not None:
            raise  # not at start-up: the traceback says where
        servers = daemon.config.bootstrap_servers
        typer.echo(f"error: {config}: no Kafka broker answers at {servers} ({exc})", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


def produce(
    scenario: Annotated[str, typer.Argument(help="Scenario YAML, or a bundled scenario's name.")],
    topic: Annotated[str, typer.Option(help="The topic to write to.")],
    bootstrap_servers: Annotated[str, typer.Option(help="host:port of a broker.")] = (
        "127.0.0.1:9092"
    ),
    realtime_factor: Annotated[
        float | None,
        typer.Option(help="Pace at this multiple of real time [default: as fast as possible]."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Send at most this many records.")] = None,
) -> None:
    """Feed a topic with a scenario's CSV, one JSON record per row, keyed by its key column."""
    from kafka import KafkaProducer

    from neuralsync.config import load_scenario
    from neuralsync.events import format_stream_time
    from neuralsync.replay import csv_source
    from neuralsync.scenarios import resolve_scenario

    try:
        config = load_scenario(resolve_scenario(scenario))
        if realtime_factor is not None:
            config = config.model_copy(update={"realtime_factor": realtime_factor})
        source = csv_source(config, paced=realtime_factor is not None)
    except NeuralSyncError as exc:
        raise _fail(exc) from None
    producer = KafkaProducer(bootstrap_servers=bootstrap_servers, linger_ms=5, acks="all")
    sent = 0
    for batch in source:
        for i in range(len(batch)):
            if limit is not None and sent >= limit:
                break
            record = {
                config.timestamp: format_stream_time(batch.timestamps[i].item(), batch.time_kind)
            }
            key = None
            if batch.keys is not None and config.key:
                key = str(batch.keys[i])
                record[config.key] = key
            for name, value in zip(batch.columns, batch.values[i], strict=True):
                record[name] = float(value) if value == value else None
            producer.send(
                topic, key=key.encode() if key else None, value=json.dumps(record).encode()
            )
            sent += 1
    producer.flush()
    producer.close()
    typer.echo(f"sent {sent} records to {topic}", err=True)


def bench_kafka(
    records: Annotated[int, typer.Option(help="Records to send (over 2 partitions).")] = 5000,
    bootstrap_servers: Annotated[
        str | None, typer.Option(help="A broker to use [default: start a Tansu broker].")
    ] = None,
    quick: Annotated[bool, typer.Option(help="A smoke run: 1,000 records.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """Records/s end to end through a broker, and produce-to-prediction latency p50 and p99.

    Starts a Tansu broker on a free loopback port unless ``--bootstrap-servers`` names one,
    and a daemon in this process (4 keys over 2 partitions, adaptation off).
    """
    from connectors.kafka.bench import run_bench

    if quick:
        records = min(records, 1000)
    figures = run_bench(records=records, bootstrap_servers=bootstrap_servers)
    if as_json:
        typer.echo(json.dumps(figures, indent=2))
    else:
        typer.echo(
            f"{figures['records']} records in {figures['seconds']:.2f} s: "
            f"{figures['records_per_second']:.0f} records/s end to end; latency p50 "
            f"{figures['latency_p50_ms']:.1f} ms, p99 {figures['latency_p99_ms']:.1f} ms "
            f"(paced at {figures['latency_rate']:.0f} records/s)"
        )
