"""The live model: a torch module with its optimiser, learning online one step per batch."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from neuralsync.config import ModelConfig
from neuralsync.models import build_module, build_uninitialised

__all__ = ["OnlineLearner", "resolve_device"]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` is CUDA when available, else CPU.

    >>> resolve_device("cpu")
    device(type='cpu')

    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from neuralsync.errors import ConfigError

        raise ConfigError("device 'cuda' was asked for, but torch sees no CUDA device")
    return torch.device(name)


class OnlineLearner:
    """A forecasting network and its optimiser: ``predict`` a window, ``learn`` from its truth.

    Inputs and targets are normalised windows, ``(batch, lookback, inputs)`` and
    ``(batch, horizon, targets)``, as numpy arrays or tensors.

    Parameters
    ----------
    config
        The network and optimiser settings.
    n_inputs, lookback, horizon
        The window's shape.
    target_index
        Positions of the targets among the input columns.
    device
        Where the network lives.
    initialise
        Draw fresh weights (from torch's global generator). False leaves them uninitialised,
        for a caller that loads a state next without disturbing the global generator.

    Examples
    --------
    >>> import numpy as np, torch
    >>> _ = torch.manual_seed(0)
    >>> learner = OnlineLearner(ModelConfig(lr=0.05), n_inputs=1, lookback=4, horizon=1,
    ...                         target_index=[0])
    >>> x = np.ones((1, 4, 1), dtype=np.float32)
    >>> learner.predict(x).tolist()          # an untrained model forecasts the last value
    [[[1.0]]]
    >>> losses = [learner.learn(x, np.full((1, 1, 1), 2.0)) for _ in range(50)]
    >>> losses[-1] < losses[0]
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
        self.config = config
        self.n_inputs = n_inputs
        self.lookback = lookback
        self.horizon = horizon
        self.target_index = list(target_index)
        self.device = torch.device(device)
        if initialise:
            self.module_ = build_module(config, n_inputs, lookback, horizon, self.target_index)
            self.module_ = self.module_.to(self.device)
        else:
            self.module_ = build_uninitialised(
                lambda: build_module(config, n_inputs, lookback, horizon, self.target_index),
                self.target_index,
                self.device,
            )
        self.optimizer_ = self._make_optimizer()
        self.steps_ = 0
        self.skipped_steps_ = 0
        self._has_dropout = config.dropout > 0
        self.module_.train(False)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        params = self.module_.parameters()
        if c.optimizer == "adam":
            return torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)
        return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)

    def _tensor(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(array, torch.Tensor):
            return array.to(self.device, torch.float32)
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device)

    @torch.no_grad()
    def predict(self, windows: np.ndarray | torch.Tensor) -> np.ndarray:
        """Forecast ``(batch, horizon, targets)`` for ``(batch, lookback, inputs)`` windows."""
        return self.module_(self._tensor(windows)).cpu().numpy()

    @torch.no_grad()
    def squared_errors(self, windows: torch.Tensor, truths: torch.Tensor) -> torch.Tensor:
        """Mean squared error per sample, without learning."""
        out = self.module_(self._tensor(windows))
        return ((out - self._tensor(truths)) ** 2).flatten(1).mean(1).cpu()

    def learn(self, windows: np.ndarray | torch.Tensor, truths: np.ndarray | torch.Tensor) -> float:
        """One optimiser step on a batch; returns its loss before the step.

        A step whose loss or gradient is not finite is skipped (the weights stay as they were)
        and counted in ``skipped_steps_``; the loss is returned so the caller can report it.
        """
        if self._has_dropout:
            self.module_.train(True)
        try:
            out = self.module_(self._tensor(windows))
        finally:
            self.module_.train(False)
        loss = torch.nn.functional.mse_loss(out, self._tensor(truths))
        value = float(loss.detach())
        if not np.isfinite(value):
            self.skipped_steps_ += 1
            return value
        self.optimizer_.zero_grad(set_to_none=True)
        loss.backward()
        # Without clipping the norm is still computed (an infinite max_norm scales by 1): an
        # overflowing gradient must be caught even when the loss was finite.
        max_norm = self.config.grad_clip if self.config.grad_clip is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.module_.parameters(), max_norm)
        if not torch.isfinite(norm):
            self.skipped_steps_ += 1
            self.optimizer_.zero_grad(set_to_none=True)
            return float("nan")
        self.optimizer_.step()
        self.steps_ += 1
        return value

    def clone(self) -> OnlineLearner:
        """An independent copy: same weights and optimiser state."""
        twin = copy.copy(self)
        twin.module_ = copy.deepcopy(self.module_)
        twin.optimizer_ = twin._make_optimizer()
        twin.optimizer_.load_state_dict(copy.deepcopy(self.optimizer_.state_dict()))
        return twin

    def recalled(self, stored: OnlineLearner) -> OnlineLearner:
        """The model regime recall proposes when it brings ``stored`` back in place of this
        live learner: ``stored`` itself, since everything a network knows is regime-bound.
        A learner with lifelong state (which learns from every sample and forgets none, so
        that the live copy knows all a stored one does and more) hands that state on instead
        (:meth:`RLSLearner.recalled <neuralsync.rls.RLSLearner.recalled>`)."""
        return stored

    def spec(self) -> dict[str, Any]:
        """Everything needed to rebuild this learner's network (plain JSON types)."""
        return {
            "config": self.config.model_dump(mode="json"),
            "n_inputs": self.n_inputs,
            "lookback": self.lookback,
            "horizon": self.horizon,
            "target_index": self.target_index,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec(),
            "module": self.module_.state_dict(),
            "optimizer": self.optimizer_.state_dict(),
            "steps": self.steps_,
            "skipped_steps": self.skipped_steps_,
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str) -> OnlineLearner:
        spec = state["spec"]
        learner = cls(
            ModelConfig.model_validate(spec["config"]),
            n_inputs=spec["n_inputs"],
            lookback=spec["lookback"],
            horizon=spec["horizon"],
            target_index=spec["target_index"],
            device=device,
            initialise=False,
        )
        learner.module_.load_state_dict(state["module"])
        learner.optimizer_.load_state_dict(state["optimizer"])
        learner.steps_ = int(state["steps"])
        learner.skipped_steps_ = int(state["skipped_steps"])
        return learner
