"""Per-partition checkpoints: a partition's whole state and the offset it covers, in one file.

The layout is ``ROOT/TOPIC-PARTITION/state-OFFSET.pt`` (OFFSET: the next offset to consume,
twelve digits), each file a :mod:`neuralsync.state` snapshot, so ``neuralsync inspect ROOT``
reads it without this package. ``ROOT`` is a directory (written atomically: temporary file,
fsync, rename) or any fsspec URL (one object PUT, which object stores make atomic). The newest
``keep`` snapshots of a partition are kept; a damaged newest falls back to the one before.
"""

from __future__ import annotations

import io
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import torch

from neuralsync.errors import CheckpointError
from neuralsync.state import FORMAT_VERSION, CheckpointStore, load_snapshot

__all__ = ["WRITE_PAUSE_ENV", "PartitionCheckpoints"]

log = logging.getLogger("neuralsync.kafka")
_NAME = re.compile(r"^state-(\d{12})\.pt$")
_TEMPORARY = re.compile(r"^\.state-\d{12}\.pt\.tmp-")
#: For crash tests only: seconds to pause half way through writing a local checkpoint, so a
#: test can kill the daemon while a torn temporary file is on disk.
WRITE_PAUSE_ENV = "NEURALSYNC_KAFKA_CHECKPOINT_WRITE_PAUSE_S"
_PARTITION = re.compile(r"^(.+)-(\d+)$")


class PartitionCheckpoints:
    """Checkpoints of every partition under one root.

    Examples
    --------
    >>> import tempfile, torch
    >>> store = PartitionCheckpoints(tempfile.mkdtemp())
    >>> _ = store.save("prices", 0, 10, {"w": torch.zeros(1)})
    >>> _ = store.save("prices", 0, 20, {"w": torch.ones(1)})
    >>> store.latest("prices", 0)["offset"], store.latest("prices", 1)
    (20, None)

    """

    def __init__(self, url: str, keep: int = 2):
        self.url = str(url)
        self.keep = keep
        self.remote = "://" in self.url and not self.url.startswith("file://")
        if self.remote:
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(self.url)
        else:
            self.root = self.url.removeprefix("file://")

    def _local(self, topic: str, partition: int) -> CheckpointStore:
        return CheckpointStore(Path(self.root) / f"{topic}-{partition}", keep=self.keep)

    def _write_local(self, topic: str, partition: int, offset: int, data: bytes) -> str:
        """Write ``data`` atomically: temporary file, fsync, rename, fsync of the folder.

        A crash at any point leaves the previous snapshots intact and at worst a torn
        temporary file, which no reader takes for a snapshot and :meth:`latest` removes.
        """
        folder = Path(self.root) / f"{topic}-{partition}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"state-{offset:012d}.pt"
        temporary = folder / f".{path.name}.tmp-{os.getpid()}"
        pause = float(os.environ.get(WRITE_PAUSE_ENV) or 0)
        try:
            with open(temporary, "wb") as handle:
                if pause:
                    handle.write(data[: len(data) // 2])
                    handle.flush()
                    time.sleep(pause)
                    data = data[len(data) // 2 :]
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)  # make the rename itself durable
        finally:
            os.close(descriptor)
        return str(path)

    def _folder(self, topic: str, partition: int) -> str:
        return f"{self.root.rstrip('/')}/{topic}-{partition}"

    def names(self, topic: str, partition: int) -> list[str]:
        """Snapshot paths of a partition, newest first."""
        if not self.remote:
            return [str(p) for p in self._local(topic, partition).paths()]
        folder = self._folder(topic, partition)
        if not self.fs.exists(folder):
            return []
        found = [p for p in self.fs.ls(folder, detail=False) if _NAME.match(p.rsplit("/", 1)[-1])]
        return sorted(found, key=lambda p: p.rsplit("/", 1)[-1], reverse=True)

    def partitions(self) -> list[tuple[str, int]]:
        """The (topic, partition) pairs that have a folder under the root."""
        if self.remote:
            if not self.fs.exists(self.root):
                return []
            entries = [
                p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False)
            ]
        else:
            root = Path(self.root)
            entries = [p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
        found = []
        for name in entries:
            match = _PARTITION.match(name)
            if match:
                found.append((match.group(1), int(match.group(2))))
        return sorted(found)

    def save(self, topic: str, partition: int, offset: int, state: dict[str, Any]) -> str:
        """Write ``state`` as the checkpoint covering offsets ``[0, offset)``; return its path."""
        snapshot = {"topic": topic, "partition": partition, "offset": offset, **state}
        buffer = io.BytesIO()
        torch.save({"format_version": FORMAT_VERSION, **snapshot}, buffer)
        if not self.remote:
            path = self._write_local(topic, partition, offset, buffer.getvalue())
            for old in self._local(topic, partition).paths()[self.keep :]:
                old.unlink(missing_ok=True)
            return path
        path = f"{self._folder(topic, partition)}/state-{offset:012d}.pt"
        self.fs.makedirs(self._folder(topic, partition), exist_ok=True)
        self.fs.pipe_file(path, buffer.getvalue())
        for old in self.names(topic, partition)[self.keep :]:
            self.fs.rm_file(old)
        return path

    def _load(self, path: str) -> dict[str, Any]:
        if not self.remote:
            return load_snapshot(Path(path))
        try:
            state = torch.load(io.BytesIO(self.fs.cat_file(path)), weights_only=True)
        except Exception as exc:  # torch raises many types for a torn or foreign file
            raise CheckpointError(f"{path}: cannot read the checkpoint ({exc})") from None
        if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"{path}: not a NeuralSync checkpoint of format {FORMAT_VERSION}")
        return state

    def latest(self, topic: str, partition: int) -> dict[str, Any] | None:
        """The newest readable checkpoint of a partition, ``None`` when it has none.

        Damaged snapshots newer than the one returned are deleted: they describe offsets that
        are about to be processed again, and left in place they would count towards ``keep``
        and have pruning delete good ones instead.
        """
        if not self.remote:
            # Left by a writer killed mid-write; the partition is ours now, so no one else
            # is writing them.
            folder = Path(self.root) / f"{topic}-{partition}"
            for stale in folder.glob(".state-*") if folder.is_dir() else []:
                if _TEMPORARY.match(stale.name):
                    log.warning("removing %s, left by a checkpoint write cut short", stale)
                    stale.unlink(missing_ok=True)
        damaged = []
        for path in self.names(topic, partition):
            try:
                state = self._load(path)
            except CheckpointError as exc:
                log.warning("skipping a damaged checkpoint: %s", exc)
                damaged.append(path)
                continue
            for bad in damaged:
                self._remove(bad)
            state["path"] = path
            return state
        if damaged:
            log.warning(
                "%s-%d: no readable checkpoint (%d damaged); starting the partition afresh",
                topic,
                partition,
                len(damaged),
            )
            for bad in damaged:
                self._remove(bad)
        return None

    def _remove(self, path: str) -> None:
        if self.remote:
            self.fs.rm_file(path)
        else:
            Path(path).unlink(missing_ok=True)
