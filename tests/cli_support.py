"""Helpers for tests that read a command's output."""

from __future__ import annotations

import json
from typing import Any


def last_json_object(text: str) -> dict[str, Any]:
    """The last top-level JSON object in ``text`` (log lines may come before it)."""
    decoder = json.JSONDecoder()
    for start in reversed([i for i, c in enumerate(text) if c == "{"]):
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict) and not text[end:].strip():
            return value
    raise AssertionError(f"no JSON object at the end of the output:\n{text}")
