"""Output files a run appends to and can cut back to a checkpointed byte position."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["ResumableFile"]


class ResumableFile:
    """A text file written at its end whose byte position can be saved and returned to.

    A checkpoint notes :meth:`position` after :meth:`flush` (which fsyncs); a resumed run
    :meth:`truncate`\\ s back to it, so the file ends equal to one never interrupted.

    Examples
    --------
    >>> import pathlib, tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "out.txt"
    >>> out = ResumableFile(path, append=False)
    >>> out.write("kept\\n")
    >>> mark = out.position()
    >>> out.write("cut\\n")
    >>> out.truncate(mark)
    >>> out.close()
    >>> path.read_text()
    'kept\\n'

    """

    def __init__(self, path: str | Path, *, append: bool):
        self.path = Path(path)
        self._file = open(self.path, "a" if append else "w", newline="", encoding="utf-8")  # noqa: SIM115

    def write(self, text: str) -> None:
        self._file.write(text)

    def flush(self) -> None:
        """Write everything through to the disk (fsync)."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def position(self) -> int:
        self._file.flush()
        return self._file.tell()

    def truncate(self, position: int) -> None:
        self._file.flush()
        self._file.truncate(position)
        self._file.seek(position)

    def close(self) -> None:
        self._file.close()
