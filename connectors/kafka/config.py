"""The daemon's configuration: broker, topics, the pipeline scenario, checkpoints, metrics.

Loaded from YAML and validated with pydantic; every mistake becomes a
:class:`~neuralsync.errors.ConfigError` naming the file, the line and the option.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from neuralsync.config import Scenario, load_scenario
from neuralsync.errors import ConfigError

__all__ = [
    "CheckpointConfig",
    "DaemonConfig",
    "MetricsConfig",
    "TopicsConfig",
    "load_daemon_config",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TopicsConfig(_Strict):
    """The topic read and the three written."""

    input: str
    predictions: str
    events: str
    dead_letter: str


class CheckpointConfig(_Strict):
    """Where and how often each partition's state is written together with its offset."""

    #: A directory, or any fsspec URL (``s3://bucket/prefix``, ``memory://x``).
    url: str
    #: Checkpoint a partition after this many of its records...
    every_records: Annotated[int, Field(gt=0)] = 1000
    #: ...or this many seconds after its oldest record not yet checkpointed, whichever first.
    every_seconds: Annotated[float, Field(gt=0.0)] = 30.0
    #: Snapshots kept per partition; a damaged newest falls back to the one before.
    keep: Annotated[int, Field(ge=2)] = 2


class MetricsConfig(_Strict):
    """The Prometheus ``/metrics`` and ``/healthz`` endpoint."""

    enabled: bool = True
    host: str = "127.0.0.1"
    #: 0 picks a free port (logged at start).
    port: Annotated[int, Field(ge=0, lt=65536)] = 9308


class DaemonConfig(_Strict):
    """Everything ``neuralsync serve`` needs.

    Records are JSON objects whose fields are named by the scenario: ``scenario.timestamp``,
    ``scenario.key`` (optional) and the feature and target columns.

    >>> config = DaemonConfig.model_validate({
    ...     "bootstrap_servers": "127.0.0.1:9092", "group_id": "g",
    ...     "topics": {"input": "in", "predictions": "p", "events": "e", "dead_letter": "d"},
    ...     "scenario": {"name": "s", "timestamp": "t", "targets": "y"},
    ...     "checkpoint": {"url": "/tmp/ck"}})
    >>> config.pipeline_scenario().bad_records
    'dead_letter'

    """

    bootstrap_servers: str | list[str]
    group_id: str
    topics: TopicsConfig
    #: The pipeline settings: a scenario YAML (relative to this file) or the mapping itself.
    scenario: str | dict[str, Any]
    #: ``datetime``: timestamps are ISO 8601 strings; ``number``: plain numbers (seconds, steps).
    time_kind: Literal["datetime", "number"] = "datetime"
    checkpoint: CheckpointConfig
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    #: Passed unchanged to kafka-python's consumer and producer: ``security_protocol``,
    #: ``sasl_mechanism``, ``sasl_plain_username``, ``ssl_cafile``, ...
    kafka: dict[str, Any] = Field(default_factory=dict)
    session_timeout_ms: Annotated[int, Field(gt=0)] = 10000
    #: kafka-python leaves the group when ``poll`` is not called for this long. The daemon's
    #: poll loop never trains, so slow training does not count against it.
    max_poll_interval_ms: Annotated[int, Field(gt=0)] = 300000
    max_poll_records: Annotated[int, Field(gt=0)] = 200
    poll_timeout_ms: Annotated[int, Field(gt=0)] = 200
    #: How long the broker may hold a fetch waiting for data: a floor on the latency of a
    #: quiet stream.
    fetch_max_wait_ms: Annotated[int, Field(ge=0)] = 100
    #: A partition with this many records waiting for the worker is paused until it drains.
    max_buffered_records: Annotated[int, Field(gt=0)] = 1000
    #: No record for this long is reported as a stall (log, metric, /healthz): a broker away,
    #: or producers stopped.
    stall_timeout_s: Annotated[float, Field(gt=0.0)] = 60.0
    #: Records larger than this many bytes are dead-lettered unread.
    max_record_bytes: Annotated[int, Field(gt=0)] = 1_000_000
    #: Where relative paths in this configuration are taken from (set by the loader).
    base_dir: Path = Path(".")

    def pipeline_scenario(self) -> Scenario:
        """The scenario that drives each partition's pipeline; bad rows are dead-lettered."""
        if isinstance(self.scenario, str):
            scenario = load_scenario(self.base_dir / self.scenario)
        else:
            raw = {"name": "kafka", **self.scenario}
            try:
                scenario = Scenario.model_validate(raw)
            except ValidationError as exc:
                raise ConfigError(f"option 'scenario': {_messages(exc)}") from None
        return scenario.model_copy(update={"bad_records": "dead_letter"})

    def checkpoint_url(self) -> str:
        """The checkpoint location, a relative directory taken from the config's folder."""
        url = self.checkpoint.url
        if "://" in url or Path(url).is_absolute():
            return url
        return str(self.base_dir / url)


def _messages(exc: ValidationError, lines: dict[str, int] | None = None, origin: str = "") -> str:
    out = []
    for item in exc.errors():
        dotted = ".".join(str(p) for p in item["loc"]) or "(top level)"
        line = (lines or {}).get(dotted) or (lines or {}).get(dotted.rpartition(".")[0])
        where = f"{origin}:{line}: " if line else (f"{origin}: " if origin else "")
        if item["type"] == "missing":
            out.append(f"{where}required option '{dotted}' is missing")
        elif item["type"] == "extra_forbidden":
            out.append(f"{where}unknown option '{dotted}'")
        else:
            out.append(f"{where}option '{dotted}': {item['msg']} (got {item.get('input')!r})")
    return "\n".join(out)


def _key_lines(text: str) -> dict[str, int]:
    lines: dict[str, int] = {}

    def walk(node: yaml.Node, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                dotted = f"{path}.{key_node.value}" if path else str(key_node.value)
                lines[dotted] = key_node.start_mark.line + 1
                walk(value_node, dotted)

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, "")
    return lines


def load_daemon_config(path: str | Path) -> DaemonConfig:
    """Load and validate a daemon YAML; :class:`ConfigError` names the file, line and option."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: daemon configuration not found")
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of options at the top level")
    raw["base_dir"] = path.parent
    try:
        config = DaemonConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_messages(exc, _key_lines(text), str(path))) from None
    config.pipeline_scenario()  # fail now, not at the first assignment
    return config
