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

    For a proposal that carries ``canary_errors`` (errors measured test-then-train over a long
    window, as a deferred search's winner does), ``min_z`` > 0 also asks the advantage to
    stand out from noise: the paired z-score of the per-sample error differences must reach it.

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

    def __init__(self, margin: float = 0.0, min_z: float = 0.0):
        self.margin = margin
        self.min_z = min_z

    def decide(
        self,
        proposal: Proposal,
        live_errors: torch.Tensor,
        canary_x: torch.Tensor,
        canary_y: torch.Tensor,
    ) -> GateDecision:
        if proposal.canary_errors is not None:
            errors = proposal.canary_errors.to(torch.float64)
        else:
            errors = proposal.learner.squared_errors(canary_x, canary_y).to(torch.float64)
        candidate = float(errors.mean())
        live = float(live_errors.mean())
        accepted = bool(math.isfinite(candidate) and candidate < live * (1.0 - self.margin))
        figures = {"candidate_mse": candidate, "live_mse": live, "margin": self.margin}
        reason = (
            "candidate beats the live model on the canary window"
            if accepted
            else "candidate does not beat the live model on the canary window"
        )
        if proposal.canary_errors is not None and len(errors) > 1:
            # Errors measured test-then-train over a long window: the advantage should stand
            # out from sample-to-sample noise (a paired z-score of the error differences).
            diff = errors - live_errors.to(torch.float64)
            spread = float(diff.std()) / math.sqrt(len(diff))
            z = -float(diff.mean()) / spread if spread > 0 else 0.0
            figures["advantage_z"] = z
            if accepted and z < self.min_z:
                accepted = False
                reason = (
                    f"candidate's advantage on the canary window is within noise "
                    f"(z = {z:.2f} < {self.min_z:g})"
                )
        return GateDecision(accepted, reason, figures)


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

    def __init__(self, margin: float = 0.0, risk_threshold: float = 0.6, min_z: float = 0.0):
        super().__init__(margin, min_z)
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
