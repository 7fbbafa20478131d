"""In-memory sources (pandas frames, iterables of rows) and the parsing every source shares.

File and broker sources live in ``connectors/``; they parse with :func:`frame_to_batch` too,
so a bad cell reads the same wherever it came from.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from neuralsync.base import Batch, Source
from neuralsync.errors import ConfigError, DataError, suggest

if TYPE_CHECKING:
    from neuralsync.config import Scenario

__all__ = ["MISSING_TOKENS", "DataFrameSource", "IterableSource", "frame_to_batch"]

#: Cell texts read as a missing value (then handled by the scenario's ``missing`` policy).
MISSING_TOKENS = frozenset({"", "na", "nan", "null", "none", "n/a", "#n/a"})


def _numeric_column(cells: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Float values of a column and a mask of cells that are present but not numbers."""
    if pd.api.types.is_numeric_dtype(cells) and not pd.api.types.is_bool_dtype(cells):
        return cells.to_numpy(dtype=np.float64, na_value=np.nan), np.zeros(len(cells), bool)
    numbers = pd.to_numeric(cells, errors="coerce")
    text = cells.astype("string").str.strip().str.lower()
    present = cells.notna().to_numpy() & ~text.isin(MISSING_TOKENS).fillna(True).to_numpy()
    values = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
    return values, present & np.isnan(values)


def _time_kind(cells: pd.Series, fmt: str | None) -> str:
    """``"datetime"`` for a datetime column, a given format, or cells that are mostly dates;
    else ``"number"``. A few unreadable cells do not decide it: they are bad records."""
    if fmt is not None or pd.api.types.is_datetime64_any_dtype(cells):
        return "datetime"
    numbers = pd.to_numeric(cells, errors="coerce")
    numeric = int(numbers.notna().sum())
    if numeric == len(cells) or numeric == 0:
        return "number" if numeric else "datetime"
    dates = pd.to_datetime(cells[numbers.isna()], format="mixed", errors="coerce", utc=True)
    return "number" if numeric > int(dates.notna().sum()) else "datetime"


def _parse_timestamps(
    cells: pd.Series, time_kind: str | None, fmt: str | None
) -> tuple[np.ndarray, np.ndarray, str]:
    """Timestamps as int64 ns (datetimes) or float64 (numbers), a mask of unparseable cells,
    and the time kind (decided on the first batch and kept for the whole stream)."""
    if time_kind is None:
        time_kind = _time_kind(cells, fmt)
    if time_kind == "number":
        values = pd.to_numeric(cells, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
        return values, np.isnan(values), time_kind
    if pd.api.types.is_datetime64_any_dtype(cells):
        parsed = cells
    else:
        parsed = pd.to_datetime(cells, format=fmt or "mixed", errors="coerce", utc=True)
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    bad = parsed.isna().to_numpy()
    values = parsed.astype("datetime64[ns]").to_numpy().astype("datetime64[ns]").view(np.int64)
    return values, bad, time_kind


def frame_to_batch(
    frame: pd.DataFrame,
    *,
    timestamp: str,
    columns: Sequence[str],
    key: str | None = None,
    timestamp_format: str | None = None,
    time_kind: str | None = None,
    origins: np.ndarray | None = None,
    source_name: str = "frame",
) -> Batch:
    """Parse a frame (numbers or raw text cells) into a :class:`~neuralsync.base.Batch`.

    Unparseable cells do not raise here: their rows are listed in ``Batch.errors`` with the
    reason, and the pipeline applies the scenario's bad-record policy.

    Examples
    --------
    >>> import pandas as pd
    >>> frame = pd.DataFrame({"t": ["2024-01-01", "2024-01-02"], "y": ["1.5", "oops"]})
    >>> batch = frame_to_batch(frame, timestamp="t", columns=["y"], source_name="demo.csv",
    ...                        origins=np.array([2, 3]))
    >>> batch.values[0, 0], batch.errors[1][0]
    (np.float64(1.5), "non-numeric value 'oops' in column 'y'; expected a number")

    """
    values = np.empty((len(frame), len(columns)), dtype=np.float64)
    errors: dict[int, tuple[str, str]] = {}

    def raw(i: int) -> str:
        return ",".join("" if pd.isna(v) else str(v) for v in frame.iloc[i].tolist())

    times, bad_times, time_kind = _parse_timestamps(frame[timestamp], time_kind, timestamp_format)
    expected = (
        f"format {timestamp_format!r}"
        if timestamp_format
        else ("a number" if time_kind == "number" else "a date and time")
    )
    for i in np.flatnonzero(bad_times):
        cell = frame[timestamp].iloc[i]
        errors[int(i)] = (
            f"cannot read timestamp {cell!r} in column '{timestamp}'; expected {expected}",
            raw(int(i)),
        )
    for j, column in enumerate(columns):
        values[:, j], bad = _numeric_column(frame[column])
        for i in np.flatnonzero(bad):
            errors.setdefault(
                int(i),
                (
                    f"non-numeric value {frame[column].iloc[i]!r} in column '{column}'; "
                    "expected a number",
                    raw(int(i)),
                ),
            )
    keys = None if key is None else frame[key].astype(str).to_numpy(dtype=object)
    return Batch(
        columns=list(columns),
        values=values,
        timestamps=times,
        keys=keys,
        origins=origins,
        errors=errors,
        source_name=source_name,
        time_kind=time_kind,
    )


def check_columns(available: Sequence[str], wanted: Sequence[str], where: str) -> None:
    """Raise a :class:`ConfigError` naming the first wanted column that is not available."""
    for column in wanted:
        if column not in available:
            raise ConfigError(
                f"{where}: column '{column}' named in the scenario is not in the data"
                f"{suggest(column, available)}; columns present: {', '.join(available)}"
            )


class DataFrameSource(Source):
    """Replay a pandas DataFrame in batches of ``chunk_size`` rows.

    Examples
    --------
    >>> import pandas as pd
    >>> frame = pd.DataFrame({"t": [1, 2, 3], "y": [0.1, 0.2, 0.3]})
    >>> source = DataFrameSource(frame, timestamp="t", columns=["y"], chunk_size=2)
    >>> [len(b) for b in source]
    [2, 1]
    >>> source.seek(2)
    >>> [b.values[:, 0].tolist() for b in source]
    [[0.3]]

    """

    def __init__(
        self,
        frame: pd.DataFrame,
        *,
        timestamp: str,
        columns: Sequence[str],
        key: str | None = None,
        timestamp_format: str | None = None,
        chunk_size: int = 4096,
        name: str = "frame",
    ):
        check_columns(list(frame.columns), [timestamp, *columns, *([key] if key else [])], name)
        self.frame = frame
        self.timestamp = timestamp
        self.columns = list(columns)
        self.key = key
        self.timestamp_format = timestamp_format
        self.chunk_size = chunk_size
        self.name = name
        self.position = 0
        self.time_kind: str | None = None

    @classmethod
    def for_scenario(
        cls, frame: pd.DataFrame, scenario: Scenario, **options: Any
    ) -> DataFrameSource:
        """Read ``frame`` the way ``scenario`` reads its CSV: same columns, key and timestamps."""
        return cls(
            frame,
            timestamp=scenario.timestamp,
            columns=scenario.inputs,
            key=scenario.key,
            timestamp_format=scenario.timestamp_format,
            name=options.pop("name", scenario.name),
            **options,
        )

    def seek(self, position: int) -> None:
        self.position = position

    def total_rows(self) -> int:
        return len(self.frame)

    def __iter__(self) -> Iterator[Batch]:
        for start in range(self.position, len(self.frame), self.chunk_size):
            chunk = self.frame.iloc[start : start + self.chunk_size]
            batch = frame_to_batch(
                chunk,
                timestamp=self.timestamp,
                columns=self.columns,
                key=self.key,
                timestamp_format=self.timestamp_format,
                time_kind=self.time_kind,
                origins=np.arange(start, start + len(chunk)),
                source_name=f"{self.name} row",
            )
            self.time_kind = batch.time_kind
            self.position = start + len(chunk)
            yield batch


class IterableSource(Source):
    """Replay any iterable of mappings (e.g. decoded JSON records), ``batch_size`` at a time.

    A record that lacks a field gets a missing value there (handled by the missing policy).

    Examples
    --------
    >>> rows = [{"t": i, "y": float(i)} for i in range(5)]
    >>> source = IterableSource(rows, timestamp="t", columns=["y"], batch_size=4)
    >>> [len(b) for b in source]
    [4, 1]

    """

    def __init__(
        self,
        rows: Iterable[Mapping[str, Any]],
        *,
        timestamp: str,
        columns: Sequence[str],
        key: str | None = None,
        timestamp_format: str | None = None,
        batch_size: int = 256,
        name: str = "record",
    ):
        self.rows = rows
        self.timestamp = timestamp
        self.columns = list(columns)
        self.key = key
        self.timestamp_format = timestamp_format
        self.batch_size = batch_size
        self.name = name
        self.skip = 0
        self.time_kind: str | None = None

    def seek(self, position: int) -> None:
        self.skip = position

    def __iter__(self) -> Iterator[Batch]:
        fields = [self.timestamp, *self.columns, *([self.key] if self.key else [])]
        buffer: list[Mapping[str, Any]] = []
        index = 0
        for index, row in enumerate(self.rows):
            if index < self.skip:
                continue
            if not isinstance(row, Mapping):
                raise DataError(
                    f"expected a mapping of field names to values, got {type(row).__name__}",
                    f"{self.name} {index}",
                )
            buffer.append(row)
            if len(buffer) == self.batch_size:
                yield self._batch(buffer, index - len(buffer) + 1, fields)
                buffer = []
        if buffer:
            yield self._batch(buffer, index - len(buffer) + 1, fields)

    def _batch(self, rows: list[Mapping[str, Any]], first: int, fields: list[str]) -> Batch:
        frame = pd.DataFrame(
            [{f: r.get(f) for f in fields} for r in rows], columns=fields, dtype=object
        )
        batch = frame_to_batch(
            frame,
            timestamp=self.timestamp,
            columns=self.columns,
            key=self.key,
            timestamp_format=self.timestamp_format,
            time_kind=self.time_kind,
            origins=np.arange(first, first + len(rows)),
            source_name=self.name,
        )
        self.time_kind = batch.time_kind
        return batch
