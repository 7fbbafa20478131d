"""Regime recall: when a regime comes back, bring back the model that had learned it.

Many streams move between a few regimes that recur: calm and volatile markets, weekday and
weekend load, the seasons. The live model at the end of a regime has learned it, so a copy kept
then is, when the regime returns, a better start than anything adapted from a few dozen samples.
:class:`RegimeRecall` keeps such copies and, at a detection, offers the one that fits the newest
samples best to the canary gate, at once: a stored model has never seen the canary window, so it
can be judged on it without waiting for more data. Meta-adaptation
(:class:`~neuralsync.meta.MetaAdapter`) follows a little later with its adapted proposal, which
covers regimes that are new.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from neuralsync.base import Adapter, Proposal, RegimeChange
from neuralsync.config import RecallConfig, Scenario
from neuralsync.learner import OnlineLearner

__all__ = ["RegimeRecall"]


class RegimeRecall(Adapter):
    """At a regime change, propose the stored model that best fits the newest samples.

    The library holds a copy of the live model taken at each detection: the model as it ended
    the regime that just closed. The newest ``models`` copies are kept. At a detection (the
    pipeline consults this adapter at once: ``support_delay`` is 0) it scores every stored model
    on the newest ``select`` support samples, the ones just before the canary window, and
    proposes a copy of the best. Then it stores the live model. A recalled model must beat the
    live one on the canary window by ``margin`` (relative), with a paired z-score of at least
    ``min_z``, to go live. A regime that truly comes back makes its own model far better than
    the live one, while a stored model that is merely as good (a regime that did not recur)
    would be a coin toss on a short canary window. A live model with lifelong state hands it
    to the copy it brings back (:meth:`~neuralsync.learner.OnlineLearner.recalled`).

    Parameters
    ----------
    models
        Copies kept; the oldest is evicted.
    select
        Newest support samples the stored models are scored on to choose one.
    margin
        Relative improvement over the live model's canary error a recalled model must reach.
    min_z
        Paired z-score its advantage on the canary window must reach as well
        (:func:`~neuralsync.gates.advantage_z`).

    Examples
    --------
    A model that learned ``y = -x`` is stored at the first change; the stream turns to
    ``y = x``, then back to ``y = -x``, and the stored model is recalled:

    >>> import torch
    >>> from neuralsync.config import ModelConfig
    >>> from neuralsync.learner import OnlineLearner
    >>> _ = torch.manual_seed(0)
    >>> def trained(sign):
    ...     config = ModelConfig(type="linear", lr=0.1, subtract_last=False)
    ...     model = OnlineLearner(config, n_inputs=1, lookback=1,
    ...                           horizon=1, target_index=[0])
    ...     for _ in range(300):
    ...         x = torch.randn(8, 1, 1)
    ...         model.learn(x, sign * x)
    ...     return model
    >>> recall = RegimeRecall(models=4, select=16)
    >>> recall.on_regime_change(None, trained(-1.0), torch.zeros(0, 1, 1), torch.zeros(0, 1, 1))
    >>> x = torch.randn(32, 1, 1)
    >>> proposal = recall.on_regime_change(None, trained(1.0), x, -x)
    >>> proposal.source, proposal.details["library"], proposal.margin
    ('recall', 1, 0.1)
    >>> proposal.details["select_mse"] < 1e-3, len(recall.library_)
    (True, 2)

    """

    name = "recall"
    support_delay = 0

    def __init__(self, models: int = 8, select: int = 32, margin: float = 0.1, min_z: float = 1.0):
        if models < 1 or select < 1:
            raise ValueError(f"models and select must be at least 1, got {models} and {select}")
        if not 0.0 <= margin < 1.0:
            raise ValueError(f"margin must be in [0, 1), got {margin}")
        if min_z < 0.0:
            raise ValueError(f"min_z must be at least 0, got {min_z}")
        self.models = models
        self.select = select
        self.margin = margin
        self.min_z = min_z
        #: The stored models' ``state_dict()``s, oldest first (plain tensors: the snapshot
        #: holds them as they are, and a recalled model is rebuilt on the live model's device).
        self.library_: list[dict[str, Any]] = []
        #: Stream position of the detection at which each was stored (``None``: unknown).
        self.stored_at_: list[int | None] = []

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> RegimeRecall:
        c: RecallConfig = scenario.adaptation.recall
        return cls(c.models, c.select, c.margin, c.min_z)

    def on_regime_change(
        self,
        change: RegimeChange | None,
        live: OnlineLearner,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
    ) -> Proposal | None:
        from neuralsync.rls import learner_from_state_dict

        proposal = None
        x, y = support_x[-self.select :], support_y[-self.select :]
        if self.library_ and len(x):
            # Each as it would come back: with the live model's lifelong state, if it has any.
            stored = [
                live.recalled(learner_from_state_dict(state, live.device))
                for state in self.library_
            ]
            scores = [float(model.squared_errors(x, y).mean()) for model in stored]
            best = min(range(len(scores)), key=scores.__getitem__)
            details = {
                "library": len(stored),
                "chosen": best,
                "stored_at": self.stored_at_[best],
                "select_size": len(x),
                "select_mse": scores[best],
                "select_mse_worst": max(scores),
            }
            proposal = Proposal(
                stored[best],
                self.name,
                details,
                event="recall",
                margin=self.margin,
                min_z=self.min_z,
            )
        # The live model as it ends the regime that just closed; a deep copy, because its
        # state_dict shares storage with the weights it goes on updating.
        self.library_.append(copy.deepcopy(live.state_dict()))
        self.stored_at_.append(None if change is None else change.position)
        del self.library_[: -self.models], self.stored_at_[: -self.models]
        return proposal

    def state_dict(self) -> dict[str, Any]:
        return {"library": list(self.library_), "stored_at": list(self.stored_at_)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.library_ = list(state["library"])
        self.stored_at_ = list(state["stored_at"])
