"""CSV files: a chunked, resumable, optionally paced source, and a resumable prediction sink."""

from __future__ import annotations

import csv
import io
import math
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from neuralsync.base import Batch, Prediction, PredictionSink, Source
from neuralsync.errors import DataError
from neuralsync.files import ResumableFile
from neuralsync.sources import check_columns, frame_to_batch

__all__ = ["CSVPredictionSink", "CSVSource"]


class CSVSource(Source):
    """Stream a CSV file in chunks, as fast as possible or at a multiple of real time.

    Cells are read as text and parsed by :func:`neuralsync.sources.frame_to_batch`, so a bad
    cell is reported with its file, line and column. Blank lines are skipped.

    Parameters
    ----------
    path
        The CSV file; its first line is the header.
    timestamp, columns, key
        The timestamp column, the numeric columns to read, and the optional key column.
    chunk_size
        Rows read at a time.
    realtime_factor
        Stream seconds replayed per wall second (``None``: as fast as possible). Needs
        datetime or numeric-seconds timestamps.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "prices.csv"
    >>> _ = path.write_text("time,price\\n2024-01-01,1.0\\n2024-01-02,1.5\\n2024-01-03,2.0\\n")
    >>> source = CSVSource(path, timestamp="time", columns=["price"], chunk_size=2)
    >>> [b.values[:, 0].tolist() for b in source]
    [[1.0, 1.5], [2.0]]
    >>> source.seek(2)
    >>> [b.origin(0) for b in source]
    ['...prices.csv:4']

    """

    def __init__(
        self,
        path: str | Path,
        *,
        timestamp: str,
        columns: Sequence[str],
        key: str | None = None,
        timestamp_format: str | None = None,
        chunk_size: int = 4096,
        realtime_factor: float | None = None,
    ):
        self.path = Path(path)
        self.timestamp = timestamp
        self.columns = list(columns)
        self.key = key
        self.timestamp_format = timestamp_format
        self.chunk_size = chunk_size
        self.realtime_factor = realtime_factor
        self.position = 0
        self.time_kind: str | None = None
        self.header_ = self._read_header()
        check_columns(self.header_, self._wanted(), f"{self.path}:1")

    def _wanted(self) -> list[str]:
        return [self.timestamp, *self.columns, *([self.key] if self.key else [])]

    def _read_header(self) -> list[str]:
        if not self.path.is_file():
            raise DataError("file not found", str(self.path))
        try:
            header = pd.read_csv(self.path, nrows=0, dtype=str).columns
        except pd.errors.EmptyDataError:
            raise DataError(
                "the file is empty; expected a header line naming the columns, "
                "then one row per line",
                str(self.path),
            ) from None
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read the header: {exc}", f"{self.path}:1") from None
        return [str(c) for c in header]

    def seek(self, position: int) -> None:
        self.position = position

    def total_rows(self) -> int:
        with open(self.path, "rb") as handle:
            lines = sum(chunk.count(b"\n") for chunk in iter(lambda: handle.read(1 << 20), b""))
            handle.seek(-1, os.SEEK_END)
            if handle.read(1) != b"\n":
                lines += 1
        return max(lines - 1, 0)

    def __iter__(self) -> Iterator[Batch]:
        reader = pd.read_csv(
            self.path,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            chunksize=self.chunk_size,
            skip_blank_lines=False,
        )
        line = 2  # the header is line 1
        rows_seen = 0
        yielded = 0
        started: tuple[float, float] | None = None
        try:
            for chunk in reader:
                # All columns are read (not ``usecols``) so that a row with more cells than the
                # header is an error, not silently cut to the header's width.
                chunk = chunk.loc[:, chunk.columns.isin(self._wanted())]
                lines = np.arange(line, line + len(chunk))
                line += len(chunk)
                blank = (chunk == "").all(axis=1).to_numpy()
                chunk, lines = chunk[~blank], lines[~blank]
                skip = min(max(self.position - rows_seen, 0), len(chunk))
                rows_seen += len(chunk)
                chunk, lines = chunk.iloc[skip:], lines[skip:]
                if chunk.empty:
                    continue
                batch = frame_to_batch(
                    chunk,
                    timestamp=self.timestamp,
                    columns=self.columns,
                    key=self.key,
                    timestamp_format=self.timestamp_format,
                    time_kind=self.time_kind,
                    origins=lines,
                    source_name=str(self.path),
                )
                self.time_kind = batch.time_kind
                self.position = rows_seen
                yielded += len(batch)
                if self.realtime_factor is None:
                    yield batch
                else:
                    for i in range(len(batch)):
                        started = self._pace(batch.timestamps[i], started)
                        yield batch.slice(i, i + 1)
        except pd.errors.ParserError as exc:
            ragged = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
            if ragged:
                fields, at, saw = ragged.groups()
                raise DataError(
                    f"malformed CSV: {saw} cells in this row, expected {fields} as in the header",
                    f"{self.path}:{at}",
                ) from None
            raise DataError(f"malformed CSV: {str(exc).strip()}", str(self.path)) from None
        finally:  # also when the reader stops early (a limit, a stop request)
            reader.close()
        if rows_seen == 0:
            raise DataError("the file has a header but no data rows", str(self.path))

    def _pace(self, timestamp: float, started: tuple[float, float] | None) -> tuple[float, float]:
        seconds = float(timestamp) / 1e9 if self.time_kind == "datetime" else float(timestamp)
        if math.isnan(seconds):
            return started or (time.monotonic(), 0.0)
        if started is None:
            return time.monotonic(), seconds
        wall_start, stream_start = started
        due = wall_start + (seconds - stream_start) / self.realtime_factor
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return started


class CSVPredictionSink(PredictionSink):
    """Append forecasts to a CSV file; its byte position lets a resumed run cut what came after
    the checkpoint, so a resumed file equals an uninterrupted one.

    Columns: ``issued_at, timestamp, key, target, step, prediction, truth, last_value``
    (``timestamp`` is the time of the truth; floats are written exactly, with ``repr``).
    """

    HEADER = (
        "issued_at",
        "timestamp",
        "key",
        "target",
        "step",
        "prediction",
        "truth",
        "last_value",
    )

    def __init__(self, path: str | Path, *, append: bool = False):
        self.path = Path(path)
        exists = self.path.exists() and self.path.stat().st_size > 0
        self._file = ResumableFile(self.path, append=append)
        if not (append and exists):
            self._file.write(",".join(self.HEADER) + "\n")

    def write(self, predictions: list[Prediction]) -> None:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        for p in predictions:
            writer.writerow(
                (
                    _cell(p.issued_at),
                    _cell(p.timestamp),
                    p.key or "",
                    p.target,
                    p.step,
                    repr(p.prediction),
                    "" if math.isnan(p.truth) else repr(p.truth),
                    repr(p.last_value),
                )
            )
        self._file.write(buffer.getvalue())

    def flush(self) -> None:
        self._file.flush()

    def position(self) -> int:
        return self._file.position()

    def truncate(self, position: int) -> None:
        self._file.truncate(position)

    def close(self) -> None:
        self._file.close()


def _cell(value: object) -> str:
    if value is None:
        return ""
    return repr(value) if isinstance(value, float) else str(value)
