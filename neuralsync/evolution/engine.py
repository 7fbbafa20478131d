"""The evolution engine: one search for a better live model, on the data of a new regime.

A search takes the live model (its genome and weights) and recent labelled samples, split in
time order into a training part and a *fitness slice* (the newest samples). Every candidate
starts from its parent's trained weights where shapes match (Lamarckian inheritance), lives
``life_steps`` SGD steps on the training part, and is scored by its loss on the fitness slice.
Candidates that share an architecture and the optimiser genes that cannot be batched train
together (:class:`~neuralsync.evolution.population.PopulationTrainer`).

Generation 0 is the *incumbent* — the live genome with the live weights, trained the same way,
the yardstick every fitness is divided by — plus the elites of earlier searches and
multi-scale offspring of the incumbent. Each later generation ranks the population; a genome
survives unchanged with the resonance rule's probability (high for the best, low for the
weak); the others are replaced by children of tournament winners (crossover, then parametric
mutation at 0.3σ / 1σ / 3σ, and a structural mutation with some probability, the learning rate
annealed), and a child worse than its parent still takes its place only with the annealing
acceptance probability. σ shrinks on progress and grows on stagnation. The surrogate predicts
each child's relative loss before it is trained; clearly bad ones are not trained at all.

The search is a pure function of its inputs and the engine's state at its start: it runs in a
background thread on a copy of the engine, with its own generators, and the copy becomes the
engine's state when the pipeline collects the result — so a run resumed from a snapshot taken
mid-search repeats the same search exactly.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from neuralsync.config import EvolutionConfig, ModelConfig
from neuralsync.evolution.genome import Genome, SearchSpace, inherit_weights
from neuralsync.evolution.operators import (
    MULTISCALE,
    AdaptiveSigma,
    LearningRateAnnealer,
    ResonanceRule,
    crossover,
    diversity,
    mutate_params,
    mutate_structure,
    tournament_select,
)
from neuralsync.evolution.population import PopulationTrainer
from neuralsync.evolution.surrogate import Surrogate, regime_features
from neuralsync.gates import standard_error_of_mean
from neuralsync.learner import OnlineLearner

__all__ = ["Candidate", "EvolutionEngine", "SearchResult", "search_space_for"]


def search_space_for(config: EvolutionConfig) -> SearchSpace:
    """The space evolution searches in a stream.

    SGD only, because within-life training is batched SGD; no dropout, because dropout would
    draw from torch's process-wide generator in a background thread, which is neither
    reproducible nor harmless to the stream's own draws.
    """
    return SearchSpace(
        kinds=tuple(config.block_kinds),
        max_blocks=config.max_blocks,
        max_width=64,
        max_dropout=0.0,
        optimizers=("sgd",),
        batch_sizes=(1, 2, 4, 8, 16),
        life_steps_bounds=(10, 200),
    )


@dataclass
class Candidate:
    """A genome in a search, with its trained network and its scores."""

    genome: Genome
    module: torch.nn.Module | None = None
    fitness: float = math.inf
    #: The surrogate's prediction before training (relative loss), when it had one.
    predicted: float | None = None
    predicted_std: float | None = None
    parent_fitness: float | None = None
    origin: str = "incumbent"
    scale: float | None = None
    evaluated: bool = False
    #: With ``fitness: prequential``: the network after its test-then-train pass over the
    #: fitness slice, ready to go live (``module`` stays as it was before, for its children).
    final: torch.nn.Module | None = None
    #: Its error on each sample of the fitness slice (the fitness is their mean).
    sample_losses: torch.Tensor | None = None


@dataclass
class SearchResult:
    """What a search hands back: the winner and the record of how it was found."""

    best: Candidate
    incumbent_fitness: float
    risk: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluations: list[dict[str, Any]] = field(default_factory=list)


class EvolutionEngine:
    """Evolve genomes for a regime; its state (elites, σ, surrogate) carries across searches.

    Parameters
    ----------
    config
        Population size, generations, operators and their switches.
    seed
        Seeds every search together with the stream position it starts at.

    Examples
    --------
    >>> import torch
    >>> from neuralsync.config import EvolutionConfig, ModelConfig
    >>> from neuralsync.learner import OnlineLearner
    >>> live = OnlineLearner(ModelConfig(), n_inputs=1, lookback=8, horizon=1, target_index=[0])
    >>> t = torch.arange(200.0)
    >>> x = torch.sin(t[:, None] / 4 + torch.arange(8.0) / 4)[:, :, None]
    >>> y = torch.sin(t / 4 + 2.0)[:, None, None]
    >>> engine = EvolutionEngine(EvolutionConfig(population=4, generations=2), seed=0)
    >>> result = engine.search(live, x, y, position=0)
    >>> len(result.history), result.best.fitness <= result.incumbent_fitness
    (2, True)

    """

    def __init__(self, config: EvolutionConfig, seed: int = 0, elites: int = 3):
        self.config = config
        self.seed = seed
        self.elites = elites
        self.space = search_space_for(config)
        self.sigma_ = AdaptiveSigma(sigma0=config.sigma)
        self.surrogate_ = Surrogate(seed=seed)
        #: The best genomes of earlier searches (JSON dicts), seeds for the next.
        self.elites_: list[dict[str, Any]] = []
        self.searches_ = 0
        self.counts_: dict[str, int] = {"evaluated": 0, "prefiltered": 0, "samples_seen": 0}
        #: Per-generation records of every search (bounded), for the report.
        self.history_: list[dict[str, Any]] = []

    # -- the search ---------------------------------------------------------------------

    def search(
        self,
        live: OnlineLearner,
        x: torch.Tensor,
        y: torch.Tensor,
        position: int,
        progress: Any = None,
    ) -> SearchResult:
        """Run one search on ``x``/``y`` (normalised windows and targets, oldest first) and
        update this engine's state. ``live`` is read, never changed."""
        cfg = self.config
        rng = np.random.default_rng([self.seed, position])
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        n_fit = max(1, round(len(x) * cfg.fitness_fraction))
        if len(x) - n_fit < 2:
            raise ValueError(f"a search needs at least {n_fit + 2} samples, got {len(x)}")
        data = (x[:-n_fit], y[:-n_fit], x[-n_fit:], y[-n_fit:])
        shape = (live.n_inputs, live.lookback, live.horizon, live.target_index)
        # anneal_t0 = 0 switches simulated annealing off: no learning-rate perturbation, and
        # every child takes its place whatever its fitness.
        annealer = LearningRateAnnealer(cfg.anneal_t0 or 1.0, cfg.anneal_cooling)
        incumbent_genome = Genome.from_model_config(live.config)
        live_module = live.module_

        def build(genome: Genome, parent: torch.nn.Module | None) -> torch.nn.Module:
            module = genome.build(*shape, generator=generator)
            if parent is not None and cfg.lamarckian:
                noise = cfg.inheritance_noise
                inherit_weights(module, parent, noise, generator if noise > 0 else None)
            return module

        incumbent = Candidate(incumbent_genome, build(incumbent_genome, live_module))
        population = [incumbent]
        seen = {incumbent_genome.hash}
        for elite in self.elites_:
            genome = Genome.from_dict(elite)
            if genome.hash not in seen and len(population) < cfg.population:
                seen.add(genome.hash)
                population.append(Candidate(genome, build(genome, live_module), origin="elite"))
        while len(population) < cfg.population:
            child = self._child(population, [incumbent], 0, rng, annealer, len(population))
            if child.genome.hash in seen:
                continue
            seen.add(child.genome.hash)
            child.module = build(child.genome, live_module)
            population.append(child)

        result_history: list[dict[str, Any]] = []
        evaluations: list[dict[str, Any]] = []
        features = np.empty(0)  # the regime's features, once generation 0 has a yardstick
        best_so_far = math.inf
        incumbent_fitness = math.nan
        self._prefiltered_now = 0
        for generation in range(cfg.generations):
            started = time.perf_counter()
            fresh = [c for c in population if not c.evaluated]
            samples = self._evaluate(fresh, data, generator, live.config)
            if generation == 0:
                incumbent_fitness = incumbent.fitness
                features = regime_features(data[1].numpy(), np.array([incumbent_fitness]))
                if cfg.surrogate:
                    # Generation 0 is not screened (it is the search's seed), but each member
                    # still gets a prediction made before its result is added: the risk of a
                    # winner from generation 0, and more checks of the surrogate.
                    self._predict_for([c for c in fresh if c is not incumbent], features)
            rejected = []
            for candidate in fresh:
                relative = _relative(candidate.fitness, incumbent_fitness)
                if candidate.predicted is not None:
                    self.surrogate_.check(candidate.predicted, relative)
                self.surrogate_.add(_features(candidate.genome, self.space, features), relative)
                evaluations.append(_evaluation(candidate, generation, relative))
                # Simulated annealing: a child worse than its parent takes a place in the
                # population only with a probability that falls with the temperature.
                parent = candidate.parent_fitness
                worse = parent is not None and math.isfinite(parent) and candidate.fitness > parent
                if worse and cfg.anneal_t0 > 0:
                    delta = _relative(candidate.fitness, parent)
                    if not annealer.accept(delta, generation, rng):
                        rejected.append(candidate)
            population = [c for c in population if c not in rejected or c is incumbent]
            if cfg.surrogate:
                self.surrogate_.fit()
            ranked = sorted(population, key=lambda c: c.fitness)
            improved = ranked[0].fitness < best_so_far * (1.0 - 1e-3)
            best_so_far = min(best_so_far, ranked[0].fitness)
            sigma = self.sigma_.update(improved) if generation > 0 else self.sigma_.sigma_
            finite = [c.fitness for c in population if math.isfinite(c.fitness)]
            record = {
                "search": self.searches_,
                "change_position": position,
                "generation": generation,
                "best_fitness": ranked[0].fitness,
                "mean_fitness": float(np.mean(finite)) if finite else math.nan,
                "incumbent_fitness": incumbent_fitness,
                "sigma": sigma,
                "diversity": diversity([c.genome for c in population], self.space),
                "evaluated": len(fresh),
                "prefiltered": self._prefiltered_now,
                "annealing_rejected": len(rejected),
                "samples_seen": samples,
                "wall_seconds": time.perf_counter() - started,
                "best_genome": ranked[0].genome.describe(),
            }
            result_history.append(record)
            if progress is not None:
                progress(record)
            if generation + 1 < cfg.generations:
                ranked = sorted(population, key=lambda c: c.fitness)
                population = self._next_generation(ranked, rng, annealer, generation + 1, features)
                for child in population:
                    if child.module is None:
                        parent = child._parent_module  # type: ignore[attr-defined]
                        child.module = build(child.genome, parent)

        ranked = sorted(population, key=lambda c: c.fitness)
        best = ranked[0]
        self.elites_ = [c.genome.to_dict() for c in ranked[: self.elites] if c is not incumbent]
        self.searches_ += 1
        self.history_ = (self.history_ + result_history)[-500:]
        risk = self._risk(best, incumbent, live.horizon) if cfg.surrogate else None
        return SearchResult(best, incumbent_fitness, risk, result_history, evaluations)

    def _risk(self, best: Candidate, incumbent: Candidate, horizon: int = 1) -> float | None:
        """The probability that ``best`` is worse than the live model: the surrogate's
        prediction (made before ``best`` was trained, with the spread of the trees and of the
        surrogate's past errors) as a prior, updated by ``best``'s measured fitness (with the
        standard error of its per-sample advantage over the incumbent). ``None`` without a
        prediction (the surrogate was not ready) or when the incumbent won."""
        if best is incumbent or best.predicted is None or best.sample_losses is None:
            return None
        prior_var = (best.predicted_std or 0.05) ** 2 + self.surrogate_.error() ** 2
        measured = _relative(best.fitness, incumbent.fitness)
        if not math.isfinite(measured) or incumbent.sample_losses is None:
            return 1.0
        diff = (best.sample_losses - incumbent.sample_losses).double()
        # Overlapping targets (horizon > 1) make neighbouring differences correlated.
        spread = standard_error_of_mean(diff, horizon)
        # Delta method: the standard error of log(best / incumbent).
        measured_var = max(spread / max(incumbent.fitness, 1e-12), 1e-3) ** 2
        weight = (1.0 / prior_var) + (1.0 / measured_var)
        mean = (best.predicted / prior_var + measured / measured_var) / weight
        return 0.5 * (1.0 + math.erf(mean * math.sqrt(weight) / math.sqrt(2.0)))

    def _child(
        self,
        ranked: Sequence[Candidate],
        parents: Sequence[Candidate],
        generation: int,
        rng: np.random.Generator,
        annealer: LearningRateAnnealer,
        index: int,
    ) -> Candidate:
        """A child of tournament winners among ``parents``: crossover or not, then mutation."""
        cfg = self.config
        fitness = [p.fitness if math.isfinite(p.fitness) else 1e30 for p in parents]
        size = min(cfg.tournament_size, len(parents))
        first = parents[tournament_select(fitness, size, rng)]
        genome, origin = first.genome, "mutation"
        if len(parents) > 1 and rng.random() < cfg.crossover_rate:
            second = parents[
                tournament_select(fitness, min(cfg.tournament_size, len(parents)), rng)
            ]
            genome, origin = crossover(first.genome, second.genome, rng), "crossover"
        scale = MULTISCALE[index % len(MULTISCALE)] if cfg.multiscale else 1.0
        genome = mutate_params(genome, self.sigma_.sigma_ * scale, rng, self.space)
        if rng.random() < cfg.structural_rate:
            genome, change = mutate_structure(genome, rng, self.space)
            origin += f"+{change}"
        if cfg.anneal_t0 > 0:
            lr = annealer.perturb(genome.lr, generation, rng, self.space)
            genome = Genome.from_dict({**genome.to_dict(), "lr": lr})
        child = Candidate(genome, origin=origin, scale=scale, parent_fitness=first.fitness)
        child._parent_module = first.module  # type: ignore[attr-defined]
        return child

    def _next_generation(
        self,
        ranked: list[Candidate],
        rng: np.random.Generator,
        annealer: LearningRateAnnealer,
        generation: int,
        features: np.ndarray,
    ) -> list[Candidate]:
        cfg = self.config
        resonance = ResonanceRule(cfg.resonance_factor)
        incumbent_fitness = next(
            (c.fitness for c in ranked if c.origin == "incumbent"), ranked[0].fitness
        )
        best_relative = _relative(ranked[0].fitness, incumbent_fitness)
        nxt: list[Candidate] = []
        seen = set()
        for rank, member in enumerate(ranked):
            if rank == 0 or resonance.survives(rank, len(ranked), rng):
                nxt.append(member)
                seen.add(member.genome.hash)
        self._prefiltered_now = 0
        slots = cfg.population - len(nxt)
        # Make up to three children per free slot; the surrogate screens them all at once
        # and the first ones not predicted clearly worse take the slots.
        pool: list[Candidate] = []
        attempts = 0
        while len(pool) < (3 if cfg.surrogate else 1) * slots and attempts < 20 * slots:
            attempts += 1
            # Children cycle through the mutation scales, so each generation has all three.
            child = self._child(ranked, ranked, generation, rng, annealer, len(pool))
            if child.genome.hash not in seen:
                seen.add(child.genome.hash)
                pool.append(child)
        predicted = None
        if cfg.surrogate and pool:
            rows = np.stack([_features(c.genome, self.space, features) for c in pool])
            predicted = self.surrogate_.predict(rows)
        for i, child in enumerate(pool):
            if len(nxt) == cfg.population:
                break
            if predicted is not None:
                child.predicted = float(predicted[0][i])
                child.predicted_std = float(predicted[1][i])
                # Clearly worse: even its optimistic bound is behind the best so far.
                if child.predicted - child.predicted_std > best_relative + 0.1:
                    self._prefiltered_now += 1
                    self.counts_["prefiltered"] += 1
                    continue
            nxt.append(child)
        return nxt

    def _predict_for(self, candidates: list[Candidate], features: np.ndarray) -> None:
        """Set each candidate's surrogate prediction (relative loss and spread), if ready."""
        if not candidates:
            return
        rows = np.stack([_features(c.genome, self.space, features) for c in candidates])
        predicted = self.surrogate_.predict(rows)
        if predicted is None:
            return
        for candidate, mean, std in zip(candidates, *predicted, strict=True):
            candidate.predicted, candidate.predicted_std = float(mean), float(std)

    def _evaluate(
        self,
        candidates: list[Candidate],
        data: tuple[torch.Tensor, ...],
        generator: torch.Generator,
        online: ModelConfig,
    ) -> int:
        """Train every candidate its life and score it on the fitness slice; samples seen.

        ``holdout`` fitness is the loss on the slice after training; ``prequential`` fitness
        is the mean error over one test-then-train pass through the slice, with the optimiser
        settings the candidate would have live (``online``'s, or its own genes with
        ``online_genes``): how it would do if swapped in.
        """
        x_train, y_train, x_fit, y_fit = data
        groups: dict[tuple[Any, ...], list[Candidate]] = {}
        for c in candidates:
            g = c.genome
            key = (g.architecture_hash, g.batch_size, g.life_steps, g.grad_clip)
            groups.setdefault(key, []).append(c)
        samples = 0
        for (_, batch_size, steps, clip), members in groups.items():
            trainer = PopulationTrainer([c.module for c in members])
            trainer.train(
                x_train,
                y_train,
                steps=steps,
                batch_size=min(batch_size, len(x_train)),
                lr=[c.genome.lr for c in members],
                momentum=[c.genome.momentum for c in members],
                weight_decay=[c.genome.weight_decay for c in members],
                grad_clip=clip,
                generator=generator,
            )
            if self.config.fitness == "prequential":
                n = len(x_fit)
                own = self.config.online_genes
                # Copies: ``module`` stays as within-life training left it, for the children.
                tested = PopulationTrainer([copy.deepcopy(m) for m in trainer.modules()])
                losses = tested.train(
                    x_fit,
                    y_fit,
                    steps=n,
                    batch_size=1,
                    order=torch.arange(n)[:, None],
                    lr=[c.genome.lr for c in members] if own else online.lr,
                    momentum=[c.genome.momentum for c in members] if own else online.momentum,
                    weight_decay=[c.genome.weight_decay for c in members]
                    if own
                    else online.weight_decay,
                    grad_clip=clip if own else online.grad_clip,
                    generator=generator,
                )
                for candidate, final in zip(members, tested.modules(), strict=True):
                    candidate.final = final
                samples += n * len(members)
            else:
                prediction = trainer.predict(x_fit)
                losses = ((prediction - y_fit) ** 2).flatten(2).mean(2)
            for candidate, module, per_sample in zip(
                members, trainer.modules(), losses.detach(), strict=True
            ):
                candidate.sample_losses = per_sample
                loss = per_sample.mean()
                candidate.module = module
                value = float(loss)
                candidate.fitness = value if math.isfinite(value) else math.inf
                candidate.evaluated = True
            samples += steps * batch_size * len(members)
        self.counts_["evaluated"] += len(candidates)
        self.counts_["samples_seen"] += samples
        return samples

    # -- results --------------------------------------------------------------------------

    def learner_for(self, candidate: Candidate, live: OnlineLearner) -> OnlineLearner:
        """The candidate as a live learner: its network, the live settings, its optimiser."""
        config: ModelConfig = candidate.genome.to_model_config(base=live.config)
        if not self.config.online_genes:
            online = ("lr", "momentum", "weight_decay", "grad_clip", "batch_size", "optimizer")
            config = config.model_copy(update={k: getattr(live.config, k) for k in online})
        learner = OnlineLearner(
            config,
            live.n_inputs,
            live.lookback,
            live.horizon,
            live.target_index,
            live.device,
            initialise=False,  # the candidate's weights come next; torch's generator untouched
        )
        network = candidate.final if candidate.final is not None else candidate.module
        learner.module_.load_state_dict(network.state_dict())
        if hasattr(live, "with_network"):  # a live model with more than its network (rls)
            return live.with_network(learner.module_, config)
        return learner

    def clone(self) -> EvolutionEngine:
        """An independent copy (a search runs on one while the stream goes on)."""
        return copy.deepcopy(self)

    def state_dict(self) -> dict[str, Any]:
        return {
            "sigma": self.sigma_.state_dict(),
            "surrogate": self.surrogate_.state_dict(),
            "elites": list(self.elites_),
            "searches": self.searches_,
            "counts": dict(self.counts_),
            # Wall time is the process's, not the stream's: a snapshot holds the rest.
            "history": [
                {k: v for k, v in record.items() if k != "wall_seconds"} for record in self.history_
            ],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sigma_.load_state_dict(state["sigma"])
        self.surrogate_.load_state_dict(state["surrogate"])
        self.elites_ = list(state["elites"])
        self.searches_ = int(state["searches"])
        self.counts_ = dict(state["counts"])
        self.history_ = list(state["history"])


def _relative(fitness: float, incumbent: float) -> float:
    """log(candidate / incumbent): negative is better than the live model."""
    if not (math.isfinite(fitness) and math.isfinite(incumbent)) or incumbent <= 0:
        return math.inf if not math.isfinite(fitness) else 0.0
    return math.log(max(fitness, 1e-12) / incumbent)


def _features(genome: Genome, space: SearchSpace, regime: np.ndarray) -> np.ndarray:
    return np.concatenate([genome.encode(space), regime])


def _evaluation(candidate: Candidate, generation: int, relative: float) -> dict[str, Any]:
    return {
        "generation": generation,
        "genome": candidate.genome.hash,
        "describe": candidate.genome.describe(),
        "origin": candidate.origin,
        "scale": candidate.scale,
        "fitness": candidate.fitness,
        "relative_loss": relative,
        "predicted_relative_loss": candidate.predicted,
    }
