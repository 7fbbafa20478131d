"""Evolution operators: sampling, selection, crossover, mutation, and the schedules that tune them.

Every operator is a pure function of its inputs and an explicit ``numpy.random.Generator``:
same seed, same result. Lower fitness is better (fitness is a loss).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import fields, replace
from typing import Any

import numpy as np

from neuralsync.evolution.genome import Block, Genome, SearchSpace

__all__ = [
    "MULTISCALE",
    "STRUCTURAL_MUTATIONS",
    "AdaptiveSigma",
    "LearningRateAnnealer",
    "ResonanceRule",
    "anneal",
    "clip",
    "crossover",
    "diversity",
    "multiscale_offspring",
    "mutate_params",
    "mutate_structure",
    "random_block",
    "random_genome",
    "tournament_select",
]

#: Step-size multipliers of multi-scale mutation: small, medium and large steps.
MULTISCALE: tuple[float, ...] = (0.3, 1.0, 3.0)
#: The kinds of structural mutation, as :func:`mutate_structure` names them.
STRUCTURAL_MUTATIONS: tuple[str, ...] = (
    "add",
    "remove",
    "resize",
    "retype",
    "activation",
    "residual",
)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _nearest(value: Any, choices: Sequence[Any]) -> Any:
    if value in choices:
        return value
    numeric = [c for c in choices if c is not None]
    if value is None or not numeric:
        return choices[-1] if value is None else choices[0]
    return min(numeric, key=lambda c: abs(math.log(c) - math.log(value)))


# ---------------------------------------------------------------------- sampling and clipping


def random_block(space: SearchSpace, rng: np.random.Generator) -> Block:
    """A block drawn uniformly from the space (dropout is 0 half of the time)."""
    kind = str(rng.choice(space.kinds))
    dropout = 0.0 if rng.random() < 0.5 else float(rng.uniform(0.0, space.max_dropout))
    return Block(
        kind=kind,
        width=int(rng.choice(space.width_choices)),
        activation=str(rng.choice(space.activations)),
        dropout=dropout,
        residual=bool(rng.random() < space.residual_rate),
        dilation=int(rng.choice(space.dilations)),
    )


def random_genome(space: SearchSpace, rng: np.random.Generator) -> Genome:
    """A genome drawn from ``space``: log-uniform learning rate and weight decay (0 half of the
    time), uniform choices elsewhere.

    >>> g = random_genome(SearchSpace(), np.random.default_rng(0))
    >>> g == random_genome(SearchSpace(), np.random.default_rng(0)), clip(g, SearchSpace()) == g
    (True, True)

    """
    n_blocks = int(rng.integers(space.min_blocks, space.max_blocks + 1))
    blocks = tuple(random_block(space, rng) for _ in range(n_blocks))
    wd = 0.0 if rng.random() < 0.5 else _log_uniform(rng, *space.weight_decay_bounds)
    clips = space.grad_clips
    return Genome(
        blocks=blocks,
        lr=_log_uniform(rng, *space.lr_bounds),
        momentum=float(rng.uniform(*space.momentum_bounds)),
        weight_decay=wd,
        batch_size=int(rng.choice(space.batch_sizes)),
        grad_clip=clips[int(rng.integers(len(clips)))],
        life_steps=int(rng.integers(space.life_steps_bounds[0], space.life_steps_bounds[1] + 1)),
        optimizer=str(rng.choice(space.optimizers)),
        beta1=float(rng.uniform(*space.beta1_bounds)),
    )


def clip(genome: Genome, space: SearchSpace | None = None) -> Genome:
    """The nearest genome inside ``space``: extra blocks dropped, numbers clamped, choices
    replaced by the nearest allowed one (a disallowed kind or activation by the first allowed).

    >>> clip(Genome(blocks=(Block("mlp", 1000),), lr=5.0), SearchSpace()).describe()
    'mlp128 | sgd lr=3.0e-01'

    """
    space = space or SearchSpace()
    blocks = []
    for b in genome.blocks[: space.max_blocks]:
        blocks.append(
            replace(
                b,
                kind=b.kind if b.kind in space.kinds else space.kinds[0],
                width=int(np.clip(b.width, space.min_width, space.max_width)),
                activation=b.activation
                if b.activation in space.activations or b.kind in ("gru", "lstm")
                else space.activations[0],
                dropout=float(min(b.dropout, space.max_dropout)),
                dilation=int(_nearest(b.dilation, space.dilations)),
            )
        )
    while len(blocks) < space.min_blocks:
        blocks.append(Block(space.kinds[0], space.width_choices[0], space.activations[0]))
    wd = genome.weight_decay
    if wd > 0:
        wd = float(np.clip(wd, *space.weight_decay_bounds))
    return replace(
        genome,
        blocks=tuple(blocks),
        lr=float(np.clip(genome.lr, *space.lr_bounds)),
        momentum=float(np.clip(genome.momentum, *space.momentum_bounds)),
        weight_decay=wd,
        batch_size=int(_nearest(genome.batch_size, space.batch_sizes)),
        grad_clip=_nearest(genome.grad_clip, space.grad_clips),
        life_steps=int(np.clip(genome.life_steps, *space.life_steps_bounds)),
        optimizer=genome.optimizer if genome.optimizer in space.optimizers else space.optimizers[0],
        beta1=float(np.clip(genome.beta1, *space.beta1_bounds)),
    )


# ---------------------------------------------------------------------- selection and crossover


def tournament_select(fitness: Sequence[float], size: int, rng: np.random.Generator) -> int:
    """Index of the best (lowest) fitness among ``size`` entries drawn without replacement.

    ``size`` 1 is uniform selection; ``size = len(fitness)`` always picks the best. A NaN
    fitness counts as the worst.

    >>> tournament_select([3.0, 1.0, 2.0], size=3, rng=np.random.default_rng(0))
    1

    """
    values = np.asarray(fitness, dtype=float)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"fitness: expected a non-empty sequence of numbers, got {fitness!r}")
    if not 1 <= size <= len(values):
        raise ValueError(f"size: expected an integer in [1, {len(values)}], got {size!r}")
    entrants = rng.choice(len(values), size=size, replace=False)
    scores = np.where(np.isnan(values[entrants]), np.inf, values[entrants])
    return int(entrants[int(np.argmin(scores))])


def crossover(a: Genome, b: Genome, rng: np.random.Generator, *, blend: bool = False) -> Genome:
    """A child of two genomes.

    Architecture: one-point crossover at a common cut ``k`` (the first parent's blocks before
    ``k``, the second's from ``k``), the parents' order drawn at random; the child never has
    more blocks than the longer parent. Hyperparameters: each field from a parent drawn at
    random; with ``blend``, the learning rate and weight decay are the parents' geometric mean
    instead (weight decay picked when either is 0).

    >>> rng = np.random.default_rng(1)
    >>> a, b = Genome((Block("gru", 8),), lr=0.1), Genome((Block("mlp", 4),), lr=0.001)
    >>> round(crossover(a, b, rng, blend=True).lr, 6)
    0.01

    """
    first, second = (a, b) if rng.random() < 0.5 else (b, a)
    k = int(rng.integers(0, max(len(a.blocks), len(b.blocks)) + 1))
    blocks = first.blocks[:k] + second.blocks[k:]
    picks = {
        f.name: getattr(a if rng.random() < 0.5 else b, f.name)
        for f in fields(Genome)
        if f.name != "blocks"
    }
    if blend:
        picks["lr"] = math.sqrt(a.lr * b.lr)
        if a.weight_decay > 0 and b.weight_decay > 0:
            picks["weight_decay"] = math.sqrt(a.weight_decay * b.weight_decay)
    return Genome(blocks=blocks, **picks)


# ---------------------------------------------------------------------- mutation


def mutate_structure(
    g: Genome,
    rng: np.random.Generator,
    space: SearchSpace,
    kinds: Sequence[str] = STRUCTURAL_MUTATIONS,
) -> tuple[Genome, str]:
    """One structural change, drawn uniformly from those ``kinds`` that apply; returns the
    child (inside ``space``) and the change's name.

    ``add`` inserts a random block at a random position; ``remove`` deletes one; ``resize``
    doubles or halves a width (the other way when a bound stops it); ``retype`` gives a block
    another kind; ``activation`` gives a feed-forward block another nonlinearity (its weights
    still fit: a Lamarckian child keeps them); ``residual`` toggles a skip connection.
    ``"none"`` when no kind applies.

    >>> child, change = mutate_structure(Genome(blocks=()), np.random.default_rng(0), SearchSpace())
    >>> change, len(child.blocks)
    ('add', 1)

    """
    unknown = set(kinds) - set(STRUCTURAL_MUTATIONS)
    if unknown:
        raise ValueError(
            f"kinds: unknown {sorted(unknown)}; expected some of {STRUCTURAL_MUTATIONS}"
        )
    g = clip(g, space)
    n = len(g.blocks)
    applies = {
        "add": n < space.max_blocks,
        "remove": n > space.min_blocks,
        "resize": n > 0 and len(space.width_choices) > 1,
        "retype": n > 0 and len(space.kinds) > 1,
        "activation": len(space.activations) > 1
        and any(b.kind not in ("gru", "lstm") for b in g.blocks),
        "residual": n > 0,
    }
    options = [k for k in kinds if applies[k]]
    if not options:
        return g, "none"
    change = str(rng.choice(options))
    blocks = list(g.blocks)
    if change == "add":
        blocks.insert(int(rng.integers(0, n + 1)), random_block(space, rng))
    elif change == "remove":
        del blocks[int(rng.integers(0, n))]
    elif change == "activation":
        # Recurrent cells keep their own nonlinearity, so only the other blocks can change.
        i = int(rng.choice([j for j, b in enumerate(blocks) if b.kind not in ("gru", "lstm")]))
        others = [a for a in space.activations if a != blocks[i].activation]
        blocks[i] = replace(blocks[i], activation=str(rng.choice(others)))
    else:
        i = int(rng.integers(0, n))
        b = blocks[i]
        if change == "resize":
            up = rng.random() < 0.5
            if (up and b.width * 2 > space.max_width) or (
                not up and b.width // 2 < space.min_width
            ):
                up = not up
            width = b.width * 2 if up else b.width // 2
            blocks[i] = replace(b, width=int(np.clip(width, space.min_width, space.max_width)))
        elif change == "retype":
            kind = str(rng.choice([k for k in space.kinds if k != b.kind]))
            dilation = int(rng.choice(space.dilations)) if kind == "tcn" else 1
            # A recurrent block's activation was canonicalised away: give the new kind a real one.
            activation = str(rng.choice(space.activations)) if b.kind in ("gru", "lstm") else None
            blocks[i] = replace(
                b, kind=kind, dilation=dilation, activation=activation or b.activation
            )
        else:
            blocks[i] = replace(b, residual=not b.residual)
    return clip(replace(g, blocks=tuple(blocks)), space), change


def _neighbour(value: Any, choices: Sequence[Any], rng: np.random.Generator) -> Any:
    i = list(choices).index(value)
    j = int(np.clip(i + (1 if rng.random() < 0.5 else -1), 0, len(choices) - 1))
    return choices[j if j != i else (i - 1 if i > 0 else min(i + 1, len(choices) - 1))]


def _logit_step(value: float, sigma: float, rng: np.random.Generator) -> float:
    p = min(max(value, 0.02), 0.98)
    x = math.log(p / (1 - p)) + sigma * float(rng.normal())
    return 1.0 / (1.0 + math.exp(-x))


def mutate_params(
    g: Genome,
    sigma: float,
    rng: np.random.Generator,
    space: SearchSpace,
    *,
    discrete_rate: float = 0.2,
) -> Genome:
    """Perturb the hyperparameters with Gaussian steps of scale ``sigma``; returns a child
    inside ``space``.

    The learning rate and a non-zero weight decay move in natural-log space
    (``log lr + sigma·N(0, 1)``); momentum (and beta1 with Adam) in logit space, a momentum
    under 0.03 snapping to 0. With probability ``discrete_rate`` each: the batch size and the
    gradient clip move to a neighbouring choice, the life steps are scaled by 1.5 or 1/1.5, and
    the weight decay switches off (or, when off, on at a log-uniform value).

    >>> child = mutate_params(Genome(blocks=()), 0.5, np.random.default_rng(0), SearchSpace())
    >>> child.lr != 0.01, child.blocks
    (True, ())

    """
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma: expected a finite number >= 0, got {sigma!r}")
    g = clip(g, space)
    lr = math.exp(math.log(g.lr) + sigma * float(rng.normal()))
    momentum = _logit_step(g.momentum, sigma, rng) if g.optimizer == "sgd" else g.momentum
    if momentum < 0.03:
        momentum = 0.0
    beta1 = _logit_step(g.beta1, sigma, rng) if g.optimizer == "adam" else g.beta1
    wd = g.weight_decay
    if rng.random() < discrete_rate:
        wd = 0.0 if wd > 0 else _log_uniform(rng, *space.weight_decay_bounds)
    elif wd > 0:
        wd = math.exp(math.log(wd) + sigma * float(rng.normal()))
    batch, grad_clip, life = g.batch_size, g.grad_clip, g.life_steps
    if rng.random() < discrete_rate:
        batch = _neighbour(batch, space.batch_sizes, rng)
    if rng.random() < discrete_rate:
        grad_clip = _neighbour(grad_clip, space.grad_clips, rng)
    if rng.random() < discrete_rate:
        life = round(life * (1.5 if rng.random() < 0.5 else 1 / 1.5))
    child = replace(
        g,
        lr=lr,
        momentum=momentum,
        beta1=beta1,
        weight_decay=wd,
        batch_size=batch,
        grad_clip=grad_clip,
        life_steps=life,
    )
    return clip(child, space)


def multiscale_offspring(
    parent: Genome,
    n: int,
    sigma: float,
    rng: np.random.Generator,
    space: SearchSpace,
    structural_rate: float = 0.2,
    scales: Sequence[float] = MULTISCALE,
) -> list[tuple[Genome, float]]:
    """``n`` children of ``parent``, child ``i`` mutated with step ``sigma × scales[i % len]``
    (so all scales are present when ``n >= len(scales)``), each also structurally mutated with
    probability ``structural_rate``. Returns ``(child, scale multiplier)`` pairs.

    >>> kids = multiscale_offspring(Genome(()), 3, 0.3, np.random.default_rng(0), SearchSpace())
    >>> [scale for _, scale in kids]
    [0.3, 1.0, 3.0]

    """
    if n < 0:
        raise ValueError(f"n: expected an integer >= 0, got {n!r}")
    if not scales:
        raise ValueError("scales: expected at least one step-size multiplier")
    out = []
    for i in range(n):
        scale = float(scales[i % len(scales)])
        child = mutate_params(parent, sigma * scale, rng, space)
        if rng.random() < structural_rate:
            child, _ = mutate_structure(child, rng, space)
        out.append((child, scale))
    return out


# ---------------------------------------------------------------------- schedules


class AdaptiveSigma:
    """The mutation step size, adapted by progress.

    A generation that improved the best fitness multiplies σ by ``shrink`` (exploit near the
    new best); ``patience`` generations in a row without improvement multiply it by ``grow``
    (explore further). σ stays within ``[low, high]``.

    >>> s = AdaptiveSigma(sigma0=0.3, patience=2)
    >>> s.update(True), s.update(False), s.update(False)
    (0.24, 0.24, 0.3)

    """

    def __init__(
        self,
        sigma0: float = 0.3,
        shrink: float = 0.8,
        grow: float = 1.25,
        patience: int = 2,
        low: float = 0.01,
        high: float = 3.0,
    ):
        if not 0 < low <= sigma0 <= high:
            raise ValueError(f"expected 0 < low <= sigma0 <= high, got {low}, {sigma0}, {high}")
        if not (0 < shrink <= 1 <= grow) or patience < 1:
            raise ValueError(
                f"expected 0 < shrink <= 1 <= grow and patience >= 1,"
                f" got {shrink}, {grow}, {patience}"
            )
        self.sigma0 = sigma0
        self.shrink = shrink
        self.grow = grow
        self.patience = patience
        self.low = low
        self.high = high
        self.sigma_ = sigma0
        self.stagnation_ = 0

    def update(self, improved: bool) -> float:
        """Record one generation; returns the new σ."""
        if improved:
            self.sigma_ *= self.shrink
            self.stagnation_ = 0
        else:
            self.stagnation_ += 1
            if self.stagnation_ >= self.patience:
                self.sigma_ *= self.grow
                self.stagnation_ = 0
        self.sigma_ = round(min(max(self.sigma_, self.low), self.high), 12)
        return self.sigma_

    def state_dict(self) -> dict[str, Any]:
        return {"sigma": self.sigma_, "stagnation": self.stagnation_}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        sigma, stagnation = state.get("sigma"), state.get("stagnation")
        if not isinstance(sigma, int | float) or not self.low <= sigma <= self.high:
            raise ValueError(
                f"sigma: expected a number in [{self.low}, {self.high}], got {sigma!r}"
            )
        if not isinstance(stagnation, int) or stagnation < 0:
            raise ValueError(f"stagnation: expected an integer >= 0, got {stagnation!r}")
        self.sigma_ = float(sigma)
        self.stagnation_ = stagnation


class ResonanceRule:
    """Who survives a generation unchanged: good genomes "resonate", weaker ones mutate more.

    The genome ranked ``rank`` (0 = best) of ``population`` survives unchanged with probability
    ``resonance_factor × (1 − mutation_rate × rank / (population − 1))``: ``resonance_factor``
    for the best, falling linearly to ``resonance_factor × (1 − mutation_rate)`` for the worst.

    >>> ResonanceRule(0.7, 0.3).probability(0, 10), ResonanceRule(0.7, 0.3).probability(9, 10)
    (0.7, 0.49)

    """

    def __init__(self, resonance_factor: float = 0.7, mutation_rate: float = 0.3):
        for name, value in (
            ("resonance_factor", resonance_factor),
            ("mutation_rate", mutation_rate),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
        self.resonance_factor = resonance_factor
        self.mutation_rate = mutation_rate

    def probability(self, rank: int, population: int) -> float:
        """The chance that the genome ranked ``rank`` survives unchanged."""
        if population < 1 or not 0 <= rank < population:
            raise ValueError(f"rank: expected 0 <= rank < population, got {rank} of {population}")
        position = rank / (population - 1) if population > 1 else 0.0
        return round(self.resonance_factor * (1.0 - self.mutation_rate * position), 12)

    def survives(self, rank: int, population: int, rng: np.random.Generator) -> bool:
        return bool(rng.random() < self.probability(rank, population))


class LearningRateAnnealer:
    """Simulated annealing of the learning rate over generations.

    The temperature is ``T = t0 × cooling**generation``. :meth:`perturb` multiplies a learning
    rate by ``exp(spread × T × N(0, 1))``; :meth:`accept` takes a better candidate always and a
    worse one (loss higher by ``delta_loss``) with probability ``exp(−delta_loss / T)``.

    >>> a = LearningRateAnnealer(t0=1.0, cooling=0.5)
    >>> a.temperature(0), a.temperature(2), round(a.acceptance(0.5, 1), 4)
    (1.0, 0.25, 0.3679)

    """

    def __init__(self, t0: float = 1.0, cooling: float = 0.9, spread: float = 1.0):
        if not (t0 > 0 and 0 < cooling <= 1 and spread >= 0):
            raise ValueError(
                f"expected t0 > 0, 0 < cooling <= 1, spread >= 0; got {t0}, {cooling}, {spread}"
            )
        self.t0 = t0
        self.cooling = cooling
        self.spread = spread

    def temperature(self, generation: int) -> float:
        if generation < 0:
            raise ValueError(f"generation: expected an integer >= 0, got {generation!r}")
        return self.t0 * self.cooling**generation

    def perturb(
        self,
        lr: float,
        generation: int,
        rng: np.random.Generator,
        space: SearchSpace | None = None,
    ) -> float:
        """A log-normal perturbation of ``lr`` whose spread falls with the temperature."""
        factor = math.exp(self.spread * self.temperature(generation) * float(rng.normal()))
        value = lr * factor
        return float(np.clip(value, *space.lr_bounds)) if space is not None else value

    def acceptance(self, delta_loss: float, generation: int) -> float:
        """Probability of accepting a candidate whose loss is higher by ``delta_loss``."""
        if delta_loss <= 0:
            return 1.0
        return math.exp(-delta_loss / self.temperature(generation))

    def accept(self, delta_loss: float, generation: int, rng: np.random.Generator) -> bool:
        return bool(rng.random() < self.acceptance(delta_loss, generation))


def anneal(
    value: float,
    generation: int,
    t0: float = 1.0,
    cooling: float = 0.9,
    rng: np.random.Generator | None = None,
) -> float:
    """``value`` (a learning rate) times ``exp(T × N(0, 1))`` with ``T = t0 × cooling**generation``.

    >>> round(anneal(0.01, 0, rng=np.random.default_rng(0)), 5)  # exp(0.126) at T = 1
    0.01134

    """
    if rng is None:
        raise ValueError("anneal needs rng, a numpy Generator: randomness is always explicit")
    return LearningRateAnnealer(t0, cooling).perturb(value, generation, rng)


# ---------------------------------------------------------------------- diversity


def diversity(genomes: Sequence[Genome], space: SearchSpace | None = None) -> float:
    """Mean pairwise Euclidean distance between the genomes' encodings, each feature
    standardised over the population (constant features count 0); 0 for identical genomes.

    >>> g = Genome(blocks=())
    >>> diversity([g, g], SearchSpace()), diversity([g, Genome((), lr=0.1)], SearchSpace()) > 0
    (0.0, True)

    """
    if len(genomes) < 2:
        return 0.0
    codes = np.stack([g.encode(space) for g in genomes])
    std = codes.std(axis=0)
    z = (codes - codes.mean(axis=0)) / np.where(std > 0, std, 1.0)
    diff = z[:, None, :] - z[None, :, :]
    dist = np.sqrt((diff**2).sum(-1))
    n = len(genomes)
    return float(dist.sum() / (n * (n - 1)))
