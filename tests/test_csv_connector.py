"""Tests for :mod:`connectors.csv_files`: the chunked, resumable, paced CSV source and the sink."""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from connectors.csv_files import CSVPredictionSink, CSVSource
from neuralsync.base import Batch, Prediction
from neuralsync.errors import ConfigError, DataError

HEADER = "time,sym,x,y\n"


def _rows(n: int) -> list[str]:
    stamps = pd.date_range("2024-01-01", periods=n, freq="h")
    return [
        f"{t:%Y-%m-%d %H:%M:%S},{'ab'[i % 2]},{i * 0.5},{i * i}\n" for i, t in enumerate(stamps)
    ]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _source(path: Path, **options) -> CSVSource:
    return CSVSource(path, timestamp="time", columns=["y", "x"], key="sym", **options)


def _concat(batches: list[Batch]) -> dict[str, np.ndarray]:
    return {
        "values": np.concatenate([b.values for b in batches]),
        "timestamps": np.concatenate([b.timestamps for b in batches]),
        "origins": np.concatenate([b.origins for b in batches]),
        "keys": np.concatenate([b.keys for b in batches]),
    }


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return _write(tmp_path / "data.csv", HEADER + "".join(_rows(25)))


# -- reading ------------------------------------------------------------------------------------


def test_reads_values_timestamps_keys_and_line_numbers(data):
    (batch,) = list(_source(data))
    assert batch.columns == ["y", "x"]
    np.testing.assert_array_equal(batch.values[:, 0], np.arange(25.0) ** 2)
    np.testing.assert_array_equal(batch.values[:, 1], np.arange(25) * 0.5)
    expected = pd.date_range("2024-01-01", periods=25, freq="h").as_unit("ns").asi8
    np.testing.assert_array_equal(batch.timestamps, expected)
    assert batch.time_kind == "datetime"
    assert batch.keys.tolist() == list("ab" * 12 + "a")
    np.testing.assert_array_equal(batch.origins, np.arange(2, 27))
    assert batch.origin(0) == f"{data}:2"
    assert batch.errors == {}


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_chunk_size_does_not_change_the_stream(data, chunk_size):
    reference = _concat(list(_source(data, chunk_size=25)))
    batches = list(_source(data, chunk_size=chunk_size))
    assert [len(b) for b in batches[:-1]] == [chunk_size] * (len(batches) - 1)
    assert sum(len(b) for b in batches) == 25
    got = _concat(batches)
    for name, array in reference.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
def test_time_kind_of_the_first_chunk_holds_for_the_rest(tmp_path, chunk_size):
    text = "time,y\n" + "".join(f"{i * 0.25},{i}\n" for i in range(20))
    batches = list(CSVSource(_write(tmp_path / "n.csv", text), timestamp="time", columns=["y"]))
    assert all(b.time_kind == "number" for b in batches)
    np.testing.assert_array_equal(_concat_times(batches), np.arange(20) * 0.25)


def _concat_times(batches: list[Batch]) -> np.ndarray:
    return np.concatenate([b.timestamps for b in batches])


@pytest.mark.parametrize("chunk_size", [1, 3, 100])
def test_blank_lines_are_skipped_but_counted_in_line_numbers(tmp_path, chunk_size):
    rows = _rows(6)
    text = HEADER + rows[0] + rows[1] + "\n" + rows[2] + "\n\n" + "".join(rows[3:])
    batches = list(_source(_write(tmp_path / "b.csv", text), chunk_size=chunk_size))
    got = _concat(batches)
    np.testing.assert_array_equal(got["values"][:, 0], np.arange(6.0) ** 2)
    np.testing.assert_array_equal(got["origins"], [2, 3, 5, 8, 9, 10])


def test_unused_columns_are_not_parsed(tmp_path):
    text = "time,note,y\n1,free text,1.5\n2,more,2.5\n"
    (batch,) = CSVSource(_write(tmp_path / "c.csv", text), timestamp="time", columns=["y"])
    assert batch.errors == {}
    np.testing.assert_array_equal(batch.values[:, 0], [1.5, 2.5])


def test_total_rows_with_and_without_a_final_newline(tmp_path, data):
    assert _source(data).total_rows() == 25
    text = HEADER + "".join(_rows(3)).rstrip("\n")
    assert _source(_write(tmp_path / "x.csv", text)).total_rows() == 3


# -- seeking (resume) ---------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, 10_000])
@pytest.mark.parametrize("position", [0, 1, 6, 7, 8, 24])
def test_seek_resumes_exactly_after_the_rows_already_consumed(data, chunk_size, position):
    whole = _concat(list(_source(data)))
    source = _source(data, chunk_size=chunk_size)
    source.seek(position)
    got = _concat(list(source))
    for name, array in whole.items():
        np.testing.assert_array_equal(got[name], array[position:], err_msg=name)
    assert source.position == 25


def test_seek_to_the_end_yields_nothing(data):
    source = _source(data, chunk_size=4)
    source.seek(25)
    assert list(source) == []


def test_seek_counts_rows_not_blank_lines(tmp_path):
    rows = _rows(5)
    text = HEADER + rows[0] + "\n\n" + "".join(rows[1:])
    source = _source(_write(tmp_path / "b.csv", text), chunk_size=2)
    source.seek(2)
    got = _concat(list(source))
    np.testing.assert_array_equal(got["values"][:, 0], [4.0, 9.0, 16.0])
    np.testing.assert_array_equal(got["origins"], [6, 7, 8])


def test_position_follows_the_batches_handed_out(data):
    source = _source(data, chunk_size=10)
    positions = [source.position for _ in source]
    assert positions == [10, 20, 25]


# -- bad files and cells ------------------------------------------------------------------------


def test_non_numeric_cell_is_reported_with_file_and_line(tmp_path):
    rows = _rows(12)
    rows[8] = rows[8].replace(",64\n", ",sixty-four\n")
    path = _write(tmp_path / "d.csv", HEADER + "".join(rows))
    batches = list(_source(path, chunk_size=5))
    errors = {
        b.origin(i): reason for b in batches for i, (reason, _) in b.errors.items()
    }  # fmt: skip
    assert errors == {
        f"{path}:10": "non-numeric value 'sixty-four' in column 'y'; expected a number"
    }
    bad = batches[1]
    assert bad.errors[3][1] == "2024-01-01 08:00:00,a,4.0,sixty-four"


def test_missing_file(tmp_path):
    with pytest.raises(DataError) as info:
        _source(tmp_path / "absent.csv")
    assert str(info.value) == f"{tmp_path / 'absent.csv'}: file not found"


def test_empty_file(tmp_path):
    with pytest.raises(DataError) as info:
        _source(_write(tmp_path / "e.csv", ""))
    assert "the file is empty" in str(info.value)
    assert str(tmp_path / "e.csv") in str(info.value)


@pytest.mark.parametrize("text", [HEADER, HEADER.rstrip("\n"), HEADER + "\n\n"])
def test_header_only_file_fails_when_read(tmp_path, text):
    source = _source(_write(tmp_path / "h.csv", text))
    with pytest.raises(DataError) as info:
        list(source)
    assert str(info.value) == f"{tmp_path / 'h.csv'}: the file has a header but no data rows"


def test_misspelt_column_is_caught_at_the_header_with_a_suggestion(data):
    with pytest.raises(ConfigError) as info:
        CSVSource(data, timestamp="time", columns=["yy"])
    message = str(info.value)
    assert message.startswith(f"{data}:1: column 'yy'")
    assert "did you mean 'y'" in message
    assert "columns present: time, sym, x, y" in message


def test_row_with_more_cells_than_the_header_is_an_error_with_its_line(tmp_path):
    rows = _rows(10)
    rows[5] = rows[5].rstrip("\n") + ",extra,cells\n"
    path = _write(tmp_path / "r.csv", HEADER + "".join(rows))
    with pytest.raises(DataError) as info:
        list(_source(path, chunk_size=3))
    assert str(info.value).startswith(f"{path}:7: malformed CSV")
    assert "6 cells" in str(info.value) and "expected 4" in str(info.value)


def test_row_with_fewer_cells_reads_as_missing_values(tmp_path):
    rows = _rows(4)
    rows[2] = "2024-01-01 02:00:00,a,1.0\n"
    (batch,) = list(_source(_write(tmp_path / "s.csv", HEADER + "".join(rows))))
    assert batch.errors == {}
    assert np.isnan(batch.values[2, 0]) and batch.values[2, 1] == 1.0


def test_undecodable_header(tmp_path):
    path = tmp_path / "bin.csv"
    path.write_bytes(b"\xff\xfe\x00time,y\n1,2\n")
    with pytest.raises(DataError) as info:
        CSVSource(path, timestamp="time", columns=["y"])
    assert str(info.value).startswith(f"{path}:1: cannot read the header")


# -- pacing -------------------------------------------------------------------------------------


def _arrivals(source: CSVSource) -> tuple[list[int], list[float]]:
    sizes, times = [], []
    start = time.monotonic()
    for batch in source:
        sizes.append(len(batch))
        times.append(time.monotonic() - start)
    return sizes, times


def test_realtime_factor_paces_numeric_seconds(tmp_path):
    text = "time,y\n" + "".join(f"{10 + i * 0.1:.1f},{i}\n" for i in range(6))
    source = CSVSource(
        _write(tmp_path / "p.csv", text), timestamp="time", columns=["y"], realtime_factor=1.0
    )
    sizes, times = _arrivals(source)
    assert sizes == [1] * 6  # one row at a time, each when it is due
    assert times[0] < 0.2
    assert 0.45 <= times[-1] < 2.0  # 0.5 stream seconds at 1x
    for i in range(1, 6):
        assert times[i] >= 0.1 * i - 0.02


def test_realtime_factor_scales_datetime_streams(tmp_path):
    stamps = pd.date_range("2024-01-01", periods=5, freq="min")
    text = "time,y\n" + "".join(f"{t:%Y-%m-%d %H:%M:%S},{i}\n" for i, t in enumerate(stamps))
    source = CSVSource(
        _write(tmp_path / "p.csv", text),
        timestamp="time",
        columns=["y"],
        chunk_size=2,
        realtime_factor=1200.0,  # a minute in 50 ms
    )
    sizes, times = _arrivals(source)
    assert sizes == [1] * 5
    assert 0.19 <= times[-1] < 1.5


def test_without_realtime_factor_the_file_is_read_at_once(tmp_path):
    text = "time,y\n" + "".join(f"{i * 100},{i}\n" for i in range(50))
    sizes, times = _arrivals(
        CSVSource(_write(tmp_path / "f.csv", text), timestamp="time", columns=["y"])
    )
    assert sizes == [50]
    assert times[-1] < 1.0


def test_pace_sleeps_until_the_row_is_due(data):
    source = _source(data, realtime_factor=10.0)
    source.time_kind = "number"
    started = (time.monotonic(), 100.0)
    before = time.monotonic()
    assert source._pace(101.0, started) == started  # due 0.1 s after the start
    assert time.monotonic() - before >= 0.09
    before = time.monotonic()
    late = (time.monotonic() - 5.0, 100.0)
    source._pace(101.0, late)  # was due 4.9 s ago: no sleep
    assert time.monotonic() - before < 0.05


def test_pace_starts_the_clock_on_the_first_row_and_ignores_unreadable_times(data):
    source = _source(data, realtime_factor=1.0)
    source.time_kind = "datetime"
    wall, stream = source._pace(float(3_000_000_000), None)
    assert stream == 3.0
    assert abs(wall - time.monotonic()) < 0.5
    before = time.monotonic()
    assert source._pace(math.nan, (wall, stream)) == (wall, stream)
    assert time.monotonic() - before < 0.05


# -- the prediction sink ------------------------------------------------------------------------


def _prediction(i: int, truth: float | None = None, key: str | None = "AAA") -> Prediction:
    return Prediction(
        issued_at=f"2024-01-01T0{i}:00:00",
        timestamp=f"2024-01-01T0{i + 1}:00:00",
        key=key,
        target="price",
        step=1,
        prediction=0.1 * i + 1 / 3,
        truth=float(i) if truth is None else truth,
        last_value=i - 0.5,
    )


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_sink_writes_the_header_and_exact_floats(tmp_path):
    path = tmp_path / "predictions.csv"
    sink = CSVPredictionSink(path)
    sink.write([_prediction(1), _prediction(2, truth=math.nan, key=None)])
    sink.close()
    assert path.read_text().splitlines()[0] == ",".join(CSVPredictionSink.HEADER)
    rows = _read(path)
    assert len(rows) == 2
    assert rows[0]["issued_at"] == "2024-01-01T01:00:00"
    assert rows[0]["timestamp"] == "2024-01-01T02:00:00"
    assert rows[0]["key"] == "AAA" and rows[0]["target"] == "price" and rows[0]["step"] == "1"
    assert float(rows[0]["prediction"]) == 0.1 + 1 / 3  # repr round-trips exactly
    assert float(rows[0]["truth"]) == 1.0
    assert float(rows[0]["last_value"]) == 0.5
    assert rows[1]["truth"] == ""  # not known yet
    assert rows[1]["key"] == ""


def test_sink_writes_numeric_times_exactly(tmp_path):
    path = tmp_path / "p.csv"
    sink = CSVPredictionSink(path)
    sink.write([Prediction(0.1, 0.30000000000000004, None, "y", 2, 1.0, 2.0, 0.5)])
    sink.close()
    row = _read(path)[0]
    assert float(row["timestamp"]) == 0.30000000000000004
    assert row["step"] == "2"


def test_sink_truncate_returns_to_a_byte_position(tmp_path):
    path = tmp_path / "predictions.csv"
    sink = CSVPredictionSink(path)
    sink.write([_prediction(0), _prediction(1)])
    sink.flush()
    mark = sink.position()
    assert mark == path.stat().st_size
    sink.write([_prediction(2), _prediction(3)])
    sink.flush()
    assert path.stat().st_size > mark
    sink.truncate(mark)
    assert path.stat().st_size == mark
    sink.write([_prediction(4)])
    sink.close()
    assert [r["truth"] for r in _read(path)] == ["0.0", "1.0", "4.0"]


def test_sink_resume_equals_an_uninterrupted_file(tmp_path):
    whole = tmp_path / "whole.csv"
    sink = CSVPredictionSink(whole)
    sink.write([_prediction(i) for i in range(5)])
    sink.close()

    resumed = tmp_path / "resumed.csv"
    sink = CSVPredictionSink(resumed)
    sink.write([_prediction(i) for i in range(3)])
    mark = sink.position()
    sink.write([_prediction(3), _prediction(8)])  # written after the checkpoint, then lost
    sink.close()
    sink = CSVPredictionSink(resumed, append=True)
    sink.truncate(mark)
    sink.write([_prediction(3), _prediction(4)])
    sink.close()
    assert resumed.read_bytes() == whole.read_bytes()


def test_sink_append_keeps_one_header_and_fresh_sink_overwrites(tmp_path):
    path = tmp_path / "p.csv"
    sink = CSVPredictionSink(path)
    sink.write([_prediction(0)])
    sink.close()
    sink = CSVPredictionSink(path, append=True)
    sink.write([_prediction(1)])
    sink.close()
    assert path.read_text().count("issued_at") == 1
    assert len(_read(path)) == 2
    CSVPredictionSink(path).close()  # not appending: starts afresh
    assert _read(path) == []
    assert path.read_text() == ",".join(CSVPredictionSink.HEADER) + "\n"


def test_sink_append_to_an_empty_file_writes_the_header(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("")
    sink = CSVPredictionSink(path, append=True)
    sink.write([_prediction(0)])
    sink.close()
    assert len(_read(path)) == 1


@pytest.mark.parametrize("encoding_quirk", ["bom", "crlf"])
def test_excel_style_files_read_the_same(tmp_path, data, encoding_quirk):
    text = data.read_text(encoding="utf-8")
    path = tmp_path / "excel.csv"
    if encoding_quirk == "bom":
        path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    else:
        path.write_bytes(text.replace("\n", "\r\n").encode("utf-8"))
    got, want = _concat(list(_source(path))), _concat(list(_source(data)))
    for name, array in want.items():
        np.testing.assert_array_equal(got[name], array, err_msg=name)
