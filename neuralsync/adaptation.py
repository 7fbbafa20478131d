"""Adapters that react to a regime change, and the registry that builds them by name.

An adapter gets the live learner and recent labelled samples (the support set) and may
propose a replacement; the pipeline's gate scores it on later samples it never trained on.
Meta-adaptation (``meta``, :mod:`neuralsync.meta`) is used when a scenario names no
adapter. More adapters (evolution) register here or under the
``neuralsync.adapters`` entry-point group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from neuralsync.base import Adapter, Proposal, RegimeChange
from neuralsync.config import Scenario
from neuralsync.errors import ConfigError, suggest
from neuralsync.learner import OnlineLearner

__all__ = ["ADAPTERS", "FreshStartAdapter", "adapter_names", "build_adapters"]


class FreshStartAdapter(Adapter):
    """Propose a freshly initialised model trained on the support window only.

    The simplest answer to a regime change, and the baseline the smarter adapters must beat:
    forget everything and learn the new regime from what has been seen since.

    Parameters
    ----------
    epochs
        Passes over the support window, oldest sample first.

    Examples
    --------
    >>> import torch
    >>> from neuralsync.config import ModelConfig
    >>> _ = torch.manual_seed(0)
    >>> live = OnlineLearner(ModelConfig(), n_inputs=1, lookback=4, horizon=1, target_index=[0])
    >>> x, y = torch.randn(32, 4, 1), torch.randn(32, 1, 1)
    >>> proposal = FreshStartAdapter(epochs=2).on_regime_change(None, live, x, y)
    >>> proposal.source, proposal.learner.steps_, proposal.learner is live
    ('fresh_start', 64, False)

    """

    name = "fresh_start"

    def __init__(self, epochs: int = 1):
        self.epochs = epochs

    def on_regime_change(
        self,
        change: RegimeChange | None,
        live: OnlineLearner,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
    ) -> Proposal:
        fresh = OnlineLearner(
            live.config,
            live.n_inputs,
            live.lookback,
            live.horizon,
            live.target_index,
            device=live.device,
        )
        for _ in range(self.epochs):
            for x, y in zip(support_x, support_y, strict=True):
                fresh.learn(x[None], y[None])
        return Proposal(fresh, self.name, {"support_size": len(support_x), "epochs": self.epochs})


def _meta(scenario: Scenario) -> Adapter:
    from neuralsync.meta import MetaAdapter  # torch.func: loaded only when used

    return MetaAdapter.from_scenario(scenario)


def _recall(scenario: Scenario) -> Adapter:
    from neuralsync.recall import RegimeRecall

    return RegimeRecall.from_scenario(scenario)


def _evolution(scenario: Scenario) -> Adapter:
    from neuralsync.evolution.adapter import EvolutionAdapter  # scikit-learn: only when used

    return EvolutionAdapter.from_scenario(scenario)


#: Built-in adapters by name: a factory taking the scenario.
ADAPTERS: dict[str, Callable[[Scenario], Adapter]] = {
    "fresh_start": lambda scenario: FreshStartAdapter(),
    "recall": _recall,
    "meta": _meta,
    "evolution": _evolution,
}


def adapter_names(scenario: Scenario) -> list[str]:
    """The adapters a scenario uses: ``adaptation.adapters``, or when that names none,
    regime recall (``recall``), meta-adaptation (``meta``) and evolution (``evolution``), each
    unless its ``enabled`` is false.

    >>> from neuralsync.config import Scenario
    >>> s = Scenario(name="s", timestamp="t", targets="y")
    >>> adapter_names(s)
    ['recall', 'meta', 'evolution']
    >>> s.adaptation.meta.enabled = False
    >>> s.adaptation.recall.enabled = False
    >>> adapter_names(s)
    ['evolution']
    >>> s.adaptation.evolution.enabled = False
    >>> adapter_names(s)
    []
    >>> s.adaptation.adapters = ["fresh_start", "meta"]
    >>> adapter_names(s)
    ['fresh_start', 'meta']

    """
    named = list(scenario.adaptation.adapters)
    if named:
        return named
    adaptation = scenario.adaptation
    return [
        name
        for name, config in (
            ("recall", adaptation.recall),
            ("meta", adaptation.meta),
            ("evolution", adaptation.evolution),
        )
        if config.enabled
    ]


def build_adapters(scenario: Scenario) -> list[Adapter]:
    """Instantiate the adapters a scenario names, in order."""
    from importlib.metadata import entry_points

    factories: dict[str, Any] = dict(ADAPTERS)
    for ep in entry_points(group="neuralsync.adapters"):
        factories.setdefault(ep.name, ep.load())
    adapters = []
    for name in adapter_names(scenario):
        if name not in factories:
            raise ConfigError(
                f"option 'adaptation.adapters': unknown adapter '{name}'"
                f"{suggest(name, factories)}; available: {', '.join(factories)}"
            )
        adapters.append(factories[name](scenario))
    return adapters
