"""Tests of ``neuralsync bench seeds``: the MNIST and character-GPT benches, their data readers.

The quick paths run on small synthetic arrays, so they need no data files; one test per bench
runs on the shared data and skips (saying why) when it is absent.
"""

from __future__ import annotations

import gzip
import json
import os

import numpy as np
import pytest
import torch

from neuralsync.bench.chargpt import CharGPT, CharText, char_windows
from neuralsync.bench.mnist import Mnist, data_dir, load_mnist, mnist_mlp, read_idx
from neuralsync.bench.seeds import (
    GPT_COOLDOWN,
    GPT_DEFAULTS,
    GPT_METHODS,
    format_hybrid_es,
    format_resonance_gpt,
    plain_sgd,
    run_hybrid_es,
    run_resonance_gpt,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # The benches take one thread themselves; the helpers called directly here do the same,
    # since a second thread on a small shared CPU slows these tiny models down.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _shared_data():
    try:
        return data_dir(("mnist", "tinyshakespeare.txt"))
    except FileNotFoundError as error:
        return pytest.skip(f"shared data absent: {error}")


def _synthetic_mnist(seed: int = 0) -> Mnist:
    """Ten noisy prototypes of 784 pixels in 0..255: learnable, like digits, in a second."""
    rng = np.random.default_rng(seed)
    prototypes = rng.integers(0, 256, (10, 784))

    def draw(n):
        labels = rng.integers(0, 10, n)
        noise = rng.normal(0, 90, (n, 784))
        images = np.clip(prototypes[labels] + noise, 0, 255).astype(np.uint8)
        return images.reshape(n, 28, 28), labels.astype(np.uint8)

    images, labels = draw(2600)
    test_images, test_labels = draw(1000)
    return Mnist.from_arrays(images, labels, test_images, test_labels, validation=500)


def _synthetic_text(seed: int = 0, n: int = 30_000) -> CharText:
    """A text where each character mostly determines the next: a GPT can learn it quickly."""
    rng = np.random.default_rng(seed)
    alphabet = "abcdefghij .\n"
    follow = rng.integers(0, len(alphabet), len(alphabet))
    codes = [0]
    for _ in range(n - 1):
        codes.append(follow[codes[-1]] if rng.random() < 0.8 else rng.integers(len(alphabet)))
    return CharText.from_text("".join(alphabet[c] for c in codes))


def test_read_idx_parses_the_format_and_rejects_what_is_not(tmp_path):
    values = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    header = bytes([0, 0, 0x08, 3]) + np.array([2, 3, 4], dtype=">u4").tobytes()
    path = tmp_path / "x-idx3-ubyte.gz"
    with gzip.open(path, "wb") as handle:
        handle.write(header + values.tobytes())
    np.testing.assert_array_equal(read_idx(path), values)
    (tmp_path / "bad").write_bytes(b"PK\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes(header + values.tobytes()[:-1])
    with pytest.raises(ValueError, match="header says shape"):
        read_idx(tmp_path / "short")


def test_missing_data_gets_an_error_naming_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURALSYNC_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere.*NEURALSYNC_DATA"):
        data_dir()
    monkeypatch.setenv("NEURALSYNC_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="lacks mnist"):
        data_dir(("mnist",))
    (tmp_path / "mnist").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\.gz is missing"):
        load_mnist()
    monkeypatch.setenv("NEURALSYNC_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_resonance_gpt(quick=True, out=tmp_path / "out", log=lambda _: None)
    with pytest.raises(ValueError, match="seeds: expected at least 1"):
        run_resonance_gpt(quick=True, seeds=0, out=tmp_path / "out", log=lambda _: None)


def test_plain_sgd_learns_and_reports_at_its_checkpoints():
    data = _synthetic_mnist()
    sgd = plain_sgd(data, lr=0.1, batch_size=32, checkpoints=[320, 3200], curve_every=640)
    assert [p["samples"] for p in sgd["checkpoints"]] == [320, 3200]
    assert sgd["checkpoints"][-1]["test_accuracy"] > 0.5  # chance is 0.1
    assert [p["samples"] for p in sgd["curve"]] == [320, 640, 1280, 1920, 2560, 3200]


def test_hybrid_es_quick_run_on_synthetic_digits(tmp_path):
    lines = []
    report = run_hybrid_es(quick=True, out=tmp_path, log=lines.append, data=_synthetic_mnist())
    names = [run["name"] for run in report["runs"]]
    assert names == ["published-p10", "published-p15", "published-p20", "efficient-p4"]
    for run in report["runs"]:
        history = run["history"]
        assert len(history) == run["generations"]
        assert run["samples"] == run["population"] * run["life_steps"] * 32 * run["generations"]
        for record in history:
            assert 0 <= record["test_accuracy"] <= 1 and record["sigma"] > 0
            assert record["diversity"] > 0
        assert run["best_test_accuracy"] >= run["final_test_accuracy"] > 0.2  # chance 0.1
        assert run["sgd"]["samples"] == run["samples"]
    robustness = report["robustness"]
    assert [(row["lr"], row["seed"]) for row in robustness] == [(0.01, 0), (0.2, 0), (0.2, 1)]
    for row in robustness:
        assert 0 < row["hybrid_lr_adapted"] <= 1 and row["final_lr"] > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"][0]["history"] == json.loads(json.dumps(report["runs"][0]["history"]))
    for plot in report["plots"]:
        assert os.path.getsize(plot) > 5_000
    assert {os.path.basename(p) for p in report["plots"]} == {
        "seeds_hybrid_accuracy.png", "seeds_hybrid_sigma.png", "seeds_hybrid_gain.png",
        "seeds_hybrid_diversity.png", "seeds_hybrid_lr.png",
    }  # fmt: skip
    text = format_hybrid_es(report)
    assert "published-p15" in text and "SGD" in text and "quick" in text
    assert "lr-adapted" in text and "worst over the learning rates" in text
    assert any("gen" in line for line in lines)


def test_resonance_gpt_quick_run_gives_every_method_the_same_budget(tmp_path):
    report = run_resonance_gpt(quick=True, seeds=2, out=tmp_path, log=lambda _: None,
                               text=_synthetic_text())  # fmt: skip
    assert set(report["runs"]) == set(GPT_METHODS)
    budget = report["budget_steps"]
    for method, rows in report["runs"].items():
        assert [r["seed"] for r in rows] == [0, 1]
        for row in rows:
            assert row["steps"] == budget
            assert np.isfinite(row["select_bpc"]) and np.isfinite(row["report_bpc"])
            assert row["select_bpc"] < np.log2(13)  # it learned: below a uniform guess
        summary = report["summary"][method]["report_bpc"]
        assert summary["min"] <= summary["mean"] <= summary["max"]
    # Defaults never move; random search never moves; resonance+ starts one member at them.
    defaults = ("defaults", "defaults-long", "defaults-cooldown")
    for row in [row for method in defaults for row in report["runs"][method]]:
        for record in row["history"]:
            for member in record["members"]:
                assert member["lr"] == pytest.approx(GPT_DEFAULTS["lr"])
    for row in report["runs"]["random"]:
        firsts = [m["lr"] for m in row["history"][0]["members"]]
        assert all([m["lr"] for m in r["members"]] == firsts for r in row["history"])
    start = report["runs"]["resonance+"][0]["history"][0]["members"][0]
    assert start["lr"] == pytest.approx(GPT_DEFAULTS["lr"])
    assert start["momentum"] == pytest.approx(GPT_DEFAULTS["momentum"])
    # Random search and the published rule start from the same draws.
    random0 = report["runs"]["random"][0]["history"][0]["members"]
    resonance0 = report["runs"]["resonance"][0]["history"][0]["members"]
    assert [m["lr"] for m in random0] == [m["lr"] for m in resonance0]
    # The other reading of the defaults: one model, every step of the budget; with resonance+'s
    # cooldown, the learning rate falls over the last generations.
    for method in ("defaults-long", "defaults-cooldown"):
        for row in report["runs"][method]:
            assert all(len(record["members"]) == 1 for record in row["history"])
            assert row["best_params"]["lr"] == pytest.approx(GPT_DEFAULTS["lr"])
    cooled = GPT_COOLDOWN[0]
    for method in ("defaults-cooldown", "resonance+"):
        scales = [r["lr_scale"] for r in report["runs"][method][0]["history"]]
        assert scales[:-cooled] == [1.0] * (len(scales) - cooled)
        assert 1.0 > scales[-1] > GPT_COOLDOWN[1]
    # resonance+ halves its population each generation down to one lineage.
    sizes = [len(r["members"]) for r in report["runs"]["resonance+"][0]["history"]]
    assert sizes == [4, 2, 1]
    assert set(report["verdict"]) == {
        f"{variant} vs {baseline}"
        for variant in ("resonance", "resonance+")
        for baseline in ("random", "defaults", "defaults-long", "defaults-cooldown")
    }
    assert len(report["plots"]) == 2 and all(os.path.getsize(p) > 5_000 for p in report["plots"])
    text = format_resonance_gpt(report)
    assert "resonance+" in text and "±" in text


def test_char_windows_and_the_gpt_are_causal():
    windows, targets = char_windows(np.arange(20), block=4, stride=3)
    assert windows[1].tolist() == [3, 4, 5, 6] and targets[1].tolist() == [4, 5, 6, 7]
    model = CharGPT(vocab=7, block=6, width=8, heads=2, layers=1)
    codes = torch.randint(0, 7, (2, 6), generator=torch.Generator().manual_seed(0))
    changed = codes.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 7
    with torch.no_grad():
        a, b = model(codes), model(changed)
    torch.testing.assert_close(a[:, :-1], b[:, :-1])  # no position sees a later one
    assert not torch.allclose(a[:, -1], b[:, -1])
    with pytest.raises(ValueError, match="cannot fill one window"):
        char_windows(np.arange(4), block=4, stride=1)


def test_the_shared_data_loads_and_the_quick_bench_runs_on_it(tmp_path):
    root = _shared_data()
    data = load_mnist(root)
    assert data.x_train.shape == (55_000, 784) and data.x_test.shape == (10_000, 784)
    assert data.y_train.min() == 0 and data.y_train.max() == 9
    assert float(data.x_train.min()) >= 0.0 and float(data.x_train.max()) == 1.0
    assert sum(p.numel() for p in mnist_mlp().parameters()) == 109_386
    from typer.testing import CliRunner

    from neuralsync.cli import app

    result = CliRunner().invoke(
        app, ["bench", "seeds", "hybrid-es", "--quick", "--out", str(tmp_path), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert "efficient-p4" in result.output
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["runs"][-1]["final_test_accuracy"] > 0.3  # chance is 0.1
