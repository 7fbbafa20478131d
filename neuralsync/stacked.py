"""Thousands of series at once: one window MLP per key, parameters stacked along a key axis.

A fleet of per-key models (one per symbol, sensor or customer) does not need a Python loop
over keys: with every key's weights stacked into ``(keys, ...)`` tensors, the keys that tick
together forecast and take their SGD steps in one go: on the CPU as one compiled kernel per
tick with the keys as SIMD lanes (parameters stored keys-last), on CUDA as a handful of batched
tensor operations. Gradients are written out by hand (the network is two matrix products), so
no autograd graph is built per step, and each key's step is the reference path's: its own
loss, its own gradient-norm clip, its own momentum buffer.

:class:`StackedLearners` is the model fleet; :class:`StackedForecaster` adds what the pipeline
keeps per key (window, running normalisation, pending forecasts awaiting their truth,
prequential error) as stacked tensors too, so the per-key overhead is a few numbers, not a
Python object.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numba import njit

from neuralsync.config import ModelConfig
from neuralsync.fast import _FASTMATH, ACTIVATION_CODES, _activate, _activation_slope
from neuralsync.learner import OnlineLearner

__all__ = ["StackedForecaster", "StackedLearners", "stacked_reason"]

_MIN_STD = 1e-8


def stacked_reason(config: ModelConfig) -> str | None:
    """Why ``config`` cannot be stacked, or ``None`` when it can.

    >>> stacked_reason(ModelConfig(hidden=[16])) is None
    True
    >>> stacked_reason(ModelConfig(hidden=[16, 16]))
    '2 hidden layers (stacked models have at most one)'

    """
    if config.optimizer != "sgd":
        return f"optimizer '{config.optimizer}' (stacked models use SGD)"
    if config.type == "mlp" and len(config.hidden) > 1:
        return f"{len(config.hidden)} hidden layers (stacked models have at most one)"
    if config.type == "mlp" and config.activation not in ("relu", "tanh"):
        return f"activation '{config.activation}' (stacked models have relu and tanh)"
    if config.dropout > 0:
        return "dropout (stacked models have none)"
    if config.batch_size != 1:
        return "batch_size > 1 (stacked models step once per key and tick)"
    return None


class StackedLearners:
    """One window MLP per key with stacked parameters; batched forecasts and SGD steps.

    Parameters
    ----------
    config
        The network and optimiser settings, shared by every key (see :func:`stacked_reason`).
    n_keys
        How many models.
    n_inputs, lookback, horizon, target_index
        The window's shape, as for :class:`~neuralsync.learner.OnlineLearner`.
    device
        Where the stacked tensors live.
    seed
        Seeds the initial weights (torch's ``nn.Linear`` initialisation, per key).
    keys_last
        Store the parameters as ``(parameters, keys)``, keys innermost, so a compiled kernel
        can run one key per SIMD lane; ``flat_`` is then a transposed view. The default,
        keys first, suits the batched torch operations.

    Examples
    --------
    >>> import torch
    >>> fleet = StackedLearners(ModelConfig(lr=0.05), n_keys=1000, n_inputs=2, lookback=4,
    ...                         horizon=1, target_index=[0])
    >>> keys = torch.arange(0, 1000, 2)              # half the keys tick
    >>> x, y = torch.randn(500, 4, 2), torch.randn(500, 1, 1)
    >>> losses = [fleet.learn(keys, x, y).mean() for _ in range(30)]
    >>> bool(losses[-1] < losses[0] / 2)
    True
    >>> fleet.predict(keys, x).shape
    torch.Size([500, 1, 1])

    """

    def __init__(
        self,
        config: ModelConfig,
        n_keys: int,
        n_inputs: int,
        lookback: int,
        horizon: int,
        target_index: Sequence[int],
        device: torch.device | str = "cpu",
        seed: int = 0,
        keys_last: bool = False,
    ):
        reason = stacked_reason(config)
        if reason is not None:
            raise ValueError(f"this model cannot be stacked: {reason}")
        self.config = config
        self.n_keys = n_keys
        self.n_inputs = n_inputs
        self.lookback = lookback
        self.horizon = horizon
        self.target_index = list(target_index)
        self.device = torch.device(device)
        self.hidden = config.type == "mlp"
        n_in = lookback * n_inputs
        n_out = horizon * len(self.target_index)
        widths = [n_in, config.hidden[0], n_out] if self.hidden else [n_in, n_out]
        # Each key's parameters are one row of `flat_`, laid out as the fast path's kernels
        # expect (w1, b1[, w2, b2]); `params_` are per-layer views of it for the torch path.
        self._shapes = [
            shape
            for fan_in, fan_out in itertools.pairwise(widths)
            for shape in ((fan_out, fan_in), (fan_out,))
        ]
        size = sum(math.prod(shape) for shape in self._shapes)
        if keys_last:
            self.storage_ = torch.empty(size, n_keys, device=self.device)
            self.flat_ = self.storage_.T
        else:
            self.flat_ = self.storage_ = torch.empty(n_keys, size, device=self.device)
        self.params_ = self._views(self.flat_)
        generator = torch.Generator().manual_seed(seed)
        for layer, fan_in in enumerate(widths[:-1]):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialisation
            for param in self.params_[2 * layer : 2 * layer + 2]:
                # Drawn keys-first whatever the storage order, so both layouts start equal.
                values = torch.empty(param.shape).uniform_(-bound, bound, generator=generator)
                param.copy_(values)
        if config.subtract_last:  # the head starts at zero: every key starts as last value
            self.params_[-2].zero_()
            self.params_[-1].zero_()
        momentum_size = size if config.momentum else 0
        if keys_last:
            self.momentum_storage_ = torch.zeros(momentum_size, n_keys, device=self.device)
            self.flat_momentum_ = self.momentum_storage_.T
        else:
            self.flat_momentum_ = torch.zeros(n_keys, momentum_size, device=self.device)
            self.momentum_storage_ = self.flat_momentum_
        self.momentum_ = self._views(self.flat_momentum_) if config.momentum else []
        self.steps_ = torch.zeros(n_keys, dtype=torch.long, device=self.device)
        self.skipped_steps_ = torch.zeros(n_keys, dtype=torch.long, device=self.device)
        self._index = torch.as_tensor(self.target_index, device=self.device)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-layer ``(keys, *shape)`` views of a ``(keys, size)`` tensor."""
        views, offset = [], 0
        for shape in self._shapes:
            size = math.prod(shape)
            views.append(flat[:, offset : offset + size].view(flat.shape[0], *shape))
            offset += size
        return views

    def layers_keys_last(self, storage: torch.Tensor) -> tuple[np.ndarray, ...]:
        """``(w1, b1, w2, b2)`` as ``(out, in, keys)`` / ``(out, keys)`` numpy views of
        keys-last ``storage``; a missing layer (linear model, no momentum) is empty."""
        keys = storage.shape[1]
        flat = storage.numpy()
        views, offset = [], 0
        for shape in self._shapes:
            size = math.prod(shape) if flat.shape[0] else 0
            views.append(flat[offset : offset + size].reshape(*shape, keys) if size else
                         np.zeros((*(0 for _ in shape), keys), np.float32))  # fmt: skip
            offset += size
        while len(views) < 4:
            views.append(np.zeros((0, 0, keys) if len(views) == 2 else (0, keys), np.float32))
        return tuple(views)

    @classmethod
    def from_learners(cls, learners: Sequence[OnlineLearner]) -> StackedLearners:
        """Stack independent reference learners (same settings) into one fleet."""
        first = learners[0]
        fleet = cls(first.config, len(learners), first.n_inputs, first.lookback, first.horizon,
                    first.target_index, device=first.device)  # fmt: skip
        linears = [m for m in first.module_.net if isinstance(m, torch.nn.Linear)]
        for k, learner in enumerate(learners):
            layers = [m for m in learner.module_.net if isinstance(m, torch.nn.Linear)]
            values = [p for m in layers for p in (m.weight, m.bias)]
            for i, (stacked, value) in enumerate(zip(fleet.params_, values, strict=True)):
                stacked[k] = value.detach()
                buffer = learner.optimizer_.state.get(value, {}).get("momentum_buffer")
                if fleet.momentum_ and buffer is not None:
                    fleet.momentum_[i][k] = buffer
            fleet.steps_[k] = learner.steps_
        if len(linears) * 2 != len(fleet.params_):
            raise ValueError("learners do not match the stacked layout")
        return fleet

    def _layers(self, keys: torch.Tensor | None) -> list[torch.Tensor]:
        """The parameters of ``keys``: the stacked tensors themselves for all keys, else copies."""
        return self.params_ if keys is None else [p[keys] for p in self.params_]

    def _forward(self, params: list[torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        n = x.shape[0]
        last = x[:, -1:, :]
        z = ((x - last) if self.config.subtract_last else x).reshape(n, -1, 1)
        # Batched matrix-vector products as broadcast multiply-and-sum: for matrices this small
        # a vectorised elementwise pass beats a loop of tiny GEMMs (bmm) several times over.
        a = (params[0] * z.transpose(1, 2)).sum(2, keepdim=True) + params[1].unsqueeze(2)
        if self.hidden:
            h = torch.relu(a) if self.config.activation == "relu" else torch.tanh(a)
            out = (params[2] * h.transpose(1, 2)).sum(2, keepdim=True) + params[3].unsqueeze(2)
        else:
            h, out = a, a
        out = out.view(n, self.horizon, len(self.target_index))
        if self.config.subtract_last:
            out = out + last[:, :, self._index]
        return out, z, a, h

    @torch.no_grad()
    def predict(self, keys: torch.Tensor | None, windows: torch.Tensor) -> torch.Tensor:
        """Forecast ``(n, horizon, targets)`` for key ``keys[i]``'s window ``windows[i]``.

        ``keys=None`` means every key, in order (no gather: the fastest case).
        """
        return self._forward(self._layers(keys), windows)[0]

    @torch.no_grad()
    def learn(
        self, keys: torch.Tensor | None, windows: torch.Tensor, truths: torch.Tensor
    ) -> torch.Tensor:
        """One SGD step for each key in ``keys`` (no key twice; None: all); returns the losses.

        A key whose loss or gradient is not finite keeps its weights and counts a skipped step.
        """
        c = self.config
        n = windows.shape[0]
        params = self._layers(keys)
        buffers = self.momentum_ if keys is None else [m[keys] for m in self.momentum_]
        out, z, a, h = self._forward(params, windows)
        diff = (out - truths.view_as(out)).reshape(n, -1, 1)
        losses = diff.square().mean(dim=(1, 2))
        delta = diff * (2.0 / diff.shape[1])
        # Each layer's weight gradient is an outer product, (error signal) x (layer input):
        # kept as the pair, it is never materialised; the update is one fused addcmul.
        if self.hidden:
            back = (params[2] * delta).sum(1).unsqueeze(2)
            back = back * ((a > 0).to(a.dtype) if c.activation == "relu" else 1 - h * h)
            pairs = [(back, z), (delta, h)]
        else:
            pairs = [(delta, z)]
        # |g x^T|^2 = |g|^2 |x|^2, and the bias adds |g|^2.
        squares = sum(g.square().sum((1, 2)) * (x.square().sum((1, 2)) + 1) for g, x in pairs)
        norms = squares.sqrt()
        finite = torch.isfinite(losses) & torch.isfinite(norms)
        skipped = None if bool(finite.all()) else (~finite).nonzero().squeeze(1)
        if skipped is not None:  # rare: keep those keys exactly as they are
            saved = [p[skipped].clone() for p in [*params, *buffers]]
            pairs = [(torch.nan_to_num(g, 0.0, 0.0, 0.0), torch.nan_to_num(x, 0.0, 0.0, 0.0))
                     for g, x in pairs]  # fmt: skip
        coef = torch.ones_like(norms)
        if c.grad_clip is not None:
            coef = torch.clamp(c.grad_clip / (norms + 1e-6), max=1.0)
        coef = coef.view(n, 1, 1)
        for layer, (g, x) in enumerate(pairs):
            weight, bias = params[2 * layer], params[2 * layer + 1]
            g = g * coef
            if c.momentum:
                # torch.optim.SGD: buffer = momentum * buffer + (grad + decay * param); a zero
                # buffer makes the first step the plain gradient, as torch seeds it.
                w_buf, b_buf = buffers[2 * layer], buffers[2 * layer + 1]
                w_buf.mul_(c.momentum)
                b_buf.mul_(c.momentum)
                if c.weight_decay:
                    w_buf.add_(weight, alpha=c.weight_decay)
                    b_buf.add_(bias, alpha=c.weight_decay)
                w_buf.addcmul_(g, x.transpose(1, 2))
                b_buf.add_(g.squeeze(2))
                weight.sub_(w_buf, alpha=c.lr)
                bias.sub_(b_buf, alpha=c.lr)
                continue
            if c.weight_decay:
                weight.mul_(1 - c.lr * c.weight_decay)
                bias.mul_(1 - c.lr * c.weight_decay)
            weight.addcmul_(g, x.transpose(1, 2), value=-c.lr)
            bias.sub_(g.squeeze(2), alpha=c.lr)
        if skipped is not None:
            for tensor, kept in zip([*params, *buffers], saved, strict=True):
                tensor[skipped] = kept
        if keys is not None:  # write the gathered copies back
            for stacked, updated in zip(
                [*self.params_, *self.momentum_], [*params, *buffers], strict=True
            ):
                stacked[keys] = updated
        index = slice(None) if keys is None else keys
        self.steps_[index] += finite.long()
        self.skipped_steps_[index] += (~finite).long()
        return losses

    def learner(self, key: int) -> OnlineLearner:
        """Key ``key``'s model as a reference :class:`OnlineLearner` (for adapters, export)."""
        single = OnlineLearner(self.config, self.n_inputs, self.lookback, self.horizon,
                               self.target_index, device=self.device)  # fmt: skip
        layers = [m for m in single.module_.net if isinstance(m, torch.nn.Linear)]
        with torch.no_grad():
            for param, stacked in zip(
                [p for m in layers for p in (m.weight, m.bias)], self.params_, strict=True
            ):
                param.copy_(stacked[key])
        if self.config.momentum and int(self.steps_[key]) > 0:
            for param, buffer in zip(single.optimizer_.param_groups[0]["params"],
                                     self.momentum_, strict=True):  # fmt: skip
                single.optimizer_.state[param]["momentum_buffer"] = buffer[key].clone()
        single.steps_ = int(self.steps_[key])
        return single

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": self.flat_.cpu().contiguous().clone(),
            "momentum": self.flat_momentum_.cpu().contiguous().clone(),
            "steps": self.steps_.cpu(),
            "skipped_steps": self.skipped_steps_.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # All in place: the layer views and a compiled kernel's views stay valid.
        self.flat_.copy_(state["params"])
        self.flat_momentum_.copy_(state["momentum"])
        self.steps_.copy_(state["steps"])
        self.skipped_steps_.copy_(state["skipped_steps"])


class StackedForecaster:
    """Test-then-train over many keyed series at once, with one model per key.

    Each tick brings one row for some of the keys. For each of them, in order: the forecast
    whose horizon that row completes is scored and learned from (the label delay equals the
    horizon), the row enters the key's running normalisation and window, and a new forecast is
    issued once the window is full. The same protocol as :class:`~neuralsync.pipeline.Pipeline`
    with one model per key instead of one shared model, and ``running`` normalisation.

    Parameters
    ----------
    config
        The per-key model (see :func:`stacked_reason`).
    n_keys, n_inputs, lookback, horizon, target_index, device, seed
        As for :class:`StackedLearners`.
    backend
        ``numba``: one compiled kernel per tick, with the keys as SIMD lanes (the CPU
        default); ``torch``: batched tensor operations (the default on CUDA). Both give the
        same numbers within float32 rounding.

    Examples
    --------
    >>> import torch
    >>> forecaster = StackedForecaster(ModelConfig(), n_keys=3, n_inputs=1, lookback=4,
    ...                                horizon=1, target_index=[0])
    >>> keys = torch.tensor([0, 2])
    >>> for t in range(50):
    ...     _ = forecaster.step(torch.tensor([[float(t)], [float(-t)]]), keys)
    >>> forecaster.rows_.tolist()
    [50, 0, 50]
    >>> forecaster.scored_.tolist()
    [46, 0, 46]

    """

    def __init__(
        self,
        config: ModelConfig,
        n_keys: int,
        n_inputs: int,
        lookback: int,
        horizon: int,
        target_index: Sequence[int],
        device: torch.device | str = "cpu",
        seed: int = 0,
        backend: str = "auto",
    ):
        device = torch.device(device)
        if backend == "auto":
            backend = "numba" if device.type == "cpu" else "torch"
        if backend not in ("numba", "torch"):
            raise ValueError(f"backend {backend!r}: expected 'auto', 'numba' or 'torch'")
        if backend == "numba" and device.type != "cpu":
            raise ValueError(f"backend 'numba' runs on the CPU, not on {device}")
        self.backend = backend
        self.learners = StackedLearners(config, n_keys, n_inputs, lookback, horizon,
                                        target_index, device=device, seed=seed,
                                        keys_last=backend == "numba")  # fmt: skip
        n_targets = len(target_index)
        self.horizon = horizon
        self.lookback = lookback
        self._index = torch.as_tensor(list(target_index), device=device)
        self.rows_ = torch.zeros(n_keys, dtype=torch.long, device=device)
        self.window_ = torch.zeros(n_keys, lookback, n_inputs, device=device)
        self.targets_seen_ = torch.zeros(n_keys, horizon, n_targets, device=device)
        self.mean_ = torch.zeros(n_keys, n_inputs, dtype=torch.float64, device=device)
        self.m2_ = torch.zeros(n_keys, n_inputs, dtype=torch.float64, device=device)
        # One pending forecast per horizon slot: the normalised window and its target scaling.
        self.pending_window_ = torch.zeros(n_keys, horizon, lookback, n_inputs, device=device)
        self.pending_center_ = torch.zeros(n_keys, horizon, n_targets, device=device)
        self.pending_scale_ = torch.ones(n_keys, horizon, n_targets, device=device)
        self.pending_forecast_ = torch.zeros(n_keys, horizon, horizon, n_targets, device=device)
        self.pending_last_ = torch.zeros(n_keys, horizon, n_targets, device=device)
        self.squared_error_ = torch.zeros(n_keys, dtype=torch.float64, device=device)
        self.baseline_squared_error_ = torch.zeros(n_keys, dtype=torch.float64, device=device)
        self.scored_ = torch.zeros(n_keys, dtype=torch.long, device=device)
        self._all_keys = torch.arange(n_keys, device=device)
        self._kernel_args: tuple[Any, ...] | None = None

    @torch.no_grad()
    def step(self, rows: torch.Tensor, keys: torch.Tensor | None = None) -> torch.Tensor:
        """Take one row for each key in ``keys``; return their new forecasts.

        ``rows`` is ``(n, inputs)``; ``keys`` names the key of each row (no key twice), or is
        ``None`` when every key ticks, in key order (the fastest case: no gathers). Returns
        ``(n, horizon, targets)`` in the rows' units; NaN where a key's window is not yet full.
        """
        if self.backend == "numba":
            return self._step_compiled(rows, keys)
        if keys is not None:
            keys = keys.to(self.window_.device)
        sel = slice(None) if keys is None else keys
        rows = rows.to(self.window_.device, self.window_.dtype)
        truth_now = rows[:, self._index]
        history = torch.cat([self.targets_seen_[sel, 1:], truth_now.unsqueeze(1)], 1)
        self.targets_seen_[sel] = history
        count = self.rows_[sel] + 1
        # The forecast issued `horizon` rows ago has its whole truth now: score it, learn it.
        issued = count - self.horizon
        due = issued >= self.lookback
        listed = self._all_keys if keys is None else keys
        if bool(due.all()):
            due_keys, due_listed, slot, truths = keys, listed, issued % self.horizon, history
        elif bool(due.any()):
            due_listed, slot, truths = listed[due], issued[due] % self.horizon, history[due]
            due_keys = due_listed
        else:
            truths = None
        if truths is not None:
            at = (due_listed, slot)
            center = self.pending_center_[at].unsqueeze(1)
            scale = self.pending_scale_[at].unsqueeze(1)
            forecast = self.pending_forecast_[at] * scale + center
            last = self.pending_last_[at].unsqueeze(1)
            scored = slice(None) if due_keys is None else due_keys
            self.squared_error_[scored] += (forecast - truths).square().sum((1, 2)).double()
            self.baseline_squared_error_[scored] += (last - truths).square().sum((1, 2)).double()
            self.scored_[scored] += 1
            normalised = (truths - center) / scale
            self.learners.learn(due_keys, self.pending_window_[at], normalised)
        # Running normalisation (Welford), then the window.
        self.rows_[sel] = count
        counts = count.unsqueeze(1)
        values = rows.double()
        delta = values - self.mean_[sel]
        mean = self.mean_[sel] + delta / counts
        self.mean_[sel] = mean
        m2 = self.m2_[sel] + delta * (values - mean)
        self.m2_[sel] = m2
        window = torch.cat([self.window_[sel, 1:], rows.unsqueeze(1)], 1)
        self.window_[sel] = window
        std = (m2 / counts).clamp(min=0).sqrt()
        std = torch.where((std > _MIN_STD) & (counts >= 2), std, torch.ones_like(std))
        mean, std = mean.float(), std.float()
        normalised = (window - mean.unsqueeze(1)) / std.unsqueeze(1)
        forecast = self.learners.predict(keys, normalised)
        at = (listed, count % self.horizon)
        self.pending_window_[at] = normalised
        self.pending_center_[at] = mean[:, self._index]
        self.pending_scale_[at] = std[:, self._index]
        self.pending_forecast_[at] = forecast
        self.pending_last_[at] = truth_now
        out = forecast * std[:, self._index].unsqueeze(1) + mean[:, self._index].unsqueeze(1)
        ready = (count >= self.lookback).view(-1, 1, 1)
        return torch.where(ready, out, torch.full_like(out, float("nan")))

    def _step_compiled(self, rows: torch.Tensor, keys: torch.Tensor | None) -> torch.Tensor:
        rows_np = np.ascontiguousarray(rows.detach().cpu().numpy(), dtype=np.float32)
        keys_np = (
            self._all_keys.numpy() if keys is None else np.ascontiguousarray(keys.cpu().numpy())
        )
        out = np.empty((len(keys_np), self.horizon, len(self._index)), np.float32)
        _fleet_step(keys_np, keys is None, rows_np, *self._kernel_state(), out)
        return torch.from_numpy(out)

    def _kernel_state(self) -> tuple[Any, ...]:
        """The kernel's view of the state: numpy views of the tensors, made once (every update
        is in place, so they stay valid) because making them costs more than a small tick."""
        if self._kernel_args is None:
            learners, c = self.learners, self.learners.config
            self._kernel_args = (
                self._index.numpy(), self.rows_.numpy(), self.targets_seen_.numpy(),
                self.mean_.numpy(), self.m2_.numpy(), self.window_.numpy(),
                self.pending_window_.numpy(), self.pending_center_.numpy(),
                self.pending_scale_.numpy(), self.pending_forecast_.numpy(),
                self.pending_last_.numpy(), self.squared_error_.numpy(),
                self.baseline_squared_error_.numpy(), self.scored_.numpy(),
                *learners.layers_keys_last(learners.storage_),
                *learners.layers_keys_last(learners.momentum_storage_),
                learners.steps_.numpy(), learners.skipped_steps_.numpy(), learners.hidden,
                ACTIVATION_CODES.get(c.activation, 0), c.subtract_last, np.float32(c.lr),
                np.float32(c.momentum), np.float32(c.weight_decay),
                np.float32(-1.0 if c.grad_clip is None else c.grad_clip),
            )  # fmt: skip
        return self._kernel_args

    def metrics(self) -> dict[str, Any]:
        """Prequential MSE over all keys' scored forecasts, beside the last-value forecast's."""
        values = self.scored_.sum().item() * self.horizon * len(self._index)
        if values == 0:
            return {"n_predictions": 0, "mse": None, "baseline_last_value": {"mse": None}}
        return {
            "n_predictions": int(values),
            "mse": self.squared_error_.sum().item() / values,
            "baseline_last_value": {"mse": self.baseline_squared_error_.sum().item() / values},
        }


# -- the compiled fleet step -------------------------------------------------------------------
# Parameters are stored keys-last, ``(parameter, key)``: every loop below runs over a chunk of
# keys in its innermost dimension, so each key is one SIMD lane and the same instruction steps
# many models at once. Gradients are never materialised: each layer's is the outer product of
# its error signal and its input, and the update applies it directly.

#: Keys per chunk: the chunk's working arrays (hidden activations, error signals; ~256 KB for
#: 32 hidden units) stay in cache. Measured: 64 keys ran at 2.0M key-events/s, 1024 at 3.1M.
_CHUNK = 1024


@njit(cache=True, fastmath=_FASTMATH)
def _fleet_step(keys, contiguous, rows, target_index, rows_seen, targets_seen, mean, m2, window,
                pending_window, pending_center, pending_scale, pending_forecast, pending_last,
                squared_error, baseline_squared_error, scored, w1, b1, w2, b2, mw1, mb1, mw2,
                mb2, steps, skipped, hidden, activation, subtract_last, lr, momentum,
                weight_decay, clip, out):  # fmt: skip
    """:meth:`StackedForecaster.step` for the listed keys, in chunks of keys.

    ``contiguous``: the keys are ``0 .. n-1`` in order, so the chunk's parameters are read in
    place; otherwise they are gathered into a chunk buffer and written back.
    """
    n_keys = keys.shape[0]
    horizon, n_targets = targets_seen.shape[1], targets_seen.shape[2]
    lookback, n_inputs = window.shape[1], window.shape[2]
    in_dim = lookback * n_inputs
    width, n_out = w1.shape[0], (w2.shape[0] if hidden else w1.shape[0])
    # One thread: SIMD across keys does the work; numba's parallel loops, measured here, lost
    # the vectorisation and stalled behind busy cores.
    for start in range(0, n_keys, _CHUNK):
        n = min(_CHUNK, n_keys - start)
        z = np.zeros((in_dim, n), np.float32)
        last = np.zeros((n_out, n), np.float32)
        y = np.zeros((n_out, n), np.float32)
        due = np.zeros(n, np.bool_)
        any_due = False
        # 1. The forecast whose horizon this row completes: score it, set up its learning step.
        for q in range(n):
            k = keys[start + q]
            row = rows[start + q]
            count = rows_seen[k] + 1
            for s in range(horizon - 1):
                targets_seen[k, s] = targets_seen[k, s + 1]
            for t in range(n_targets):
                targets_seen[k, horizon - 1, t] = row[target_index[t]]
            issued = count - horizon
            if issued < lookback:
                continue
            due[q] = True
            any_due = True
            slot = issued % horizon
            error = 0.0
            baseline = 0.0
            for s in range(horizon):
                for t in range(n_targets):
                    center = pending_center[k, slot, t]
                    scale = pending_scale[k, slot, t]
                    truth = targets_seen[k, s, t]
                    forecast = pending_forecast[k, slot, s, t] * scale + center
                    error += (forecast - truth) ** 2
                    baseline += (pending_last[k, slot, t] - truth) ** 2
                    y[s * n_targets + t, q] = (truth - center) / scale
            squared_error[k] += error
            baseline_squared_error[k] += baseline
            scored[k] += 1
            _window_column(pending_window[k, slot], subtract_last, target_index, z, last, q)
        params = _chunk_params(keys, contiguous, start, n, w1, b1, w2, b2)
        buffers = _chunk_params(keys, contiguous, start, n, mw1, mb1, mw2, mb2)
        if any_due:
            stepped = _chunk_learn(params, buffers, z, last, y, due, hidden, activation, lr,
                                   momentum, weight_decay, clip)  # fmt: skip
            for q in range(n):
                if due[q]:
                    k = keys[start + q]
                    if stepped[q]:
                        steps[k] += 1
                    else:
                        skipped[k] += 1
        # 2. The row joins the key's normalisation and window; the next forecast is issued.
        mean32 = np.empty((n, n_inputs), np.float32)
        std32 = np.empty((n, n_inputs), np.float32)
        for q in range(n):
            k = keys[start + q]
            row = rows[start + q]
            count = rows_seen[k] + 1
            rows_seen[k] = count
            for r in range(lookback - 1):
                window[k, r] = window[k, r + 1]
            for i in range(n_inputs):
                value = np.float64(row[i])
                deviation = value - mean[k, i]
                mean[k, i] += deviation / count
                m2[k, i] += deviation * (value - mean[k, i])
                window[k, lookback - 1, i] = row[i]
                std = math.sqrt(max(m2[k, i] / count, 0.0))
                mean32[q, i] = mean[k, i]
                std32[q, i] = std if (std > _MIN_STD and count >= 2) else 1.0
            slot = count % horizon
            for r in range(lookback):
                for i in range(n_inputs):
                    pending_window[k, slot, r, i] = (window[k, r, i] - mean32[q, i]) / std32[q, i]
            for t in range(n_targets):
                pending_center[k, slot, t] = mean32[q, target_index[t]]
                pending_scale[k, slot, t] = std32[q, target_index[t]]
                pending_last[k, slot, t] = row[target_index[t]]
            _window_column(pending_window[k, slot], subtract_last, target_index, z, last, q)
        forecast = np.empty((n_out, n), np.float32)
        hidden_out = np.empty((width, n), np.float32)
        _chunk_forward(params, z, last, hidden, activation, hidden_out, forecast)
        for q in range(n):
            k = keys[start + q]
            count = rows_seen[k]
            slot = count % horizon
            for s in range(horizon):
                for t in range(n_targets):
                    value = forecast[s * n_targets + t, q]
                    pending_forecast[k, slot, s, t] = value
                    unscaled = value * std32[q, target_index[t]] + mean32[q, target_index[t]]
                    out[start + q, s, t] = unscaled if count >= lookback else np.nan
        if not contiguous:
            _scatter_params(keys, start, n, params, w1, b1, w2, b2)
            _scatter_params(keys, start, n, buffers, mw1, mb1, mw2, mb2)


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _window_column(normalised, subtract_last, target_index, z, last, q):
    """Key ``q``'s model input (the flattened window) and last target values, as columns."""
    lookback, n_inputs = normalised.shape
    n_targets = target_index.shape[0]
    d = 0
    for r in range(lookback):
        for i in range(n_inputs):
            value = normalised[r, i]
            z[d, q] = value - normalised[lookback - 1, i] if subtract_last else value
            d += 1
    if subtract_last:
        for m in range(last.shape[0]):
            last[m, q] = normalised[lookback - 1, target_index[m % n_targets]]


@njit(cache=True, inline="always")
def _chunk_params(keys, contiguous, start, n, w1, b1, w2, b2):
    """The chunk's parameters and the column its first key is at: the stacked arrays
    themselves for contiguous keys, else gathered copies (column 0)."""
    if contiguous:  # read and written in place, from column `start`
        return w1, b1, w2, b2, start
    g1 = np.empty((w1.shape[0], w1.shape[1], n), np.float32)
    gb1 = np.empty((b1.shape[0], n), np.float32)
    g2 = np.empty((w2.shape[0], w2.shape[1], n), np.float32)
    gb2 = np.empty((b2.shape[0], n), np.float32)
    for q in range(n):
        k = keys[start + q]
        g1[:, :, q] = w1[:, :, k]
        gb1[:, q] = b1[:, k]
        g2[:, :, q] = w2[:, :, k]
        gb2[:, q] = b2[:, k]
    return g1, gb1, g2, gb2, 0


@njit(cache=True)
def _scatter_params(keys, start, n, params, w1, b1, w2, b2):
    g1, gb1, g2, gb2, _ = params
    for q in range(n):
        k = keys[start + q]
        w1[:, :, k] = g1[:, :, q]
        b1[:, k] = gb1[:, q]
        w2[:, :, k] = g2[:, :, q]
        b2[:, k] = gb2[:, q]


@njit(cache=True, fastmath=_FASTMATH)
def _chunk_forward(params, z, last, hidden, activation, h, o):
    """Forward pass for a chunk of keys: ``z (in, n)`` → ``o (out, n)``; keeps ``h``."""
    w1, b1, w2, b2, off = params
    n = z.shape[1]
    end = off + n
    first = h if hidden else o
    for j in range(w1.shape[0]):
        acc = first[j]
        bias = b1[j, off:end]
        for q in range(n):
            acc[q] = bias[q]
        for d in range(w1.shape[1]):
            weights = w1[j, d, off:end]
            inputs = z[d]
            for q in range(n):
                acc[q] += weights[q] * inputs[q]
        if hidden:
            for q in range(n):
                acc[q] = _activate(acc[q], activation)
    if hidden:
        for m in range(w2.shape[0]):
            acc = o[m]
            bias = b2[m, off:end]
            for q in range(n):
                acc[q] = bias[q]
            for j in range(w2.shape[1]):
                weights = w2[m, j, off:end]
                inputs = h[j]
                for q in range(n):
                    acc[q] += weights[q] * inputs[q]
    for m in range(o.shape[0]):
        for q in range(n):
            o[m, q] += last[m, q]


@njit(cache=True, fastmath=_FASTMATH)
def _chunk_learn(params, buffers, z, last, y, due, hidden, activation, lr, momentum,
                 weight_decay, clip):  # fmt: skip
    """One SGD step per due key of the chunk (torch.optim.SGD semantics); returns stepped."""
    w1, b1, w2, b2, off = params
    n = z.shape[1]
    n_out = y.shape[0]
    width = w1.shape[0]
    h = np.empty((width, n), np.float32)
    o = np.empty((n_out, n), np.float32)
    _chunk_forward(params, z, last, hidden, activation, h, o)
    # Error signals: delta (outputs), back (hidden units); squared norms for the clip.
    delta = o
    delta_sq = np.zeros(n, np.float32)
    loss = np.zeros(n, np.float32)
    for m in range(n_out):
        for q in range(n):
            diff = o[m, q] - y[m, q]
            loss[q] += diff * diff
            delta[m, q] = diff * np.float32(2.0 / n_out)
            delta_sq[q] += delta[m, q] * delta[m, q]
    input_sq = np.ones(n, np.float32)  # the bias's input is 1
    for d in range(z.shape[0]):
        for q in range(n):
            input_sq[q] += z[d, q] * z[d, q]
    if hidden:
        hidden_sq = np.ones(n, np.float32)
        back = np.zeros((width, n), np.float32)
        back_sq = np.zeros(n, np.float32)
        for j in range(width):
            for q in range(n):
                hidden_sq[q] += h[j, q] * h[j, q]
            for m in range(n_out):
                weights = w2[m, j, off : off + n]
                for q in range(n):
                    back[j, q] += weights[q] * delta[m, q]
            for q in range(n):
                back[j, q] *= _activation_slope(h[j, q], h[j, q], activation)
                back_sq[q] += back[j, q] * back[j, q]
        squares = np.empty(n, np.float32)
        for q in range(n):
            squares[q] = delta_sq[q] * hidden_sq[q] + back_sq[q] * input_sq[q]
        first_signal = back
    else:
        squares = np.empty(n, np.float32)
        for q in range(n):
            squares[q] = delta_sq[q] * input_sq[q]
        first_signal = delta
    # Per key: the clipped step size, or nothing for keys not due or not finite.
    step = np.zeros(n, np.float32)
    keep = np.ones(n, np.float32)  # momentum factor: 1 keeps an idle key's buffer as it is
    decay = np.zeros(n, np.float32)
    stepped = np.zeros(n, np.bool_)
    for q in range(n):
        norm = math.sqrt(squares[q])
        if due[q] and math.isfinite(loss[q]) and math.isfinite(norm):
            stepped[q] = True
            coef = min(clip / (norm + 1e-6), 1.0) if clip >= 0 else 1.0
            step[q] = coef
            keep[q] = momentum
            decay[q] = weight_decay
    for q in range(n):  # idle keys: zero signals, so no NaN or inf reaches a weight
        if not stepped[q]:
            for m in range(n_out):
                delta[m, q] = 0.0
            if hidden:
                for j in range(width):
                    first_signal[j, q] = 0.0
            for d in range(z.shape[0]):
                z[d, q] = 0.0
    rate = np.empty(n, np.float32)
    for q in range(n):
        rate[q] = lr if stepped[q] else 0.0
    with_momentum = momentum != 0
    if hidden:
        _apply(w2, b2, buffers[2], buffers[3], off, buffers[4], delta, h, step, keep, decay,
               rate, with_momentum)  # fmt: skip
    _apply(w1, b1, buffers[0], buffers[1], off, buffers[4], first_signal, z, step, keep, decay,
           rate, with_momentum)  # fmt: skip
    return stepped


@njit(cache=True, fastmath=_FASTMATH)
def _apply(weight, bias, weight_buffer, bias_buffer, off, buffer_off, signal, inputs, coef, keep,
           decay, rate, with_momentum):  # fmt: skip
    """SGD on one layer: gradient ``signal[j] * inputs[d]`` (bias: ``signal[j]``), per key.

    The chunk's keys are columns ``off ..`` of the parameters, ``buffer_off ..`` of the
    momentum buffers.
    """
    n = inputs.shape[1]
    end, buffer_end = off + n, buffer_off + n
    scaled = np.empty(n, np.float32)
    for j in range(weight.shape[0]):
        for q in range(n):
            scaled[q] = signal[j, q] * coef[q]
        for d in range(weight.shape[1]):
            w = weight[j, d, off:end]
            x = inputs[d]
            if with_momentum:
                buf = weight_buffer[j, d, buffer_off:buffer_end]
                for q in range(n):
                    buf[q] = keep[q] * buf[q] + scaled[q] * x[q] + decay[q] * w[q]
                    w[q] -= rate[q] * buf[q]
            else:
                for q in range(n):
                    w[q] -= rate[q] * (scaled[q] * x[q] + decay[q] * w[q])
        b = bias[j, off:end]
        if with_momentum:
            buf = bias_buffer[j, buffer_off:buffer_end]
            for q in range(n):
                buf[q] = keep[q] * buf[q] + scaled[q] + decay[q] * b[q]
                b[q] -= rate[q] * buf[q]
        else:
            for q in range(n):
                b[q] -= rate[q] * (scaled[q] + decay[q] * b[q])
