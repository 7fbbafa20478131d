"""Gates: who decides whether a proposal may replace the live model.

:class:`CanaryGate` compares the proposal with the live model on the canary window — the most
recent labelled samples, which the proposal never trained on. :class:`StabilityGate` (the
pipeline's default) adds the surrogate's check for proposals that carry a predicted risk
(evolution's): a candidate goes live only when its predicted risk is under a threshold *and*
it beats the live model on the canary window.
"""

from __future__ import annotations

import math

import torch

from neuralsync.base import Gate, GateDecision, Proposal

__all__ = ["CanaryGate", "StabilityGate"]


class CanaryGate(Gate):
    """Accept a proposal whose canary error beats the live model's by ``margin`` (relative).

    Examples
    --------
    >>> import torch
    >>> from neuralsync.adaptation import FreshStartAdapter
    >>> from neuralsync.config import ModelConfig
    >>> from neuralsync.learner import OnlineLearner
    >>> live = OnlineLearner(ModelConfig(), n_inputs=1, lookback=4, horizon=1, target_index=[0])
    >>> x = torch.zeros(8, 4, 1)
    >>> y = torch.zeros(8, 1, 1)  # the untrained model forecasts the last value: 0, exactly
    >>> decision = CanaryGate(0.0).decide(Proposal(live, "test"), torch.ones(8), x, y)
    >>> decision.accepted, decision.figures["candidate_mse"]
    (True, 0.0)

    """

    def __init__(self, margin: float = 0.0):
        self.margin = margin

    def decide(
        self,
        proposal: Proposal,
        live_errors: torch.Tensor,
        canary_x: torch.Tensor,
        canary_y: torch.Tensor,
    ) -> GateDecision:
        if proposal.canary_errors is not None:
            candidate = float(proposal.canary_errors.mean())
        else:
            candidate = float(proposal.learner.squared_errors(canary_x, canary_y).mean())
        live = float(live_errors.mean())
        accepted = bool(math.isfinite(candidate) and candidate < live * (1.0 - self.margin))
        reason = (
            "candidate beats the live model on the canary window"
            if accepted
            else "candidate does not beat the live model on the canary window"
        )
        return GateDecision(
            accepted, reason, {"candidate_mse": candidate, "live_mse": live, "margin": self.margin}
        )


class StabilityGate(CanaryGate):
    """The canary check, preceded by the surrogate's risk check where a proposal has one.

    A proposal whose ``details`` carry ``risk`` (the surrogate's probability that it is worse
    than the live model) is refused when the risk is above ``risk_threshold``, whatever its
    canary figures; proposals without one (meta-adaptation's) face the canary alone.

    Examples
    --------
    >>> import torch
    >>> from neuralsync.config import ModelConfig
    >>> from neuralsync.learner import OnlineLearner
    >>> live = OnlineLearner(ModelConfig(), n_inputs=1, lookback=4, horizon=1, target_index=[0])
    >>> x, y = torch.zeros(8, 4, 1), torch.zeros(8, 1, 1)
    >>> risky = Proposal(live, "evolution", {"risk": 0.9})
    >>> decision = StabilityGate(risk_threshold=0.5).decide(risky, torch.ones(8), x, y)
    >>> decision.accepted, decision.reason
    (False, 'surrogate risk 0.900 is above the threshold 0.500')

    """

    def __init__(self, margin: float = 0.0, risk_threshold: float = 0.6):
        super().__init__(margin)
        self.risk_threshold = risk_threshold

    def decide(
        self,
        proposal: Proposal,
        live_errors: torch.Tensor,
        canary_x: torch.Tensor,
        canary_y: torch.Tensor,
    ) -> GateDecision:
        canary = super().decide(proposal, live_errors, canary_x, canary_y)
        risk = proposal.details.get("risk")
        if risk is None:
            return canary
        figures = {**canary.figures, "risk": float(risk), "risk_threshold": self.risk_threshold}
        if risk > self.risk_threshold:
            reason = f"surrogate risk {risk:.3f} is above the threshold {self.risk_threshold:.3f}"
            return GateDecision(False, reason, figures)
        return GateDecision(
            canary.accepted, f"surrogate risk {risk:.3f} is acceptable; {canary.reason}", figures
        )
