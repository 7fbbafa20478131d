"""``neuralsync bench adaptation --quick``: the three methods on the recurring scenario and
ETTh2 (when ../shared/data has it), as a table and as JSON."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from neuralsync.bench.adaptation import METHODS, data_dir
from neuralsync.cli import app


def test_bench_adaptation_quick_prints_a_table_and_json(tmp_path):
    out = tmp_path / "figures.json"
    result = CliRunner().invoke(app, ["bench", "adaptation", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| scenario | method | median lag | total excess error |" in result.output
    figures = json.loads(out.read_text(encoding="utf-8"))
    expected = {"recurring", "etth2"} if (data_dir() / "ETTh2.csv").is_file() else {"recurring"}
    assert set(figures["scenarios"]) == expected
    for name, scenario in figures["scenarios"].items():
        assert set(scenario["methods"]) == set(METHODS)
        changes = {m["changes"] for m in scenario["methods"].values()}
        assert len(changes) == 1 and changes.pop() >= 1, name  # the same changes for all
        for method in scenario["methods"].values():
            assert method["median_lag"] is None or method["median_lag"] >= 0
    recurring = figures["scenarios"]["recurring"]
    assert recurring["basis"] == "true"
    assert recurring["methods"]["online_sgd"]["swaps"] == 0
    assert (
        recurring["methods"]["fresh_reset"]["swaps"]
        == recurring["methods"]["fresh_reset"]["detections"]
    )
