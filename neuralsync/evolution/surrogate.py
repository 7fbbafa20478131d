"""The surrogate: predicts how well a genome will do on a regime before it is trained.

An extra-trees regressor on the genome's numeric encoding plus a few features of the regime
(:func:`regime_features`). Its target is the *relative* loss, ``log(candidate / live)``, the
candidate's loss on a fitness slice over the live model's loss on the same slice: absolute
losses are not comparable from one regime to the next, ratios to the live model are. The
spread of the individual trees' predictions is the uncertainty.

Two uses: the engine skips candidates predicted clearly worse than the best so far (the
prefilter), and the stability gate turns the prediction into a risk — the probability that the
candidate is worse than the live model.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["Surrogate", "regime_features"]


def regime_features(support_y: torch.Tensor | np.ndarray, live_errors: np.ndarray) -> np.ndarray:
    """A few numbers that describe the regime a search runs in.

    The spread and the mean step of the support targets (how volatile, how trending) and the
    live model's recent error level (how far off it is), all on a log scale.

    >>> import numpy as np
    >>> regime_features(np.ones((10, 1, 1)), np.full(10, 0.5)).round(3).tolist()
    [-9.21, -9.21, -0.693]

    """
    y = np.asarray(support_y, dtype=np.float64).reshape(len(support_y), -1)
    spread = float(y.std()) if len(y) > 1 else 0.0
    step = float(np.abs(np.diff(y, axis=0)).mean()) if len(y) > 1 else 0.0
    level = float(np.mean(live_errors)) if len(live_errors) else 0.0
    return np.log(np.array([spread, step, level]) + 1e-4)


class Surrogate:
    """Predict a candidate's relative loss and its uncertainty from its encoding.

    Parameters
    ----------
    n_estimators
        Trees in the forest.
    min_samples
        Evaluations needed before the surrogate predicts at all; until then ``predict``
        returns ``None`` and nothing is filtered.
    max_samples
        Evaluations kept (the oldest go first), which bounds memory and fitting time.
    seed
        The forest's random state: the same evaluations give the same predictions.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> surrogate = Surrogate(min_samples=8)
    >>> X = rng.normal(size=(40, 3))
    >>> for x in X:
    ...     surrogate.add(x, float(2 * x[0]))
    >>> mean, std = surrogate.predict(np.array([[1.0, 0, 0], [-1.0, 0, 0]]))
    >>> bool(mean[0] > mean[1]), std.shape
    (True, (2,))

    """

    def __init__(
        self, n_estimators: int = 50, min_samples: int = 16, max_samples: int = 2000, seed: int = 0
    ):
        self.n_estimators = n_estimators
        self.min_samples = min_samples
        self.max_samples = max_samples
        self.seed = seed
        self.X_: list[np.ndarray] = []
        self.y_: list[float] = []
        #: (predicted, measured) relative losses of candidates predicted before the surrogate
        #: had seen them: what its rank correlation is judged on.
        self.checks_: list[tuple[float, float]] = []
        self._forest: Any = None
        self._added = 0  # evaluations ever added: a refit is due when it moves
        self._fitted_on = 0

    @property
    def ready(self) -> bool:
        return len(self.y_) >= self.min_samples

    def add(self, features: np.ndarray, relative_loss: float) -> None:
        """Record one evaluation; a non-finite loss is recorded as a large one (a failure)."""
        value = float(relative_loss) if math.isfinite(relative_loss) else 5.0
        self.X_.append(np.asarray(features, dtype=np.float64))
        self.y_.append(value)
        self._added += 1
        if len(self.y_) > self.max_samples:
            del self.X_[0], self.y_[0]

    def fit(self) -> None:
        """Refit the forest on every evaluation kept (a no-op until ``min_samples``)."""
        if not self.ready or (self._forest is not None and self._fitted_on == self._added):
            return
        from sklearn.ensemble import ExtraTreesRegressor

        self._forest = ExtraTreesRegressor(
            n_estimators=self.n_estimators, min_samples_leaf=2, random_state=self.seed, n_jobs=1
        ).fit(np.stack(self.X_), np.asarray(self.y_))
        self._fitted_on = self._added

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Mean and spread of the trees' predictions for each row, or ``None`` when not ready."""
        if not self.ready:
            return None
        self.fit()
        # The trees' own arrays, not each estimator's predict(): that re-validates the input
        # per tree, which cost forty times the prediction itself.
        X = np.atleast_2d(np.asarray(features, dtype=np.float32))
        per_tree = np.stack([t.tree_.predict(X)[:, 0] for t in self._forest.estimators_])
        # A floor on the spread: trees that agree are not proof, and a zero would make the
        # risk a hard 0 or 1.
        return per_tree.mean(0), np.maximum(per_tree.std(0), 0.05)

    def risk(self, features: np.ndarray) -> tuple[float, float, float] | None:
        """``(risk, mean, std)``: the probability that the candidate is worse than the live
        model (relative loss above 0) under a normal with the predicted mean and spread."""
        predicted = self.predict(features)
        if predicted is None:
            return None
        mean, std = float(predicted[0][0]), float(predicted[1][0])
        return 0.5 * (1.0 + math.erf(mean / (std * math.sqrt(2.0)))), mean, std

    def check(self, predicted: float, measured: float) -> None:
        """Record a prediction made before the candidate was evaluated, and its outcome."""
        if math.isfinite(predicted) and math.isfinite(measured):
            self.checks_.append((float(predicted), float(measured)))

    def error(self, min_checks: int = 5, prior: float = 0.5) -> float:
        """The root-mean-square error of its predictions on unseen candidates so far: how far
        to trust the next one. ``prior`` until ``min_checks`` have been made."""
        if len(self.checks_) < min_checks:
            return prior
        predicted, measured = np.array(self.checks_).T
        return float(np.sqrt(np.mean((predicted - measured) ** 2)))

    def kendall_tau(self) -> float | None:
        """Rank agreement between predicted and measured relative losses on unseen candidates."""
        if len(self.checks_) < 3:
            return None
        from scipy.stats import kendalltau

        predicted, measured = zip(*self.checks_, strict=True)
        tau = kendalltau(predicted, measured).statistic
        return None if not math.isfinite(tau) else float(tau)

    def state_dict(self) -> dict[str, Any]:
        """The evaluations, not the forest: refitting with the same seed rebuilds it exactly."""
        return {
            "X": torch.from_numpy(np.stack(self.X_)) if self.X_ else None,
            "y": list(self.y_),
            "checks": [list(pair) for pair in self.checks_],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        X = state.get("X")
        self.X_ = [] if X is None else [row.copy() for row in X.numpy()]
        self.y_ = [float(v) for v in state.get("y", [])]
        self.checks_ = [(float(a), float(b)) for a, b in state.get("checks", [])]
        self._forest = None
        self._added = len(self.y_)
        self._fitted_on = 0
