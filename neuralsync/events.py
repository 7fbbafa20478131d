"""Structured events: every decision the pipeline takes, as one JSON object.

Each event carries the stream time it refers to and the wall time it was taken at.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Event", "EventBus", "format_stream_time", "json_safe"]


_OWN_FIELDS = frozenset({"type", "stream_time", "wall_time", "position"})


def format_stream_time(timestamp: float | int | None, kind: str) -> str | float | None:
    """Stream time as it is written in events: ISO-8601 for datetimes, the number otherwise.

    >>> format_stream_time(0, "datetime")
    '1970-01-01T00:00:00'
    >>> format_stream_time(12.5, "number")
    12.5

    """
    if timestamp is None:
        return None
    if kind == "datetime":
        return (
            dt.datetime.fromtimestamp(int(timestamp) / 1e9, tz=dt.UTC)
            .replace(tzinfo=None)
            .isoformat()
        )
    return float(timestamp)


def _jsonable(value: Any) -> Any:
    """Plain JSON types for numpy scalars and non-finite floats (JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class Event:
    """One decision: ``type`` says which, ``data`` holds its figures and reasons.

    >>> e = Event("regime_change", position=42, stream_time="2020-01-01T00:00:00",
    ...           data={"key": "AAPL", "detector": "adwin"})
    >>> e.to_dict(wall_time="2026-01-01T00:00:00+00:00")["type"]
    'regime_change'

    """

    type: str
    position: int
    stream_time: str | float | None
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, wall_time: str | None = None) -> dict[str, Any]:
        wall = wall_time or dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        record = {
            "type": self.type,
            "stream_time": self.stream_time,
            "wall_time": wall,
            "position": self.position,
        }
        # A detail may not overwrite the event's own fields: such a detail keeps a prefix.
        for name, value in _jsonable(self.data).items():
            record[f"detail_{name}" if name in _OWN_FIELDS else name] = value
        return record

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=False)


class EventBus:
    """Fan an event out to every subscriber, in subscription order.

    >>> bus = EventBus()
    >>> seen = []
    >>> bus.subscribe(lambda e: seen.append(e.type))
    >>> bus.emit(Event("checkpoint", position=10, stream_time=None))
    >>> seen
    ['checkpoint']

    """

    def __init__(self) -> None:
        self._subscribers: list[Callable[[Event], None]] = []
        self.counts: dict[str, int] = {}

    def subscribe(self, callback: Callable[[Event], None]) -> None:
        self._subscribers.append(callback)

    def emit(self, event: Event) -> None:
        self.counts[event.type] = self.counts.get(event.type, 0) + 1
        for callback in self._subscribers:
            callback(event)


def json_safe(value: Any) -> Any:
    """``value`` with every NaN and infinity replaced by ``None``, at any depth: JSON has no
    such numbers, and a figure that does not exist yet is ``null``.

    >>> json_safe({"mse": float("nan"), "lags": [1.0, float("inf")]})
    {'mse': None, 'lags': [1.0, None]}

    """
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
