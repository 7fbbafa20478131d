"""Tests of ``neuralsync bench population``: one quick run, its JSON and what it must show.

Not a speed test (the machine is shared): it checks the figures' structure and that every
backend trained the population.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from cli_support import last_json_object
from typer.testing import CliRunner

from neuralsync.bench.population import TRAIN_BACKENDS, format_table
from neuralsync.cli import app


@pytest.fixture(scope="module")
def figures() -> dict[str, Any]:
    threads = torch.get_num_threads()
    result = CliRunner().invoke(app, ["bench", "population", "--quick", "--json"])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == threads  # the bench restores the caller's threads
    return last_json_object(result.stdout)


def test_figures_have_every_backend_and_ratio(figures):
    training = figures["training"]
    assert figures["quick"] is True and figures["torch_threads"] == 1
    assert training["n_models"] == 16 and training["batch_size"] == 16
    assert set(training["median_seconds"]) == set(TRAIN_BACKENDS)
    for backend in TRAIN_BACKENDS:
        times = training["seconds"][backend]
        assert len(times) == training["reps"] and all(t > 0 for t in times)
    assert set(training["ratios"]) == {"loop_over_vmap", "loop_over_hand"}
    median = training["median_seconds"]
    assert training["ratios"]["loop_over_hand"] == pytest.approx(median["loop"] / median["hand"])
    assert training["auto_backend"] == "hand"
    assert training["meets_target"] == (training["loop_over_auto"] >= training["target_ratio"])


def test_every_backend_trained_the_population(figures):
    training = figures["training"]
    before = training["loss_before_each"]
    assert len(before) == 16
    for backend in TRAIN_BACKENDS:
        after = training["loss_after_each"][backend]
        assert len(after) == 16
        assert all(math.isfinite(a) and a < b for a, b in zip(after, before, strict=True))
    # Same initial models, same minibatches: the backends agree on what was learned.
    loop = training["loss_after"]["loop"]
    for backend in ("vmap", "hand"):
        assert training["loss_after"][backend] == pytest.approx(loop, rel=1e-3)


def test_the_table_shows_each_backend(figures):
    from rich.console import Console

    console = Console(width=120, record=True)
    console.print(format_table(figures))
    text = console.export_text()
    for backend in TRAIN_BACKENDS:
        assert backend in text
    assert "hand (auto)" in text and "target loop / auto" in text


def test_replay_with_evolution_on_and_off(figures):
    replay = figures["replay"]
    on, off = replay["on"], replay["off"]
    assert on["rows"] == off["rows"] == 2500
    assert on["searches"] >= 1 and off["searches"] == 0 and off["evolution_swaps"] == 0
    assert on["events_per_second"] > 0 and off["events_per_second"] > 0
    assert replay["on_over_off"] == pytest.approx(
        on["events_per_second"] / off["events_per_second"]
    )
