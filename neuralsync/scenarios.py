"""Bundled scenarios: find them by name, list them, and read their true change points."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from neuralsync.config import Scenario
from neuralsync.errors import ConfigError, suggest

__all__ = [
    "bundled_dir",
    "list_scenarios",
    "load_change_point_keys",
    "load_change_points",
    "resolve_scenario",
]


def bundled_dir() -> Path:
    """The folder of bundled scenarios: ``$NEURALSYNC_SCENARIOS``, else ``scenarios/`` of the
    source checkout this package was installed from."""
    override = os.environ.get("NEURALSYNC_SCENARIOS")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent / "scenarios"


def list_scenarios() -> list[tuple[str, str, Path]]:
    """``(name, description, path)`` of every bundled scenario, sorted by name.

    >>> "default" in [name for name, _, _ in list_scenarios()]
    True

    """
    found = []
    for path in sorted(bundled_dir().glob("*.yaml")):
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            raw = {}
        found.append((str(raw.get("name", path.stem)), str(raw.get("description", "")), path))
    return found


def resolve_scenario(name_or_path: str | Path) -> Path:
    """A scenario YAML from a path, or from the name of a bundled scenario."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: scenario file not found")
        return path
    names = {name: p for name, _, p in list_scenarios()}
    if str(name_or_path) in names:
        return names[str(name_or_path)]
    raise ConfigError(
        f"no scenario '{name_or_path}': not a file and not a bundled scenario"
        f"{suggest(str(name_or_path), names)}; bundled: {', '.join(sorted(names)) or 'none'}"
    )


def _parse_time(value: Any, origin: str) -> int | float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    try:
        return int(pd.Timestamp(value).tz_localize(None).value)
    except (ValueError, TypeError):
        raise ConfigError(
            f"{origin}: change point {value!r} is neither a number nor a date"
        ) from None


def load_change_points(scenario: Scenario) -> list[int | float] | None:
    """True change points as stream times (ns since the epoch for dates), or ``None``.

    Accepts a list in the scenario, or a JSON file holding a list or
    ``{"change_points": [{"timestamp": ...}, ...]}``.
    """
    entries = _change_point_entries(scenario)
    return None if entries is None else [time for time, _ in entries]


def load_change_point_keys(scenario: Scenario) -> list[str | None] | None:
    """The key each true change point happens to (its entry's ``"key"``; ``None`` where an
    entry names none), in the order of :func:`load_change_points`; ``None`` without any."""
    entries = _change_point_entries(scenario)
    return None if entries is None else [key for _, key in entries]


def _change_point_entries(scenario: Scenario) -> list[tuple[int | float, str | None]] | None:
    spec = scenario.change_points
    if spec is None:
        return None
    origin = "option 'change_points'"
    if isinstance(spec, Path):
        origin = str(spec)
        if not spec.is_file():
            raise ConfigError(f"{spec}: change-point file not found")
        try:
            spec = json.loads(spec.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{origin}:{exc.lineno}: malformed JSON: {exc.msg}") from None
    if isinstance(spec, dict):
        spec = spec.get("change_points")
    if not isinstance(spec, list):
        raise ConfigError(
            f"{origin}: expected a list of change points or "
            '{"change_points": [{"timestamp": ...}, ...]}'
        )
    entries = []
    for entry in spec:
        value = entry.get("timestamp") if isinstance(entry, dict) else entry
        key = entry.get("key") if isinstance(entry, dict) else None
        entries.append((_parse_time(value, origin), None if key is None else str(key)))
    return sorted(entries, key=lambda entry: entry[0])
