"""A live model with a linear core: recursive least squares experts and the network, mixed online.

On the online forecasting benchmarks (ETTh2, WTH, exchange rates) an SGD-trained network loses to
plain linear models kept exact by recursive least squares (RLS). :class:`RLSLearner` keeps the
network and puts it beside two such linear experts, all forecasting the change from the last
observed value (NLinear's "subtract last"):

- ``channel``: per-channel NLinear, one linear map from a channel's window (minus its last value)
  to its horizon, shared by every target channel, kept by RLS;
- ``window``: one linear map from the whole flattened window (every input column, over its
  levels; ``rls_window: relative`` takes them relative to their last value) to every target's
  horizon, kept by RLS with a ridge penalty of 100 and no forgetting; its levels are clipped,
  smoothly, at three standard deviations of the rows it has learned from, so that where the
  stream leaves every level it learned from (ETTh2's test period goes 51 standard deviations
  out) it does not extrapolate;
- ``network``: the scenario's window MLP, learned by SGD as the plain learner learns it.

The mixture is ``last + sum_e w[h, t, e] * change_e[h, t]``: for every step ``h`` and target
``t`` a weight per expert, the least-squares combination of the experts' past forecasts (each
taken when it was issued, so out of sample), discounted by ``mixture_forgetting`` and shrunk
towards zero, that is towards the last value: with no evidence that the experts forecast
the change, the forecast is persistence. How strongly is chosen online: one mixture per
strength in ``mixture_shrinkage`` (in samples of the target's mean square, so the same setting
means the same on every scale), and the forecast comes from the one with the lowest discounted
out-of-sample error so far, over every step and target (one choice for all of them, steadier
than one per step). Where the experts forecast well a weak shrinkage leads; on a series close
to a random walk (exchange rates) the strongest does, and the forecast stays close to the last
value (docs/benchmarks.md, "the mixture shrunk towards the last value"). The mixture's
forecast change is kept between the least and the greatest of the experts' changes and zero
(``mixture_hull``): a weight one bad row pulled far cannot forecast beyond every expert
(docs/benchmarks.md, "one glitch row").

A least-squares mixture of few, correlated experts is noisy where its samples are few: at long
horizons the truth arrives ``horizon`` steps late and neighbouring windows' targets overlap, and
there the mixture can end worse than its best expert, or than the last value. So the mixture
remembers ``horizon`` times longer than ``mixture_forgetting`` says (neighbouring windows'
targets overlap, so each sample carries about ``1 / horizon`` of the news). With
``rls_selection: leader`` the forecast is, per step and target, that of the leader among the
candidates — the mixture, each expert alone, the last value — by their discounted out-of-sample
squared errors; with ``rls_selection: best``, that of the one candidate whose errors summed over
every step and target are lowest. Those records remember ``selection_forgetting`` long, without
the mixture's slowdown by the horizon: the window expert, with hundreds of weights per target,
forecasts poorly for its first thousands of windows, and a record as long as the mixture's keeps
that for tens of thousands of windows at long horizons. The default, ``mixture``, always
forecasts with the mixture; the benchmark chooses between it and ``best`` on validation rows
(docs/benchmarks.md, "the best candidate").
"""

from __future__ import annotations

import collections
import copy
import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.linalg.blas import dsymv as _symv
from scipy.linalg.blas import dsyr as _syr

from neuralsync.config import ModelConfig
from neuralsync.learner import OnlineLearner
from neuralsync.scaling import OnlineScaler

__all__ = ["RLS", "RLSLearner", "learner_from_state_dict"]

#: Experts in the order of the mixture's weights.
EXPERTS = ("channel", "window", "network")
#: What the forecast is selected from, per step and target, in the order of ``track_``.
CANDIDATES = ("mixture", *EXPERTS, "last_value")
#: Least prior strength of the mixture (a series whose target never moved has no scale).
_MIN_STRENGTH = 1e-12
#: Least scale the window expert's levels are clipped at (a column that never moved).
_MIN_STD = 1e-12


class RLS:
    """Multi-output recursive least squares with a forgetting factor.

    ``W`` solves ``min sum_i forgetting**(n-i) ||y_i - x_i W||^2 + alpha_n ||W||^2``; each
    :meth:`learn` takes a block of rows observed at the same time (one forgetting step per
    block): the channels of one window are one update. ``alpha_n`` is the ridge penalty
    discounted with the data (``alpha * forgetting**n``), except that no coefficient's variance
    is ever let above the prior's ``1 / alpha`` (below).

    The inverse information matrix is ``scale_ * P_``: forgetting multiplies the scalar, not
    the matrix, so a row costs one symmetric rank-one BLAS update. Two numerical guards keep
    the recursion stable however long it runs:

    - ``P_`` is symmetric by construction: only its upper triangle is kept and updated
      (``dsyr``, ``dsymv``). A full update rounds ``P[i, j]`` and ``P[j, i]`` differently, and
      with forgetting that antisymmetric error grows by ``1 / forgetting`` every step (on WTH
      at forgetting 0.999 it took P indefinite, and the forecasts to 1e6, after 28,000 windows);
    - a direction the inputs stop exciting (a feature that is always zero, a channel that
      stays flat) would see its variance grow by ``1 / forgetting`` every step, without bound,
      until it overflows. Each coefficient's variance is capped at the prior's, ``1 / alpha``,
      by a congruence scaling of ``P`` (which keeps it positive definite): with no data on a
      coefficient the estimate is never less certain than before any data.

    Parameters
    ----------
    n_features, n_outputs
        Shapes of ``x`` and ``y`` rows.
    alpha
        Ridge penalty of the starting solution (``P = I / alpha``), and the cap on variances.
    forgetting
        Weight of the past relative to a new block; 1 never forgets.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(200, 3))
    >>> y = x @ np.array([[1.0], [-2.0], [0.5]])
    >>> rls = RLS(3, 1, alpha=1e-6)
    >>> for i in range(0, 200, 4):
    ...     rls.learn(x[i : i + 4], y[i : i + 4])
    >>> rls.W_.ravel().round(4)
    array([ 1. , -2. ,  0.5])
    >>> ridge = RLS(3, 1, alpha=1e-6).fit(x, y)  # the same solution in one solve
    >>> bool(np.allclose(ridge.W_, rls.W_))
    True

    A feature that is always zero leaves its variance at the prior's, forever:

    >>> rls = RLS(2, 1, alpha=1.0, forgetting=0.9)
    >>> for _ in range(10_000):  # 0.9 ** -10_000 would overflow
    ...     rls.learn(np.array([[rng.normal(), 0.0]]), np.array([[1.0]]))
    >>> rls.covariance_[1].tolist()
    [0.0, 1.0]

    """

    def __init__(
        self, n_features: int, n_outputs: int, alpha: float = 1.0, forgetting: float = 1.0
    ):
        if not 0.0 < forgetting <= 1.0:
            raise ValueError(f"forgetting must be in (0, 1], got {forgetting}")
        if alpha <= 0.0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        self.alpha = alpha
        self.forgetting = forgetting
        self.W_ = np.zeros((n_features, n_outputs))
        # Fortran order: what the BLAS routines update in place. Upper triangle only.
        self.P_ = np.asfortranarray(np.eye(n_features) / alpha)
        self.scale_ = 1.0

    @property
    def covariance_(self) -> np.ndarray:
        """The inverse information matrix ``scale_ * P_``, as a full symmetric matrix."""
        return self.scale_ * self._symmetric_P()

    def _symmetric_P(self) -> np.ndarray:
        """``P_`` with its lower triangle filled from the upper one (the only one kept)."""
        upper = np.triu(self.P_)
        return upper + np.triu(upper, 1).T

    def fit(self, X: np.ndarray, Y: np.ndarray) -> RLS:
        """The ridge solution over rows ``X``, ``Y``: the state RLS reaches with forgetting 1."""
        P = np.linalg.inv(X.T @ X + self.alpha * np.eye(X.shape[1]))
        self.P_ = np.asfortranarray((P + P.T) / 2)
        self.scale_ = 1.0
        self.W_ = self.P_ @ (X.T @ Y)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return X @ self.W_

    def learn(self, X: np.ndarray, Y: np.ndarray) -> None:
        """One block update with rows ``X`` ``(n, features)`` and targets ``Y`` ``(n, outputs)``."""
        # Forgetting once for the block, then one exact rank-one update per row.
        self.scale_ /= self.forgetting
        P = self.P_
        for x, y in zip(np.asarray(X, np.float64), np.asarray(Y, np.float64), strict=True):
            Px = _symv(self.scale_, P, x)
            denominator = 1.0 + x @ Px
            self.W_ += np.outer(Px / denominator, y - x @ self.W_)
            # P <- P - Px Px' / (1 + x'Px), on the upper triangle.
            P = _syr(-1.0 / (self.scale_ * denominator), Px, a=P, overwrite_a=True)
        self.P_ = P
        if self.scale_ > 1e6:  # fold the scalar back before it loses precision
            self.P_ = self.P_ * self.scale_
            self.scale_ = 1.0
        if self.forgetting < 1.0:
            self._cap_variances()

    def _cap_variances(self) -> None:
        variances = self.scale_ * np.diagonal(self.P_)
        over = np.flatnonzero(variances > 1.0 / self.alpha)
        if len(over):
            # D P D with D = diag(shrink): symmetric positive definite stays so.
            shrink = np.sqrt(1.0 / (self.alpha * variances[over]))
            self.P_[over, :] *= shrink[:, None]
            self.P_[:, over] *= shrink[None, :]

    def state_dict(self) -> dict[str, Any]:
        # P and its scale apart, not their product: a resumed run must end bit-identical.
        return {
            "W": torch.from_numpy(self.W_.copy()),
            "P": torch.from_numpy(self._symmetric_P()),
            "scale": float(self.scale_),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.W_ = state["W"].numpy().astype(np.float64)
        # Symmetric (or, from before the upper-triangle update, very nearly): its upper
        # triangle is what learn() reads.
        self.P_ = np.asfortranarray(state["P"].numpy(), dtype=np.float64)
        self.scale_ = float(state.get("scale", 1.0))


class RLSLearner(OnlineLearner):
    """The live learner of model type ``rls``: RLS linear experts and the network, mixed online.

    Same interface and contracts as :class:`~neuralsync.learner.OnlineLearner` (``predict``,
    ``learn``, ``squared_errors``, ``clone``, ``state_dict``): the pipeline, its gate and the
    checkpoints use it as they use the plain learner. ``module_`` is the network expert, which
    adapters may copy.

    Settings read from the :class:`~neuralsync.config.ModelConfig`: ``rls_alpha`` (ridge
    penalty of the channel expert's start), ``rls_forgetting`` (its forgetting factor);
    ``rls_window_alpha``, ``rls_window_forgetting``, ``rls_window_clip`` and
    ``rls_window_lags``, the window expert's (unset: ``rls_alpha``; ``n_inputs`` times slower
    than ``rls_forgetting``, as it has ``n_inputs`` times the parameters; no clipping; the
    whole lookback); ``mixture_forgetting`` (that of the
    mixture's statistics), ``mixture_shrinkage`` and ``mixture_hull``; ``rls_selection`` and
    ``selection_forgetting`` (what the forecast is, and the memory of the records it is
    chosen by), and the network's own settings.

    Examples
    --------
    >>> import numpy as np
    >>> config = ModelConfig(type="rls", lr=0.01)
    >>> learner = RLSLearner(config, n_inputs=2, lookback=8, horizon=1, target_index=[0, 1])
    >>> t = np.arange(400.0)
    >>> series = np.stack([np.sin(t / 4), np.cos(t / 4)], axis=1).astype(np.float32)
    >>> losses = [learner.learn(series[i : i + 8][None], series[i + 8 : i + 9][None])
    ...           for i in range(390)]
    >>> bool(np.mean(losses[-50:]) < 1e-3 < np.mean(losses[:8]))  # exact linear dynamics
    True
    >>> learner.predict(series[390:398][None]).shape
    (1, 1, 2)
    >>> twin = RLSLearner.from_state_dict(learner.state_dict(), "cpu")
    >>> bool(np.array_equal(twin.predict(series[:8][None]), learner.predict(series[:8][None])))
    True

    """

    def __init__(
        self,
        config: ModelConfig,
        n_inputs: int,
        lookback: int,
        horizon: int,
        target_index: Sequence[int],
        device: torch.device | str = "cpu",
        initialise: bool = True,
    ):
        if config.genome is not None:
            # An evolved network expert (see with_network): built from its genome, so that a
            # checkpoint rebuilds the same architecture.
            genome = config.model_copy(update={"type": "genome"})
            super().__init__(genome, n_inputs, lookback, horizon, target_index, device, initialise)
            self.config = config
        else:
            super().__init__(config, n_inputs, lookback, horizon, target_index, device, initialise)
        n_targets = len(self.target_index)
        alpha, forgetting = config.rls_alpha, config.rls_forgetting
        self.channel_ = RLS(lookback + 1, horizon, alpha, forgetting)
        # The window expert has n_inputs times the channel expert's parameters: by default it
        # remembers n_inputs times longer, for as many past samples per parameter.
        window_forgetting = config.rls_window_forgetting
        if window_forgetting is None:
            window_forgetting = 1.0 - (1.0 - forgetting) / n_inputs
        window_alpha = alpha if config.rls_window_alpha is None else config.rls_window_alpha
        self._window_lags = lookback if config.rls_window_lags is None else config.rls_window_lags
        if self._window_lags > lookback:
            raise ValueError(
                f"rls_window_lags: expected at most the lookback ({lookback} rows), "
                f"got {self._window_lags}"
            )
        self.window_ = RLS(
            self._window_lags * n_inputs + 1, horizon * n_targets, window_alpha, window_forgetting
        )
        # Every input column's running mean and variance over the rows the window expert has
        # learned from: the scale its levels are clipped at.
        self.levels_ = OnlineScaler(n_inputs)
        n_experts = len(EXPERTS)
        self.gram_ = np.zeros((horizon, n_targets, n_experts, n_experts))
        self.moment_ = np.zeros((horizon, n_targets, n_experts))
        # The prior's scale: the discounted mean square of the target's change.
        self.target_square_ = np.zeros((horizon, n_targets))
        self.target_count_ = 0.0
        self.shrinkage_ = np.asarray(config.mixture_shrinkage, dtype=np.float64)
        # One mixture per prior strength, and the discounted error of each (see weights_).
        self.shrunk_weights_ = np.zeros((len(self.shrinkage_), *self.moment_.shape))
        self.shrinkage_track_ = np.zeros(len(self.shrinkage_))
        # Discounted out-of-sample squared error of each candidate, per step and target; all
        # equal at the start, where the leader is the mixture (the first candidate).
        self.track_ = np.zeros((horizon, n_targets, len(CANDIDATES)))
        # Neighbouring windows' targets overlap on horizon - 1 of their steps: a sample says
        # about 1 / horizon as much as at horizon 1. The mixture's statistics remember horizon
        # times longer, for as many independent samples per weight at every horizon.
        self._mixture_decay = 1.0 - (1.0 - config.mixture_forgetting) / horizon
        self._selection_decay = (
            self._mixture_decay
            if config.selection_forgetting is None
            else config.selection_forgetting
        )
        # Expert forecasts by window digest, kept until their truth arrives: the mixture learns
        # from forecasts made before the experts saw the truth (out of sample). Bounded: a
        # forecast learned much later than its horizon is recomputed instead.
        self.issued_: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._issued_max = 4 * horizon + 16

    # -- forecasting --------------------------------------------------------------------------

    def _changes(self, windows: np.ndarray) -> np.ndarray:
        """Each expert's forecast change from the last value: ``(batch, horizon, targets, E)``."""
        batch = len(windows)
        ti = self.target_index
        last = windows[:, -1, :]
        ones = np.ones((batch, len(ti), 1))
        rel = (windows[:, :, ti] - last[:, None, ti]).transpose(0, 2, 1)  # (b, T, L)
        channel = np.concatenate([rel, ones], axis=2) @ self.channel_.W_  # (b, T, H)
        window = (self._window_features(windows) @ self.window_.W_).reshape(
            batch, self.horizon, len(ti)
        )
        with torch.no_grad():
            network = self.module_(self._tensor(windows)).cpu().numpy().astype(np.float64)
        network -= last[:, None, ti]
        return np.stack([channel.transpose(0, 2, 1), window, network], axis=-1)

    def _window_features(self, windows: np.ndarray) -> np.ndarray:
        """The window expert's inputs: the window's last ``rls_window_lags`` rows, flattened
        (``rls_window``), and a bias.

        Over levels by default: where a series is pulled towards a level (a temperature's
        daily mean) the expert can learn it. A linear map over levels extrapolates where the
        stream leaves every level it learned from (ETTh2's test period goes 51 standard
        deviations out), so each level is clipped, smoothly, at ``rls_window_clip`` standard
        deviations of the rows learned from: inside, nearly as it is; far outside, at the
        edge (docs/benchmarks.md, "the window expert clipped"). ``relative`` takes every
        column minus its last value, as the other experts do.
        """
        windows = windows[:, -self._window_lags :, :]
        if self.config.rls_window == "relative":
            windows = windows - windows[:, -1:, :]
        elif self.config.rls_window_clip is not None and self.levels_.n_ > 1:
            # Not OnlineScaler.std, which reads a column that never moved as scale 1: here
            # such a column has no width to extrapolate within.
            std = np.sqrt(self.levels_.m2_ / self.levels_.n_)
            bound = np.maximum(self.config.rls_window_clip * std, _MIN_STD)
            mean = self.levels_.mean_
            windows = mean + bound * np.tanh((windows - mean) / bound)
        flat = windows.reshape(len(windows), -1)
        return np.concatenate([flat, np.ones((len(windows), 1))], axis=1)

    @property
    def weights_(self) -> np.ndarray:
        """The mixture weights in use, ``(horizon, targets, experts)``: those of the strength
        with the lowest discounted out-of-sample error so far (ties: the weakest)."""
        return self.shrunk_weights_[int(self.shrinkage_track_.argmin())]

    def _mixture_weights(self) -> np.ndarray:
        """Least-squares weights per strength, step and target, shrunk towards zero:
        ``(len(mixture_shrinkage), horizon, targets, experts)``."""
        scale = self.target_square_ / max(self.target_count_, _MIN_STRENGTH)
        strength = np.maximum(self.shrinkage_[:, None, None] * scale, _MIN_STRENGTH)
        eye = np.eye(len(EXPERTS))
        return np.linalg.solve(
            self.gram_ + strength[..., None, None] * eye, self.moment_[..., None]
        )[..., 0]

    def _mixtures(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The candidates (:meth:`candidates`) and every strength's mixture, ``(batch,
        horizon, targets, len(mixture_shrinkage))``: what the shrinkage's record scores."""
        changes = self._changes(windows)
        mixtures = np.einsum("bhte,khte->bhtk", changes, self.shrunk_weights_)
        mixture = (changes * self.weights_).sum(-1, keepdims=True)
        if self.config.mixture_hull:
            low = np.minimum(changes.min(-1, keepdims=True), 0.0)
            high = np.maximum(changes.max(-1, keepdims=True), 0.0)
            mixtures = np.clip(mixtures, low, high)
            mixture = np.clip(mixture, low, high)
        candidates = np.concatenate([mixture, changes, np.zeros_like(mixture)], axis=-1)
        return candidates, mixtures

    def candidates(self, windows: np.ndarray) -> np.ndarray:
        """Each candidate's forecast of the change from the last value, for ``(batch,
        lookback, inputs)`` windows: ``(batch, horizon, targets, len(CANDIDATES))``. Nothing is
        remembered (``predict`` is what issues a forecast)."""
        return self._mixtures(windows)[0]

    def _select(self, candidates: np.ndarray) -> np.ndarray:
        if self.config.rls_selection == "mixture":
            return candidates[..., 0]
        if self.config.rls_selection == "best":
            return candidates[..., int(self.track_.sum((0, 1)).argmin())]
        leader = self.track_.argmin(-1)  # ties go to the first: the mixture
        return np.take_along_axis(candidates, leader[None, ..., None], axis=-1)[..., 0]

    def _forecast(self, windows: np.ndarray, remember: bool) -> tuple[np.ndarray, np.ndarray]:
        windows = _as_array(windows)
        candidates, mixtures = self._mixtures(windows)
        if remember:
            for window, issued in zip(
                windows, np.concatenate([candidates, mixtures], axis=-1), strict=True
            ):
                self._remember(_digest(window), issued)
        last = windows[:, -1, self.target_index]
        return last[:, None, :] + self._select(candidates), candidates

    def issue(self, windows: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``predict``, also returning the candidates the forecast was selected from (the
        changes :meth:`candidates` gives), from the same pass."""
        forecast, candidates = self._forecast(windows, remember=True)
        return forecast.astype(np.float32), candidates

    def _remember(self, key: str, change: np.ndarray) -> None:
        self.issued_[key] = change
        self.issued_.move_to_end(key)
        while len(self.issued_) > self._issued_max:
            self.issued_.popitem(last=False)

    def predict(self, windows: np.ndarray | torch.Tensor) -> np.ndarray:
        """Forecast ``(batch, horizon, targets)`` for ``(batch, lookback, inputs)`` windows."""
        return self.issue(windows)[0]

    def squared_errors(self, windows: torch.Tensor, truths: torch.Tensor) -> torch.Tensor:
        """Mean squared error per sample, without learning."""
        forecast, _ = self._forecast(windows, remember=False)
        errors = ((forecast - _as_array(truths)) ** 2).reshape(len(forecast), -1).mean(1)
        return torch.from_numpy(errors.astype(np.float32))

    # -- learning -----------------------------------------------------------------------------

    def learn(self, windows: np.ndarray | torch.Tensor, truths: np.ndarray | torch.Tensor) -> float:
        """Learn a batch: the track records and the mixture from the forecasts as they were
        issued, each expert from the truth.

        Returns the forecast's loss before the step. A batch that is not finite is skipped and
        counted in ``skipped_steps_``, as for the plain learner.
        """
        windows, truths = _as_array(windows), _as_array(truths)
        if not (np.isfinite(windows).all() and np.isfinite(truths).all()):
            self.skipped_steps_ += 1
            return float("nan")
        ti = self.target_index
        last = windows[:, -1, ti]
        n_candidates, n_strengths = len(CANDIDATES), len(self.shrinkage_)
        issued = [self.issued_.pop(_digest(window), None) for window in windows]
        missing = [
            i
            for i, forecast in enumerate(issued)
            if forecast is None or forecast.shape[-1] != n_candidates + n_strengths
        ]
        if missing:  # never forecast (or forgotten): the candidates as they are now
            issued_now = np.concatenate(self._mixtures(windows[missing]), axis=-1)
            for j, i in enumerate(missing):
                issued[i] = issued_now[j]
        stacked = np.stack(issued)
        candidates, mixtures = stacked[..., :n_candidates], stacked[..., n_candidates:]
        loss = float(((last[:, None, :] + self._select(candidates) - truths) ** 2).mean())
        # The network learns first, with the plain learner's step (and its own non-finite checks).
        super().learn(windows.astype(np.float32), truths.astype(np.float32))
        target = truths - last[:, None, :]
        decay = self._mixture_decay ** len(windows)
        errors = ((candidates - target[..., None]) ** 2).sum(0)
        self.track_ = self._selection_decay ** len(windows) * self.track_ + errors
        self.shrinkage_track_ = decay * self.shrinkage_track_ + (
            (mixtures - target[..., None]) ** 2
        ).sum((0, 1, 2))
        changes = candidates[..., 1 : 1 + len(EXPERTS)]
        self.gram_ = decay * self.gram_ + np.einsum("bhte,bhtf->htef", changes, changes)
        self.moment_ = decay * self.moment_ + np.einsum("bhte,bht->hte", changes, target)
        self.target_square_ = decay * self.target_square_ + (target**2).sum(0)
        self.target_count_ = decay * self.target_count_ + len(windows)
        self.shrunk_weights_ = self._mixture_weights()
        for window, change in zip(windows, target, strict=True):
            rel = np.concatenate([(window[:, ti] - window[-1, ti]).T, np.ones((len(ti), 1))], 1)
            self.channel_.learn(rel, change.T)
            # Consecutive windows share all but their last row: each adds its last, the first all.
            for row in window if self.levels_.n_ == 0 else window[-1:]:
                self.levels_.learn_one(row)
            self.window_.learn(self._window_features(window[None]), change.reshape(1, -1))
        return loss

    # -- state --------------------------------------------------------------------------------

    def clone(self) -> RLSLearner:
        """An independent copy: the network, its optimiser, the experts and the mixture."""
        twin = super().clone()
        twin.channel_ = copy.deepcopy(self.channel_)
        twin.window_ = copy.deepcopy(self.window_)
        for name in (
            "gram_",
            "moment_",
            "track_",
            "target_square_",
            "shrunk_weights_",
            "shrinkage_track_",
        ):
            setattr(twin, name, getattr(self, name).copy())
        twin.levels_ = copy.deepcopy(self.levels_)
        twin.issued_ = collections.OrderedDict((k, v.copy()) for k, v in self.issued_.items())
        return twin

    def recalled(self, stored: OnlineLearner) -> OnlineLearner:
        """``stored`` (a copy of this learner kept at an earlier detection), with this
        learner's window expert and the level statistics it clips with, when the window
        expert forgets nothing (``rls_window_forgetting`` 1, the benchmark's setting).

        Such an expert is the least-squares fit to every sample seen so far: nothing in it
        belongs to one regime, and the live one has learned all the stored one had and every
        sample since. Bringing the stored one back would throw that evidence away, a cost a
        short canary window cannot show and the following thousands of samples do
        (docs/benchmarks.md, "recall keeps the lifelong window expert"). What is
        regime-bound (the network, the channel expert, which forgets, and the mixture's
        weights) comes back as it was stored.

        >>> config = ModelConfig(type="rls", rls_window_forgetting=1.0)
        >>> live = RLSLearner(config, n_inputs=1, lookback=4, horizon=1, target_index=[0])
        >>> stored = live.clone()
        >>> _ = live.learn(np.ones((1, 4, 1), np.float32), np.full((1, 1, 1), 2.0, np.float32))
        >>> back = live.recalled(stored)
        >>> bool(np.array_equal(back.window_.W_, live.window_.W_)), back.window_ is live.window_
        (True, False)
        >>> bool(np.array_equal(back.channel_.W_, stored.channel_.W_))
        True

        """
        if not isinstance(stored, RLSLearner) or self.window_.forgetting < 1.0:
            return stored
        if stored.window_.W_.shape != self.window_.W_.shape:
            return stored
        back = stored.clone()
        back.window_ = copy.deepcopy(self.window_)
        back.levels_ = copy.deepcopy(self.levels_)
        return back

    def with_network(
        self, module: torch.nn.Module, config: ModelConfig | None = None
    ) -> RLSLearner:
        """A copy whose network expert is ``module`` (an adapter's proposal), with a fresh
        optimiser from ``config`` (default: this learner's); the linear experts and the
        mixture are kept, so a proposal is judged as the whole live model it would become.

        >>> config = ModelConfig(type="rls")
        >>> live = RLSLearner(config, n_inputs=1, lookback=4, horizon=1, target_index=[0])
        >>> module = copy.deepcopy(live.module_)
        >>> twin = live.with_network(module)
        >>> twin.module_ is module and twin.channel_ is not live.channel_
        True

        """
        twin = self.clone()
        if config is not None:
            # Keep what rebuilds the network from a checkpoint: its genome, or its widths
            # (a "linear" network is a window MLP without hidden layers).
            hidden = [] if config.type == "linear" else config.hidden
            # The window expert stays this one, so its shape setting must too.
            lags = self.config.rls_window_lags
            twin.config = config.model_copy(
                update={"type": "rls", "hidden": hidden, "rls_window_lags": lags}
            )
        twin.module_ = module.to(self.device)
        twin.optimizer_ = twin._make_optimizer()
        twin._has_dropout = twin.config.dropout > 0
        return twin

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        issued = list(self.issued_.items())
        state["rls"] = {
            "channel": self.channel_.state_dict(),
            "window": self.window_.state_dict(),
            "gram": torch.from_numpy(self.gram_.copy()),
            "moment": torch.from_numpy(self.moment_.copy()),
            "track": torch.from_numpy(self.track_.copy()),
            "target_square": torch.from_numpy(self.target_square_.copy()),
            "target_count": float(self.target_count_),
            "shrunk_weights": torch.from_numpy(self.shrunk_weights_.copy()),
            "shrinkage_track": torch.from_numpy(self.shrinkage_track_.copy()),
            "levels": self.levels_.state_dict(),
            "issued_keys": [k for k, _ in issued],
            "issued": torch.from_numpy(np.stack([v for _, v in issued]))
            if issued
            else torch.zeros(0),
        }
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str) -> RLSLearner:
        # Settings a checkpoint was written before: the behaviour it was written with (the
        # window expert's inputs relative; its own penalty, forgetting and clipping unset; the
        # mixture unbounded).
        before = {
            "rls_window": "relative",
            "rls_window_alpha": None,
            "rls_window_forgetting": None,
            "rls_window_clip": None,
            "mixture_hull": False,
        }
        spec = state["spec"]
        missing = {k: v for k, v in before.items() if k not in spec["config"]}
        if missing:
            spec = {**spec, "config": {**spec["config"], **missing}}
            state = {**state, "spec": spec}
        learner = super().from_state_dict(state, device)
        rls = state["rls"]
        learner.channel_.load_state_dict(rls["channel"])
        learner.window_.load_state_dict(rls["window"])
        learner.gram_ = rls["gram"].numpy().copy()
        learner.moment_ = rls["moment"].numpy().copy()
        issued = rls["issued"].numpy()
        if "track" in rls:
            learner.track_ = rls["track"].numpy().copy()
            learner.issued_ = collections.OrderedDict(
                (k, issued[i].copy()) for i, k in enumerate(rls["issued_keys"])
            )
        if "shrinkage_track" in rls:
            learner.target_square_ = rls["target_square"].numpy().copy()
            learner.target_count_ = float(rls["target_count"])
            learner.shrunk_weights_ = rls["shrunk_weights"].numpy().copy()
            learner.shrinkage_track_ = rls["shrinkage_track"].numpy().copy()
        else:
            # From before the online shrinkage: every strength starts from the weights the
            # checkpoint forecast with, and the target's scale is learned from here on.
            learner.shrunk_weights_[:] = rls["weights"].numpy()
        if "levels" in rls:
            learner.levels_.load_state_dict(rls["levels"])
        # A checkpoint from before the selection (no track records, forecasts of the experts
        # only) starts with equal records; pending forecasts stored without every strength's
        # mixture are recomputed when learned.
        return learner


def learner_from_state_dict(state: dict[str, Any], device: torch.device | str) -> OnlineLearner:
    """Rebuild a learner of whichever class wrote ``state`` (``rls`` or the plain one)."""
    if state["spec"]["config"].get("type") == "rls":
        return RLSLearner.from_state_dict(state, device)
    from neuralsync.fast import as_fast

    return as_fast(OnlineLearner.from_state_dict(state, device))


def _as_array(values: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64)


def _digest(window: np.ndarray) -> str:
    # float32 bytes: the pipeline hands the same float32 window to predict and to learn.
    return hashlib.blake2b(window.astype(np.float32).tobytes(), digest_size=12).hexdigest()
