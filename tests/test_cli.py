"""End-to-end tests of the ``neuralsync`` command line: replay outputs, options, and how every
kind of bad input is reported (exit code 2, one clear message, no traceback)."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import re
import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock
from typer.testing import CliRunner

from neuralsync.cli import app

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CSV = ROOT / "scenarios" / "default.csv"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
LOOKBACK = 4

runner = CliRunner()


def _invoke(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"uncaught {result.exception!r}\n{result.output}")
    return result.exit_code, result.output


def _replay(*args: str | Path) -> tuple[int, str]:
    return _invoke("replay", *args, "--no-progress", "--no-report")


def _error_line(code: int, output: str) -> str:
    """The one error message of a failed command, after checking how it failed."""
    assert code == 2, output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert len(output.strip().splitlines()) <= 2, output  # at most "replaying ..." before it
    return errors[0]


# -- a small scenario built from the first rows of the bundled default CSV ----------------------


def _lines(rows: int = 40) -> list[str]:
    with DEFAULT_CSV.open(encoding="utf-8") as f:
        return [next(f) for _ in range(rows + 1)]


def _set_cell(lines: list[str], line: int, column: str, value: str) -> None:
    """Replace one cell; ``line`` is the 1-based line number in the file (the header is 1)."""
    names = lines[0].strip().split(",")
    cells = lines[line - 1].rstrip("\n").split(",")
    cells[names.index(column)] = value
    lines[line - 1] = ",".join(cells) + "\n"


def _prices(lines: list[str]) -> list[float]:
    return [float(line.strip().split(",")[3]) for line in lines[1:]]


def _scenario(
    tmp_path: Path,
    edit: Callable[[list[str]], None] | None = None,
    extra: str = "",
    *,
    csv_text: str | None = None,
) -> Path:
    lines = _lines()
    if edit is not None:
        edit(lines)
    (tmp_path / "data.csv").write_text(csv_text if csv_text is not None else "".join(lines))
    path = tmp_path / "small.yaml"
    path.write_text(
        "name: small\n"
        "csv: data.csv\n"
        "timestamp: timestamp\n"
        "features: [load, temperature]\n"
        "targets: [price]\n"
        f"lookback: {LOOKBACK}\n"
        "model:\n"
        "  hidden: [8]\n" + extra
    )
    return path


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _predictions(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# -- the bundled default scenario, replayed once per test session -------------------------------


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    """``neuralsync replay --out DIR`` on the default scenario; shared by pytest-xdist workers,
    so the ~10 s replay runs once per session."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out = root / "cli-default-run"
    done = root / "cli-default-run.json"
    with FileLock(str(root / "cli-default-run.lock")):
        if not done.is_file():
            code, output = _invoke("replay", "--out", out, "--no-progress")
            done.write_text(json.dumps({"code": code, "output": output}))
    result = json.loads(done.read_text())
    return out, result["code"], result["output"]


def test_default_replay_exits_0_and_writes_every_output(default_run):
    out, code, output = default_run
    assert code == 0, output
    assert "Traceback" not in output
    for name in ("metrics.json", "events.jsonl", "predictions.csv", "report.png", "scenario.json"):
        assert (out / name).is_file(), name
    assert "replaying default" in output


def test_default_metrics_have_every_figure(default_run):
    out, _, _ = default_run
    metrics = _read_json(out / "metrics.json")
    for key in ("mse", "mae", "directional_accuracy"):
        assert isinstance(metrics[key], float) and metrics[key] >= 0
        assert isinstance(metrics["baseline_last_value"][key], float)
    assert 0 <= metrics["directional_accuracy"] <= 1
    assert metrics["n_predictions"] > 5000
    assert isinstance(metrics["regime_changes"], list) and metrics["regime_changes"]
    assert metrics["events_per_second"] > 0
    assert metrics["completed"] is True
    assert metrics["rows"] == len(DEFAULT_CSV.read_text().splitlines()) - 1


def test_default_model_beats_the_last_value_forecast(default_run):
    metrics = _read_json(default_run[0] / "metrics.json")
    assert metrics["mse"] < metrics["baseline_last_value"]["mse"]
    assert metrics["mae"] < metrics["baseline_last_value"]["mae"]


def test_default_metrics_match_the_predictions_file(default_run):
    out, _, _ = default_run
    metrics = _read_json(out / "metrics.json")
    rows = [r for r in _predictions(out / "predictions.csv") if r["truth"] != ""]
    assert len(rows) == metrics["n_predictions"]
    errors = [float(r["prediction"]) - float(r["truth"]) for r in rows]
    assert sum(e * e for e in errors) / len(errors) == pytest.approx(metrics["mse"], rel=1e-9)
    base = [float(r["last_value"]) - float(r["truth"]) for r in rows]
    expected = metrics["baseline_last_value"]["mse"]
    assert sum(e * e for e in base) / len(base) == pytest.approx(expected, rel=1e-9)


def test_default_events_are_structured_json_lines(default_run):
    events = _events(default_run[0] / "events.jsonl")
    assert events
    for event in events:
        assert {"type", "stream_time", "wall_time"} <= set(event)
        dt.datetime.fromisoformat(event["wall_time"])
    types = [e["type"] for e in events]
    assert "regime_change" in types
    assert "checkpoint" in types
    metrics = _read_json(default_run[0] / "metrics.json")
    changes = [e["stream_time"] for e in events if e["type"] == "regime_change"]
    assert changes == metrics["regime_changes"]


def test_default_predictions_csv_columns(default_run):
    with (default_run[0] / "predictions.csv").open(newline="") as f:
        header = next(csv.reader(f))
    assert {"timestamp", "key", "step", "prediction", "truth"} <= set(header)


def test_default_report_is_a_png(default_run):
    assert (default_run[0] / "report.png").read_bytes()[:8] == PNG_SIGNATURE


def test_default_summary_is_printed(default_run):
    _, _, output = default_run
    assert "mse" in output and "last value" in output
    assert "regime changes detected:" in output


def test_inspect_prints_the_last_checkpoint(default_run):
    code, output = _invoke("inspect", default_run[0])
    assert code == 0, output
    info = json.loads(output)
    assert info["position"] == _read_json(default_run[0] / "metrics.json")["rows"]
    assert re.fullmatch(r"[0-9a-f]{64}", info["state_digest"])


def test_report_and_inspect_of_a_folder_that_is_not_a_run(tmp_path):
    message = _error_line(*_invoke("report", tmp_path))
    assert "no predictions.csv" in message
    code, output = _invoke("inspect", tmp_path)
    assert code == 2 and "Traceback" not in output, output


# -- listing and keyed scenarios ----------------------------------------------------------------


def test_scenarios_lists_the_bundled_ones_one_line_each():
    code, output = _invoke("scenarios")
    assert code == 0, output
    lines = output.strip().splitlines()
    names = [line.split()[0] for line in lines]
    assert names.count("default") == 1 and names.count("symbols") == 1
    assert len(lines) == len(list((ROOT / "scenarios").glob("*.yaml")))
    default = next(line for line in lines if line.split()[0] == "default")
    assert "Hourly price" in default


def test_scenarios_and_names_follow_the_scenarios_folder(tmp_path, monkeypatch):
    folder = tmp_path / "mine"
    folder.mkdir()
    _scenario(folder)
    (folder / "small.yaml").rename(folder / "first.yaml")
    (folder / "zeta.yaml").write_text("name: zeta\ndescription: The last one.\n")
    monkeypatch.setenv("NEURALSYNC_SCENARIOS", str(folder))
    code, output = _invoke("scenarios")
    assert code == 0
    assert [line.split()[0] for line in output.strip().splitlines()] == ["small", "zeta"]
    assert output.strip().splitlines()[1].endswith("The last one.")
    code, output = _replay("small", "--out", tmp_path / "run")
    assert code == 0, output
    assert _read_json(tmp_path / "run" / "metrics.json")["rows"] == 40


def test_keyed_scenario_with_limit_reports_per_key_figures(tmp_path):
    out = tmp_path / "run"
    code, output = _replay("symbols", "--out", out, "--limit", "300")
    assert code == 0, output
    metrics = _read_json(out / "metrics.json")
    assert metrics["rows"] == 300
    assert metrics["completed"] is False
    assert "--resume" in output
    per_key = metrics["per_key"]
    assert sorted(per_key) == ["AAA", "BBB", "CCC"]
    for figures in per_key.values():
        assert figures["n_predictions"] > 0
        assert {"mse", "mae", "directional_accuracy", "baseline_last_value"} <= set(figures)
    assert sum(f["n_predictions"] for f in per_key.values()) == metrics["n_predictions"]
    keys = {r["key"] for r in _predictions(out / "predictions.csv")}
    assert keys == {"AAA", "BBB", "CCC"}


# -- options ------------------------------------------------------------------------------------


def test_set_and_named_options_take_effect(tmp_path):
    path = _scenario(tmp_path)
    out = tmp_path / "run"
    code, output = _replay(
        path,
        "--out",
        out,
        "--set",
        "model.lr=0.05",
        "--set",
        "model.hidden=[6, 3]",
        "--lookback",
        "6",
        "--seed",
        "7",
        "--detector",
        "none",
        "--horizon",
        "2",
    )
    assert code == 0, output
    saved = _read_json(out / "scenario.json")
    assert saved["model"]["lr"] == 0.05
    assert saved["model"]["hidden"] == [6, 3]
    assert saved["lookback"] == 6
    assert saved["seed"] == 7
    assert saved["detector"]["type"] == "none"
    assert saved["horizon"] == 2
    assert saved["features"] == ["load", "temperature"]  # the rest comes from the YAML
    metrics = _read_json(out / "metrics.json")
    assert (metrics["lookback"], metrics["horizon"]) == (6, 2)
    assert metrics["forecasts"] == 40 - 6 + 1  # the run used the new lookback
    assert metrics["regime_changes"] == []
    assert {r["step"] for r in _predictions(out / "predictions.csv")} == {"1", "2"}


def test_seed_changes_the_run_and_the_same_seed_repeats_it(tmp_path):
    path = _scenario(tmp_path)
    results = []
    for seed, name in (("1", "a"), ("1", "b"), ("2", "c")):
        code, output = _replay(path, "--out", tmp_path / name, "--seed", seed)
        assert code == 0, output
        results.append(_read_json(tmp_path / name / "metrics.json")["mse"])
    assert results[0] == results[1]
    assert results[0] != results[2]


# -- bad input: exit 2, one clear message, no traceback -----------------------------------------


def test_missing_csv_file(tmp_path):
    path = _scenario(tmp_path)
    (tmp_path / "data.csv").unlink()
    message = _error_line(*_replay(path, "--out", tmp_path / "run"))
    assert f"{tmp_path / 'data.csv'}: file not found" in message


def test_missing_scenario_file(tmp_path):
    message = _error_line(*_replay(tmp_path / "absent.yaml", "--out", tmp_path / "run"))
    assert "absent.yaml" in message and "not found" in message


def test_unknown_scenario_name_suggests_a_bundled_one(tmp_path):
    message = _error_line(*_replay("defualt", "--out", tmp_path / "run"))
    assert "no scenario 'defualt'" in message
    assert "did you mean 'default'" in message
    assert "symbols" in message


def test_misspelt_column_in_the_yaml_suggests_the_right_one(tmp_path):
    path = _scenario(tmp_path)
    path.write_text(path.read_text().replace("temperature]", "temprature]"))
    message = _error_line(*_replay(path, "--out", tmp_path / "run"))
    assert "column 'temprature'" in message
    assert "did you mean 'temperature'" in message
    assert "data.csv" in message


def test_misspelt_timestamp_column(tmp_path):
    path = _scenario(tmp_path)
    path.write_text(path.read_text().replace("timestamp: timestamp", "timestamp: time"))
    message = _error_line(*_replay(path, "--out", tmp_path / "run"))
    assert "column 'time'" in message and "did you mean 'timestamp'" in message


def test_non_numeric_cell_names_file_line_and_column(tmp_path):
    path = _scenario(tmp_path, lambda lines: _set_cell(lines, 17, "load", "12;5"))
    message = _error_line(*_replay(path, "--out", tmp_path / "run"))
    assert f"{tmp_path / 'data.csv'}:17" in message
    assert "non-numeric value '12;5' in column 'load'" in message
    assert "expected a number" in message


@pytest.mark.parametrize("token", ["NaN", ""])
def test_missing_cell_under_policy_error_names_file_and_line(tmp_path, token):
    path = _scenario(tmp_path, lambda lines: _set_cell(lines, 12, "price", token))
    message = _error_line(*_replay(path, "--out", tmp_path / "run"))
    assert f"{tmp_path / 'data.csv'}:12, column 'price'" in message
    assert "missing value" in message and "missing: drop" in message


@pytest.mark.parametrize("token", ["inf", "-inf"])
def test_infinite_cell_names_file_and_line(tmp_path, token):
    path = _scenario(tmp_path, lambda lines: _set_cell(lines, 25, "temperature", token))
    message = _error_line(*_replay(path, "--out", tmp_path / "run"))
    assert f"{tmp_path / 'data.csv'}:25, column 'temperature'" in message
    assert "infinite value" in message and "expected a finite number" in message


def _duplicate(lines: list[str]) -> None:
    lines[10] = lines[9]  # line 11 repeats line 10


def _swap(lines: list[str]) -> None:
    lines[9], lines[10] = lines[10], lines[9]  # lines 10 and 11 swapped


def test_duplicate_timestamp_names_file_and_line(tmp_path):
    path = _scenario(tmp_path, _duplicate)
    message = _error_line(*_replay(path, "--out", tmp_path / "run"))
    assert f"{tmp_path / 'data.csv'}:11" in message
    assert "duplicate timestamp 2024-01-01T08:00:00" in message


def test_out_of_order_timestamp_names_file_and_line(tmp_path):
    path = _scenario(tmp_path, _swap)
    message = _error_line(*_replay(path, "--out", tmp_path / "run"))
    assert f"{tmp_path / 'data.csv'}:11" in message
    assert "out-of-order timestamp 2024-01-01T08:00:00" in message
    assert "expected a time after 2024-01-01T09:00:00" in message


def test_unreadable_timestamp_names_file_and_line(tmp_path):
    path = _scenario(tmp_path, lambda lines: _set_cell(lines, 30, "timestamp", "yesterday"))
    message = _error_line(*_replay(path, "--out", tmp_path / "run"))
    assert f"{tmp_path / 'data.csv'}:30" in message
    assert "cannot read timestamp 'yesterday'" in message


def test_empty_csv_file(tmp_path):
    path = _scenario(tmp_path, csv_text="")
    message = _error_line(*_replay(path, "--out", tmp_path / "run"))
    assert f"{tmp_path / 'data.csv'}: the file is empty" in message


def test_header_only_csv_file(tmp_path):
    path = _scenario(tmp_path, csv_text=_lines()[0])
    message = _error_line(*_replay(path, "--out", tmp_path / "run"))
    assert f"{tmp_path / 'data.csv'}: the file has a header but no data rows" in message


def test_row_with_too_many_cells(tmp_path):
    def extra(lines: list[str]) -> None:
        lines[19] = lines[19].rstrip("\n") + ",1.0\n"

    path = _scenario(tmp_path, extra)
    message = _error_line(*_replay(path, "--out", tmp_path / "run"))
    assert f"{tmp_path / 'data.csv'}:20: malformed CSV" in message


def test_malformed_yaml_names_the_line(tmp_path):
    path = _scenario(tmp_path)
    text = path.read_text().replace("lookback: 4", "  lookback: 4")
    path.write_text(text)
    line = text.splitlines().index("  lookback: 4") + 1
    message = _error_line(*_replay(path, "--out", tmp_path / "run"))
    assert message.startswith(f"error: {path}:{line}: malformed YAML")


def test_unknown_option_in_yaml_names_key_line_and_suggestion(tmp_path):
    path = _scenario(tmp_path, extra="seeed: 3\n")
    line = path.read_text().splitlines().index("seeed: 3") + 1
    message = _error_line(*_replay(path, "--out", tmp_path / "run"))
    assert f"{path}:{line}: unknown option 'seeed'" in message
    assert "did you mean 'seed'" in message


def test_wrong_type_in_yaml_says_what_was_expected(tmp_path):
    path = _scenario(tmp_path)
    path.write_text(path.read_text().replace("lookback: 4", "lookback: four"))
    message = _error_line(*_replay(path, "--out", tmp_path / "run"))
    assert f"{path}:6: option 'lookback'" in message
    assert "valid integer" in message and "'four'" in message


def test_unknown_set_key(tmp_path):
    path = _scenario(tmp_path)
    message = _error_line(*_replay(path, "--out", tmp_path / "run", "--set", "model.lrr=0.1"))
    assert "unknown option 'model.lrr'" in message
    assert "did you mean 'model.lr'" in message
    assert "command line" in message


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "model.lr"], "expected KEY=VALUE"),
        (["--set", "model.lr=fast"], "option 'model.lr'"),
        (["--lookback", "0"], "option 'lookback': Input should be greater than 0"),
        (["--detector", "adwinn"], "'adwin', 'page_hinkley', 'kswin' or 'none'"),
        (["--model", "rnn"], "'mlp', 'linear'"),
    ],
)
def test_bad_command_line_values(tmp_path, args, expected):
    path = _scenario(tmp_path)
    message = _error_line(*_replay(path, "--out", tmp_path / "run", *args))
    assert expected in message
    assert f"{path}:" not in message  # not blamed on a line of the YAML


def test_resume_refuses_options_and_folders_that_are_not_runs(tmp_path):
    message = _error_line(*_replay("--resume", tmp_path))
    assert "no scenario.json" in message
    path = _scenario(tmp_path)
    run = tmp_path / "run"
    assert _replay(path, "--out", run, "--limit", "20")[0] == 0
    message = _error_line(*_replay("--resume", run, "--seed", "3"))
    assert "not allowed" in message and "seed" in message


def test_the_installed_entry_point_prints_no_traceback(tmp_path):
    path = _scenario(tmp_path, lambda lines: _set_cell(lines, 9, "price", "n/a?"))
    # The console script pip installed beside this Python (not a pyenv shim that wraps it).
    script = Path(sysconfig.get_path("scripts")) / "neuralsync"
    prefix = [str(script)] if script.is_file() else [sys.executable, "-m", "neuralsync.cli"]
    result = subprocess.run(
        [*prefix, "replay", str(path), "--out", str(tmp_path / "run"), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert f"{tmp_path / 'data.csv'}:9" in result.stderr
    assert "non-numeric value 'n/a?'" in result.stderr


# -- missing values and bad records under the forgiving policies --------------------------------


def _truths(out: Path) -> list[float]:
    return [float(r["truth"]) for r in _predictions(out / "predictions.csv") if r["truth"] != ""]


def test_missing_policy_drop_skips_rows_and_counts_them(tmp_path):
    blanks = {8: "price", 15: "load", 30: "price"}

    def edit(lines: list[str]) -> None:
        for line, column in blanks.items():
            _set_cell(lines, line, column, "")

    path = _scenario(tmp_path, edit, extra="missing: drop\n")
    out = tmp_path / "run"
    code, output = _replay(path, "--out", out)
    assert code == 0, output
    metrics = _read_json(out / "metrics.json")
    assert metrics["missing"] == {"policy": "drop", "dropped_rows": 3, "filled_cells": 0}
    good = [p for i, p in enumerate(_prices(_lines()), start=2) if i not in blanks]
    assert metrics["forecasts"] == len(good) - LOOKBACK + 1
    assert _truths(out) == good[LOOKBACK:]


def test_missing_policy_ffill_repeats_the_last_value_and_counts_cells(tmp_path):
    def edit(lines: list[str]) -> None:
        _set_cell(lines, 12, "price", "")
        _set_cell(lines, 12, "load", "NA")
        _set_cell(lines, 20, "temperature", "nan")

    path = _scenario(tmp_path, edit, extra="missing: ffill\n")
    out = tmp_path / "run"
    code, output = _replay(path, "--out", out)
    assert code == 0, output
    metrics = _read_json(out / "metrics.json")
    assert metrics["missing"] == {"policy": "ffill", "dropped_rows": 0, "filled_cells": 3}
    assert metrics["forecasts"] == 40 - LOOKBACK + 1
    prices = _prices(_lines())
    prices[12 - 2] = prices[11 - 2]  # line 12 takes line 11's price
    assert _truths(out) == prices[LOOKBACK:]


def test_missing_policy_ffill_drops_a_first_row_with_nothing_to_fill_from(tmp_path):
    path = _scenario(tmp_path, lambda lines: _set_cell(lines, 2, "load", ""), "missing: ffill\n")
    out = tmp_path / "run"
    assert _replay(path, "--out", out)[0] == 0
    missing = _read_json(out / "metrics.json")["missing"]
    assert (missing["dropped_rows"], missing["filled_cells"]) == (1, 0)


def test_dead_letter_sets_bad_rows_aside_and_keeps_every_good_row(tmp_path):
    def edit(lines: list[str]) -> None:
        _set_cell(lines, 8, "load", "oops")
        _set_cell(lines, 14, "price", "inf")
        lines[20] = lines[19]  # line 21 duplicates line 20
        _set_cell(lines, 28, "timestamp", "not-a-time")
        lines[32], lines[33] = lines[33], lines[32]  # line 34 is older than line 33

    path = _scenario(tmp_path, edit, extra="bad_records: dead_letter\n")
    out = tmp_path / "run"
    code, output = _replay(path, "--out", out)
    assert code == 0, output
    data = tmp_path / "data.csv"
    letters = _events(out / "dead_letter.jsonl")
    assert [d["origin"].split(",")[0] for d in letters] == [
        f"{data}:{line}" for line in (8, 14, 21, 28, 34)
    ]
    reasons = [d["reason"] for d in letters]
    assert "non-numeric value 'oops' in column 'load'" in reasons[0]
    assert "infinite value" in reasons[1]
    assert "duplicate timestamp" in reasons[2]
    assert "cannot read timestamp 'not-a-time'" in reasons[3]
    assert "out-of-order timestamp" in reasons[4]
    assert all(d["type"] == "bad_record" and d["raw"] for d in letters)
    assert "oops" in letters[0]["raw"]
    bad_events = [e for e in _events(out / "events.jsonl") if e["type"] == "bad_record"]
    assert len(bad_events) == 5

    metrics = _read_json(out / "metrics.json")
    assert metrics["bad_records"] == 5
    assert metrics["completed"] is True
    original = _lines()
    edited = list(original)
    edit(edited)
    good = [
        float(line.strip().split(",")[3])
        for i, line in enumerate(edited[1:], start=2)
        if i not in (8, 14, 21, 28, 34)
    ]
    assert len(good) == 35
    assert metrics["forecasts"] == len(good) - LOOKBACK + 1
    assert _truths(out) == good[LOOKBACK:]
