"""Behaviour tests for :mod:`neuralsync.evolution.operators`, with fixed seeds and statistics."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import fields

import numpy as np
import pytest

from neuralsync.evolution.genome import Block, Genome, SearchSpace
from neuralsync.evolution.operators import (
    MULTISCALE,
    STRUCTURAL_MUTATIONS,
    AdaptiveSigma,
    LearningRateAnnealer,
    ResonanceRule,
    anneal,
    clip,
    crossover,
    diversity,
    multiscale_offspring,
    mutate_params,
    mutate_structure,
    random_genome,
    tournament_select,
)

SPACE = SearchSpace()
HYPER = [f.name for f in fields(Genome) if f.name != "blocks"]


def _inside(g: Genome, space: SearchSpace) -> bool:
    return clip(g, space) == g and space.min_blocks <= len(g.blocks) <= space.max_blocks


def _chi2_uniform(counts: np.ndarray) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


# ---------------------------------------------------------------------- sampling and clipping


def test_random_genomes_are_inside_the_space_and_deterministic():
    space = SearchSpace(kinds=("gru", "tcn"), max_blocks=2, batch_sizes=(4,), grad_clips=(2.0,))
    a = [random_genome(space, np.random.default_rng(s)) for s in range(50)]
    b = [random_genome(space, np.random.default_rng(s)) for s in range(50)]
    assert a == b
    assert all(_inside(g, space) for g in a)
    assert {b.kind for g in a for b in g.blocks} == {"gru", "tcn"}
    assert {g.batch_size for g in a} == {4} and {g.grad_clip for g in a} == {2.0}
    assert len({g.hash for g in a}) == 50


def test_clip_moves_every_gene_into_the_space():
    space = SearchSpace(kinds=("mlp", "tcn"), max_blocks=2, activations=("relu", "tanh"))
    wild = Genome(
        blocks=(
            Block("attention", 1000, "gelu", 0.9),
            Block("tcn", 2, dilation=3),
            Block("mlp", 8),
        ),
        lr=10.0,
        momentum=0.99,
        weight_decay=1.0,
        batch_size=5,
        grad_clip=0.7,
        life_steps=10_000,
    )
    g = clip(wild, space)
    assert [b.kind for b in g.blocks] == ["mlp", "tcn"]
    assert [b.width for b in g.blocks] == [128, 4]
    assert g.blocks[0].activation == "relu" and g.blocks[0].dropout == space.max_dropout
    assert g.blocks[1].dilation in (2, 4)  # nearest in log space to 3
    assert (g.lr, g.momentum, g.weight_decay) == (0.3, 0.95, 1e-2)
    assert g.batch_size == 4 and g.grad_clip in (0.5, 1.0) and g.life_steps == 200
    assert clip(g, space) == g
    assert clip(Genome((), weight_decay=0.0), space).weight_decay == 0.0


# ---------------------------------------------------------------------- selection


def test_tournament_of_the_whole_population_always_picks_the_best():
    rng = np.random.default_rng(0)
    fitness = rng.normal(size=12)
    best = int(np.argmin(fitness))
    assert all(tournament_select(fitness, 12, rng) == best for _ in range(200))
    with_nan = [float("nan"), 2.0, 1.0]
    assert all(tournament_select(with_nan, 3, rng) == 2 for _ in range(20))


def test_tournament_of_one_is_uniform():
    rng = np.random.default_rng(1)
    fitness = np.arange(8.0)
    counts = np.bincount([tournament_select(fitness, 1, rng) for _ in range(8000)], minlength=8)
    assert _chi2_uniform(counts) < 24.3  # chi-square, 7 degrees of freedom, p = 0.001


def test_larger_tournaments_prefer_better_genomes():
    rng = np.random.default_rng(2)
    fitness = np.arange(10.0)
    picks = [tournament_select(fitness, 3, rng) for _ in range(3000)]
    # P(best wins a 3-tournament) = 3/10; the worst can only win alone, never here.
    assert Counter(picks)[0] / 3000 == pytest.approx(0.3, abs=0.03)
    assert Counter(picks)[9] == 0 and Counter(picks)[8] == 0


def test_tournament_rejects_bad_sizes():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"size: expected an integer in \[1, 3\]"):
        tournament_select([1.0, 2.0, 3.0], 4, rng)
    with pytest.raises(ValueError, match="non-empty"):
        tournament_select([], 1, rng)


# ---------------------------------------------------------------------- crossover


def test_crossover_children_only_hold_parent_genes():
    rng = np.random.default_rng(3)
    for _ in range(200):
        a, b = random_genome(SPACE, rng), random_genome(SPACE, rng)
        child = crossover(a, b, rng)
        parent_blocks = set(a.blocks) | set(b.blocks)
        assert set(child.blocks) <= parent_blocks
        assert len(child.blocks) <= max(len(a.blocks), len(b.blocks))
        for name in HYPER:
            assert getattr(child, name) in (getattr(a, name), getattr(b, name))
        assert _inside(child, SPACE)


def test_crossover_mixes_both_parents():
    rng = np.random.default_rng(4)
    a = Genome((Block("gru", 8), Block("gru", 8)), lr=0.1, momentum=0.9)
    b = Genome((Block("mlp", 4), Block("mlp", 4)), lr=0.001, momentum=0.0)
    children = [crossover(a, b, rng) for _ in range(200)]
    kinds = {tuple(bl.kind for bl in c.blocks) for c in children}
    assert ("gru", "mlp") in kinds and ("mlp", "gru") in kinds
    assert {c.lr for c in children} == {0.1, 0.001}
    mixed = [c for c in children if (c.lr == 0.1) != (c.momentum == 0.9)]
    assert len(mixed) > 50  # fields are inherited independently


def test_crossover_blend_takes_the_geometric_mean():
    rng = np.random.default_rng(5)
    a, b = Genome((), lr=0.1, weight_decay=1e-2), Genome((), lr=1e-3, weight_decay=1e-6)
    child = crossover(a, b, rng, blend=True)
    assert child.lr == pytest.approx(1e-2) and child.weight_decay == pytest.approx(1e-4)
    off = crossover(a, Genome((), weight_decay=0.0), rng, blend=True)
    assert off.weight_decay in (0.0, 1e-2)


# ---------------------------------------------------------------------- structural mutation


def test_every_structural_mutation_happens_and_stays_in_the_space():
    space = SearchSpace(max_blocks=3, max_width=64)
    rng = np.random.default_rng(6)
    seen = Counter()
    g = random_genome(space, rng)
    for _ in range(400):
        child, change = mutate_structure(g, rng, space)
        seen[change] += 1
        assert _inside(child, space)
        n, m = len(g.blocks), len(child.blocks)
        if change == "add":
            assert m == n + 1
        elif change == "remove":
            assert m == n - 1
        else:
            assert m == n
            diff = [(p, c) for p, c in zip(g.blocks, child.blocks, strict=True) if p != c]
            assert len(diff) == 1
            p, c = diff[0]
            if change == "resize":
                assert c.width in (p.width * 2, p.width // 2) and c.kind == p.kind
            elif change == "retype":
                assert c.kind != p.kind and c.width == p.width
            elif change == "activation":
                assert c.activation != p.activation and c.kind == p.kind
                assert c.kind not in ("gru", "lstm") and c.width == p.width
            else:
                assert c.residual != p.residual and c.kind == p.kind
        g = child
    assert set(seen) == set(STRUCTURAL_MUTATIONS)


def test_activation_mutation_skips_recurrent_cells_and_keeps_the_weights_shape():
    space = SearchSpace(kinds=("mlp", "gru"), max_blocks=2, activations=("relu", "tanh"))
    rng = np.random.default_rng(8)
    recurrent = Genome((Block("gru", 16),))
    assert mutate_structure(recurrent, rng, space, kinds=("activation",)) == (recurrent, "none")
    mixed = Genome((Block("gru", 16), Block("mlp", 16, activation="relu")))
    child, change = mutate_structure(mixed, rng, space, kinds=("activation",))
    assert change == "activation"
    assert child.blocks == (mixed.blocks[0], Block("mlp", 16, activation="tanh"))
    parent, kid = mixed.build(3, 8, 1, [0]), child.build(3, 8, 1, [0])
    assert [p.shape for p in parent.parameters()] == [p.shape for p in kid.parameters()]
    single = SearchSpace(activations=("relu",))
    plain = Genome((Block("mlp", 16),))
    assert mutate_structure(plain, rng, single, kinds=("activation",)) == (plain, "none")


def test_structural_mutation_respects_bounds_and_chosen_kinds():
    space = SearchSpace(max_blocks=1, min_width=8, max_width=16)
    rng = np.random.default_rng(7)
    full = Genome((Block("mlp", 16),))
    for _ in range(50):
        child, change = mutate_structure(full, rng, space, kinds=("add", "resize"))
        assert change == "resize" and child.blocks[0].width == 8  # cannot add, cannot grow
    empty = Genome(())
    assert mutate_structure(empty, rng, space, kinds=("remove",)) == (empty, "none")
    with pytest.raises(ValueError, match=r"unknown.*'grow'"):
        mutate_structure(full, rng, space, kinds=("grow",))


# ---------------------------------------------------------------------- parametric mutation


def test_spread_of_learning_rate_steps_scales_with_sigma():
    rng = np.random.default_rng(8)
    parent = Genome((Block("mlp", 8),), lr=3e-3, momentum=0.5, weight_decay=1e-4)
    spreads = {}
    for sigma in (0.05, 0.2, 0.8):
        logs = [math.log(mutate_params(parent, sigma, rng, SPACE).lr) for _ in range(800)]
        spreads[sigma] = float(np.std(logs))
        assert np.mean(logs) == pytest.approx(math.log(3e-3), abs=4 * sigma / math.sqrt(800))
    assert spreads[0.05] == pytest.approx(0.05, rel=0.1)
    assert spreads[0.2] == pytest.approx(0.2, rel=0.1)
    assert spreads[0.8] == pytest.approx(0.8, rel=0.1)


def test_parametric_mutation_moves_only_hyperparameters_inside_the_space():
    rng = np.random.default_rng(9)
    parent = Genome((Block("gru", 8),), momentum=0.5, weight_decay=1e-4, life_steps=50)
    children = [mutate_params(parent, 0.5, rng, SPACE) for _ in range(500)]
    assert all(c.blocks == parent.blocks and _inside(c, SPACE) for c in children)
    assert len({c.momentum for c in children}) > 400
    weight_decays = [c.weight_decay for c in children]
    assert 0 < weight_decays.count(0.0) < 200  # occasionally switched off
    assert {c.batch_size for c in children} == {1, 2}
    assert {c.life_steps for c in children} == {33, 50, 75}
    assert len({c.grad_clip for c in children}) == 3  # 1.0 and both neighbours
    still = mutate_params(parent, 0.0, rng, SPACE, discrete_rate=0)
    assert still.hash == parent.hash  # equal up to float rounding of exp(log(lr))
    with pytest.raises(ValueError, match="sigma"):
        mutate_params(parent, -1.0, rng, SPACE)


def test_adam_genomes_mutate_beta1_not_momentum():
    rng = np.random.default_rng(10)
    parent = Genome((), optimizer="adam", momentum=0.0, beta1=0.9)
    children = [mutate_params(parent, 0.5, rng, SPACE) for _ in range(50)]
    assert {c.momentum for c in children} == {0.0}
    assert len({c.beta1 for c in children}) == 50


# ---------------------------------------------------------------------- multi-scale offspring


def test_every_generation_holds_all_three_scales():
    rng = np.random.default_rng(11)
    parent = Genome((Block("mlp", 8),), lr=3e-3)
    for n in (3, 4, 7, 16):
        kids = multiscale_offspring(parent, n, 0.2, rng, SPACE, structural_rate=0.3)
        assert len(kids) == n
        assert set(MULTISCALE) <= {scale for _, scale in kids}
        assert all(_inside(child, SPACE) for child, _ in kids)


def test_larger_scales_take_larger_steps():
    rng = np.random.default_rng(12)
    parent = Genome((Block("mlp", 8),), lr=3e-3)
    steps: dict[float, list[float]] = {s: [] for s in MULTISCALE}
    for _ in range(300):
        for child, scale in multiscale_offspring(parent, 3, 0.2, rng, SPACE, structural_rate=0):
            steps[scale].append(abs(math.log(child.lr / parent.lr)))
    small, medium, large = (np.mean(steps[s]) for s in MULTISCALE)
    assert small < medium < large
    assert medium / small == pytest.approx(1 / 0.3, rel=0.2)


def test_structural_rate_controls_architecture_changes():
    rng = np.random.default_rng(13)
    parent = Genome((Block("mlp", 8),))
    kids = multiscale_offspring(parent, 300, 0.1, rng, SPACE, structural_rate=0.5)
    changed = sum(child.blocks != parent.blocks for child, _ in kids)
    assert 120 < changed < 180
    kids = multiscale_offspring(parent, 30, 0.1, rng, SPACE, structural_rate=0.0)
    assert all(child.blocks == parent.blocks for child, _ in kids)


# ---------------------------------------------------------------------- adaptive sigma


def test_adaptive_sigma_shrinks_on_progress_and_grows_on_stagnation():
    s = AdaptiveSigma(sigma0=0.3, shrink=0.8, grow=1.25, patience=2)
    assert s.update(True) == pytest.approx(0.24)
    assert s.update(False) == pytest.approx(0.24)  # one stagnant generation: patience
    assert s.update(False) == pytest.approx(0.3)
    assert s.update(False) == pytest.approx(0.3)
    assert s.update(True) == pytest.approx(0.24)  # progress resets the stagnation count
    assert s.update(False) == pytest.approx(0.24)


def test_adaptive_sigma_bounds_and_state():
    s = AdaptiveSigma(sigma0=0.3, low=0.1, high=0.5, patience=1)
    assert all(s.update(True) >= 0.1 for _ in range(50)) and s.sigma_ == 0.1
    assert all(s.update(False) <= 0.5 for _ in range(50)) and s.sigma_ == 0.5
    s.update(True)
    state = s.state_dict()
    assert state == {"sigma": pytest.approx(0.4), "stagnation": 0}
    twin = AdaptiveSigma(sigma0=0.3, low=0.1, high=0.5, patience=1)
    twin.load_state_dict(state)
    assert [twin.update(i % 3 == 0) for i in range(10)] == [s.update(i % 3 == 0) for i in range(10)]
    with pytest.raises(ValueError, match="sigma"):
        twin.load_state_dict({"sigma": 9.0, "stagnation": 0})
    with pytest.raises(ValueError, match="stagnation"):
        twin.load_state_dict({"sigma": 0.2, "stagnation": -1})
    with pytest.raises(ValueError, match="low <= sigma0"):
        AdaptiveSigma(sigma0=5.0)


# ---------------------------------------------------------------------- resonance


def test_resonance_probability_formula():
    rule = ResonanceRule(resonance_factor=0.8, mutation_rate=0.5)
    probs = [rule.probability(r, 5) for r in range(5)]
    assert probs == pytest.approx([0.8, 0.7, 0.6, 0.5, 0.4])
    assert rule.probability(0, 1) == 0.8
    with pytest.raises(ValueError, match="rank"):
        rule.probability(5, 5)
    with pytest.raises(ValueError, match="resonance_factor"):
        ResonanceRule(resonance_factor=1.5)


def test_resonance_survival_frequencies_fall_with_rank():
    rule = ResonanceRule(resonance_factor=0.7, mutation_rate=0.6)
    rng = np.random.default_rng(14)
    trials = 4000
    rates = [np.mean([rule.survives(r, 4, rng) for _ in range(trials)]) for r in range(4)]
    for rank, rate in enumerate(rates):
        expected = rule.probability(rank, 4)
        assert rate == pytest.approx(
            expected, abs=4 * math.sqrt(expected * (1 - expected) / trials)
        )
    assert rates[0] > rates[1] > rates[2] > rates[3]


# ---------------------------------------------------------------------- annealing


def test_annealing_spread_falls_with_generations():
    annealer = LearningRateAnnealer(t0=1.0, cooling=0.8)
    rng = np.random.default_rng(15)
    spreads = []
    for generation in (0, 5, 15):
        logs = [math.log(annealer.perturb(1e-2, generation, rng)) for _ in range(1000)]
        spreads.append(float(np.std(logs)))
        assert spreads[-1] == pytest.approx(annealer.temperature(generation), rel=0.1)
    assert spreads[0] > spreads[1] > spreads[2]
    clipped = [annealer.perturb(0.2, 0, rng, SPACE) for _ in range(200)]
    assert max(clipped) == SPACE.lr_bounds[1]
    values = [anneal(1e-2, 0, t0=0.5, cooling=0.9, rng=rng) for _ in range(1000)]
    assert float(np.std(np.log(values))) == pytest.approx(0.5, rel=0.1)
    with pytest.raises(ValueError, match="rng"):
        anneal(1e-2, 0)


def test_annealing_acceptance_of_worse_candidates_falls_with_generations():
    annealer = LearningRateAnnealer(t0=1.0, cooling=0.7)
    rng = np.random.default_rng(16)
    trials = 3000
    rates = []
    for generation in (0, 2, 6):
        rate = np.mean([annealer.accept(0.3, generation, rng) for _ in range(trials)])
        expected = math.exp(-0.3 / annealer.temperature(generation))
        assert rate == pytest.approx(expected, abs=0.03)
        rates.append(rate)
    assert rates[0] > rates[1] > rates[2]
    assert all(annealer.accept(-0.1, 50, rng) for _ in range(20))  # better: always accepted


# ---------------------------------------------------------------------- diversity


def test_diversity_is_zero_for_clones_and_counts_differing_features():
    rng = np.random.default_rng(17)
    g = random_genome(SPACE, rng)
    assert diversity([g] * 5, SPACE) == 0.0
    assert diversity([g], SPACE) == 0.0
    h = random_genome(SPACE, rng)
    # Two genomes standardise to ±1 on each feature that differs: distance 2·sqrt(count).
    differing = int((g.encode(SPACE) != h.encode(SPACE)).sum())
    assert diversity([g, h], SPACE) == pytest.approx(2 * math.sqrt(differing))


def test_diversity_is_higher_for_random_than_for_mutated_populations():
    rng = np.random.default_rng(18)
    g = random_genome(SPACE, rng)
    near = [mutate_params(g, 0.1, rng, SPACE, discrete_rate=0) for _ in range(12)]
    far = [random_genome(SPACE, rng) for _ in range(12)]
    assert 0 < diversity(near, SPACE) < diversity(far, SPACE)
