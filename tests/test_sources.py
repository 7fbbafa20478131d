"""Tests for :mod:`neuralsync.sources`: parsing frames into batches, in-memory sources."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from neuralsync.base import Batch
from neuralsync.errors import ConfigError, DataError
from neuralsync.sources import (
    MISSING_TOKENS,
    DataFrameSource,
    IterableSource,
    check_columns,
    frame_to_batch,
)


def _ns(*stamps: str) -> np.ndarray:
    return pd.to_datetime(list(stamps)).as_unit("ns").to_numpy().view(np.int64)


def _concat(batches: list[Batch]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (
        np.concatenate([b.values for b in batches]),
        np.concatenate([b.timestamps for b in batches]),
        np.concatenate([b.origins for b in batches]),
    )


# -- frame_to_batch -----------------------------------------------------------------------------


def test_text_cells_are_parsed_into_numbers_and_ns_timestamps():
    frame = pd.DataFrame(
        {
            "t": ["2024-01-01 00:00:00", "2024-01-01 01:00:00"],
            "a": ["1.5", " -2e3 "],
            "b": ["7", "0.25"],
            "ignored": ["x", "y"],
        }
    )
    batch = frame_to_batch(frame, timestamp="t", columns=["b", "a"])
    assert batch.columns == ["b", "a"]
    assert batch.values.dtype == np.float64
    np.testing.assert_array_equal(batch.values, [[7.0, 1.5], [0.25, -2000.0]])
    assert batch.time_kind == "datetime"
    assert batch.timestamps.dtype == np.int64
    np.testing.assert_array_equal(
        batch.timestamps, _ns("2024-01-01 00:00:00", "2024-01-01 01:00:00")
    )
    assert batch.errors == {}
    assert batch.keys is None
    assert len(batch) == 2


def test_numeric_timestamps_are_plain_numbers():
    frame = pd.DataFrame({"t": ["0", "0.5", "10"], "y": ["1", "2", "3"]})
    batch = frame_to_batch(frame, timestamp="t", columns=["y"])
    assert batch.time_kind == "number"
    assert batch.timestamps.dtype == np.float64
    np.testing.assert_array_equal(batch.timestamps, [0.0, 0.5, 10.0])


def test_datetime64_column_is_a_datetime_stream_in_nanoseconds():
    times = pd.date_range("2024-01-01", periods=3, freq="h")
    frame = pd.DataFrame({"t": times, "y": [1.0, 2.0, 3.0]})
    batch = frame_to_batch(frame, timestamp="t", columns=["y"])
    assert batch.time_kind == "datetime"
    np.testing.assert_array_equal(batch.timestamps, times.as_unit("ns").asi8)


def test_time_zones_are_converted_to_naive_utc():
    aware = pd.date_range("2024-01-01", periods=2, freq="h", tz="Europe/Paris")
    batch = frame_to_batch(pd.DataFrame({"t": aware, "y": [1, 2]}), timestamp="t", columns=["y"])
    np.testing.assert_array_equal(batch.timestamps, _ns("2023-12-31 23:00", "2024-01-01 00:00"))


def test_offsets_that_change_with_daylight_saving_are_read():
    frame = pd.DataFrame(
        {"t": ["2024-03-31T01:30:00+01:00", "2024-03-31T03:30:00+02:00"], "y": ["1", "2"]}
    )
    batch = frame_to_batch(frame, timestamp="t", columns=["y"])
    assert batch.errors == {}
    np.testing.assert_array_equal(batch.timestamps, _ns("2024-03-31 00:30", "2024-03-31 01:30"))


def test_timestamp_format_is_used_even_when_cells_look_numeric():
    frame = pd.DataFrame({"t": ["20240102", "20240103"], "y": ["1", "2"]})
    batch = frame_to_batch(frame, timestamp="t", columns=["y"], timestamp_format="%Y%m%d")
    assert batch.time_kind == "datetime"
    np.testing.assert_array_equal(batch.timestamps, _ns("2024-01-02", "2024-01-03"))


def test_a_cell_that_does_not_match_the_format_is_a_bad_record():
    frame = pd.DataFrame({"t": ["02/01/2024", "2024-01-03"], "y": ["1", "2"]})
    batch = frame_to_batch(frame, timestamp="t", columns=["y"], timestamp_format="%d/%m/%Y")
    assert list(batch.errors) == [1]
    assert "format '%d/%m/%Y'" in batch.errors[1][0]
    assert batch.timestamps[0] == _ns("2024-01-02")[0]


def test_non_numeric_cells_become_errors_with_reason_and_raw_text():
    frame = pd.DataFrame({"t": ["1", "2", "3"], "a": ["1", "oops", "3"], "b": ["4", "5", "x"]})
    batch = frame_to_batch(
        frame, timestamp="t", columns=["a", "b"], origins=np.array([2, 3, 4]), source_name="f.csv"
    )
    assert set(batch.errors) == {1, 2}
    reason, raw = batch.errors[1]
    assert reason == "non-numeric value 'oops' in column 'a'; expected a number"
    assert raw == "2,oops,5"
    assert "'x' in column 'b'" in batch.errors[2][0]
    assert np.isnan(batch.values[1, 0]) and batch.values[1, 1] == 5.0
    assert batch.origin(1) == "f.csv:3"
    assert batch.origin(2, "b") == "f.csv:4, column 'b'"


def test_unreadable_timestamp_is_an_error_and_comes_before_a_bad_value():
    frame = pd.DataFrame({"t": ["2024-01-01", "not a date"], "y": ["1", "bad"]})
    batch = frame_to_batch(frame, timestamp="t", columns=["y"])
    assert list(batch.errors) == [1]
    assert batch.errors[1][0] == (
        "cannot read timestamp 'not a date' in column 't'; expected a date and time"
    )


def test_one_bad_numeric_timestamp_does_not_spoil_the_rest_of_the_batch():
    frame = pd.DataFrame({"t": ["1", "2", "x", "4"], "y": ["1", "2", "3", "4"]})
    batch = frame_to_batch(frame, timestamp="t", columns=["y"])
    assert batch.time_kind == "number"
    assert list(batch.errors) == [2]
    assert "expected a number" in batch.errors[2][0]
    np.testing.assert_array_equal(batch.timestamps[[0, 1, 3]], [1.0, 2.0, 4.0])


def test_one_bad_date_does_not_spoil_the_rest_of_the_batch():
    frame = pd.DataFrame({"t": ["2024-01-01", "17", "2024-01-03"], "y": ["1", "2", "3"]})
    batch = frame_to_batch(frame, timestamp="t", columns=["y"])
    assert batch.time_kind == "datetime"
    assert list(batch.errors) == [1]


@pytest.mark.parametrize("token", [*sorted(MISSING_TOKENS), "NaN", " NA ", "NULL"])
def test_missing_tokens_are_nan_not_errors(token):
    frame = pd.DataFrame({"t": ["1", "2"], "y": ["1.0", token]})
    batch = frame_to_batch(frame, timestamp="t", columns=["y"])
    assert batch.errors == {}
    assert batch.values[0, 0] == 1.0 and np.isnan(batch.values[1, 0])


def test_infinite_cells_are_parsed_as_infinity_for_the_pipeline_to_judge():
    frame = pd.DataFrame({"t": ["1", "2"], "y": ["inf", "-inf"]})
    batch = frame_to_batch(frame, timestamp="t", columns=["y"])
    assert batch.errors == {}
    np.testing.assert_array_equal(batch.values[:, 0], [np.inf, -np.inf])


def test_numeric_frames_and_missing_numbers():
    frame = pd.DataFrame({"t": [1, 2, 3], "y": [1, None, 3]})
    batch = frame_to_batch(frame, timestamp="t", columns=["y"])
    assert batch.errors == {}
    np.testing.assert_array_equal(batch.values[:, 0], [1.0, np.nan, 3.0])


def test_keys_are_strings():
    frame = pd.DataFrame({"t": [1, 1, 2], "sym": ["A", 7, "A"], "y": [1.0, 2.0, 3.0]})
    batch = frame_to_batch(frame, timestamp="t", columns=["y"], key="sym")
    assert batch.keys.tolist() == ["A", "7", "A"]


def test_time_kind_given_by_an_earlier_batch_is_kept():
    frame = pd.DataFrame({"t": ["5", "6"], "y": ["1", "2"]})
    batch = frame_to_batch(frame, timestamp="t", columns=["y"], time_kind="datetime")
    assert batch.time_kind == "datetime"
    assert set(batch.errors) == {0, 1}


# -- Batch --------------------------------------------------------------------------------------


def _batch() -> Batch:
    return Batch(
        columns=["y"],
        values=np.arange(5.0)[:, None],
        timestamps=np.arange(10, 15, dtype=np.int64),
        keys=np.array(list("ababa"), dtype=object),
        origins=np.arange(2, 7),
        errors={1: ("bad", "raw1"), 3: ("worse", "raw3")},
        source_name="s.csv",
        time_kind="number",
    )


def test_slice_keeps_rows_and_renumbers_errors():
    part = _batch().slice(1, 4)
    assert len(part) == 3
    np.testing.assert_array_equal(part.values[:, 0], [1.0, 2.0, 3.0])
    np.testing.assert_array_equal(part.timestamps, [11, 12, 13])
    assert part.keys.tolist() == ["b", "a", "b"]
    assert part.errors == {0: ("bad", "raw1"), 2: ("worse", "raw3")}
    assert part.origin(2) == "s.csv:5"
    assert (part.source_name, part.time_kind, part.columns) == ("s.csv", "number", ["y"])


def test_slices_put_back_together_give_the_batch():
    batch = _batch()
    parts = [batch.slice(0, 2), batch.slice(2, 3), batch.slice(3, 5), batch.slice(5, 5)]
    assert [len(p) for p in parts] == [2, 1, 2, 0]
    values, times, origins = _concat(parts)
    np.testing.assert_array_equal(values, batch.values)
    np.testing.assert_array_equal(times, batch.timestamps)
    np.testing.assert_array_equal(origins, batch.origins)
    errors = {}
    for offset, part in zip((0, 2, 3), parts[:3], strict=True):
        errors.update({i + offset: e for i, e in part.errors.items()})
    assert errors == batch.errors


def test_slice_without_keys_or_origins():
    batch = Batch(columns=["y"], values=np.zeros((3, 1)), timestamps=np.arange(3))
    part = batch.slice(1, 3)
    assert part.keys is None and part.origins is None
    assert part.origin(0) == "stream"


# -- check_columns ------------------------------------------------------------------------------


def test_check_columns_passes_when_all_are_present():
    check_columns(["t", "price", "volume"], ["price", "t"], "x.csv:1")


def test_check_columns_names_the_missing_column_suggests_and_lists():
    with pytest.raises(ConfigError) as info:
        check_columns(["t", "price", "volume"], ["t", "prcie"], "x.csv:1")
    message = str(info.value)
    assert message.startswith("x.csv:1: column 'prcie' named in the scenario is not in the data")
    assert "(did you mean 'price'?)" in message
    assert message.endswith("columns present: t, price, volume")


def test_check_columns_without_a_close_match_has_no_hint():
    with pytest.raises(ConfigError) as info:
        check_columns(["t", "price"], ["zzzzzz"], "here")
    assert "did you mean" not in str(info.value)


# -- DataFrameSource ----------------------------------------------------------------------------


def _frame(n: int = 10) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "t": pd.date_range("2024-01-01", periods=n, freq="min"),
            "k": ["a", "b"] * (n // 2),
            "x": np.arange(n, dtype=float),
            "y": np.arange(n, dtype=float) ** 2,
        }
    )


@pytest.mark.parametrize("chunk_size", [1, 3, 10, 100])
def test_dataframe_source_chunks_concatenate_to_the_whole_frame(chunk_size):
    frame = _frame()
    source = DataFrameSource(
        frame, timestamp="t", columns=["y", "x"], key="k", chunk_size=chunk_size
    )
    assert source.total_rows() == 10
    batches = list(source)
    assert [len(b) for b in batches][:-1] == [chunk_size] * (len(batches) - 1)
    values, times, origins = _concat(batches)
    np.testing.assert_array_equal(values, frame[["y", "x"]].to_numpy())
    np.testing.assert_array_equal(times, frame["t"].dt.as_unit("ns").to_numpy().view(np.int64))
    np.testing.assert_array_equal(origins, np.arange(10))
    assert np.concatenate([b.keys for b in batches]).tolist() == frame["k"].tolist()
    assert all(b.time_kind == "datetime" for b in batches)
    assert source.position == 10


def test_dataframe_source_seek_resumes_after_the_given_rows():
    frame = _frame()
    source = DataFrameSource(frame, timestamp="t", columns=["x"], chunk_size=4)
    source.seek(7)
    batches = list(source)
    values, _, origins = _concat(batches)
    np.testing.assert_array_equal(values[:, 0], [7.0, 8.0, 9.0])
    np.testing.assert_array_equal(origins, [7, 8, 9])
    assert batches[0].origin(0) == "frame row:7"


def test_dataframe_source_reports_a_bad_cell_by_row():
    frame = pd.DataFrame({"t": [1, 2, 3], "y": ["1", "two", "3"]})
    batch = next(iter(DataFrameSource(frame, timestamp="t", columns=["y"], name="prices")))
    assert list(batch.errors) == [1]
    assert batch.origin(1) == "prices row:1"


def test_dataframe_source_refuses_a_misspelt_column_up_front():
    with pytest.raises(ConfigError) as info:
        DataFrameSource(_frame(), timestamp="t", columns=["yy"], name="prices")
    assert "'yy'" in str(info.value) and "did you mean 'y'" in str(info.value)
    assert str(info.value).startswith("prices:")
    with pytest.raises(ConfigError, match="'kk'"):
        DataFrameSource(_frame(), timestamp="t", columns=["y"], key="kk")
    with pytest.raises(ConfigError, match="'time'"):
        DataFrameSource(_frame(), timestamp="time", columns=["y"])


def test_dataframe_source_keeps_the_time_kind_of_its_first_batch():
    frame = pd.DataFrame({"t": ["1", "2", "2024-01-01"], "y": [1.0, 2.0, 3.0]})
    batches = list(DataFrameSource(frame, timestamp="t", columns=["y"], chunk_size=2))
    assert [b.time_kind for b in batches] == ["number", "number"]
    assert list(batches[1].errors) == [0]


# -- IterableSource -----------------------------------------------------------------------------


def _records(n: int) -> list[dict]:
    return [{"t": i, "sym": "ab"[i % 2], "y": i * 1.5, "extra": "ignored"} for i in range(n)]


@pytest.mark.parametrize("batch_size", [1, 4, 7, 100])
def test_iterable_source_batches_concatenate_to_all_records(batch_size):
    source = IterableSource(
        iter(_records(7)), timestamp="t", columns=["y"], key="sym", batch_size=batch_size
    )
    batches = list(source)
    assert sum(len(b) for b in batches) == 7
    assert all(len(b) == batch_size for b in batches[:-1])
    values, times, origins = _concat(batches)
    np.testing.assert_array_equal(values[:, 0], np.arange(7) * 1.5)
    np.testing.assert_array_equal(times, np.arange(7.0))
    np.testing.assert_array_equal(origins, np.arange(7))
    assert np.concatenate([b.keys for b in batches]).tolist() == list("abababa")


def test_iterable_source_seek_skips_records_and_keeps_their_numbers():
    source = IterableSource(_records(6), timestamp="t", columns=["y"], batch_size=2)
    source.seek(3)
    batches = list(source)
    assert [len(b) for b in batches] == [2, 1]
    _, times, origins = _concat(batches)
    np.testing.assert_array_equal(times, [3.0, 4.0, 5.0])
    np.testing.assert_array_equal(origins, [3, 4, 5])
    assert batches[0].origin(0) == "record:3"


def test_iterable_source_a_missing_field_is_a_missing_value():
    rows = [{"t": 0, "y": 1.0}, {"t": 1}, {"t": 2, "y": "nan"}, {"t": 3, "y": "x"}]
    batch = next(iter(IterableSource(rows, timestamp="t", columns=["y"])))
    assert np.isnan(batch.values[1, 0]) and np.isnan(batch.values[2, 0])
    assert list(batch.errors) == [3]


def test_iterable_source_parses_iso_timestamps():
    rows = [{"t": "2024-01-01T00:00:00Z", "y": 1}, {"t": "2024-01-01T01:00:00Z", "y": 2}]
    batch = next(iter(IterableSource(rows, timestamp="t", columns=["y"])))
    assert batch.time_kind == "datetime"
    np.testing.assert_array_equal(batch.timestamps, _ns("2024-01-01 00:00", "2024-01-01 01:00"))


def test_iterable_source_refuses_a_record_that_is_not_a_mapping():
    rows = [{"t": 0, "y": 1.0}, [1, 2]]
    with pytest.raises(DataError) as info:
        list(IterableSource(rows, timestamp="t", columns=["y"], name="message"))
    assert str(info.value).startswith("message 1: expected a mapping")
    assert "list" in str(info.value)


def test_iterable_source_of_nothing_yields_nothing():
    assert list(IterableSource([], timestamp="t", columns=["y"])) == []
