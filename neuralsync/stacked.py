"""Thousands of series at once: one window MLP per key, parameters stacked along a key axis.

A fleet of per-key models (one per symbol, sensor or customer) does not need a Python loop
over keys: with every key's weights stacked into ``(keys, ...)`` tensors, the keys that tick
together forecast and take their SGD steps as a handful of batched tensor operations, on the
CPU or on CUDA. Gradients are written out by hand (the network is two matrix products), so no
autograd graph is built per step, and each key's step is exactly the reference path's: its own
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
from numba import njit, prange

from neuralsync.config import ModelConfig
from neuralsync.fast import _FASTMATH, ACTIVATION_CODES, _forward, _layers, _learn_with
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
        self.flat_ = torch.empty(n_keys, size, device=self.device)
        self.params_ = self._views(self.flat_)
        generator = torch.Generator().manual_seed(seed)
        for layer, fan_in in enumerate(widths[:-1]):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialisation
            for param in self.params_[2 * layer : 2 * layer + 2]:
                param.uniform_(-bound, bound, generator=generator)  # in place: no temporaries
        if config.subtract_last:  # the head starts at zero: every key starts as last value
            self.params_[-2].zero_()
            self.params_[-1].zero_()
        self.flat_momentum_ = torch.zeros(n_keys, size if config.momentum else 0, device=device)
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
            "params": self.flat_.cpu().clone(),
            "momentum": self.flat_momentum_.cpu().clone(),
            "steps": self.steps_.cpu(),
            "skipped_steps": self.skipped_steps_.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.flat_.copy_(state["params"])  # in place: the layer views stay valid
        self.flat_momentum_.copy_(state["momentum"])
        self.steps_ = state["steps"].to(self.device)
        self.skipped_steps_ = state["skipped_steps"].to(self.device)


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
        ``numba``: one compiled kernel per tick, looping over the keys on all CPU cores (the
        CPU default); ``torch``: batched tensor operations (the default on CUDA). Both give the
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
        self.learners = StackedLearners(config, n_keys, n_inputs, lookback, horizon,
                                        target_index, device=device, seed=seed)  # fmt: skip
        device = self.learners.device
        if backend == "auto":
            backend = "numba" if device.type == "cpu" else "torch"
        if backend not in ("numba", "torch"):
            raise ValueError(f"backend {backend!r}: expected 'auto', 'numba' or 'torch'")
        if backend == "numba" and device.type != "cpu":
            raise ValueError(f"backend 'numba' runs on the CPU, not on {device}")
        self.backend = backend
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
        learners, c = self.learners, self.learners.config
        out = np.empty((len(keys_np), self.horizon, len(self._index)), np.float32)
        clip = -1.0 if c.grad_clip is None else c.grad_clip
        _fleet_step(
            keys_np, rows_np, self._index.numpy(), self.rows_.numpy(), self.targets_seen_.numpy(),
            self.mean_.numpy(), self.m2_.numpy(), self.window_.numpy(),
            self.pending_window_.numpy(), self.pending_center_.numpy(),
            self.pending_scale_.numpy(), self.pending_forecast_.numpy(),
            self.pending_last_.numpy(), self.squared_error_.numpy(),
            self.baseline_squared_error_.numpy(), self.scored_.numpy(),
            learners.flat_.numpy(), learners.flat_momentum_.numpy(), learners.steps_.numpy(),
            learners.skipped_steps_.numpy(), learners.flat_.shape[1],
            self.lookback * self.window_.shape[2], learners.params_[0].shape[1],
            self.horizon * len(self._index), learners.hidden,
            ACTIVATION_CODES.get(c.activation, 0), c.subtract_last, np.float32(c.lr),
            np.float32(c.momentum), np.float32(c.weight_decay), np.float32(clip), out,
        )  # fmt: skip
        return torch.from_numpy(out)

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


@njit(cache=True, parallel=True, fastmath=_FASTMATH)
def _fleet_step(keys, rows, target_index, rows_seen, targets_seen, mean, m2, window,
                pending_window, pending_center, pending_scale, pending_forecast, pending_last,
                squared_error, baseline_squared_error, scored, flat, momentum, steps, skipped,
                n_params, in_dim, width, n_out, hidden, activation, subtract_last, lr,
                momentum_factor, weight_decay, clip, out):  # fmt: skip
    """:meth:`StackedForecaster.step` for every listed key, one key per loop iteration.

    The same protocol, in the same order, as the torch version; each key's SGD step is the fast
    path's kernel on that key's row of the stacked parameters.
    """
    horizon, n_targets = targets_seen.shape[1], targets_seen.shape[2]
    lookback, n_inputs = window.shape[1], window.shape[2]
    # Keys go in chunks, one scratch space per chunk: allocating per key costs more than the
    # arithmetic of a model this small.
    n_keys = keys.shape[0]
    n_chunks = min(n_keys, 64)
    for chunk in prange(n_chunks):
        target = np.empty((1, n_out), np.float32)
        grad = np.empty(n_params, np.float32)
        mean32 = np.empty(n_inputs, np.float32)
        std32 = np.empty(n_inputs, np.float32)
        z = np.empty(in_dim, np.float32)
        a = np.empty(width, np.float32)
        h = np.empty(width, np.float32)
        o = np.empty(n_out, np.float32)
        delta = np.empty(n_out, np.float32)
        back = np.empty(width, np.float32)
        for j in range(chunk * n_keys // n_chunks, (chunk + 1) * n_keys // n_chunks):
            k = keys[j]
            row = rows[j]
            count = rows_seen[k] + 1
            for s in range(horizon - 1):
                targets_seen[k, s] = targets_seen[k, s + 1]
            for t in range(n_targets):
                targets_seen[k, horizon - 1, t] = row[target_index[t]]
            issued = count - horizon
            if issued >= lookback:  # the forecast issued `horizon` rows ago is complete
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
                        target[0, s * n_targets + t] = (truth - center) / scale
                squared_error[k] += error
                baseline_squared_error[k] += baseline
                scored[k] += 1
                # A zero momentum buffer makes the first step the plain gradient, as in torch.
                _, stepped = _learn_with(
                    pending_window[k, slot : slot + 1], target, flat[k], grad, momentum[k], in_dim,
                    width, n_out, hidden, activation, subtract_last, target_index, lr,
                    momentum_factor, weight_decay, clip, True, z, a, h, o, delta, back,
                )  # fmt: skip
                if stepped:
                    steps[k] += 1
                else:
                    skipped[k] += 1
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
                mean32[i] = mean[k, i]
                std32[i] = std if (std > _MIN_STD and count >= 2) else 1.0
            slot = count % horizon
            for r in range(lookback):
                for i in range(n_inputs):
                    pending_window[k, slot, r, i] = (window[k, r, i] - mean32[i]) / std32[i]
            for t in range(n_targets):
                pending_center[k, slot, t] = mean32[target_index[t]]
                pending_scale[k, slot, t] = std32[target_index[t]]
                pending_last[k, slot, t] = row[target_index[t]]
            w1, b1, w2, b2 = _layers(flat[k], in_dim, width, n_out, hidden)
            _forward(pending_window[k, slot], w1, b1, w2, b2, hidden, activation, subtract_last,
                     target_index, z, a, h, o)  # fmt: skip
            for s in range(horizon):
                for t in range(n_targets):
                    value = o[s * n_targets + t]
                    pending_forecast[k, slot, s, t] = value
                    unscaled = value * std32[target_index[t]] + mean32[target_index[t]]
                    out[j, s, t] = unscaled if count >= lookback else np.nan
