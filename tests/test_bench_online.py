"""The online forecasting benchmark: protocol, baselines, the RLS live model, the command."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from neuralsync.bench.online import (
    ETT_BORDERS,
    LOOKBACK,
    METHODS,
    _execute,
    _linear,
    _pipeline_result,
    _plan,
    _run_pipeline,
    _stream,
    format_table,
    load_dataset,
    plot_grid,
    rls_components,
    run_online,
)
from neuralsync.bench.online_baselines import ChannelRLS, LastValue, WindowRLS
from neuralsync.bench.online_trace import plot_trace, read_events, read_windows
from neuralsync.cli import app
from neuralsync.errors import ConfigError


def _series(n: int, d: int = 3, seed: int = 0) -> np.ndarray:
    """Noisy coupled oscillations with a slow drift: learnable, not trivial."""
    rng = np.random.default_rng(seed)
    t = np.arange(n)[:, None]
    phases = rng.uniform(0, 6, d)
    base = np.sin(t / (6.0 + np.arange(d)) + phases) + 0.002 * t
    return base + 0.1 * rng.normal(size=(n, d))


def _csv(tmp_path, n: int, name: str = "toy.csv", d: int = 3):
    values = _series(n, d)
    frame = pd.DataFrame(values, columns=[f"c{i}" for i in range(d - 1)] + ["OT"])
    frame.insert(0, "date", pd.date_range("2020-01-01", periods=n, freq="h").astype(str))
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path, values


# -- data and splits ---------------------------------------------------------------------------


def test_splits_zscore_and_target_last(tmp_path):
    path, values = _csv(tmp_path, 1000)
    frame = pd.read_csv(path)
    frame[["OT", "c0", "c1"]].assign(date=frame["date"]).to_csv(path, index=False)
    data = load_dataset(path, target="OT")
    assert data.columns == ["c0", "c1", "OT"]  # the target is moved last
    assert data.borders == (200, 250, 1000)  # 20 / 5 / 75 %
    train = data.values[:200]
    np.testing.assert_allclose(train.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(train.std(0), 1, atol=1e-12)  # population std
    expected = (values - values[:200].mean(0)) / values[:200].std(0)
    np.testing.assert_allclose(data.values, expected)
    # Validation and test windows start lookback rows early; the first test target is row 250.
    x, y = data.windows("test", horizon=4)
    assert len(x) == (1000 - (250 - LOOKBACK)) - LOOKBACK - 4 + 1
    np.testing.assert_array_equal(y[0][0], data.values[250])
    np.testing.assert_array_equal(x[0][-1], data.values[249])
    assert data.rows("valid") == (200 - LOOKBACK, 250)


def test_ett_borders(tmp_path):
    path, _ = _csv(tmp_path, ETT_BORDERS[-1] + 100, name="ETTtoy.csv", d=2)
    data = load_dataset(path)
    assert data.borders == ETT_BORDERS
    assert len(data.values) == ETT_BORDERS[-1] + 100  # rows after the test border are unused
    short, _ = _csv(tmp_path, 5000, name="ETTshort.csv", d=2)
    with pytest.raises(ConfigError, match="needs 14400 rows"):
        load_dataset(short)


def test_bad_files_are_clear_errors(tmp_path):
    path, _ = _csv(tmp_path, 600)
    with pytest.raises(ConfigError, match="target column 'price' not found; pass --target"):
        load_dataset(path, target="price")
    pd.read_csv(path).drop(columns="date").to_csv(tmp_path / "nodate.csv", index=False)
    with pytest.raises(ConfigError, match="no 'date' column"):
        load_dataset(tmp_path / "nodate.csv")
    # Another name for the date column (the bundled scenarios' "timestamp") is --date.
    renamed = tmp_path / "timestamp.csv"
    pd.read_csv(path).rename(columns={"date": "timestamp"}).to_csv(renamed, index=False)
    with pytest.raises(ConfigError, match=r"no 'date' column.*pass --date COL"):
        load_dataset(renamed)
    same, plain = load_dataset(renamed, date="timestamp"), load_dataset(path)
    assert same.columns == plain.columns and np.array_equal(same.values, plain.values)
    with pytest.raises(ConfigError, match="not found"):
        load_dataset(tmp_path / "missing.csv")
    with pytest.raises(ConfigError, match="protocol 'leaky'"):
        run_online(path, 1, "leaky")


# -- the protocol -----------------------------------------------------------------------------


class _Recorder:
    """A last-value model that records which windows it learned before each forecast."""

    def __init__(self):
        self.learned: list[int] = []
        self.seen_at: list[list[int]] = []

    def learn(self, window, target):
        self.learned.append(int(window[0, 0]))

    def predict(self, window):
        self.seen_at.append(list(self.learned))
        return np.repeat(window[-1:], 1, axis=0)


@pytest.mark.parametrize("delay", [1, 5])
def test_stream_learns_a_window_only_after_its_delay(delay):
    x = np.arange(20.0)[:, None, None] * np.ones((1, 4, 1))  # window k is filled with k
    y = np.zeros((20, 1, 1))
    model = _Recorder()
    _stream(model, x, y, delay)
    for k, learned in enumerate(model.seen_at):
        assert learned == list(range(max(0, k - delay + 1)))


def test_linear_baselines_learn_validation_then_score_test_only(tmp_path):
    path, _ = _csv(tmp_path, 900)
    data = load_dataset(path)
    x, y = data.windows("valid+test", horizon=2)
    xt, yt = data.windows("test", horizon=2)
    np.testing.assert_array_equal(x[-len(xt) :], xt)  # the test windows close the stream
    np.testing.assert_array_equal(y[-len(yt) :], yt)
    persistence = _stream(LastValue(2), x, y, 2, score_from=len(x) - len(xt))
    assert persistence[:2] == _stream(LastValue(2), xt, yt, 2)[:2]
    # A learner scored on the same test windows has learned the validation ones first.
    fitted = ChannelRLS(LOOKBACK, 2, alpha=1.0, forgetting=0.99).fit(*data.windows("train", 2))
    learned = _stream(fitted, x, y, 2, score_from=len(x) - len(xt))
    result = _linear(lambda a, f: ChannelRLS(LOOKBACK, 2, a, f), data, 2, 2, [(1.0, 0.99)])
    assert result["mse"] == pytest.approx(learned[0]) and result["test_windows"] == len(xt)


def test_pipeline_windows_match_the_protocol(tmp_path):
    """A pipeline whose network cannot move from its start (the last-value forecast) scores
    exactly the last-value baseline: same windows, same entries, same scale."""
    path, _ = _csv(tmp_path, 900)
    data = load_dataset(path)
    for horizon in (1, 3):
        reference = _linear(lambda a, f, h=horizon: LastValue(h), data, horizon, horizon, [(1, 1)])
        frozen = _run_pipeline(data, horizon, "sgd_network", 1e-30, "test", seed=0)
        assert frozen["windows"] == reference["test_windows"]
        assert frozen["mse"] == pytest.approx(reference["mse"], rel=1e-5)
        assert frozen["mae"] == pytest.approx(reference["mae"], rel=1e-5)


# -- the linear baselines ---------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ChannelRLS, WindowRLS])
def test_baselines_ridge_start_equals_rls_from_scratch(cls):
    series = _series(300, d=2)
    x = np.stack([series[i : i + 8] for i in range(290)])
    y = np.stack([series[i + 8 : i + 10] for i in range(290)])
    args = (8, 2) if cls is ChannelRLS else (8, 2, 2)
    fitted = cls(*args, alpha=0.5).fit(x, y)
    online = cls(*args, alpha=0.5)
    for window, target in zip(x, y, strict=True):
        online.learn(window, target)
    np.testing.assert_allclose(online.predict(x[5]), fitted.predict(x[5]), atol=1e-8)
    assert np.mean((fitted.predict(x[-1]) - y[-1]) ** 2) < 0.1


# -- the benchmark -----------------------------------------------------------------------------


def test_run_online_quick_writes_results(tmp_path):
    path, _ = _csv(tmp_path, 1500)
    report = run_online(path, 1, "delayed", out=tmp_path / "run", quick=True)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["horizon"] == 1 and list(saved["methods"]) == list(METHODS)
    for method, result in saved["methods"].items():
        assert {"mse", "mae", "wall_s", "events_per_s"} <= set(result), method
        assert np.isfinite(result["mse"]) and result["mae"] > 0
    windows = {r["test_windows"] for r in saved["methods"].values()}
    assert windows == {1500 - (375 - LOOKBACK) - LOOKBACK - 1 + 1}  # borders (300, 375, 1500)
    methods = saved["methods"]
    assert methods["neuralsync"]["mse"] < methods["last_value"]["mse"]
    table = format_table(report)
    assert table.count("\n| ") == len(METHODS) + 1 and "**" in table
    png = plot_grid([report], tmp_path / "grid.png")
    assert png.stat().st_size > 1000


def test_passes_in_worker_processes_give_the_same_figures(tmp_path):
    """Every pass is deterministic and independent: two at a time in worker processes, the
    figures and choices are those of one at a time, in the order the methods were asked."""
    path, _ = _csv(tmp_path, 1500)
    methods = ("neuralsync", "last_value", "sgd_network", "neuralsync_no_adapt")
    one = run_online(path, 2, "delayed", quick=True, methods=methods)
    two = run_online(path, 2, "delayed", quick=True, methods=methods, jobs=2)
    assert list(two["methods"]) == list(methods) and two["jobs"] == 2 and two["elapsed_s"] > 0
    for method in methods:
        for field in ("mse", "mae", "selected", "swaps", "test_windows"):
            assert two["methods"][method].get(field) == one["methods"][method].get(field)
    with pytest.raises(ConfigError, match="jobs must be at least 1"):
        run_online(path, 2, "delayed", quick=True, jobs=0)


def test_each_test_pass_waits_for_the_rate_chosen_on_validation(tmp_path):
    """With a grid of rates, a method's test pass runs with the rate its validation passes
    chose, and the full pipeline with the one its variant without adaptation chose."""
    path, _ = _csv(tmp_path, 1500)
    data = load_dataset(path, rows=1500)
    methods = ("sgd_network", "neuralsync_no_adapt", "neuralsync")
    tasks = _plan(data, 2, 2, methods, [], (0.01, 0.3), seed=0)
    assert {t.key for t in tasks if not t.needs} == {
        ("valid", m, lr) for m in methods[:2] for lr in (0.01, 0.3)
    }
    order = []
    done = _execute(tasks, 2, lambda key, _: order.append(key))
    for method, chooser in zip(methods, (*methods[:2], methods[1]), strict=True):
        scores = {lr: done[("valid", chooser, lr)][0]["mse"] for lr in (0.01, 0.3)}
        assert done[("test", method)][0]["lr"] == min(scores, key=scores.get)
        assert order.index(("test", method)) > order.index(("valid", chooser, 0.3))


def test_the_neuralsync_rows_choose_their_settings_in_turn_at_the_chosen_rate(tmp_path):
    """The live model's settings are chosen on validation after the rate, one after another:
    the window expert's clip width at the chosen rate, then the selection at the chosen rate
    and width. The full pipeline takes its variant's choices, and results.json says what ran."""
    path, _ = _csv(tmp_path, 1500)
    data = load_dataset(path, rows=1500)
    methods = ("neuralsync_no_adapt", "neuralsync")
    choices = (("rls_window_clip", (3.0, 0.5)), ("rls_selection", ("mixture", "best")))
    tasks = _plan(data, 2, 2, methods, [], (0.01, 0.3), seed=0, choices=choices)
    by_key = {t.key: t for t in tasks}
    rates = {("valid", methods[0], lr) for lr in (0.01, 0.3)}
    width_key = ("valid_model", methods[0], "rls_window_clip", 0.5)
    best_key = ("valid_model", methods[0], "rls_selection", "best")
    assert set(by_key[width_key].needs) == rates
    assert set(by_key[best_key].needs) == rates | {width_key}
    assert set(by_key[("test", methods[1])].needs) == rates | {width_key, best_key}
    done = _execute(tasks, 1, lambda key, _: None)
    scores = {lr: done[("valid", methods[0], lr)][0]["mse"] for lr in (0.01, 0.3)}
    lr = min(scores, key=scores.get)
    # The rate passes ran with every setting's first value.
    assert done[("valid", methods[0], 0.3)][0]["model"] == {
        "rls_window_clip": 3.0,
        "rls_selection": "mixture",
    }
    assert done[width_key][0]["lr"] == lr
    widths = {3.0: scores[lr], 0.5: done[width_key][0]["mse"]}
    assert widths[0.5] != widths[3.0]  # the width changes the live model's forecasts
    width = min(widths, key=widths.get)
    assert done[best_key][0]["lr"] == lr
    assert done[best_key][0]["model"] == {"rls_window_clip": width, "rls_selection": "best"}
    selections = {"mixture": widths[width], "best": done[best_key][0]["mse"]}
    chosen = {"rls_window_clip": width, "rls_selection": min(selections, key=selections.get)}
    for method in methods:
        test = done[("test", method)][0]
        assert (test["lr"], test["model"]) == (lr, chosen)
    result = _pipeline_result(done, methods[0])
    assert result["selected"] == {"lr": lr, **chosen}
    assert set(result["valid_mse"]) == {
        "lr=0.01",
        "lr=0.3",
        "rls_window_clip=0.5",
        "rls_selection=best",
    }
    # One rate: a setting's first value still gets a pass of its own to be compared with.
    one_rate = _plan(data, 2, 2, methods[:1], [], (0.01,), seed=0, choices=choices[:1])
    assert {t.key for t in one_rate} == {
        ("valid", methods[0], 0.01),
        width_key,
        ("test", methods[0]),
    }
    # Nothing to choose: no validation pass; the test pass runs with the first values.
    fixed = _plan(
        data, 2, 2, methods[:1], [], (0.01,), seed=0, choices=(("rls_window_clip", (3.0,)),)
    )
    assert {t.key for t in fixed} == {("test", methods[0])}


def test_fsnet_protocol_with_a_leak_runs_only_the_baselines(tmp_path):
    path, _ = _csv(tmp_path, 1500)
    methods = ("last_value", "nlinear_channel", "neuralsync")
    report = run_online(path, 3, "fsnet", quick=True, methods=methods)
    assert "skipped" in report["methods"]["neuralsync"]
    assert "not run" in format_table(report)
    # Same windows, learned earlier: the persistence score is the same, a learner's is not.
    delayed = run_online(path, 3, "delayed", quick=True, methods=methods[:2])
    leaky, honest = report["methods"], delayed["methods"]
    assert leaky["last_value"]["mse"] == honest["last_value"]["mse"]
    assert leaky["nlinear_channel"]["test_windows"] == honest["nlinear_channel"]["test_windows"]
    assert leaky["nlinear_channel"]["mse"] != honest["nlinear_channel"]["mse"]


def test_command_line(tmp_path):
    path, _ = _csv(tmp_path, 1500)
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "online",
            "--data",
            str(path),
            "--horizon",
            "2",
            "--quick",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "| neuralsync |" in result.output
    assert (tmp_path / "results.json").is_file()
    bad = CliRunner().invoke(app, ["bench", "online", "--data", str(path), "--target", "zz"])
    assert bad.exit_code == 2 and "target column 'zz' not found" in bad.output
    # --method runs a subset; an unknown one is an error that lists the methods.
    some = ["bench", "online", "--data", str(path), "--quick", "--out", str(tmp_path / "some")]
    result = CliRunner().invoke(
        app, [*some, "--method", "last_value", "--method", "sgd_network", "--trace"]
    )
    assert result.exit_code == 0, result.output
    ran = json.loads((tmp_path / "some" / "results.json").read_text())
    assert set(ran["methods"]) == {"last_value", "sgd_network"}
    traced = tmp_path / "some" / "trace"
    assert (traced / "sgd_network" / "events.jsonl").is_file()
    assert len(read_windows(traced / "last_value")) == ran["methods"]["last_value"]["test_windows"]
    bad = CliRunner().invoke(app, [*some, "--method", "arima"])
    assert bad.exit_code == 2 and "unknown methods ['arima']" in bad.output


def test_rls_components_score_every_candidate_on_validation_and_test(tmp_path):
    path, _ = _csv(tmp_path, 1000)
    data = load_dataset(path)
    figures = rls_components(data, 2)
    assert set(figures) == {"valid", "test"}
    for split, scores in figures.items():
        x, y = data.windows(split, 2)
        last_value = float(((y - x[:, -1:, :]) ** 2).mean())
        assert scores["last_value"] == pytest.approx(last_value, rel=1e-6)
        # The default forecast is the mixture (float32 on the way out).
        assert scores["forecast"] == pytest.approx(scores["mixture"], rel=1e-5)
        assert scores["channel"] < last_value  # the toy series is learnable
    leader = rls_components(data, 2, rls_selection="leader")
    assert leader["test"]["channel"] == figures["test"]["channel"]  # the experts are the same
    # The live model as the pipeline drives it: the variant without adaptation at the same
    # rate and width (quick: lr 0.01, the first width) scores the same forecasts.
    pipeline = run_online(path, 2, quick=True, methods=("neuralsync_no_adapt",))
    assert pipeline["methods"]["neuralsync_no_adapt"]["mse"] == pytest.approx(
        figures["test"]["forecast"], rel=1e-6
    )


def test_trace_keeps_every_window_and_the_pipelines_events(tmp_path):
    """``--trace``: per-window errors that add up to the run's figures, on the test windows'
    own rows, and the full pipeline's decisions (a regime change in the test rows here)."""
    path, _ = _csv(tmp_path, 1500)
    frame = pd.read_csv(path)
    frame.loc[900:, "OT"] = 3.0 - 2.0 * frame.loc[900:, "OT"]  # the target turns over
    frame.to_csv(path, index=False)
    methods = ("last_value", "nlinear_channel", "neuralsync")
    report = run_online(
        path, 2, "delayed", out=tmp_path / "run", quick=True, trace=True, methods=methods
    )
    trace = tmp_path / "run" / "trace"
    first = load_dataset(path).rows("test")[0] + LOOKBACK - 1
    for method in methods:
        windows = read_windows(trace / method)
        result = report["methods"][method]
        assert len(windows) == result["test_windows"]
        assert windows["origin"].tolist() == list(range(first, first + len(windows)))
        assert windows["mse"].mean() == pytest.approx(result["mse"], rel=1e-9)
        assert windows["mae"].mean() == pytest.approx(result["mae"], rel=1e-9)
    events = read_events(trace / "neuralsync")
    assert (events["type"] == "regime_change").any()
    assert (events["type"] == "swap").sum() == report["methods"]["neuralsync"]["swaps"]
    assert (trace / "trace.png").stat().st_size > 1000
    shutil.rmtree(trace / "last_value")  # without the reference: each method's own MSE
    assert plot_trace(trace, tmp_path / "own.png").stat().st_size > 1000
    with pytest.raises(FileNotFoundError, match="run with --trace first"):
        plot_trace(tmp_path, tmp_path / "none.png")
    with pytest.raises(ConfigError, match="trace: expected an output directory"):
        run_online(path, 2, "delayed", quick=True, trace=True)
