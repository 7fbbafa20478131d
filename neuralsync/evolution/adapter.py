"""Evolution as an adapter: a search per regime change, in the background, gated on delivery.

At a regime change (after ``after_detection`` more labelled samples, so the data is from the
new regime) the adapter copies the live model and the recent samples and starts a search in a
worker thread; the stream goes on. The pipeline collects the result ``result_delay`` labelled
samples later — waiting there if the search is still running, so that every run swaps at the
same positions — lets the winner catch up on the samples that arrived meanwhile, and offers it
to the stability gate, which judges it on the newest samples, which the search never saw.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from neuralsync.base import Adapter, Deferred, Proposal, RegimeChange
from neuralsync.config import EvolutionConfig, Scenario
from neuralsync.evolution.engine import EvolutionEngine, SearchResult
from neuralsync.learner import OnlineLearner

__all__ = ["EvolutionAdapter"]


class EvolutionAdapter(Adapter):
    """Evolve a new live model for each new regime, off the stream's thread.

    Parameters
    ----------
    config
        The engine's settings and the timing of its searches.
    seed
        Seeds each search together with the stream position of its change.

    Examples
    --------
    >>> import torch
    >>> from neuralsync.config import EvolutionConfig, ModelConfig
    >>> from neuralsync.learner import OnlineLearner
    >>> live = OnlineLearner(ModelConfig(), n_inputs=1, lookback=8, horizon=1, target_index=[0])
    >>> x, y = torch.randn(96, 8, 1), torch.randn(96, 1, 1)
    >>> adapter = EvolutionAdapter(EvolutionConfig(population=3, generations=1))
    >>> deferred = adapter.on_regime_change(None, live, x, y)
    >>> proposal = adapter.collect(deferred)  # waits for the search
    >>> proposal.source, adapter.engine_.searches_
    ('evolution', 1)

    """

    name = "evolution"

    def __init__(self, config: EvolutionConfig | None = None, seed: int = 0):
        self.config = config or EvolutionConfig()
        self.seed = seed
        self.support_delay = self.config.after_detection
        self.result_delay = self.config.result_delay
        self.deliver_when_ready = self.config.mode == "latency"
        self.history_size = self.config.window
        self.engine_ = EvolutionEngine(self.config, seed=seed)
        self._worker: ThreadPoolExecutor | None = None
        #: The engine copy each running search works on, by the id of its future.
        self._running: dict[int, EvolutionEngine] = {}

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> EvolutionAdapter:
        return cls(scenario.adaptation.evolution, seed=scenario.seed)

    def on_regime_change(
        self,
        change: RegimeChange | None,
        live: OnlineLearner,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
    ) -> Deferred:
        job = {
            "position": 0 if change is None else int(change.position),
            "live": _detached(live.state_dict()),
            "x": support_x.detach().clone(),
            "y": support_y.detach().clone(),
            "device": str(live.device),
        }
        return self.resume(job)

    def resume(self, job: dict[str, Any]) -> Deferred:
        """Start the search ``job`` describes on a copy of the engine as it is now."""
        engine = self.engine_.clone()
        if self._worker is None:
            self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evolution")
        future: Future[Proposal | None] = self._worker.submit(_run, engine, job)
        self._running[id(future)] = engine
        return Deferred(future, job)

    def collect(self, deferred: Deferred) -> Proposal | None:
        """Wait for the search, then make its engine copy the engine: what it learned (the
        surrogate's evaluations, σ, the elites) is committed at the same stream position in
        every run."""
        engine = self._running.pop(id(deferred.future))
        proposal = deferred.future.result()
        self.engine_ = engine
        return proposal

    def metrics(self) -> dict[str, Any]:
        """Searches, candidates, the surrogate's rank agreement, and the per-generation history."""
        engine = self.engine_
        return {
            "searches": engine.searches_,
            **engine.counts_,
            "sigma": engine.sigma_.sigma_,
            "surrogate_kendall_tau": engine.surrogate_.kendall_tau(),
            "surrogate_checks": len(engine.surrogate_.checks_),
            "history": engine.history_,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"engine": self.engine_.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "engine" in state:
            self.engine_.load_state_dict(state["engine"])


def _detached(state: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a learner's state: the live model keeps training meanwhile."""
    if isinstance(state, dict):
        return {k: _detached(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_detached(v) for v in state]
    if isinstance(state, torch.Tensor):
        return state.detach().clone()
    return state


def _run(engine: EvolutionEngine, job: dict[str, Any]) -> Proposal:
    """One search, in the worker thread: everything it touches is its own."""
    from neuralsync.rls import learner_from_state_dict

    live = learner_from_state_dict(job["live"], torch.device(job["device"]))
    result = engine.search(live, job["x"], job["y"], position=int(job["position"]))
    learner = engine.learner_for(result.best, live)
    if result.best.final is None:
        # The winner trained on the older part of the data only; it learns the fitness slice
        # too, in order, so that it is as current as the live model was at the start.
        n_fit = max(1, round(len(job["x"]) * engine.config.fitness_fraction))
        for x, y in zip(job["x"][-n_fit:], job["y"][-n_fit:], strict=True):
            learner.learn(x[None], y[None])
    return Proposal(learner, "evolution", _details(result), events=_events(result))


def _details(result: SearchResult) -> dict[str, Any]:
    best = result.best
    return {
        "genome": best.genome.hash,
        "architecture": best.genome.describe(),
        "origin": best.origin,
        "fitness": best.fitness,
        "incumbent_fitness": result.incumbent_fitness,
        "relative_loss": math.log(best.fitness / result.incumbent_fitness)
        if best.fitness > 0 and result.incumbent_fitness > 0
        else None,
        "generations": len(result.history),
        "evaluated": len(result.evaluations),
        "risk": result.risk,
    }


def _events(result: SearchResult) -> list[tuple[str, dict[str, Any]]]:
    events: list[tuple[str, dict[str, Any]]] = []
    for evaluation in result.evaluations:
        events.append(("candidate_evaluated", dict(evaluation)))
    for record in result.history:
        events.append(("evolution_generation", dict(record)))
    return events
