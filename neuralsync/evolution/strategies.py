"""The evolution engine outside the stream: two population strategies for any torch model and data.

- :class:`HybridES`: the bio-inspired hybrid of evolution strategies and SGD. A parent spawns
  children by multi-scale Gaussian mutation of its weights, every child lives (SGD with
  learning-rate decay, keeping what it learned: Lamarckian), the best child becomes the next
  parent, and σ adapts to progress.
- :class:`ResonanceHPO`: the AEON resonance design for hyperparameters. A population of
  learning rate, momentum and weight decay, each member evaluated by training; members mutate,
  "resonate" (survive unchanged) or are nudged, and the learning rate is annealed.

Both train their population together through
:class:`~neuralsync.evolution.population.PopulationTrainer`, so a generation costs about one
model's training time times a small factor, not times the population.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from neuralsync.evolution.operators import MULTISCALE, AdaptiveSigma, LearningRateAnnealer
from neuralsync.evolution.population import OPTIMIZERS, PopulationTrainer

__all__ = ["DEFAULT_RANGES", "HybridES", "ResonanceHPO"]

LossFn = Callable[[Tensor, Tensor], Tensor]
MetricFn = Callable[[Tensor, Tensor], float]
ModelSource = nn.Module | Callable[[], nn.Module]

#: The published search ranges of :class:`ResonanceHPO`.
DEFAULT_RANGES: dict[str, tuple[float, float]] = {
    "lr": (1e-5, 1e-3),
    "momentum": (0.5, 0.9),
    "weight_decay": (0.0, 0.1),
}
_TRAINABLE = ("lr", "momentum", "weight_decay")


def _build(model: ModelSource, seed: int) -> nn.Module:
    """A fresh copy of ``model``, or what the factory ``model()`` returns, seeded by ``seed``.

    A factory initialises its weights from torch's global RNG; forking it keeps the caller's
    RNG stream untouched and makes the result depend on ``seed`` only.
    """
    if isinstance(model, nn.Module):
        return copy.deepcopy(model)
    if not callable(model):
        raise TypeError(f"model must be an nn.Module or a factory of one, got {type(model)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        built = model()
    if not isinstance(built, nn.Module):
        raise TypeError(f"the model factory returned a {type(built).__name__}, not an nn.Module")
    return built


def _flat(module: nn.Module) -> Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def _check_xy(x: Any, y: Any, name: str) -> None:
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(f"{name}: expected tensors, got {type(x).__name__}, {type(y).__name__}")
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(f"{name}: x has {x.shape[0]} samples and y {y.shape[0]}; expected n > 0")


class HybridES:
    """Evolution strategies + SGD: multi-scale offspring, within-life SGD, the best is the parent.

    Each generation the parent spawns ``population`` children. Child ``k`` adds Gaussian noise
    of standard deviation ``σ × multiscale[k % len(multiscale)]`` to every parameter (small,
    medium and large steps in every generation); with ``noise="relative"`` the noise of each
    tensor is further scaled by that tensor's standard deviation (tensors with a zero standard
    deviation, such as zero-initialised heads, get absolute noise). Every child then lives
    ``life_steps`` SGD steps with learning-rate decay, all children together, and keeps what it
    learned (Lamarckian). A child's fitness is its loss on the validation data when it is given
    to :meth:`fit`, else on a fixed held-out-free sample of the training data (up to
    ``eval_size`` rows, drawn once). The fittest child becomes the next parent; σ shrinks when
    a generation improved the best fitness so far and grows after ``patience`` generations
    without (:class:`~neuralsync.evolution.operators.AdaptiveSigma`).

    With ``lr_sigma > 0`` the learning rate is part of the genome too (log-normal
    self-adaptation, as in classic evolution strategies): each child trains with the parent's
    learning rate times ``exp(lr_sigma × N(0, 1))``, and the winner passes its rate on. A
    learning rate that is too small or too large is then corrected by selection, where plain
    SGD stays where it was set. Off by default (the published design).

    Parameters
    ----------
    model
        The initial parent, or a zero-argument factory of one (called once, with torch's RNG
        forked and seeded from ``seed``).
    population, life_steps, generations
        Children per generation, SGD steps each child lives, generations.
    sigma0, multiscale, noise
        Initial mutation scale, the per-child multipliers, ``"absolute"`` or ``"relative"``.
    shrink, grow, patience
        σ adaptation (see :class:`~neuralsync.evolution.operators.AdaptiveSigma`); σ stays
        within ``[sigma0 / 100, sigma0 * 100]``.
    lr, lr_decay, momentum, weight_decay, grad_clip, batch_size
        Within-life SGD: step ``t`` of a life uses ``lr * lr_decay**t``.
    lr_sigma
        Spread of the children's log learning rates around the parent's (0: every child uses
        ``lr``).
    select
        ``"loss"`` (lowest fitness loss) or ``"metric"`` (highest ``metric``, given to fit).
    eval_size
        Rows of training data to score on when no validation data is given.
    backend
        :class:`~neuralsync.evolution.population.PopulationTrainer`'s backend.
    seed
        Seeds the mutations, the minibatches and a factory's initialisation.

    Attributes
    ----------
    history_
        One dict per generation: ``generation``, ``best_fitness``, ``mean_fitness`` (children
        after learning), ``best_before_learning`` (the best child right after mutation),
        ``parent_fitness`` (the parent it came from), ``sigma`` (used for this generation),
        ``diversity`` (mean pairwise Euclidean distance between the children's parameter
        vectors, after learning), ``samples_seen`` (cumulative training samples),
        ``wall_seconds`` (cumulative), ``lr`` (the next parent's learning rate: the best
        child's), ``diverged`` (every child's fitness was not finite, so the parent stayed),
        and ``metric`` (the best child's) when a metric is given.
    parent_
        The current parent (the last generation's best child, as it learned); already set
        when ``callback`` is called, so a callback can score it, e.g. on test data.
    best_model_, best_fitness_
        The fittest model seen, and its fitness.
    lr_
        The current parent's learning rate (``lr`` unless ``lr_sigma > 0``).

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(512, 4, generator=g)
    >>> y = torch.sin(x[:, :1]) + 0.5 * x[:, 1:2]
    >>> model = lambda: nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    >>> es = HybridES(model, population=6, life_steps=20, generations=4, lr=0.1, seed=0)
    >>> es = es.fit(x[:384], y[:384], x[384:], y[384:])
    >>> [round(r["sigma"], 4) for r in es.history_][:2]
    [0.02, 0.016]
    >>> bool(es.history_[-1]["best_fitness"] < es.history_[0]["parent_fitness"])
    True

    """

    def __init__(
        self,
        model: ModelSource,
        population: int = 10,
        life_steps: int = 150,
        generations: int = 50,
        sigma0: float = 0.02,
        multiscale: tuple[float, ...] = MULTISCALE,
        noise: str = "absolute",
        shrink: float = 0.8,
        grow: float = 1.25,
        patience: int = 2,
        lr: float = 0.05,
        lr_decay: float = 0.99,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        grad_clip: float | None = None,
        batch_size: int = 64,
        lr_sigma: float = 0.0,
        select: str = "loss",
        eval_size: int = 2048,
        backend: str = "auto",
        seed: int = 0,
    ):
        if population < 1 or life_steps < 0 or generations < 1 or batch_size < 1:
            raise ValueError(
                "HybridES: expected population >= 1, life_steps >= 0, generations >= 1, "
                f"batch_size >= 1; got {population}, {life_steps}, {generations}, {batch_size}"
            )
        if not sigma0 > 0 or not multiscale or min(multiscale) < 0:
            raise ValueError(f"HybridES: expected sigma0 > 0 and scales >= 0, got {sigma0}")
        if noise not in ("absolute", "relative"):
            raise ValueError(f"HybridES: noise must be 'absolute' or 'relative', got {noise!r}")
        if select not in ("loss", "metric"):
            raise ValueError(f"HybridES: select must be 'loss' or 'metric', got {select!r}")
        if not lr > 0 or lr_sigma < 0:
            raise ValueError(f"HybridES: expected lr > 0 and lr_sigma >= 0, got {lr}, {lr_sigma}")
        self.model = model
        self.population = population
        self.life_steps = life_steps
        self.generations = generations
        self.sigma0 = sigma0
        self.multiscale = tuple(multiscale)
        self.noise = noise
        self.shrink = shrink
        self.grow = grow
        self.patience = patience
        self.lr = lr
        self.lr_decay = lr_decay
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.grad_clip = grad_clip
        self.batch_size = batch_size
        self.lr_sigma = lr_sigma
        self.select = select
        self.eval_size = eval_size
        self.backend = backend
        self.seed = seed

    def _mutate(self, parent: nn.Module, scale: float, generator: torch.Generator) -> nn.Module:
        child = copy.deepcopy(parent)
        with torch.no_grad():
            for p in child.parameters():
                noise = torch.randn(p.shape, generator=generator, dtype=p.dtype)
                step = scale
                if self.noise == "relative" and p.numel() > 1:
                    spread = float(p.std())
                    step = scale * spread if spread > 0 else scale
                p.add_(noise.to(p.device), alpha=step)
        return child

    def fit(
        self,
        x_train: Tensor,
        y_train: Tensor,
        x_val: Tensor | None = None,
        y_val: Tensor | None = None,
        loss: LossFn | None = None,
        metric: MetricFn | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> HybridES:
        """Evolve for ``generations`` generations; returns ``self``.

        ``loss(prediction, target)`` (MSE by default) trains and scores the children;
        ``metric(prediction, target) -> float`` (higher is better, e.g. accuracy) is recorded
        for the best child and selects when ``select="metric"``. ``callback(record)`` is called
        with each generation's history record.
        """
        _check_xy(x_train, y_train, "HybridES.fit training data")
        if (x_val is None) != (y_val is None):
            raise ValueError("HybridES.fit: give both x_val and y_val, or neither")
        if self.select == "metric" and metric is None:
            raise ValueError("HybridES.fit: select='metric' needs a metric")
        generator = torch.Generator().manual_seed(self.seed)
        if x_val is None:
            rows = torch.randperm(x_train.shape[0], generator=generator)[: self.eval_size]
            x_val, y_val = x_train[rows.to(x_train.device)], y_train[rows.to(y_train.device)]
        _check_xy(x_val, y_val, "HybridES.fit validation data")
        loss_fn = loss if loss is not None else nn.functional.mse_loss
        parent = _build(self.model, self.seed).to(x_train.device)
        sigma = AdaptiveSigma(
            self.sigma0, self.shrink, self.grow, self.patience, self.sigma0 / 100, self.sigma0 * 100
        )
        parent_fitness = float(PopulationTrainer([parent], "loop").evaluate(x_val, y_val, loss))
        self.best_model_ = copy.deepcopy(parent)
        self.best_fitness_ = parent_fitness
        self.history_: list[dict[str, Any]] = []
        samples, start = 0, time.perf_counter()
        parent_lr = self.lr
        for generation in range(self.generations):
            used_sigma = sigma.sigma_
            children = [
                self._mutate(parent, used_sigma * self.multiscale[k % len(self.multiscale)],
                             generator)
                for k in range(self.population)
            ]  # fmt: skip
            rates = torch.full((self.population,), parent_lr, dtype=torch.float64)
            if self.lr_sigma > 0:
                z = torch.randn(self.population, generator=generator, dtype=torch.float64)
                rates = rates * torch.exp(self.lr_sigma * z)
            trainer = PopulationTrainer(children, self.backend)
            before = trainer.evaluate(x_val, y_val, loss)
            if self.life_steps > 0:
                trainer.train(
                    x_train, y_train, steps=self.life_steps, batch_size=self.batch_size,
                    lr=rates.tolist(), momentum=self.momentum, weight_decay=self.weight_decay,
                    grad_clip=self.grad_clip, lr_decay=self.lr_decay, generator=generator,
                    loss=loss_fn,
                )  # fmt: skip
                samples += self.population * self.life_steps * self.batch_size
            predictions = trainer.predict(x_val)
            fitness = torch.stack([loss_fn(p, y_val) for p in predictions]).detach().cpu()
            fitness = torch.nan_to_num(fitness.double(), nan=math.inf)
            scores = None
            if metric is not None:
                scores = torch.tensor([float(metric(p, y_val)) for p in predictions])
            if self.select == "loss":
                best = int(fitness.argmin())
            else:  # a diverged child's accuracy is chance, not a reason to pick it
                best = int(scores.masked_fill(~torch.isfinite(fitness), -math.inf).argmax())
            diverged = not math.isfinite(float(fitness[best]))
            improved = float(fitness[best]) < self.best_fitness_
            if improved:
                self.best_fitness_ = float(fitness[best])
                self.best_model_ = copy.deepcopy(children[best])
            sigma.update(improved)
            vectors = torch.stack([_flat(c) for c in children]).double()
            spread = float(torch.pdist(vectors).mean()) if len(children) > 1 else 0.0
            record: dict[str, Any] = {
                "generation": generation,
                "best_fitness": float(fitness[best]),
                "mean_fitness": float(fitness[torch.isfinite(fitness)].mean()),
                "best_before_learning": float(before.min()),
                "parent_fitness": parent_fitness,
                "sigma": used_sigma,
                "diversity": spread,
                "diverged": diverged,
                "samples_seen": samples,
                "wall_seconds": time.perf_counter() - start,
            }
            if scores is not None:
                record["metric"] = float(scores[best])
            self.history_.append(record)
            if diverged:
                # Every child diverged: the parent stays. Divergence is the one unambiguous
                # sign that the learning rate is too large, so a self-adapted one is halved.
                if self.lr_sigma > 0:
                    parent_lr /= 2.0
            else:
                parent, parent_fitness = children[best], float(fitness[best])
                parent_lr = float(rates[best])
            record["lr"] = parent_lr
            # Set before the callback, so that it can score the generation's winner.
            self.parent_, self.sigma_, self.lr_ = parent, sigma.sigma_, parent_lr
            if callback is not None:
                callback(record)
        return self


class ResonanceHPO:
    """Resonance hyperparameter search: mutate, resonate or nudge; anneal the learning rate.

    A population of hyperparameter sets starts uniformly in ``ranges`` (log-uniformly for
    ``lr``). Every generation each member is evaluated, then each member, independently:

    - mutates with probability ``mutation_rate``: every value × U(0.9, 1.1);
    - otherwise survives unchanged ("resonates") with probability ``resonance_factor``;
    - otherwise is nudged: every value × U(0.95, 1.05).

    A member that mutated or was nudged also has its learning rate annealed: × exp(T × N(0, 1))
    with the temperature ``T = t0 × cooling**generation`` (``anneal=None``: no annealing).
    Values are clipped to their ranges. The best (hyperparameters, loss, model) so far is kept.

    With ``exploit > 0`` (off by default, an addition to the published design) the search
    also selects: after each evaluation the ``round(exploit × population)`` worst members
    (at most half) take over the hyperparameters (and, the batched way, the weights) of the
    as many best, then mutate, so a copy never retraces its source's steps. Without it nothing
    selects: every member follows its own random walk and the search is a random search whose
    points drift.

    Two additions for the batched way, both off by default, spend a fixed step budget on one
    lineage rather than spreading it evenly (a model trained ``budget / population`` steps
    cannot compete with one model trained on the whole budget):

    - ``shrink < 1`` (successive halving): after each evaluation only the best
      ``ceil(shrink × size)`` members go on (weights and hyperparameters), and the steps per
      generation grow so that every generation costs ``population × steps_per_generation``
      steps. The survivors' lineages get the steps the dropped members no longer take. Once
      one member is left it keeps its hyperparameters: no selection can judge a move any more.
    - ``cooldown = (n, factor)``: in the last ``n`` generations nothing moves any more; every
      member's learning rate decays geometrically, step by step, to ``factor`` times its value
      at the start of the cooldown (the annealing's final cooling, as a schedule: a constant
      rate leaves a model short of the minimum its noise lets it circle).

    Two ways to evaluate:

    - ``train_fn(params, seed) -> loss`` (or ``(loss, model)``): anything, trained from scratch
      by the caller for each member and generation;
    - batched: a ``model`` (module or factory) and the data given to :meth:`fit`. Member ``i``
      owns one model and keeps training it across generations (Lamarckian: the weights carry
      over, the hyperparameters change under it), all members together through
      :class:`~neuralsync.evolution.population.PopulationTrainer`, ``steps_per_generation``
      steps each; the loss is on the validation data (the training data when none is given).
      The whole search costs ``population × generations × steps_per_generation`` optimizer
      steps. Only ``lr``, ``momentum`` and ``weight_decay`` can be searched this way. A member
      whose loss is not finite restarts from the best model so far.

    Parameters
    ----------
    train_fn
        The evaluation, or None for the batched way.
    model
        The batched way's model or factory (factory: seeded per member from ``seed``).
    population, generations
        Members, generations.
    ranges
        ``name -> (low, high)``.
    mutation_rate, resonance_factor, anneal
        The update rule above; ``anneal`` is ``(t0, cooling)``.
    exploit
        The fraction of the population replaced by copies of the best each generation.
    initial
        Starting points (e.g. known defaults) for the first members, within ``ranges``; the
        others start at random as above.
    elite
        The best members of each generation keep their hyperparameters for sure (the resonance
        factor at its strongest for the genomes that proved best; ``0``: none, as published).
    shrink
        The fraction of members kept after each generation (``1``: all; batched way only).
    cooldown
        ``(generations, factor)``: the final learning-rate decay (None: none; batched way only).
    steps_per_generation, batch_size, grad_clip, backend
        The batched way's training.
    optimizer, beta2
        The batched way's optimiser: ``"sgd"`` (``momentum`` is SGD's momentum) or ``"adamw"``
        (``momentum`` is Adam's β1, ``beta2`` its β2); see
        :meth:`~neuralsync.evolution.population.PopulationTrainer.train`.
    seed
        Seeds every random choice (and the factory's initialisations).

    Attributes
    ----------
    history_
        Per generation: ``generation``, ``best_loss``, ``mean_loss``, ``best_loss_so_far``,
        ``temperature``, ``members`` (each member's hyperparameters and ``loss``, as evaluated),
        ``actions`` (``"mutate"``, ``"keep"``, ``"nudge"``, ``"exploit"``, ``"drop"`` or ``"cool"``
        per member, for the next generation), ``steps`` (cumulative optimizer steps, batched
        way), ``lr_scale`` (what the cooldown multiplied the learning rates by at the start of
        the generation; 1 outside it) and ``wall_seconds``.
    best_params_, best_loss_, best_model_
        The best so far (``best_model_``: None when ``train_fn`` returns only a loss).

    Examples
    --------
    >>> def train_fn(params, seed):  # a bowl with its minimum at lr = 3e-4, momentum = 0.8
    ...     return (math.log10(params["lr"]) + 3.5) ** 2 + (params["momentum"] - 0.8) ** 2
    >>> hpo = ResonanceHPO(train_fn, population=8, generations=15, seed=0).fit()
    >>> bool(hpo.best_loss_ <= hpo.history_[0]["best_loss"])
    True
    >>> sorted(hpo.best_params_)
    ['lr', 'momentum', 'weight_decay']

    """

    def __init__(
        self,
        train_fn: Callable[[dict[str, float], int], Any] | None = None,
        *,
        model: ModelSource | None = None,
        population: int = 8,
        generations: int = 10,
        ranges: Mapping[str, tuple[float, float]] | None = None,
        mutation_rate: float = 0.3,
        resonance_factor: float = 0.7,
        anneal: tuple[float, float] | None = (0.3, 0.8),
        steps_per_generation: int = 100,
        batch_size: int = 32,
        grad_clip: float | None = None,
        backend: str = "auto",
        seed: int = 0,
        exploit: float = 0.0,
        optimizer: str = "sgd",
        beta2: float = 0.999,
        initial: Sequence[Mapping[str, float]] | None = None,
        shrink: float = 1.0,
        cooldown: tuple[int, float] | None = None,
        elite: int = 0,
    ):
        if (train_fn is None) == (model is None):
            raise ValueError("ResonanceHPO: give either train_fn or model (batched), not both")
        if population < 1 or generations < 1:
            raise ValueError(
                f"ResonanceHPO: expected population, generations >= 1, got {population}, "
                f"{generations}"
            )
        for name, value in (
            ("mutation_rate", mutation_rate),
            ("resonance_factor", resonance_factor),
            ("exploit", exploit),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ResonanceHPO: {name} must be in [0, 1], got {value}")
        ranges = dict(DEFAULT_RANGES if ranges is None else ranges)
        for name, bounds in ranges.items():
            low, high = bounds
            if not low <= high:
                raise ValueError(f"ResonanceHPO: range of {name!r} is ({low}, {high}), low > high")
        if model is not None:
            unknown = sorted(set(ranges) - set(_TRAINABLE))
            if unknown:
                raise ValueError(
                    f"ResonanceHPO: the batched way searches {_TRAINABLE}, not {unknown}"
                )
        if anneal is not None:
            LearningRateAnnealer(*anneal)  # validates t0 and cooling
        for start in initial or ():
            outside = {
                name: start.get(name)
                for name, (low, high) in ranges.items()
                if name not in start or not low <= start[name] <= high
            }
            if outside:
                raise ValueError(
                    f"ResonanceHPO: initial member {dict(start)} is missing or outside the "
                    f"ranges for {sorted(outside)} (ranges {ranges})"
                )
        if initial is not None and len(initial) > population:
            raise ValueError(
                f"ResonanceHPO: {len(initial)} initial members for a population of {population}"
            )
        if optimizer not in OPTIMIZERS:
            raise ValueError(
                f"ResonanceHPO: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}"
            )
        if not (isinstance(elite, int) and 0 <= elite <= population):
            raise ValueError(f"ResonanceHPO: elite must be in 0..{population}, got {elite!r}")
        if not 0.0 < shrink <= 1.0:
            raise ValueError(f"ResonanceHPO: shrink must be in (0, 1], got {shrink}")
        if cooldown is not None:
            length, factor = cooldown
            if not (isinstance(length, int) and 1 <= length <= generations and 0 < factor <= 1):
                raise ValueError(
                    f"ResonanceHPO: cooldown must be (generations, factor) with 1 <= generations "
                    f"<= {generations} and 0 < factor <= 1, got {cooldown}"
                )
        if model is None and (shrink < 1.0 or cooldown is not None):
            raise ValueError(
                "ResonanceHPO: shrink and cooldown count optimizer steps, so they need the "
                "batched way (model=...), not train_fn"
            )
        self.train_fn = train_fn
        self.model = model
        self.population = population
        self.generations = generations
        self.ranges = ranges
        self.mutation_rate = mutation_rate
        self.resonance_factor = resonance_factor
        self.anneal = anneal
        self.steps_per_generation = steps_per_generation
        self.batch_size = batch_size
        self.grad_clip = grad_clip
        self.backend = backend
        self.seed = seed
        self.exploit = exploit
        self.initial = None if initial is None else [dict(m) for m in initial]
        self.optimizer = optimizer
        self.beta2 = beta2
        self.shrink = shrink
        self.cooldown = cooldown
        self.elite = elite

    def sizes(self) -> list[int]:
        """The population size of each generation (shrinking with ``shrink``).

        >>> ResonanceHPO(model=lambda: nn.Linear(1, 1), population=8, generations=5,
        ...              shrink=0.5).sizes()
        [8, 4, 2, 1, 1]
        """
        sizes = [self.population]
        while len(sizes) < self.generations:
            sizes.append(max(1, math.ceil(self.shrink * sizes[-1])))
        return sizes

    def _schedule(self, sizes: list[int]) -> list[tuple[int, float, float]]:
        """Per generation: steps per member, the cooldown's scale at its start, its decay/step.

        Every generation costs ``population × steps_per_generation`` steps (rounded down to a
        multiple of its size).
        """
        budget = self.population * self.steps_per_generation
        steps = [budget // size for size in sizes]
        schedule = [(s, 1.0, 1.0) for s in steps]
        if self.cooldown is not None:
            length, factor = self.cooldown
            first = self.generations - length
            total = sum(steps[first:])
            decay = factor ** (1.0 / total)
            done = 0
            for g in range(first, self.generations):
                schedule[g] = (steps[g], decay**done, decay)
                done += steps[g]
        return schedule

    def _initial(self, rng: np.random.Generator) -> list[dict[str, float]]:
        members = []
        for _ in range(self.population):
            member = {}
            for name, (low, high) in self.ranges.items():
                if name == "lr" and low > 0:
                    member[name] = float(math.exp(rng.uniform(math.log(low), math.log(high))))
                else:
                    member[name] = float(rng.uniform(low, high))
            members.append(member)
        # The given starting points replace the first draws; the rest stay as drawn, so the
        # other members are the same with and without them.
        for i, start in enumerate(self.initial or ()):
            members[i] = {name: float(start[name]) for name in self.ranges}
        return members

    def _step(
        self,
        member: dict[str, float],
        generation: int,
        rng: np.random.Generator,
        copied: bool = False,
    ) -> tuple[dict[str, float], str]:
        """The member of the next generation, and what happened to it."""
        if copied:
            action, width = "exploit", 0.1
        elif rng.random() < self.mutation_rate:
            action, width = "mutate", 0.1
        elif rng.random() < self.resonance_factor:
            return dict(member), "keep"
        else:
            action, width = "nudge", 0.05
        new = {name: value * rng.uniform(1 - width, 1 + width) for name, value in member.items()}
        if self.anneal is not None and "lr" in new:
            new["lr"] = LearningRateAnnealer(*self.anneal).perturb(new["lr"], generation, rng)
        for name, (low, high) in self.ranges.items():
            new[name] = float(min(max(new[name], low), high))
        return new, action

    def fit(
        self,
        x: Tensor | None = None,
        y: Tensor | None = None,
        x_val: Tensor | None = None,
        y_val: Tensor | None = None,
        loss: LossFn | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
    ) -> ResonanceHPO:
        """Search for ``generations`` generations; returns ``self``.

        With ``train_fn`` no data is needed; the batched way needs ``x`` and ``y`` (and scores
        on ``x_val``, ``y_val`` when given).
        """
        rng = np.random.default_rng(self.seed)
        batched = self.model is not None
        if batched:
            if x is None or y is None:
                raise ValueError("ResonanceHPO.fit: the batched way needs x and y")
            _check_xy(x, y, "ResonanceHPO.fit training data")
            if (x_val is None) != (y_val is None):
                raise ValueError("ResonanceHPO.fit: give both x_val and y_val, or neither")
            if x_val is None:
                x_val, y_val = x, y
            _check_xy(x_val, y_val, "ResonanceHPO.fit validation data")
            models = [
                _build(self.model, self.seed + i).to(x.device) for i in range(self.population)
            ]
            trainer = PopulationTrainer(models, self.backend)
            generator = torch.Generator().manual_seed(self.seed)
        members = self._initial(rng)
        self.history_: list[dict[str, Any]] = []
        self.best_loss_ = math.inf
        self.best_params_: dict[str, float] = dict(members[0])
        self.best_model_: nn.Module | None = None
        sizes = self.sizes()
        schedule = self._schedule(sizes) if batched else None
        cooling_from = self.generations - self.cooldown[0] if self.cooldown else math.inf
        steps, start = 0, time.perf_counter()
        for generation in range(self.generations):
            temperature = (
                self.anneal[0] * self.anneal[1] ** generation if self.anneal is not None else 0.0
            )
            lr_scale = 1.0
            if batched:
                member_steps, lr_scale, decay = schedule[generation]
                losses = self._train_batched(
                    trainer, members, x, y, x_val, y_val, loss, generator,
                    member_steps, lr_scale, decay,
                )  # fmt: skip
                steps += len(members) * member_steps
            else:
                losses, models = self._train_each(members, rng)
            for i, value in enumerate(losses):
                if value < self.best_loss_:
                    self.best_loss_ = value
                    self.best_params_ = dict(members[i])
                    if models[i] is not None:
                        self.best_model_ = copy.deepcopy(models[i])
            if batched and self.best_model_ is not None:
                # A diverged member restarts from the best model so far.
                for i, value in enumerate(losses):
                    if not math.isfinite(value):
                        models[i].load_state_dict(self.best_model_.state_dict())
            finite = [v for v in losses if math.isfinite(v)]
            evaluated = [{**m, "loss": v} for m, v in zip(members, losses, strict=True)]
            actions = ["drop"] * len(members)
            if generation + 1 < self.generations:
                kept = sorted(self._ranked(losses)[: sizes[generation + 1]])
            else:
                kept = list(range(len(members)))
            survivors = [members[i] for i in kept]
            survivor_losses = [losses[i] for i in kept]
            if batched and len(kept) < len(members):
                models = [models[i] for i in kept]
                trainer = PopulationTrainer(models, self.backend)
            if generation + 1 >= cooling_from:  # the next generation cools: nothing moves
                stepped = [(dict(m), "cool") for m in survivors]
            elif self.shrink < 1.0 and len(survivors) == 1:
                # Selection is what judges a move; with one lineage left, a move would be a
                # blind random walk (at a range's edge, a drift away from it).
                stepped = [(dict(survivors[0]), "keep")]
            else:
                elite = set(self._ranked(survivor_losses)[: self.elite])
                copied = self._exploit(survivors, survivor_losses, models if batched else None)
                stepped = [
                    (dict(m), "keep") if j in elite and j not in copied
                    else self._step(m, generation, rng, j in copied)
                    for j, m in enumerate(survivors)
                ]  # fmt: skip
            for i, (_, action) in zip(kept, stepped, strict=True):
                actions[i] = action
            members = [m for m, _ in stepped]
            record = {
                "generation": generation,
                "best_loss": min(losses),
                "mean_loss": float(np.mean(finite)) if finite else math.inf,
                "best_loss_so_far": self.best_loss_,
                "temperature": temperature,
                "lr_scale": lr_scale,
                "members": evaluated,
                "actions": actions,
                "steps": steps,
                "wall_seconds": time.perf_counter() - start,
            }
            self.history_.append(record)
            if callback is not None:
                callback(record)
        self.members_ = members
        return self

    @staticmethod
    def _ranked(losses: Sequence[float]) -> list[int]:
        """Member indices from the lowest loss up; ties by position, so every outcome that
        depends on the ranking is deterministic."""
        return sorted(range(len(losses)), key=lambda i: (losses[i], i))

    def _exploit(
        self, members: list[dict[str, float]], losses: list[float], models: list | None
    ) -> set[int]:
        """Replace the worst members by copies of the best, in place; return who was replaced.

        Ranks are by loss (ties by position, so the outcome is deterministic); the k-th worst
        copies the k-th best.
        """
        count = min(round(self.exploit * len(members)), len(members) // 2)
        if count == 0:
            return set()
        order = self._ranked(losses)
        for winner, loser in zip(order[:count], order[::-1][:count], strict=True):
            members[loser] = dict(members[winner])
            if models is not None:
                models[loser].load_state_dict(models[winner].state_dict())
        return set(order[::-1][:count])

    def _train_each(
        self, members: list[dict[str, float]], rng: np.random.Generator
    ) -> tuple[list[float], list[nn.Module | None]]:
        losses, models = [], []
        for member in members:
            result = self.train_fn(dict(member), int(rng.integers(2**31)))
            model = None
            if isinstance(result, tuple):
                result, model = result
            value = float(result)
            losses.append(value if math.isfinite(value) else math.inf)
            models.append(model)
        return losses, models

    def _train_batched(
        self, trainer, members, x, y, x_val, y_val, loss, generator, steps, lr_scale, decay
    ) -> list[float]:
        def column(name: str, default: float) -> list[float]:
            return [m.get(name, default) for m in members]

        trainer.train(
            x, y, steps=steps, batch_size=self.batch_size,
            lr=[lr * lr_scale for lr in column("lr", 1e-3)], lr_decay=decay,
            momentum=column("momentum", 0.0), weight_decay=column("weight_decay", 0.0),
            grad_clip=self.grad_clip, generator=generator, loss=loss,
            optimizer=self.optimizer, beta2=self.beta2,
        )  # fmt: skip
        values = trainer.evaluate(x_val, y_val, loss).double()
        return [float(v) if math.isfinite(float(v)) else math.inf for v in values]
