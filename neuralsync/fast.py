"""The fast live path: a fused forecast-and-learn step for the window MLP, compiled with numba.

One forecast and one SGD step of a tiny network cost well under a microsecond of arithmetic;
eager PyTorch spends tens of microseconds per event dispatching a dozen kernels and building
an autograd graph. :class:`FastLearner` keeps the reference :class:`OnlineLearner` interface
and state (the torch module and optimiser are still there, so checkpoints, the canary gate and
adapters see the same objects), but runs ``predict`` and ``learn`` as compiled loops over
numpy views of the very same parameter tensors. Its numbers equal the reference path's within
float32 rounding.

Which models qualify is decided by :func:`fast_path_reason`; :func:`make_learner` picks the
fast path whenever it applies and says why not otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from numba import njit

from neuralsync.config import ModelConfig
from neuralsync.learner import OnlineLearner

__all__ = ["FastLearner", "as_fast", "fast_path_reason", "live_path", "make_learner"]

ACTIVATION_CODES = {"relu": 0, "tanh": 1, "silu": 2, "gelu": 3}


def fast_path_reason(config: ModelConfig, device: torch.device | str = "cpu") -> str | None:
    """Why ``config`` cannot run on the fast path, or ``None`` when it can.

    Examples
    --------
    >>> fast_path_reason(ModelConfig()) is None
    True
    >>> fast_path_reason(ModelConfig(optimizer="adam"))
    "optimizer 'adam' (the fast path implements SGD with momentum and weight decay)"

    """
    if not config.fast_path:
        return "fast_path is off in the model settings"
    if torch.device(device).type != "cpu":
        return f"device '{torch.device(device)}' (the fast path is a CPU kernel)"
    if config.optimizer != "sgd":
        return (
            f"optimizer '{config.optimizer}' (the fast path implements SGD with momentum and "
            "weight decay)"
        )
    if config.type == "genome":
        return "an evolved network (the fast path runs the plain window MLP)"
    if config.type == "rls":
        return "an RLS mixture (neuralsync.rls runs its own numpy updates)"
    if config.type == "mlp" and len(config.hidden) > 1:
        return f"{len(config.hidden)} hidden layers (the fast path has at most one)"
    if config.type == "mlp" and config.activation not in ACTIVATION_CODES:
        return f"activation '{config.activation}' (the fast path has {', '.join(ACTIVATION_CODES)})"
    if config.dropout > 0:
        return "dropout (the fast path has none)"
    return None


def make_learner(
    config: ModelConfig,
    n_inputs: int,
    lookback: int,
    horizon: int,
    target_index: Sequence[int],
    device: torch.device | str = "cpu",
) -> OnlineLearner:
    """A :class:`FastLearner` when the model allows it, else the reference learner."""
    if config.type == "rls":
        from neuralsync.rls import RLSLearner

        return RLSLearner(config, n_inputs, lookback, horizon, target_index, device=device)
    cls = FastLearner if fast_path_reason(config, device) is None else OnlineLearner
    return cls(config, n_inputs, lookback, horizon, target_index, device=device)


def live_path(learner: OnlineLearner) -> dict[str, Any]:
    """Which path ``learner`` runs on, and why not the fast one: for metrics and events."""
    if isinstance(learner, FastLearner):
        return {"path": "fast", "kernel": "numba"}
    return {"path": "reference", "reason": fast_path_reason(learner.config, learner.device)}


def as_fast(learner: OnlineLearner) -> OnlineLearner:
    """``learner`` moved onto the fast path when its model allows it (same state), else itself."""
    if isinstance(learner, FastLearner) or fast_path_reason(learner.config, learner.device):
        return learner
    return FastLearner.from_state_dict(learner.state_dict(), learner.device)


class FastLearner(OnlineLearner):
    """:class:`~neuralsync.learner.OnlineLearner` with compiled ``predict`` and ``learn``.

    The parameters stay in the torch module; the kernels work on numpy views of them, so the
    module always holds the current weights. SGD momentum buffers live in numpy and are written
    into the torch optimiser's state whenever the state is read (:meth:`state_dict`,
    :meth:`clone`), so a checkpoint is the same whichever path wrote it.

    Examples
    --------
    >>> import numpy as np, torch
    >>> _ = torch.manual_seed(0)
    >>> config = ModelConfig(lr=0.05, momentum=0.5)
    >>> fast = FastLearner(config, n_inputs=2, lookback=4, horizon=1, target_index=[1])
    >>> reference = OnlineLearner.from_state_dict(fast.state_dict(), "cpu")
    >>> rng = np.random.default_rng(0)
    >>> for _ in range(20):
    ...     x = rng.normal(size=(1, 4, 2)).astype(np.float32)
    ...     y = rng.normal(size=(1, 1, 1)).astype(np.float32)
    ...     _ = fast.learn(x, y), reference.learn(x, y)
    >>> bool(np.allclose(fast.predict(x), reference.predict(x), atol=1e-6))
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
        reason = fast_path_reason(config, device)
        if reason is not None:
            raise ValueError(f"this model cannot run on the fast path: {reason}")
        super().__init__(config, n_inputs, lookback, horizon, target_index, device, initialise)
        self._bind()

    def _bind(self) -> None:
        """Move the parameters into one flat buffer the kernels share with the torch module.

        Each parameter tensor becomes a view of ``self._flat``, so the module, its optimiser and
        the kernels all see the same numbers; one flat array per kernel argument keeps numba's
        per-call argument handling, a large share of a step this small, to a minimum.
        """
        linears = [m for m in self.module_.net if isinstance(m, torch.nn.Linear)]
        self._torch_params = [p for m in linears for p in (m.weight, m.bias)]
        self._flat = np.concatenate([p.detach().numpy().ravel() for p in self._torch_params])
        offset = 0
        for param in self._torch_params:
            size = param.numel()
            param.data = torch.from_numpy(self._flat[offset : offset + size]).view(param.shape)
            offset += size
        self._grad = np.zeros_like(self._flat)
        self._momentum = np.zeros_like(self._flat)
        self._momentum_started = False
        self._read_momentum()
        c = self.config
        hidden = len(linears) == 2
        first = linears[0].weight
        layout = (first.shape[1], first.shape[0], self.horizon * len(self.target_index), hidden,
                  ACTIVATION_CODES.get(c.activation, 0), self.module_.subtract_last,
                  np.asarray(self.target_index, dtype=np.int64))  # fmt: skip
        self._predict_args = (self._flat, *layout)
        clip = -1.0 if c.grad_clip is None else c.grad_clip
        hyper = (c.lr, c.momentum, c.weight_decay, clip)
        self._learn_args = (self._flat, self._grad, self._momentum, *layout,
                            *(np.float32(h) for h in hyper))  # fmt: skip
        self._out_shape = (self.horizon, len(self.target_index))

    def _buffers(self) -> list[np.ndarray]:
        """The momentum buffer's view for each torch parameter."""
        views, offset = [], 0
        for param in self._torch_params:
            views.append(self._momentum[offset : offset + param.numel()].reshape(param.shape))
            offset += param.numel()
        return views

    def _read_momentum(self) -> None:
        for param, buffer in zip(self._torch_params, self._buffers(), strict=True):
            saved = self.optimizer_.state.get(param, {}).get("momentum_buffer")
            if saved is not None:
                buffer[...] = saved.numpy()
                self._momentum_started = True

    def _write_momentum(self) -> None:
        if self.config.momentum == 0 or not self._momentum_started:
            return
        for param, buffer in zip(self._torch_params, self._buffers(), strict=True):
            self.optimizer_.state[param]["momentum_buffer"] = torch.from_numpy(buffer.copy())

    @staticmethod
    def _array(values: np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
        return np.ascontiguousarray(values, dtype=np.float32)

    def predict(self, windows: np.ndarray | torch.Tensor) -> np.ndarray:
        x = self._array(windows)
        out = np.empty((x.shape[0], *self._out_shape), np.float32)
        _predict(x, *self._predict_args, out)
        return out

    def learn(self, windows: np.ndarray | torch.Tensor, truths: np.ndarray | torch.Tensor) -> float:
        x = self._array(windows)
        y = self._array(truths).reshape(x.shape[0], -1)
        loss, stepped = _learn(x, y, *self._learn_args, self._momentum_started)
        if not stepped:
            self.skipped_steps_ += 1
            return loss if not math.isfinite(loss) else float("nan")
        self._momentum_started = True
        self.steps_ += 1
        return loss

    def clone(self) -> FastLearner:
        return FastLearner.from_state_dict(self.state_dict(), self.device)

    def state_dict(self) -> dict[str, Any]:
        self._write_momentum()
        state = super().state_dict()
        state["module"] = {k: v.clone() for k, v in state["module"].items()}
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], device: torch.device | str) -> FastLearner:
        learner = super().from_state_dict(state, device)
        learner._bind()  # load_state_dict replaced the optimiser state: read its momentum
        return learner


# Reassociation lets LLVM vectorise the dot products and sums; NaN and inf keep their meaning
# (no "nnan"/"ninf"), so the non-finite checks stay exact.
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}

# -- kernels ----------------------------------------------------------------------------------
# Written as explicit loops in float32, in the order torch computes the same quantities, so
# results agree with the reference path to float32 rounding.


_SQRT_HALF = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _activate(value, code):
    if code == 0:
        return value if value > 0 else np.float32(0.0)
    if code == 1:
        return np.float32(math.tanh(value))
    if code == 2:  # silu: x·sigmoid(x)
        return np.float32(value / (1.0 + math.exp(-value)))
    # gelu, torch's exact form: x·Φ(x)
    return np.float32(0.5 * value * (1.0 + math.erf(value * _SQRT_HALF)))


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _activation_slope(pre, post, code):
    if code == 0:
        return np.float32(1.0) if pre > 0 else np.float32(0.0)
    if code == 1:
        return np.float32(1.0) - post * post
    if code == 2:
        sigmoid = 1.0 / (1.0 + math.exp(-pre))
        return np.float32(sigmoid * (1.0 + pre * (1.0 - sigmoid)))
    cdf = 0.5 * (1.0 + math.erf(pre * _SQRT_HALF))
    return np.float32(cdf + pre * _INV_SQRT_2PI * math.exp(-0.5 * pre * pre))


@njit(cache=True, inline="always", fastmath=_FASTMATH)
def _layers(flat, in_dim, width, n_out, hidden):
    """Views of the layers in ``flat``: (w1, b1, w2, b2); a linear model has w1, b1 only."""
    w1 = flat[: width * in_dim].reshape((width, in_dim))
    b1 = flat[width * in_dim : width * (in_dim + 1)]
    start = width * (in_dim + 1)
    if hidden:
        w2 = flat[start : start + n_out * width].reshape((n_out, width))
        b2 = flat[start + n_out * width : start + n_out * (width + 1)]
    else:
        w2 = flat[:0].reshape((0, 0))
        b2 = flat[:0]
    return w1, b1, w2, b2


@njit(cache=True, fastmath=_FASTMATH)
def _forward(xb, w1, b1, w2, b2, hidden, activation, subtract_last, target_index, z, a, h, o):
    """One window ``xb (lookback, inputs)`` → flat output ``o``; keeps ``z``, ``a``, ``h``."""
    lookback, n_inputs = xb.shape
    n = 0
    for row in range(lookback):
        for col in range(n_inputs):
            z[n] = xb[row, col] - xb[lookback - 1, col] if subtract_last else xb[row, col]
            n += 1
    if hidden:
        for j in range(w1.shape[0]):
            total = b1[j]
            for k in range(z.shape[0]):
                total += w1[j, k] * z[k]
            a[j] = total
            h[j] = _activate(total, activation)
        weights, bias, inputs = w2, b2, h
    else:
        weights, bias, inputs = w1, b1, z
    n_targets = target_index.shape[0]
    for m in range(o.shape[0]):
        total = bias[m]
        for k in range(inputs.shape[0]):
            total += weights[m, k] * inputs[k]
        if subtract_last:
            total += xb[lookback - 1, target_index[m % n_targets]]
        o[m] = total


@njit(cache=True, fastmath=_FASTMATH)
def _predict(x, flat, in_dim, width, n_out, hidden, activation, subtract_last, target_index, out):
    w1, b1, w2, b2 = _layers(flat, in_dim, width, n_out, hidden)
    z = np.empty(in_dim, np.float32)
    a = np.empty(width, np.float32)
    h = np.empty(width, np.float32)
    rows = out.reshape((x.shape[0], n_out))
    for b in range(x.shape[0]):
        _forward(x[b], w1, b1, w2, b2, hidden, activation, subtract_last, target_index,
                 z, a, h, rows[b])  # fmt: skip


@njit(cache=True, fastmath=_FASTMATH)
def _learn(x, y, flat, grad, momentum_buffer, in_dim, width, n_out, hidden, activation,
           subtract_last, target_index, lr, momentum, weight_decay, clip, started):  # fmt: skip
    """Mean-squared-error SGD step on a batch; returns (loss before the step, stepped)."""
    z = np.empty(in_dim, np.float32)
    a = np.empty(width, np.float32)
    h = np.empty(width, np.float32)
    o = np.empty(n_out, np.float32)
    delta = np.empty(n_out, np.float32)
    back = np.empty(width, np.float32)
    return _learn_with(x, y, flat, grad, momentum_buffer, in_dim, width, n_out, hidden,
                       activation, subtract_last, target_index, lr, momentum, weight_decay, clip,
                       started, z, a, h, o, delta, back)  # fmt: skip


@njit(cache=True, fastmath=_FASTMATH)
def _learn_with(x, y, flat, grad, momentum_buffer, in_dim, width, n_out, hidden, activation,
                subtract_last, target_index, lr, momentum, weight_decay, clip, started,
                z, a, h, o, delta, back):  # fmt: skip
    """:func:`_learn` with the caller's scratch space (``z`` .. ``back``), for loops over keys."""
    w1, b1, w2, b2 = _layers(flat, in_dim, width, n_out, hidden)
    g1, gb1, g2, gb2 = _layers(grad, in_dim, width, n_out, hidden)
    batch = x.shape[0]
    grad[:] = 0
    scale = np.float32(2.0) / np.float32(batch * n_out)
    loss = 0.0
    for b in range(batch):
        _forward(x[b], w1, b1, w2, b2, hidden, activation, subtract_last, target_index,
                 z, a, h, o)  # fmt: skip
        for m in range(n_out):
            diff = o[m] - y[b, m]
            loss += diff * diff
            delta[m] = diff * scale
        if hidden:
            for m in range(n_out):
                gb2[m] += delta[m]
                for k in range(width):
                    g2[m, k] += delta[m] * h[k]
            for k in range(width):
                total = np.float32(0.0)
                for m in range(n_out):
                    total += w2[m, k] * delta[m]
                back[k] = total * _activation_slope(a[k], h[k], activation)
        else:
            back[:] = delta
        for j in range(width):
            gb1[j] += back[j]
            for k in range(in_dim):
                g1[j, k] += back[j] * z[k]
    loss /= batch * n_out
    if not math.isfinite(loss):
        return loss, False
    squares = 0.0
    for i in range(grad.shape[0]):
        squares += grad[i] * grad[i]
    norm = math.sqrt(squares)
    if not math.isfinite(norm):  # an overflowing gradient is skipped, clipped or not
        return loss, False
    if clip >= 0:
        coef = np.float32(min(clip / (norm + 1e-6), 1.0))
        for i in range(grad.shape[0]):
            grad[i] *= coef
    # torch.optim.SGD, in the same order: decay, momentum (the first step seeds the buffer).
    for i in range(flat.shape[0]):
        step = grad[i]
        if weight_decay != 0:
            step = step + weight_decay * flat[i]
        if momentum != 0:
            step = momentum * momentum_buffer[i] + step if started else step
            momentum_buffer[i] = step
        flat[i] -= lr * step
    return loss, True
