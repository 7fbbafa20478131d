"""``neuralsync bench evolution --quick``: every ablation variant runs, side by side."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from neuralsync.bench.evolution import VARIANTS, format_seeds_table, format_table, run_ablation
from neuralsync.cli import app
from neuralsync.errors import ConfigError


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("ablation")
    result = CliRunner().invoke(app, ["bench", "evolution", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert "| default | full |" in result.stdout
    return saved


def test_every_variant_ran_on_the_same_stream(report):
    runs = report["results"]["default"]
    assert list(runs) == list(VARIANTS)
    assert runs["no evolution"]["searches"] == 0 and runs["no evolution"]["swaps"] == 0
    for name in ("full", "no surrogate", "no Lamarckian", "no multi-scale"):
        assert runs[name]["searches"] >= 1 and runs[name]["evaluated"] >= 8
        assert runs[name]["mse_over_no_evolution"] == pytest.approx(
            runs[name]["mse"] / runs["no evolution"]["mse"]
        )
    assert runs["no surrogate"]["prefiltered"] == 0


def test_the_table_has_a_row_per_variant(report):
    table = format_table(report)
    assert table.count("\n") == 1 + len(VARIANTS)


def test_an_unknown_variant_is_refused():
    with pytest.raises(ConfigError, match="unknown variants"):
        run_ablation(quick=True, variants=["no brain"])


def test_several_seeds_report_the_ratio_at_each_and_how_often_evolution_was_lower():
    report = run_ablation(quick=True, variants=["full", "no evolution"], seeds=2, log=str)
    runs = report["results"]["default"]
    full = runs["full"]
    assert [s["seed"] for s in full["per_seed"]] == [0, 1]
    assert full["per_seed"][0]["mse"] == full["mse"]  # the first seed is the main table's
    ratios = [s["mse_over_no_evolution"] for s in full["per_seed"]]
    assert full["per_seed"][1]["mse"] != full["mse"]  # another seed, another path
    assert full["geo_mean_ratio"] == pytest.approx((ratios[0] * ratios[1]) ** 0.5)
    assert full["lower_on"] == sum(r < 1 for r in ratios)
    assert runs["no evolution"]["geo_mean_ratio"] == 1.0
    table = format_seeds_table(report)
    assert "| default | full |" in table and "| default | no evolution |" not in table


def test_scenarios_are_chosen_by_name():
    with pytest.raises(ConfigError, match="unknown scenarios"):
        run_ablation(quick=True, scenarios=["mars"])
    with pytest.raises(ConfigError, match="seeds: expected at least 1"):
        run_ablation(quick=True, seeds=0)
