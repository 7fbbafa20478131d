"""Stop and resume: a replay stopped anywhere and resumed ends bit-identical to one never stopped.

Runs shortened copies of the bundled scenarios through :mod:`neuralsync.replay` and the CLI.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from neuralsync.cli import app
from neuralsync.config import Scenario, load_scenario
from neuralsync.errors import CheckpointError
from neuralsync.replay import ReplayRun, replay
from neuralsync.state import CheckpointStore, state_digest

SCENARIOS = Path(__file__).resolve().parent.parent / "scenarios"
ROWS = 2500
EVERY = 500
SYMBOL_ROWS = 2400  # 800 rows per symbol: AAA's regime change is in
SYMBOL_EVERY = 400
#: Figures that describe one process's run, not the stream's result (at any depth of
#: metrics.json and events, e.g. an evolution generation's wall seconds).
PER_PROCESS = {"wall_time", "wall_seconds", "events_per_second", "rows_this_run"}


def _stream_only(value):
    """``value`` without the per-process figures, at any depth."""
    if isinstance(value, dict):
        return {k: _stream_only(v) for k, v in value.items() if k not in PER_PROCESS}
    if isinstance(value, list):
        return [_stream_only(v) for v in value]
    return value


def _shortened(folder: Path, name: str, rows: int, every: int) -> Path:
    """A copy of a bundled scenario on its first ``rows`` rows, checkpointing every ``every``."""
    lines = (SCENARIOS / f"{name}.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    (folder / f"{name}.csv").write_text("".join(lines[: rows + 1]), encoding="utf-8")
    raw = yaml.safe_load((SCENARIOS / f"{name}.yaml").read_text(encoding="utf-8"))
    raw["change_points"] = str(SCENARIOS / f"{name}.changepoints.json")
    raw["checkpoint_every"] = every
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def default_yaml(tmp_path_factory) -> Path:
    return _shortened(tmp_path_factory.mktemp("default"), "default", ROWS, EVERY)


@pytest.fixture(scope="module")
def symbols_yaml(tmp_path_factory) -> Path:
    return _shortened(tmp_path_factory.mktemp("symbols"), "symbols", SYMBOL_ROWS, SYMBOL_EVERY)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, one per scenario and overrides, each replayed once per module."""
    done: dict[tuple[str, str], Path] = {}

    def get(yaml_path: Path, **overrides) -> Path:
        index = (str(yaml_path), json.dumps(overrides, sort_keys=True))
        if index not in done:
            out = tmp_path_factory.mktemp("reference")
            metrics = replay(load_scenario(yaml_path, overrides), out, report=False)
            assert metrics["completed"]
            done[index] = out
        return done[index]

    return get


def _events(run_dir: Path, *, checkpoints: bool = True) -> list[dict]:
    """Events without wall time, checkpoint paths reduced to the file name."""
    out = []
    for line in (run_dir / "events.jsonl").read_text(encoding="utf-8").splitlines():
        event = _stream_only(json.loads(line))
        if event["type"] == "checkpoint":
            if not checkpoints:
                continue
            event["path"] = Path(event["path"]).name
        out.append(event)
    return out


def _dead_letters(run_dir: Path) -> list[dict]:
    lines = (run_dir / "dead_letter.jsonl").read_text(encoding="utf-8").splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "wall_time"} for line in lines]


def _metrics(run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    return _stream_only(metrics)


def _final_state(run_dir: Path) -> tuple[int, str, dict]:
    snapshot = CheckpointStore(run_dir / "checkpoints").latest()
    return snapshot["pipeline"]["position"], state_digest(snapshot["pipeline"]), snapshot["sinks"]


def _assert_same_run(run_dir: Path, expected: Path, *, exact_checkpoints: bool = True) -> None:
    a, b = run_dir / "predictions.csv", expected / "predictions.csv"
    assert a.read_bytes() == b.read_bytes(), "predictions.csv differs"
    assert _events(run_dir, checkpoints=exact_checkpoints) == _events(
        expected, checkpoints=exact_checkpoints
    )
    assert _dead_letters(run_dir) == _dead_letters(expected)
    metrics, reference_metrics = _metrics(run_dir), _metrics(expected)
    assert metrics["state_digest"] == reference_metrics["state_digest"]
    assert metrics == reference_metrics
    position, digest, sinks = _final_state(run_dir)
    reference_position, reference_digest, reference_sinks = _final_state(expected)
    assert (position, digest) == (reference_position, reference_digest)
    # (the events file's offset differs with the run directory's name, which the
    # checkpoint events quote)
    for sink in ("predictions", "dead_letter"):
        assert sinks[sink] == reference_sinks[sink]


def _scenario(yaml_path: Path, **overrides) -> Scenario:
    return load_scenario(yaml_path, overrides)


# -- stop and resume ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_default_yaml(tmp_path_factory) -> Path:
    """Fewer rows, for the slower reference (PyTorch) path."""
    return _shortened(tmp_path_factory.mktemp("small"), "default", 600, 150)


VARIANTS = {
    "default settings": ("default_yaml", {}, ROWS, EVERY),
    # Adam and two hidden layers run on the PyTorch reference path, with optimiser moments
    "adam, two hidden layers": (
        "small_default_yaml",
        {"model.optimizer": "adam", "model.hidden": [8, 8]},
        600,
        150,
    ),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_stopped_halfway_and_resumed_ends_bit_identical(request, reference, tmp_path, variant):
    fixture, overrides, rows, every = VARIANTS[variant]
    yaml_path = request.getfixturevalue(fixture)
    expected = reference(yaml_path, **overrides)
    scenario = _scenario(yaml_path, **overrides)
    half = rows // 2 // every * every
    first = replay(scenario, tmp_path, limit=half, report=False)
    assert first["completed"] is False and first["rows"] == half
    assert first["state_digest"] != _metrics(expected)["state_digest"]
    assert [p.name for p in CheckpointStore(tmp_path / "checkpoints").paths()] == [
        f"state-{half:012d}.pt",
        f"state-{half - every:012d}.pt",
    ]
    second = replay(scenario, tmp_path, resume=True, report=False)
    assert second["completed"] is True and second["rows"] == rows
    assert second["rows_this_run"] == rows - half
    _assert_same_run(tmp_path, expected)


def test_stopped_anywhere_several_times_ends_bit_identical(default_yaml, reference, tmp_path):
    expected = reference(default_yaml)
    scenario = _scenario(default_yaml)
    # Settings outside the fingerprint (how the CSV is chunked) may change on resume.
    rechunked = _scenario(default_yaml, chunk_size=77, description="read in small chunks")
    assert rechunked.fingerprint() == scenario.fingerprint()
    stops = [(733, False, scenario), (1891, True, rechunked), (None, True, scenario)]
    for limit, resume, settings in stops:
        run = ReplayRun(settings, tmp_path, resume=resume)
        try:
            metrics = run.run(limit=limit)
        finally:
            run.close()
        assert metrics["completed"] is (limit is None)
        assert metrics["rows"] == (limit or ROWS)
    # A stop between checkpoints commits one of its own, so the event log notes two more
    # checkpoints; everything else is the same.
    extra = [e for e in _events(tmp_path) if e["type"] == "checkpoint"]
    assert [e["position"] for e in extra] == [500, 733, 1000, 1500, 1891, 2000, 2500]
    _assert_same_run(tmp_path, expected, exact_checkpoints=False)


ADAPTING = {
    "adaptation.adapters": ["fresh_start"],
    "adaptation.support_size": 64,
    "adaptation.canary_size": 16,
}


def test_stopped_just_before_an_adaptation_ends_bit_identical(default_yaml, reference, tmp_path):
    """The adapter's support and canary samples come from before the stop: they must be in
    the snapshot, or the gate decides differently after the resume."""
    expected = reference(default_yaml, **ADAPTING)
    decisions = [e for e in _events(expected) if e["type"] == "gate_decision"]
    assert decisions, "the shortened default scenario should trigger an adaptation"
    stop = decisions[0]["position"] - 10
    scenario = _scenario(default_yaml, **ADAPTING)
    replay(scenario, tmp_path, limit=stop, report=False)
    assert not [e for e in _events(tmp_path) if e["type"] == "gate_decision"]
    replay(scenario, tmp_path, resume=True, report=False)
    _assert_same_run(tmp_path, expected, exact_checkpoints=False)


def test_resume_falls_back_to_the_previous_checkpoint_when_the_newest_is_damaged(
    default_yaml, reference, tmp_path
):
    expected = reference(default_yaml)
    scenario = _scenario(default_yaml)
    replay(scenario, tmp_path, limit=1500, report=False)
    newest = tmp_path / "checkpoints" / "state-000000001500.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 3])  # torn, as by a full disk
    run = ReplayRun(scenario, tmp_path, resume=True)
    try:
        assert run.pipeline.position_ == 1000
        assert len(run.store.skipped_) == 1 and "state-000000001500.pt" in run.store.skipped_[0]
        # the damaged snapshot is gone, so pruning cannot keep it over the good one
        assert [p.name for p in run.store.paths()] == ["state-000000001000.pt"]
        metrics = run.run()
    finally:
        run.close()
    assert metrics["completed"] and metrics["rows_this_run"] == ROWS - 1000
    _assert_same_run(tmp_path, expected)


def test_resume_with_changed_settings_is_refused_and_touches_nothing(default_yaml, tmp_path):
    replay(_scenario(default_yaml), tmp_path, limit=EVERY, report=False)
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    changed = _scenario(default_yaml, **{"model.lr": 0.05})
    with pytest.raises(CheckpointError, match=r"state-000000000500\.pt.*different settings"):
        replay(changed, tmp_path, resume=True, report=False)
    with pytest.raises(CheckpointError, match="different settings"):
        ReplayRun(_scenario(default_yaml, lookback=16), tmp_path, resume=True)
    after = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


def test_resume_with_nothing_to_resume_from_is_a_clear_error(default_yaml, tmp_path):
    with pytest.raises(CheckpointError, match="nothing to resume from"):
        replay(_scenario(default_yaml), tmp_path / "empty", resume=True, report=False)


def test_a_fresh_run_into_an_existing_directory_overwrites_it(default_yaml, reference, tmp_path):
    expected = reference(default_yaml)
    scenario = _scenario(default_yaml)
    replay(scenario, tmp_path, limit=1500, report=False)
    (tmp_path / "dead_letter.jsonl").write_text('{"stale": true}\n', encoding="utf-8")
    metrics = replay(scenario, tmp_path, limit=EVERY, report=False)
    assert metrics["rows"] == EVERY
    assert [p.name for p in CheckpointStore(tmp_path / "checkpoints").paths()] == [
        "state-000000000500.pt"
    ]
    events = _events(tmp_path)
    assert max(e["position"] for e in events) == EVERY
    assert [e["position"] for e in events if e["type"] == "checkpoint"] == [EVERY]
    assert (tmp_path / "dead_letter.jsonl").read_text(encoding="utf-8") == ""
    predictions = (tmp_path / "predictions.csv").read_bytes()
    full = (expected / "predictions.csv").read_bytes()
    assert len(predictions) < len(full) and full.startswith(predictions)
    # and a fresh run to the end is the uninterrupted run, whatever was there before
    replay(scenario, tmp_path, report=False)
    _assert_same_run(tmp_path, expected)


def test_keyed_symbols_scenario_stopped_and_resumed_ends_bit_identical(
    symbols_yaml, reference, tmp_path
):
    expected = reference(symbols_yaml)
    scenario = _scenario(symbols_yaml)
    assert scenario.key == "symbol" and scenario.horizon == 3
    first = replay(scenario, tmp_path, limit=2 * SYMBOL_EVERY, report=False)
    assert first["completed"] is False
    assert sorted(first["per_key"]) == ["AAA", "BBB", "CCC"]
    replay(scenario, tmp_path, resume=True, report=False)
    _assert_same_run(tmp_path, expected)
    metrics = _metrics(tmp_path)
    assert sum(m["n_predictions"] for m in metrics["per_key"].values()) == metrics["n_predictions"]
    assert "detection" in metrics


# -- the command line ---------------------------------------------------------------------------


def _cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result, result.output + (getattr(result, "stderr", "") or "")


def test_cli_replay_with_limit_then_resume_ends_bit_identical(default_yaml, reference, tmp_path):
    expected = reference(default_yaml)
    out = tmp_path / "run"
    common = ("--no-report", "--no-progress")
    result, text = _cli("replay", str(default_yaml), "--out", str(out), "--limit", "1000", *common)
    assert result.exit_code == 0, text
    assert "stopped at row 1000" in text and "--resume" in text
    assert (out / "scenario.json").is_file()

    result, text = _cli("replay", "--resume", str(out), "--seed", "3", *common)
    assert result.exit_code == 2 and "not allowed" in text

    result, text = _cli("replay", "--resume", str(out), *common)
    assert result.exit_code == 0, text
    assert "stopped at row" not in text
    _assert_same_run(out, expected)


def test_cli_resume_of_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path):
    result, text = _cli("replay", "--resume", str(tmp_path), "--no-report", "--no-progress")
    assert result.exit_code == 2
    assert "no scenario.json" in text
