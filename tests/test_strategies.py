"""Tests of the population strategies HybridES and ResonanceHPO on small synthetic problems."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from neuralsync.evolution.strategies import DEFAULT_RANGES, HybridES, ResonanceHPO


def _regression(n: int = 600, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (
        torch.sin(2 * x[:, :1])
        + 0.5 * x[:, 1:2] * x[:, 2:3]
        + 0.05 * torch.randn(n, 1, generator=g)
    )
    return x[:400], y[:400], x[400:], y[400:]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))


HISTORY_FIELDS = {
    "generation", "best_fitness", "mean_fitness", "best_before_learning", "parent_fitness",
    "sigma", "diversity", "samples_seen", "wall_seconds", "lr", "diverged",
}  # fmt: skip


def test_hybrid_es_improves_on_its_initial_parent_and_records_its_history():
    x, y, xv, yv = _regression()
    records = []
    es = HybridES(_mlp, population=6, life_steps=15, generations=6, lr=0.05, batch_size=32, seed=1)
    es.fit(x, y, xv, yv, callback=records.append)
    history = es.history_
    assert records == history and len(history) == 6
    for record in history:
        assert set(record) >= HISTORY_FIELDS
        assert record["diversity"] > 0 and math.isfinite(record["mean_fitness"])
        assert record["best_fitness"] <= record["mean_fitness"]
    assert [r["samples_seen"] for r in history] == [6 * 15 * 32 * (g + 1) for g in range(6)]
    initial = history[0]["parent_fitness"]
    assert es.best_fitness_ < initial and history[-1]["best_fitness"] < initial
    assert len({r["sigma"] for r in history}) > 1  # σ adapts
    # The kept best model really has the fitness recorded for it.
    loss = nn.functional.mse_loss(es.best_model_(xv), yv).item()
    assert loss == pytest.approx(es.best_fitness_, rel=1e-5)
    # Lamarckian: the next parent is the previous generation's best child, as trained.
    for prev, nxt in itertools.pairwise(history):
        assert nxt["parent_fitness"] == prev["best_fitness"]


def test_hybrid_es_is_deterministic_and_selects_by_a_metric():
    x, y, xv, yv = _regression()
    yc, yvc = (y > 0).long().squeeze(1), (yv > 0).long().squeeze(1)

    def classifier():
        return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))

    def accuracy(prediction, target):
        return float((prediction.argmax(1) == target).float().mean())

    def run():
        es = HybridES(classifier, population=4, life_steps=10, generations=3, lr=0.1,
                      select="metric", noise="relative", seed=3)  # fmt: skip
        return es.fit(x, yc, xv, yvc, loss=nn.functional.cross_entropy, metric=accuracy)

    a, b = run(), run()
    assert [r["metric"] for r in a.history_] == [r["metric"] for r in b.history_]
    assert [r["best_fitness"] for r in a.history_] == [r["best_fitness"] for r in b.history_]
    assert all(0.0 <= r["metric"] <= 1.0 for r in a.history_)
    assert a.history_[-1]["metric"] > 0.6


def test_hybrid_es_without_validation_scores_on_training_rows():
    x, y, _, _ = _regression()
    es = HybridES(_mlp(), population=3, life_steps=5, generations=2, eval_size=100, seed=0)
    es.fit(x, y)
    assert len(es.history_) == 2 and isinstance(es.parent_, nn.Sequential)
    with pytest.raises(ValueError, match="give both x_val and y_val"):
        es.fit(x, y, x_val=x)
    with pytest.raises(ValueError, match="noise must be"):
        HybridES(_mlp, noise="gaussian")


def test_a_self_adapted_learning_rate_recovers_from_one_set_too_small_or_too_large():
    """With ``lr_sigma`` the learning rate is inherited and mutated: started too small it
    rises, started so large that SGD wrecks the network it falls; both runs end with a lower
    loss than the same runs with the rate fixed."""
    x, y, xv, yv = _regression()

    def run(lr, lr_sigma):
        es = HybridES(_mlp, population=6, life_steps=10, generations=12, lr=lr,
                      lr_sigma=lr_sigma, batch_size=32, seed=0)  # fmt: skip
        return es.fit(x, y, xv, yv)

    for lr in (0.001, 2.0):
        fixed, adapted = run(lr, 0.0), run(lr, 0.7)
        rates = [r["lr"] for r in adapted.history_]
        assert {r["lr"] for r in fixed.history_} == {lr} and fixed.lr_ == lr
        assert adapted.lr_ == rates[-1] and len(set(rates)) > 1
        if lr < 0.01:
            assert max(rates) > 10 * lr
        else:
            assert max(rates) < lr / 2
        assert adapted.best_fitness_ < fixed.best_fitness_ - 0.03
    with pytest.raises(ValueError, match="lr_sigma"):
        HybridES(_mlp, lr_sigma=-1.0)


def test_a_generation_whose_children_all_diverge_keeps_its_parent_and_halves_the_rate():
    x, y, xv, yv = _regression()
    es = HybridES(_mlp, population=4, life_steps=10, generations=4, lr=1e6, lr_sigma=0.1,
                  batch_size=32, seed=0).fit(x, y, xv, yv)  # fmt: skip
    first = es.history_[0]
    assert first["diverged"] and first["lr"] == 5e5
    assert [r["parent_fitness"] for r in es.history_] == [first["parent_fitness"]] * 4
    assert all(torch.isfinite(p).all() for p in es.parent_.parameters())


def _bowl(params, seed):
    return (math.log10(params["lr"]) + 3.5) ** 2 + (params["momentum"] - 0.8) ** 2


def test_resonance_hpo_stays_in_range_is_deterministic_and_keeps_the_best():
    def run(seed):
        return ResonanceHPO(_bowl, population=8, generations=12, seed=seed).fit()

    a, b, c = run(0), run(0), run(1)
    assert a.history_[-1]["members"] == b.history_[-1]["members"]
    assert a.best_params_ == b.best_params_ and a.best_loss_ == b.best_loss_
    assert a.history_[-1]["members"] != c.history_[-1]["members"]
    for record in a.history_:
        for member in record["members"]:
            for name, (low, high) in DEFAULT_RANGES.items():
                assert low <= member[name] <= high
    assert a.best_loss_ <= a.history_[0]["best_loss"]
    assert a.best_loss_ == min(r["best_loss"] for r in a.history_)
    assert _bowl(a.best_params_, 0) == a.best_loss_
    assert [r["best_loss_so_far"] for r in a.history_] == sorted(
        (r["best_loss_so_far"] for r in a.history_), reverse=True
    )


def test_mutation_resonance_and_nudge_happen_as_often_and_as_far_as_specified():
    ranges = {"a": (1e-9, 1e9), "b": (1e-9, 1e9)}
    hpo = ResonanceHPO(
        lambda params, seed: params["a"], population=100, generations=12, ranges=ranges,
        mutation_rate=0.3, resonance_factor=0.7, anneal=None, seed=0,
    )  # fmt: skip
    hpo.fit()
    counts = {"mutate": 0, "keep": 0, "nudge": 0}
    for prev, nxt in itertools.pairwise(hpo.history_):
        for old, new, action in zip(prev["members"], nxt["members"], prev["actions"], strict=True):
            counts[action] += 1
            # Values clipped to a range bound are left out of the ratio checks.
            ratios = np.array([new[k] / old[k] for k in ranges if new[k] not in ranges[k]])
            if action == "keep":
                assert (ratios == 1).all()
            elif action == "mutate":
                assert ((ratios >= 0.9) & (ratios <= 1.1)).all() and (ratios != 1).all()
            else:
                assert ((ratios >= 0.95) & (ratios <= 1.05)).all() and (ratios != 1).all()
    total = sum(counts.values())
    assert total == 1100
    # Expected: mutate 0.3, keep 0.7 × 0.7 = 0.49, nudge 0.21; 1,100 draws: ± ~0.014 (1σ).
    assert counts["mutate"] / total == pytest.approx(0.30, abs=0.05)
    assert counts["keep"] / total == pytest.approx(0.49, abs=0.05)
    assert counts["nudge"] / total == pytest.approx(0.21, abs=0.05)


def test_annealing_perturbs_the_learning_rate_less_as_generations_pass():
    hpo = ResonanceHPO(
        lambda params, seed: 0.0, population=200, generations=8, mutation_rate=1.0,
        ranges={"lr": (1e-9, 1.0)}, anneal=(1.0, 0.5), seed=0,
    )  # fmt: skip
    hpo.fit()
    spreads = []
    for prev, nxt in itertools.pairwise(hpo.history_):
        steps = [
            math.log(n["lr"] / p["lr"])
            for p, n in zip(prev["members"], nxt["members"], strict=True)
        ]
        spreads.append(float(np.std(steps)))
    assert spreads[0] > 0.5 and spreads[-1] < 0.1
    assert [r["temperature"] for r in hpo.history_][:3] == [1.0, 0.5, 0.25]


def test_batched_resonance_hpo_trains_members_together_and_carries_their_weights():
    x, y, xv, yv = _regression()
    hpo = ResonanceHPO(
        model=_mlp, population=5, generations=4, steps_per_generation=25, batch_size=32,
        ranges={"lr": (1e-3, 0.1), "momentum": (0.5, 0.9), "weight_decay": (0.0, 1e-3)},
        seed=0,
    )  # fmt: skip
    hpo.fit(x, y, xv, yv)
    assert [r["steps"] for r in hpo.history_] == [125, 250, 375, 500]
    first = [m["loss"] for m in hpo.history_[0]["members"]]
    last = [m["loss"] for m in hpo.history_[-1]["members"]]
    # Weights carry over: every member keeps improving its own model.
    assert sum(last) < sum(first)
    assert hpo.best_model_ is not None
    loss = nn.functional.mse_loss(hpo.best_model_(xv), yv).item()
    assert loss == pytest.approx(hpo.best_loss_, rel=1e-5)
    again = ResonanceHPO(
        model=_mlp, population=5, generations=4, steps_per_generation=25, batch_size=32,
        ranges={"lr": (1e-3, 0.1), "momentum": (0.5, 0.9), "weight_decay": (0.0, 1e-3)},
        seed=0,
    ).fit(x, y, xv, yv)  # fmt: skip
    assert again.history_[-1]["members"] == hpo.history_[-1]["members"]


def test_resonance_hpo_rejects_bad_configuration():
    with pytest.raises(ValueError, match="either train_fn or model"):
        ResonanceHPO()
    with pytest.raises(ValueError, match="batched way searches"):
        ResonanceHPO(model=_mlp, ranges={"lr": (1e-4, 1e-2), "dropout": (0, 0.5)})
    with pytest.raises(ValueError, match="mutation_rate must be in"):
        ResonanceHPO(_bowl, mutation_rate=1.5)
    with pytest.raises(ValueError, match="needs x and y"):
        ResonanceHPO(model=_mlp).fit()


def test_exploit_copies_the_best_members_and_initial_members_start_where_told(monkeypatch):
    x, y, xv, yv = _regression()
    ranges = {"lr": (1e-3, 0.1), "momentum": (0.5, 0.9), "weight_decay": (0.0, 1e-3)}
    start = {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.0}
    original = ResonanceHPO._exploit
    calls = []

    def checked(self, members, losses, models):
        # Wraps the real step and checks what it did: the two worst took over the two best's
        # hyperparameters and weights.
        order = sorted(range(len(members)), key=lambda i: (losses[i], i))
        before = [dict(m) for m in members]
        copied = original(self, members, losses, models)
        assert copied == set(order[2:])
        for winner, loser in zip(order[:2], order[::-1][:2], strict=True):
            assert members[loser] == before[winner]
            for a, b in zip(models[loser].parameters(), models[winner].parameters(), strict=True):
                assert torch.equal(a, b)
        calls.append(copied)
        return copied

    monkeypatch.setattr(ResonanceHPO, "_exploit", checked)
    hpo = ResonanceHPO(
        model=_mlp, population=4, generations=3, steps_per_generation=10, batch_size=32,
        ranges=ranges, exploit=0.5, initial=[start], seed=0,
    ).fit(x, y, xv, yv)  # fmt: skip
    assert len(calls) == 3
    first = hpo.history_[0]["members"][0]
    assert {k: first[k] for k in start} == start
    for record in hpo.history_:
        assert record["actions"].count("exploit") == 2
    monkeypatch.undo()
    # Without exploit (the published rule) nothing is copied; a starting point replaces only
    # the first draw.
    plain = ResonanceHPO(model=_mlp, population=4, generations=2, steps_per_generation=5,
                         ranges=ranges, seed=0).fit(x, y, xv, yv)  # fmt: skip
    assert "exploit" not in {a for r in plain.history_ for a in r["actions"]}
    seeded = ResonanceHPO(model=_mlp, population=4, generations=1, steps_per_generation=5,
                          ranges=ranges, initial=[start], seed=0).fit(x, y, xv, yv)  # fmt: skip
    assert [{k: m[k] for k in start} for m in seeded.history_[0]["members"][1:]] == [
        {k: m[k] for k in start} for m in plain.history_[0]["members"][1:]
    ]


def test_batched_resonance_hpo_trains_with_adamw_and_rejects_bad_starts():
    x, y, xv, yv = _regression()
    hpo = ResonanceHPO(model=_mlp, population=3, generations=3, steps_per_generation=20,
                       optimizer="adamw", beta2=0.99, seed=0).fit(x, y, xv, yv)  # fmt: skip
    first = [m["loss"] for m in hpo.history_[0]["members"]]
    last = [m["loss"] for m in hpo.history_[-1]["members"]]
    assert sum(last) < sum(first)
    with pytest.raises(ValueError, match="outside the ranges"):
        ResonanceHPO(model=_mlp, initial=[{"lr": 1.0, "momentum": 0.9, "weight_decay": 0.0}])
    with pytest.raises(ValueError, match="initial members for a population of 2"):
        ResonanceHPO(model=_mlp, population=2,
                     initial=[{"lr": 1e-4, "momentum": 0.6, "weight_decay": 0.0}] * 3)  # fmt: skip
    with pytest.raises(ValueError, match="optimizer must be one of"):
        ResonanceHPO(model=_mlp, optimizer="adam")
    with pytest.raises(ValueError, match="exploit must be in"):
        ResonanceHPO(model=_mlp, exploit=2.0)


def test_shrink_spends_each_generations_budget_on_the_better_half_until_one_lineage_is_left(
    monkeypatch,
):
    from neuralsync.evolution.population import PopulationTrainer

    populations = []
    original = PopulationTrainer.__init__

    def recorded(self, modules, backend="auto"):
        populations.append([id(m) for m in modules])
        original(self, modules, backend)

    monkeypatch.setattr(PopulationTrainer, "__init__", recorded)
    x, y, xv, yv = _regression()
    ranges = {"lr": (1e-3, 0.1), "momentum": (0.5, 0.9), "weight_decay": (0.0, 1e-3)}
    hpo = ResonanceHPO(model=_mlp, population=4, generations=4, steps_per_generation=10,
                       batch_size=32, ranges=ranges, shrink=0.5, seed=0)  # fmt: skip
    assert hpo.sizes() == [4, 2, 1, 1]
    hpo.fit(x, y, xv, yv)
    assert [len(r["members"]) for r in hpo.history_] == [4, 2, 1, 1]
    # Every generation costs the same: 4 x 10, 2 x 20, 1 x 40 steps.
    assert [r["steps"] for r in hpo.history_] == [40, 80, 120, 160]
    # The worst go; the survivors' own models (weights included) go on training.
    assert [len(p) for p in populations] == [4, 2, 1]
    for record, before, after in zip(
        hpo.history_[:2], populations[:2], populations[1:], strict=True
    ):
        losses = [m["loss"] for m in record["members"]]
        dropped = [i for i, a in enumerate(record["actions"]) if a == "drop"]
        kept = [i for i in range(len(losses)) if i not in dropped]
        assert max(losses[i] for i in kept) <= min(losses[i] for i in dropped)
        assert after == [before[i] for i in kept]
    # The last lineage keeps its hyperparameters: no selection is left to judge a move.
    assert [r["actions"] for r in hpo.history_[2:]] == [["keep"], ["keep"]]
    solo = [{k: v for k, v in r["members"][0].items() if k != "loss"} for r in hpo.history_[2:]]
    assert solo[0] == solo[1]
    assert hpo.best_loss_ == min(r["best_loss"] for r in hpo.history_)


def test_cooldown_freezes_the_hyperparameters_and_decays_the_learning_rate_to_its_factor(
    monkeypatch,
):
    from neuralsync.evolution.population import PopulationTrainer

    calls = []
    original = PopulationTrainer.train

    def recorded(self, x, y, **kwargs):
        calls.append((kwargs["steps"], list(kwargs["lr"]), kwargs["lr_decay"]))
        return original(self, x, y, **kwargs)

    monkeypatch.setattr(PopulationTrainer, "train", recorded)
    x, y, xv, yv = _regression()
    hpo = ResonanceHPO(model=_mlp, population=2, generations=4, steps_per_generation=10,
                       batch_size=32, mutation_rate=1.0, cooldown=(2, 0.1),
                       seed=0).fit(x, y, xv, yv)  # fmt: skip
    history = hpo.history_
    assert [r["actions"] for r in history[1:]] == [["cool", "cool"]] * 3
    strip = [[{k: v for k, v in m.items() if k != "loss"} for m in r["members"]] for r in history]
    assert strip[1] == strip[2] == strip[3]
    assert strip[0] != strip[1]  # before the cooldown, every member mutated
    assert [c[2] for c in calls[:2]] == [1.0, 1.0]
    decay = 0.1 ** (1 / 20)
    assert calls[2][2] == calls[3][2] == pytest.approx(decay)
    rates = [m["lr"] for m in strip[2]]
    assert calls[2][1] == pytest.approx(rates)
    assert calls[3][1] == pytest.approx([r * decay**10 for r in rates])
    # After the last step's decay the rate is the factor's tenth of where the cooldown began.
    assert [r * decay**10 for r in calls[3][1]] == pytest.approx([0.1 * r for r in rates])
    assert [r["lr_scale"] for r in history] == pytest.approx([1.0, 1.0, 1.0, decay**10])


def test_shrink_and_cooldown_reject_bad_values_and_the_unbatched_way():
    with pytest.raises(ValueError, match="shrink must be in"):
        ResonanceHPO(model=_mlp, shrink=0.0)
    with pytest.raises(ValueError, match="shrink must be in"):
        ResonanceHPO(model=_mlp, shrink=1.5)
    for bad in ((0, 0.1), (11, 0.1), (2, 0.0), (2, 1.5), (2.5, 0.1)):
        with pytest.raises(ValueError, match="cooldown must be"):
            ResonanceHPO(model=_mlp, generations=10, cooldown=bad)
    with pytest.raises(ValueError, match="need the batched way"):
        ResonanceHPO(_bowl, shrink=0.5)
    with pytest.raises(ValueError, match="need the batched way"):
        ResonanceHPO(_bowl, cooldown=(2, 0.1))


def test_elite_members_keep_their_hyperparameters_while_the_rest_move():
    def run(elite):
        return ResonanceHPO(_bowl, population=6, generations=5, mutation_rate=1.0, elite=elite,
                            seed=0).fit()  # fmt: skip

    def strip(member):
        return {k: v for k, v in member.items() if k != "loss"}

    hpo = run(2)
    for prev, nxt in itertools.pairwise(hpo.history_):
        losses = [m["loss"] for m in prev["members"]]
        best = sorted(range(len(losses)), key=lambda i: (losses[i], i))[:2]
        for i, (old, new) in enumerate(zip(prev["members"], nxt["members"], strict=True)):
            if i in best:
                assert prev["actions"][i] == "keep" and strip(old) == strip(new)
            else:
                assert prev["actions"][i] == "mutate" and strip(old) != strip(new)
    assert {a for r in run(0).history_ for a in r["actions"]} == {"mutate"}
    with pytest.raises(ValueError, match=r"elite must be in 0\.\.8"):
        ResonanceHPO(_bowl, elite=9)
