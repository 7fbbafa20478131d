"""Plugins by name: sources, sinks and adapters that installed packages register.

``connectors`` registers its CSV and Kafka adapters under the ``neuralsync.sources`` and
``neuralsync.sinks`` entry-point groups (see pyproject.toml), so the core finds them by name
without importing them: the dependency points from connectors to the core, never back.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

from neuralsync.errors import ConfigError, suggest

__all__ = ["load_plugin", "plugin_names"]


def plugin_names(group: str) -> list[str]:
    """Names registered in an entry-point group.

    >>> "csv" in plugin_names("neuralsync.sources")
    True

    """
    return sorted(ep.name for ep in entry_points(group=group))


def load_plugin(group: str, name: str) -> Any:
    """The object registered as ``name`` in ``group``; a :class:`ConfigError` if there is none."""
    for ep in entry_points(group=group):
        if ep.name == name:
            return ep.load()
    names = plugin_names(group)
    installed = ", ".join(names) if names else "none (is neuralsync installed? pip install -e .)"
    raise ConfigError(
        f"no plugin '{name}' in {group}{suggest(name, names)}; installed: {installed}"
    )
