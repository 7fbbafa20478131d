"""Tests for :mod:`neuralsync.config`: scenario YAML, defaults, overrides and error messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from neuralsync.config import (
    AdaptationConfig,
    DetectorConfig,
    ModelConfig,
    NormalizationConfig,
    Scenario,
    apply_overrides,
    load_scenario,
    parse_override,
)
from neuralsync.errors import ConfigError, suggest

MINIMAL = "csv: data.csv\ntimestamp: time\ntargets: price\n"


def _write(tmp_path: Path, text: str, name: str = "scenario.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _error(path: Path, overrides: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_scenario(path, overrides)
    return str(info.value)


# -- loading ------------------------------------------------------------------------------------


def test_paths_are_resolved_relative_to_the_yaml_not_the_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "nested" / "deeper"
    folder.mkdir(parents=True)
    path = _write(folder, MINIMAL + "change_points: ../points.json\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    scenario = load_scenario(path)
    assert scenario.csv == (folder / "data.csv").resolve()
    assert scenario.change_points == (tmp_path / "nested" / "points.json").resolve()
    assert scenario.csv.is_absolute()


def test_relative_path_to_the_yaml_itself_works_from_another_directory(tmp_path, monkeypatch):
    _write(tmp_path, MINIMAL)
    monkeypatch.chdir(tmp_path)
    scenario = load_scenario("scenario.yaml")
    assert scenario.csv == (tmp_path / "data.csv").resolve()


def test_absolute_csv_path_is_kept(tmp_path):
    target = tmp_path / "somewhere" / "prices.csv"
    path = _write(tmp_path, f"csv: {target}\ntimestamp: time\ntargets: price\n")
    assert load_scenario(path).csv == target


def test_change_points_given_as_a_list_are_not_taken_for_a_path(tmp_path):
    path = _write(tmp_path, MINIMAL + "change_points: ['2024-01-02', 300]\n")
    assert load_scenario(path).change_points == ["2024-01-02", 300]


def test_name_defaults_to_the_file_stem_and_can_be_given(tmp_path):
    assert load_scenario(_write(tmp_path, MINIMAL, "my-scenario.yaml")).name == "my-scenario"
    named = _write(tmp_path, "name: other\n" + MINIMAL, "x.yaml")
    assert load_scenario(named).name == "other"


def test_defaults_of_a_minimal_scenario(tmp_path):
    scenario = load_scenario(_write(tmp_path, MINIMAL))
    assert scenario.targets == ["price"]
    assert scenario.features == []
    assert scenario.inputs == ["price"]
    assert scenario.key is None
    assert (scenario.lookback, scenario.horizon, scenario.label_delay) == (32, 1, None)
    assert scenario.effective_label_delay == 1
    assert scenario.missing == "error"
    assert scenario.bad_records == "error"
    assert scenario.seed == 0
    assert scenario.realtime_factor is None
    assert scenario.model == ModelConfig()
    assert scenario.model.type == "mlp" and scenario.model.hidden == [32]
    assert scenario.model.lr == 0.01 and scenario.model.optimizer == "sgd"
    assert scenario.detector == DetectorConfig()
    assert scenario.detector.type == "adwin" and scenario.detector.params == {}
    assert scenario.normalization == NormalizationConfig()
    assert scenario.adaptation == AdaptationConfig()
    assert scenario.adaptation.adapters == []


def test_default_lists_are_not_shared_between_instances():
    a, b = ModelConfig(), ModelConfig()
    a.hidden.append(7)
    assert b.hidden == [32]


def test_inputs_are_features_then_targets_without_repeats():
    scenario = Scenario(
        name="s", csv="x.csv", timestamp="t", features=["load", "price"], targets=["price", "y"]
    )
    assert scenario.inputs == ["load", "price", "y"]


def test_label_delay_defaults_to_horizon_and_may_be_larger():
    assert Scenario(name="s", timestamp="t", targets="y", horizon=4).effective_label_delay == 4
    late = Scenario(name="s", timestamp="t", targets="y", horizon=2, label_delay=5)
    assert late.effective_label_delay == 5


def test_nested_sections_are_read(tmp_path):
    text = MINIMAL + (
        "model:\n  type: linear\n  lr: 0.5\n  hidden: [8, 4]\n"
        "detector:\n  type: kswin\n  params: {alpha: 0.01}\n  cooldown: 7\n"
        "normalization:\n  mode: ewm\n  halflife: 50\n"
    )
    scenario = load_scenario(_write(tmp_path, text))
    assert scenario.model.type == "linear"
    assert scenario.model.lr == 0.5
    assert scenario.model.hidden == [8, 4]
    assert scenario.detector.params == {"alpha": 0.01}
    assert scenario.detector.cooldown == 7
    assert scenario.normalization.mode == "ewm"
    assert scenario.normalization.halflife == 50.0


def test_the_bundled_scenarios_load():
    root = Path(__file__).resolve().parent.parent / "scenarios"
    default = load_scenario(root / "default.yaml")
    assert default.name == "default"
    assert default.inputs == ["load", "temperature", "price"]
    assert default.csv == (root / "default.csv").resolve()
    assert default.csv.is_file()
    symbols = load_scenario(root / "symbols.yaml")
    assert symbols.key == "symbol"
    assert symbols.horizon == 3


# -- fingerprint --------------------------------------------------------------------------------


def test_fingerprint_is_stable_across_loads_and_json_safe(tmp_path):
    path = _write(tmp_path, MINIMAL + "model:\n  lr: 0.05\n")
    first, second = load_scenario(path).fingerprint(), load_scenario(path).fingerprint()
    assert first == second
    assert json.loads(json.dumps(first)) == first


def test_fingerprint_survives_the_json_round_trip_resume_uses(tmp_path):
    path = _write(tmp_path, MINIMAL + "change_points: points.json\n")
    scenario = load_scenario(path)
    restored = Scenario.model_validate_json(scenario.model_dump_json())
    assert restored.fingerprint() == scenario.fingerprint()
    assert restored == scenario


def test_fingerprint_ignores_presentation_and_pacing_only():
    base = Scenario(name="a", csv="x.csv", timestamp="t", targets="y")
    same = base.model_copy(
        update={"name": "b", "description": "words", "realtime_factor": 60.0, "chunk_size": 7}
    )
    assert same.fingerprint() == base.fingerprint()
    for change in (
        {"lookback": 5},
        {"seed": 1},
        {"model": ModelConfig(lr=0.02)},
        {"detector": DetectorConfig(type="none")},
        {"missing": "drop"},
        {"csv": Path("other.csv")},
    ):
        assert base.model_copy(update=change).fingerprint() != base.fingerprint(), change


# -- overrides ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("model.lr=0.05", (["model", "lr"], 0.05)),
        ("lookback=16", (["lookback"], 16)),
        ("detector.type=kswin", (["detector", "type"], "kswin")),
        ("model.hidden=[16, 8]", (["model", "hidden"], [16, 8])),
        ("model.subtract_last=false", (["model", "subtract_last"], False)),
        ("model.grad_clip=null", (["model", "grad_clip"], None)),
        ("description=", (["description"], None)),
        ("description=a=b", (["description"], "a=b")),
        (" seed = 3", (["seed"], 3)),
        ("detector.params={delta: 0.01}", (["detector", "params"], {"delta": 0.01})),
    ],
)
def test_parse_override(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("model.lr", "expected KEY=VALUE"),
        ("=3", "the key before '=' is empty"),
        ("model.hidden=[1, 2", "not valid YAML"),
    ],
)
def test_parse_override_errors_name_the_setting(text, fragment):
    with pytest.raises(ConfigError) as info:
        parse_override(text)
    assert fragment in str(info.value)
    assert repr(text) in str(info.value)


def test_apply_overrides_merges_without_touching_the_original():
    raw = {"model": {"lr": 0.1, "hidden": [4]}, "seed": 1}
    merged = apply_overrides(raw, {"model.lr": 0.05, "detector.params.delta": 0.5, "seed": 9})
    assert merged == {
        "model": {"lr": 0.05, "hidden": [4]},
        "detector": {"params": {"delta": 0.5}},
        "seed": 9,
    }
    assert raw == {"model": {"lr": 0.1, "hidden": [4]}, "seed": 1}
    merged["model"]["hidden"].append(8)
    assert raw["model"]["hidden"] == [4]


def test_load_scenario_applies_overrides_on_top_of_the_yaml(tmp_path):
    path = _write(tmp_path, MINIMAL + "lookback: 10\nmodel:\n  lr: 0.1\n  type: linear\n")
    scenario = load_scenario(path, {"model.lr": 0.05, "lookback": 4, "detector.type": "none"})
    assert scenario.model.lr == 0.05
    assert scenario.model.type == "linear"  # the rest of the section is kept
    assert scenario.lookback == 4
    assert scenario.detector.type == "none"


# -- error messages -----------------------------------------------------------------------------


def test_missing_file(tmp_path):
    message = _error(tmp_path / "nope.yaml")
    assert "nope.yaml" in message and "not found" in message


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    path = _write(tmp_path, "csv: data.csv\ntimestamp: time\ntargets: price\n  lookback: 4\n")
    message = _error(path)
    assert message.startswith(f"{path}:4: malformed YAML")


def test_malformed_flow_sequence_names_a_line(tmp_path):
    path = _write(tmp_path, "csv: data.csv\ntimestamp: time\ntargets: [price\nlookback: 4\n")
    assert re.match(rf"{re.escape(str(path))}:\d+: malformed YAML", _error(path))


def test_empty_and_non_mapping_files(tmp_path):
    assert "empty" in _error(_write(tmp_path, "", "empty.yaml"))
    message = _error(_write(tmp_path, "- a\n- b\n", "list.yaml"))
    assert "mapping" in message and "list" in message


def test_unknown_top_level_option_names_key_line_and_suggestion(tmp_path):
    path = _write(tmp_path, MINIMAL + "lookbak: 4\n")
    message = _error(path)
    assert message.startswith(f"{path}:4: unknown option 'lookbak'")
    assert "(did you mean 'lookback'?)" in message
    assert "valid options:" in message


def test_unknown_nested_option_names_the_dotted_key_and_its_line(tmp_path):
    path = _write(tmp_path, MINIMAL + "model:\n  lr: 0.1\n  hiden: [3]\n")
    message = _error(path)
    assert message.startswith(f"{path}:6: unknown option 'model.hiden'")
    assert "did you mean 'hidden'" in message
    assert "batch_size" in message  # lists the model section's options, not the top level
    assert "lookback" not in message


@pytest.mark.parametrize(
    ("extra", "line", "key", "expected"),
    [
        ("lookback: many\n", 4, "lookback", "valid integer"),
        ("lookback: 0\n", 4, "lookback", "greater than 0"),
        ("features: 3\n", 4, "features", "valid list"),
        ("model:\n  lr: -1\n", 5, "model.lr", "greater than 0"),
        ("model:\n  type: transformer\n", 5, "model.type", "'mlp', 'linear'"),
        ("model: 3\n", 4, "model", "dictionary"),
        ("missing: zero\n", 4, "missing", "'error', 'drop' or 'ffill'"),
    ],
)
def test_wrong_type_says_where_and_what_was_expected(tmp_path, extra, line, key, expected):
    path = _write(tmp_path, MINIMAL + extra)
    message = _error(path)
    assert message.startswith(f"{path}:{line}: option '{key}':"), message
    assert expected in message


def test_wrong_type_quotes_the_offending_value(tmp_path):
    assert "(got 'many')" in _error(_write(tmp_path, MINIMAL + "lookback: many\n"))


def test_missing_required_option(tmp_path):
    path = _write(tmp_path, "csv: data.csv\ntimestamp: time\n")
    assert _error(path) == f"{path}: required option 'targets' is missing"


def test_several_mistakes_are_all_reported(tmp_path):
    message = _error(_write(tmp_path, MINIMAL + "lookbak: 4\nseed: x\n"))
    assert "'lookbak'" in message and "'seed'" in message
    assert len(message.splitlines()) == 2


def test_cross_field_checks_are_plain_sentences(tmp_path):
    message = _error(_write(tmp_path, MINIMAL + "key: price\n"))
    assert message == f"{tmp_path / 'scenario.yaml'}: columns used twice: ['price']"
    message = _error(_write(tmp_path, MINIMAL + "horizon: 3\nlabel_delay: 2\n"))
    assert "label_delay (2) must be at least horizon (3)" in message
    assert "Value error" not in message


def test_empty_targets_are_refused():
    with pytest.raises(ValueError, match="at least one target"):
        Scenario(name="s", timestamp="t", targets=[])


def test_unknown_override_key_is_blamed_on_the_command_line_with_a_dotted_hint(tmp_path):
    path = _write(tmp_path, MINIMAL + "model:\n  lr: 0.1\n")
    message = _error(path, {"model.lrr": 0.5})
    assert message.startswith("command line: unknown option 'model.lrr'")
    assert "(did you mean 'model.lr'?)" in message


def test_invalid_override_value_is_not_blamed_on_the_yaml_line(tmp_path):
    path = _write(tmp_path, MINIMAL + "lookback: 8\n")
    message = _error(path, {"lookback": 0})
    assert message.startswith("command line: option 'lookback':")
    assert "greater than 0" in message
    assert f"{path}:" not in message


def test_yaml_mistake_is_still_located_in_the_yaml_when_overrides_are_given(tmp_path):
    path = _write(tmp_path, MINIMAL + "seed: x\n")
    message = _error(path, {"lookback": 4})
    assert message.startswith(f"{path}:4: option 'seed'")


def test_suggest():
    assert suggest("lookbak", ["lookback", "horizon"]) == " (did you mean 'lookback'?)"
    assert suggest("qqqq", ["lookback", "horizon"]) == ""
