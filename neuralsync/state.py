"""The state snapshot: one file holding everything that changes, written atomically.

A snapshot is a dict of tensors and plain values saved with :func:`torch.save` and loaded with
``weights_only=True``, so loading never runs pickled code. :class:`CheckpointStore` keeps the
newest few in a directory and falls back to an older one when the newest is damaged.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuralsync.errors import CheckpointError

__all__ = ["FORMAT_VERSION", "CheckpointStore", "load_snapshot", "save_snapshot", "state_digest"]

FORMAT_VERSION = 1
_NAME = re.compile(r"^state-(\d{12})\.pt$")


def save_snapshot(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file, fsync, then rename.

    A crash at any point leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            torch.save({"format_version": FORMAT_VERSION, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)  # a failed write leaves no torn temporary behind
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def load_snapshot(path: Path) -> dict[str, Any]:
    """Load a snapshot without unpickling code; :class:`CheckpointError` if it is damaged."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a torn or foreign file
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a NeuralSync checkpoint of format {FORMAT_VERSION}")
    return state


def state_digest(value: Any) -> str:
    """A SHA-256 of a snapshot's content: equal digests mean bit-identical state.

    >>> import torch
    >>> state_digest({"w": torch.ones(2), "n": 3}) == state_digest({"n": 3, "w": torch.ones(2)})
    True
    >>> state_digest({"w": torch.ones(2)}) == state_digest({"w": torch.zeros(2)})
    False

    """
    digest = hashlib.sha256()

    def feed(item: Any) -> None:
        if isinstance(item, torch.Tensor):
            tensor = item.detach().cpu().contiguous()
            digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
            # reshape first: a 0-d tensor (e.g. Adam's step count) cannot be viewed as bytes
            flat = tensor.reshape(-1)
            digest.update(flat.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        elif isinstance(item, np.ndarray) and item.dtype != object:
            # every byte, not repr(): repr rounds floats and elides long arrays with "..."
            array = np.ascontiguousarray(item)
            digest.update(f"A{array.dtype.str}{array.shape}".encode())
            digest.update(array.tobytes())
        elif isinstance(item, dict):
            digest.update(b"{")
            for key in sorted(item, key=repr):
                feed(key)
                feed(item[key])
            digest.update(b"}")
        elif isinstance(item, list | tuple):
            digest.update(b"[")
            for element in item:
                feed(element)
            digest.update(b"]")
        else:
            digest.update(f"{type(item).__name__}:{item!r};".encode())

    feed(value)
    return digest.hexdigest()


class CheckpointStore:
    """A directory of snapshots named by stream position; the newest ``keep`` are kept.

    Examples
    --------
    >>> import tempfile, torch
    >>> store = CheckpointStore(tempfile.mkdtemp())
    >>> _ = store.save({"position": 10, "w": torch.zeros(1)}, position=10)
    >>> _ = store.save({"position": 20, "w": torch.ones(1)}, position=20)
    >>> store.latest()["position"]
    20

    """

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory)
        self.keep = keep
        self.skipped_: list[str] = []

    def paths(self) -> list[Path]:
        """Snapshot files, newest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.iterdir() if _NAME.match(p.name)]
        return sorted(found, key=lambda p: p.name, reverse=True)

    def save(self, state: dict[str, Any], position: int) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"state-{position:012d}.pt"
        save_snapshot(state, path)
        for old in self.paths()[self.keep :]:
            old.unlink(missing_ok=True)
        return path

    def latest(self) -> dict[str, Any]:
        """The newest readable snapshot; damaged newer ones are skipped and named in
        ``skipped_``. :class:`CheckpointError` when there is none."""
        self.skipped_ = []
        for path in self.paths():
            try:
                state = load_snapshot(path)
            except CheckpointError as exc:
                self.skipped_.append(str(exc))
                continue
            state["path"] = str(path)
            return state
        detail = f" ({'; '.join(self.skipped_)})" if self.skipped_ else ""
        raise CheckpointError(f"{self.directory}: no readable checkpoint{detail}")
