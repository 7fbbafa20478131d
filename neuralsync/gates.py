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

__all__ = ["CanaryGate", "StabilityGate", "advantage_z", "standard_error_of_mean"]


def standard_error_of_mean(values: torch.Tensor, horizon: int = 1) -> float:
    """The standard error of the mean of ``values``, a series of per-sample error differences
    between two forecasters; ``inf`` when there is no evidence to weigh (no more samples than
    ``horizon``).

    Forecasts issued on neighbouring samples share ``horizon - 1`` of their target steps, so
    their errors are correlated up to that lag and the plain standard error overstates the
    evidence about up to ``horizon``-fold. The variance is the long-run variance of Diebold
    and Mariano's forecast comparison: the variance plus twice the autocovariances up to lag
    ``horizon - 1`` (in the rare sample where that sum is not positive, the autocovariances are
    weighted as Newey and West's, which keeps it so). On few samples that estimate is biased
    low, much so where the samples are not many more than the horizon (a 64-sample canary at
    ``horizon`` 48 holds little more than one independent outcome), so it is scaled by Harvey,
    Leybourne and Newbold's small-sample correction, ``n (n - 1) / ((n - h) (n - h + 1))`` for
    ``n`` samples at horizon ``h`` (1997; here with the sample variance's ``n - 1``, so that at
    ``horizon`` 1 it is 1 and the result the plain standard error, sample variance over n).

    >>> import torch
    >>> runs = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]).repeat(4)  # in runs of 4
    >>> round(standard_error_of_mean(runs), 3), round(standard_error_of_mean(runs, 4), 3)
    (0.09, 0.116)
    >>> standard_error_of_mean(runs[:4], horizon=4)  # as many samples as steps: no evidence
    inf

    """
    if horizon < 1:
        raise ValueError(f"horizon: expected at least 1, got {horizon}")
    values = values.to(torch.float64)
    n = len(values)
    if n <= horizon:
        return math.inf
    centred = values - values.mean()
    autocovariances = [
        float((centred[lag:] * centred[:-lag]).sum()) / n for lag in range(1, horizon)
    ]
    variance = float(centred.square().sum()) / (n - 1)
    long_run = variance + 2.0 * sum(autocovariances)
    if long_run <= 0.0:
        long_run = variance + 2.0 * sum(
            (1.0 - lag / horizon) * a for lag, a in enumerate(autocovariances, start=1)
        )
    # Python integers: exactly 1 at horizon 1.
    small_sample = (n * (n - 1)) / ((n - horizon) * (n - horizon + 1))
    return math.sqrt(max(long_run, 0.0) * small_sample / n)


def advantage_z(
    candidate_errors: torch.Tensor, live_errors: torch.Tensor, horizon: int = 1
) -> float:
    """How far the candidate's advantage stands out from noise: the mean of the paired error
    differences (live minus candidate; positive when the candidate is better) over its
    :func:`standard_error_of_mean` at this ``horizon``. 0 when there is nothing to tell (no more
    samples than ``horizon``, no spread). At ``horizon`` 1 it is the paired t statistic.

    Examples
    --------
    >>> import torch
    >>> live = torch.tensor([1.0, 2.0, 1.5, 2.5])
    >>> round(advantage_z(live - 0.5 + torch.tensor([0.1, -0.1, 0.1, -0.1]), live), 2)
    8.66
    >>> runs = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]).repeat(4)  # in runs of 4
    >>> live = 2 * runs + 0.5
    >>> round(advantage_z(runs, live), 2), round(advantage_z(runs, live, horizon=4), 2)
    (11.14, 8.63)

    """
    diff = live_errors.to(torch.float64) - candidate_errors.to(torch.float64)
    spread = standard_error_of_mean(diff, horizon)
    if not 0.0 < spread < math.inf:
        return 0.0
    return float(diff.mean()) / spread


class CanaryGate(Gate):
    """Accept a proposal whose canary error beats the live model's by ``margin`` (relative;
    a proposal's own ``margin``, when larger, applies instead; so does its ``min_z``).

    Whatever the margin, an advantage must be larger than ``resolution`` (relative, 1e-6 by
    default): the forecasts are float32, which carries about seven significant digits, so a
    candidate whose mean error is lower by less than that forecasts what the live model does
    up to rounding. Swapping it in gains nothing and throws away what the live model carries
    (its optimiser state and recent fit); with ``rls_selection: best``, where a new network
    changes only candidates that are not forecast, such swaps won canaries by 2e-8 to 1.4e-7
    and cost error after them (docs/benchmarks.md).

    For a proposal that carries ``canary_errors`` (errors measured test-then-train over a long
    window, as a deferred search's winner does), ``min_z`` > 0 also asks the advantage to
    stand out from noise: the paired z-score of the per-sample error differences must reach it
    (:func:`advantage_z`, which counts overlapping ``horizon``-step targets as the evidence they
    are).

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

    def __init__(
        self,
        margin: float = 0.0,
        min_z: float = 0.0,
        horizon: int = 1,
        canary_min_z: float = 0.0,
        resolution: float = 1e-6,
    ):
        self.margin = margin
        self.min_z = min_z
        self.horizon = horizon
        self.canary_min_z = canary_min_z
        if not 0.0 <= resolution < 1.0:
            raise ValueError(
                f"resolution: expected a relative advantage in [0, 1), got {resolution!r}"
            )
        self.resolution = resolution

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
        # Both means in float64: a float32 mean of the live errors is off by about 1e-7 of
        # itself, which once let a candidate with the very same errors win.
        live = float(live_errors.to(torch.float64).mean())
        margin = max(self.margin, proposal.margin)
        accepted = bool(math.isfinite(candidate) and candidate < live * (1.0 - margin))
        figures = {"candidate_mse": candidate, "live_mse": live, "margin": margin}
        by = f" by {margin:.0%}" if margin > 0 else ""
        reason = (
            f"candidate beats the live model on the canary window{by}"
            if accepted
            else f"candidate does not beat the live model on the canary window{by}"
        )
        if accepted and not candidate < live * (1.0 - self.resolution):
            accepted = False
            reason = (
                f"candidate's advantage on the canary window ({1.0 - candidate / live:.1e}, "
                f"relative) is below the forecasts' resolution ({self.resolution:g})"
            )
        if len(errors) > 1:
            # The advantage should stand out from sample-to-sample noise (a paired z-score of
            # the error differences): errors measured test-then-train over a long window (a
            # deferred search's winner) against ``min_z``, a canary's against ``canary_min_z``.
            z = advantage_z(errors, live_errors, self.horizon)
            figures["advantage_z"] = z
            needed = self.min_z if proposal.canary_errors is not None else self.canary_min_z
            needed = max(needed, proposal.min_z)
            if accepted and z < needed:
                accepted = False
                reason = (
                    f"candidate's advantage on the canary window is within noise "
                    f"(z = {z:.2f} < {needed:g})"
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

    def __init__(
        self,
        margin: float = 0.0,
        risk_threshold: float = 0.6,
        min_z: float = 0.0,
        horizon: int = 1,
        canary_min_z: float = 0.0,
        resolution: float = 1e-6,
    ):
        super().__init__(margin, min_z, horizon, canary_min_z, resolution)
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
