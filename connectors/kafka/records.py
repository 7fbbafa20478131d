"""Kafka record values → validated rows, or the reason they are dead-lettered.

A record is a JSON object holding the scenario's timestamp, key, feature and target fields.
Anything else (bytes that are not UTF-8 JSON, a missing field, a string where a number is
expected, NaN or infinity, an oversized payload) is a :class:`PoisonRecord` whose message
goes into the dead-letter record's ``reason`` header.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from neuralsync.config import Scenario

__all__ = ["PoisonRecord", "RecordDecoder", "Row"]


class PoisonRecord(ValueError):
    """A record that cannot be used; the message says what was wrong and what was expected."""


@dataclass(frozen=True)
class Row:
    """One decoded record: its key, its timestamp (ns since the epoch or a plain number) and
    its input values in the scenario's input order."""

    key: str
    timestamp: int | float
    values: np.ndarray


class RecordDecoder:
    """Decodes record values with the field names of a scenario.

    Examples
    --------
    >>> from neuralsync.config import Scenario
    >>> decode = RecordDecoder(Scenario(name="s", timestamp="t", targets="y", key="k"),
    ...                        time_kind="number")
    >>> decode(b'{"t": 1, "k": "a", "y": 2.5}')
    Row(key='a', timestamp=1.0, values=array([2.5]))
    >>> decode(b'{"t": 1, "k": "a", "y": "2.5"}')
    Traceback (most recent call last):
    ...
    connectors.kafka.records.PoisonRecord: field 'y': expected a number, got str '2.5'

    """

    def __init__(self, scenario: Scenario, time_kind: str = "datetime", max_bytes: int = 1_000_000):
        self.timestamp = scenario.timestamp
        self.key = scenario.key
        self.inputs = scenario.inputs
        self.time_kind = time_kind
        self.max_bytes = max_bytes

    def __call__(self, raw: bytes | None) -> Row:
        if raw is None:
            raise PoisonRecord("empty record (a tombstone); expected a JSON object")
        if len(raw) > self.max_bytes:
            raise PoisonRecord(f"record of {len(raw)} bytes; the limit is {self.max_bytes}")
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise PoisonRecord(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except (json.JSONDecodeError, RecursionError) as exc:
            raise PoisonRecord(f"invalid JSON: {exc}") from None
        if not isinstance(record, dict):
            raise PoisonRecord(f"expected a JSON object, got {type(record).__name__}")
        key = ""
        if self.key is not None:
            key = self._key(record)
        timestamp = self._timestamp(record)
        values = np.empty(len(self.inputs))
        for j, name in enumerate(self.inputs):
            values[j] = self._number(record, name)
        return Row(key, timestamp, values)

    def _field(self, record: dict[str, Any], name: str) -> Any:
        if name not in record:
            raise PoisonRecord(f"field '{name}' is missing")
        return record[name]

    def _key(self, record: dict[str, Any]) -> str:
        value = self._field(record, self.key)
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise PoisonRecord(
                f"field '{self.key}': expected a string key, got {type(value).__name__}"
            )
        return str(value)

    def _number(self, record: dict[str, Any], name: str) -> float:
        value = self._field(record, name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise PoisonRecord(
                f"field '{name}': expected a number, got {type(value).__name__} {value!r}"[:200]
            )
        try:
            number = float(value)
        except OverflowError:
            raise PoisonRecord(f"field '{name}': {value} does not fit a float") from None
        if not math.isfinite(number):
            raise PoisonRecord(f"field '{name}': {value}; expected a finite number")
        return number

    def _timestamp(self, record: dict[str, Any]) -> int | float:
        name = self.timestamp
        value = self._field(record, name)
        if self.time_kind == "number":
            return self._number(record, name)
        if not isinstance(value, str):
            raise PoisonRecord(
                f"field '{name}': expected an ISO 8601 time string, got {type(value).__name__}"
            )
        try:
            stamp = pd.Timestamp(value)
        except (ValueError, OverflowError, TypeError) as exc:
            raise PoisonRecord(f"field '{name}': {value!r} is not a time ({exc})"[:200]) from None
        if stamp is pd.NaT:
            raise PoisonRecord(f"field '{name}': {value!r} is not a time")
        if stamp.tzinfo is not None:
            stamp = stamp.tz_convert("UTC").tz_localize(None)
        return int(stamp.value)
