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

import torch

from neuralsync.config import ModelConfig
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
        generator = torch.Generator().manual_seed(seed)
        self.params_: list[torch.Tensor] = []
        for fan_in, fan_out in itertools.pairwise(widths):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default initialisation
            for shape in ((n_keys, fan_out, fan_in), (n_keys, fan_out)):
                values = (torch.rand(shape, generator=generator) * 2 - 1) * bound
                self.params_.append(values.to(self.device))
        if config.subtract_last:  # the head starts at zero: every key starts as last value
            self.params_[-2].zero_()
            self.params_[-1].zero_()
        self.momentum_ = [torch.zeros_like(p) for p in self.params_] if config.momentum else []
        self.steps_ = torch.zeros(n_keys, dtype=torch.long, device=self.device)
        self.skipped_steps_ = torch.zeros(n_keys, dtype=torch.long, device=self.device)
        self._index = torch.as_tensor(self.target_index, device=self.device)

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
            "params": [p.cpu() for p in self.params_],
            "momentum": [m.cpu() for m in self.momentum_],
            "steps": self.steps_.cpu(),
            "skipped_steps": self.skipped_steps_.cpu(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.params_ = [p.to(self.device) for p in state["params"]]
        self.momentum_ = [m.to(self.device) for m in state["momentum"]]
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
    ):
        self.learners = StackedLearners(config, n_keys, n_inputs, lookback, horizon,
                                        target_index, device=device, seed=seed)  # fmt: skip
        device = self.learners.device
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
