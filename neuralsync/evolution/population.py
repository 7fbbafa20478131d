"""Train and evaluate a population of same-architecture networks together, one batched step each.

Evolution trains many candidates that share an architecture (children of one parent, members
of a hyperparameter population). A Python loop over them pays PyTorch's dispatch overhead once
per candidate and step; stacking their parameters along a leading population axis ``P`` pays it
once per step. :class:`PopulationTrainer` offers three interchangeable backends:

- ``"hand"``: MLP stacks (``nn.Linear`` + elementwise activations, optionally inside
  :class:`~neuralsync.models.WindowMLP`) as batched matrix products on ``(P, in, out)``
  weights, with the backward pass written out by hand for the mean squared error (autograd over
  the batched products for any other loss). The fastest on small CPUs.
- ``"vmap"``: any module, through ``torch.func.stack_module_state`` + ``functional_call`` +
  ``vmap(grad(...))``. Modules ``vmap`` cannot run fall back to ``"loop"``; the reason is kept
  in ``backend_reason_``.
- ``"loop"``: one ``torch.optim.SGD`` per module, the reference the others must match.

Measured on a 2-core CPU, 16 window MLPs (32 → 32 → 1) × 200 steps of 16 samples, one
thread (``neuralsync bench population``): vmap about 6x and hand about 15–20x faster than the
loop; within the hand path, the hand-written backward about 2.5x faster than autograd over the
same batched products.

Every backend takes the same step: SGD with momentum and weight decay as ``torch.optim.SGD``
does it (no dampening, no Nesterov), after clipping each candidate's gradient by its own global
norm as ``torch.nn.utils.clip_grad_norm_`` does, with per-candidate learning rate, momentum,
weight decay and learning-rate decay. Parameters with ``requires_grad=False`` are trained
by the batched backends too (the loop leaves them alone): freeze nothing in a population.
Dropout (``nn.Dropout`` layers; ``vmap`` and ``loop`` only) draws its masks from the
``generator`` given to :meth:`train`, like the minibatches, never from torch's global RNG; the
backends draw them in different orders, so with dropout they agree in distribution only.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["BACKENDS", "OPTIMIZERS", "PopulationTrainer", "hand_batch_reason"]

BACKENDS = ("auto", "hand", "vmap", "loop")
OPTIMIZERS = ("sgd", "adamw")
LossFn = Callable[[Tensor, Tensor], Tensor]
_EPS = 1e-8  # AdamW's eps, as torch.optim.AdamW's default

# Elementwise activations the hand-batched path knows, with their derivative written from the
# activation's input ``z`` and output ``a`` (None: the hand path falls back to autograd).
_ACTIVATIONS: dict[type[nn.Module], Callable[[Tensor, Tensor], Tensor] | None] = {
    nn.ReLU: lambda z, a: (z > 0).to(z.dtype),
    nn.Tanh: lambda z, a: 1 - a * a,
    nn.Sigmoid: lambda z, a: a * (1 - a),
    nn.Identity: lambda z, a: torch.ones_like(z),
    nn.GELU: None,
    nn.SiLU: None,
    nn.ELU: None,
    nn.LeakyReLU: None,
    nn.Softplus: None,
}


def _mse(prediction: Tensor, target: Tensor) -> Tensor:
    return torch.nn.functional.mse_loss(prediction, target)


def _layers(module: nn.Module) -> list[nn.Module] | None:
    """The layers of an MLP stack in order, or None when ``module`` is not one."""
    if isinstance(module, nn.Linear):
        return [module]
    if isinstance(module, nn.Sequential):
        return list(module)
    from neuralsync.models import WindowMLP

    if type(module) is WindowMLP:
        return list(module.net)
    return None


def hand_batch_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot take the hand-batched path, or ``None`` when it can.

    >>> hand_batch_reason(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))) is None
    True
    >>> hand_batch_reason(nn.GRU(4, 8))
    'GRU is not an MLP stack (nn.Linear and elementwise activations)'

    """
    layers = _layers(module)
    if layers is None:
        return (
            f"{type(module).__name__} is not an MLP stack (nn.Linear and elementwise activations)"
        )
    for layer in layers:
        if isinstance(layer, nn.Dropout) and layer.p == 0:
            continue
        if isinstance(layer, nn.Linear) or type(layer) in _ACTIVATIONS:
            continue
        return f"layer {type(layer).__name__} is not nn.Linear or an elementwise activation"
    if not isinstance(layers[0], nn.Linear) or not isinstance(layers[-1], nn.Linear):
        return "an MLP stack must start and end with nn.Linear"
    return None


def _as_vector(value: Tensor | Sequence[float] | float, size: int, name: str) -> Tensor:
    """A per-candidate hyperparameter as a float64 ``(P,)`` tensor on the CPU."""
    vector = torch.as_tensor(value, dtype=torch.float64).flatten()
    if vector.numel() == 1:
        vector = vector.expand(size)
    if vector.numel() != size:
        raise ValueError(f"{name} has {vector.numel()} values, expected 1 or {size} (one each)")
    if not torch.isfinite(vector).all():
        raise ValueError(f"{name} must be finite, got {vector.tolist()}")
    return vector.clone()


class PopulationTrainer:
    """Train and evaluate ``P`` same-architecture modules together.

    The modules are trained in place: after :meth:`train` their parameters hold what they
    learned (:meth:`modules` returns them).

    Parameters
    ----------
    modules
        At least one module; all of one class with parameters of the same names and shapes.
    backend
        ``"auto"`` (``"hand"`` when every module is an MLP stack, see :func:`hand_batch_reason`,
        else ``"vmap"``), ``"hand"``, ``"vmap"`` or ``"loop"``.

    Attributes
    ----------
    backend_
        The backend in use.
    backend_reason_
        Why that backend was chosen (and, after a fallback, why ``vmap`` could not run).
    train_losses_
        After :meth:`train`: ``(P, steps)``, each candidate's minibatch loss at each step,
        before that step's update.

    Examples
    --------
    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(256, 3, generator=g)
    >>> y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    >>> _ = torch.manual_seed(0)
    >>> nets = [nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)) for _ in range(4)]
    >>> trainer = PopulationTrainer(nets)
    >>> trainer.backend_
    'hand'
    >>> before = trainer.evaluate(x, y)
    >>> losses = trainer.train(x, y, steps=100, batch_size=32, lr=[0.01, 0.02, 0.05, 0.1],
    ...                        momentum=0.9, generator=g)
    >>> losses.shape
    torch.Size([4, 100])
    >>> bool((trainer.evaluate(x, y) < before).all())
    True

    """

    def __init__(self, modules: Sequence[nn.Module], backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        modules = list(modules)
        if not modules:
            raise ValueError("PopulationTrainer needs at least one module")
        first = modules[0]
        shapes = {name: p.shape for name, p in first.named_parameters()}
        for i, module in enumerate(modules[1:], start=1):
            if type(module) is not type(first):
                raise ValueError(
                    f"module {i} is a {type(module).__name__}, module 0 a "
                    f"{type(first).__name__}: a population shares one architecture"
                )
            other = {name: p.shape for name, p in module.named_parameters()}
            if other != shapes:
                raise ValueError(
                    f"module {i} has parameters {_describe(other)}, module 0 has "
                    f"{_describe(shapes)}: a population shares one architecture"
                )
        self.backend = backend
        self._modules = modules
        reason = hand_batch_reason(first)
        if backend == "hand" and reason is not None:
            raise ValueError(f"backend 'hand' cannot train this module: {reason}")
        if backend == "auto":
            self.backend_ = "hand" if reason is None else "vmap"
            self.backend_reason_ = "an MLP stack" if reason is None else reason
        else:
            self.backend_ = backend
            self.backend_reason_ = f"asked for {backend!r}"
        self.train_losses_: Tensor | None = None

    @property
    def size(self) -> int:
        """How many candidates."""
        return len(self._modules)

    def modules(self) -> list[nn.Module]:
        """The modules, holding what they learned."""
        return list(self._modules)

    # ------------------------------------------------------------------ public verbs

    def train(
        self,
        x: Tensor,
        y: Tensor,
        *,
        steps: int,
        batch_size: int,
        lr: Tensor | Sequence[float] | float,
        momentum: Tensor | Sequence[float] | float = 0.0,
        weight_decay: Tensor | Sequence[float] | float = 0.0,
        grad_clip: float | None = None,
        lr_decay: Tensor | Sequence[float] | float = 1.0,
        generator: torch.Generator | None = None,
        loss: LossFn | None = None,
        optimizer: str = "sgd",
        beta2: float = 0.999,
        order: Tensor | None = None,
    ) -> Tensor:
        """Take ``steps`` minibatch SGD steps on every candidate; return the losses seen.

        Every candidate sees the same minibatches: ``steps`` draws of ``batch_size`` sample
        indices (with replacement) from ``generator``, a fresh ``torch.Generator`` seeded 0
        when none is given, so training is deterministic and never touches torch's global RNG.
        Momentum buffers start at zero at each call (a new optimiser per call).

        Parameters
        ----------
        x, y
            Inputs and targets, the sample axis first.
        steps, batch_size
            How many steps, of how many samples.
        lr, momentum, weight_decay
            One value for all or one per candidate.
        grad_clip
            Clip each candidate's gradient to this global norm (None: no clipping).
        lr_decay
            Multiplies each candidate's learning rate after each step: step ``t`` uses
            ``lr * lr_decay ** t``.
        generator
            Draws the minibatch indices (and dropout masks).
        loss
            ``loss(prediction, target) -> scalar``, averaged over the batch; MSE by default.
        optimizer, beta2
            ``"sgd"`` (the steps above) or ``"adamw"``: ``torch.optim.AdamW``'s step with
            ``betas=(momentum, beta2)``, decoupled ``weight_decay`` and ``eps=1e-8``; its
            moments start at zero at each call, like the momentum buffers.
        order
            The minibatches' sample indices, ``(steps, batch_size)``, instead of random draws:
            e.g. ``arange(n)[:, None]`` for one test-then-train pass in time order (the losses
            returned are then each sample's error before it was learned).

        Returns
        -------
        Tensor
            ``(P, steps)``: each candidate's minibatch loss at each step, before its update
            (also kept as ``train_losses_``).

        """
        self._check_data(x, y, "train")
        if steps < 1 or batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
        if grad_clip is not None and not grad_clip > 0:
            raise ValueError(f"grad_clip must be positive or None, got {grad_clip}")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"beta2 must be in [0, 1), got {beta2}")
        size = self.size
        hyper = {
            "lr": _as_vector(lr, size, "lr"),
            "momentum": _as_vector(momentum, size, "momentum"),
            "weight_decay": _as_vector(weight_decay, size, "weight_decay"),
            "lr_decay": _as_vector(lr_decay, size, "lr_decay"),
        }
        if optimizer == "adamw" and not ((hyper["momentum"] >= 0) & (hyper["momentum"] < 1)).all():
            raise ValueError(f"adamw: momentum (beta1) must be in [0, 1), got {hyper['momentum']}")
        self._optimizer = (optimizer, beta2)
        if generator is None:
            generator = torch.Generator().manual_seed(0)
        if order is not None:
            if order.shape != (steps, batch_size):
                raise ValueError(
                    f"order must have shape (steps, batch_size) = {(steps, batch_size)}, "
                    f"got {tuple(order.shape)}"
                )
            index = order.to(x.device, torch.long)
        else:
            index = torch.randint(
                0, x.shape[0], (steps, batch_size), generator=generator, device=generator.device
            ).to(x.device)
        loss_fn = loss if loss is not None else _mse
        for module in self._modules:
            module.train()
        if self.backend_ == "vmap":
            try:
                with _quiet_rnn_fallback():
                    losses = self._train_vmap(x, y, index, hyper, grad_clip, loss_fn, generator)
            except Exception as error:  # the modules are untouched: written back only at the end
                # A genuine error (bad shapes, a bad loss) is raised again by the loop.
                self.backend_ = "loop"
                self.backend_reason_ = f"vmap failed ({type(error).__name__}: {error}); loop"
                losses = self._train_loop(x, y, index, hyper, grad_clip, loss_fn, generator)
        elif self.backend_ == "hand":
            losses = self._train_hand(x, y, index, hyper, grad_clip, loss)
        else:
            losses = self._train_loop(x, y, index, hyper, grad_clip, loss_fn, generator)
        self.train_losses_ = losses
        return losses

    @torch.no_grad()
    def predict(self, x: Tensor) -> Tensor:
        """Every candidate's output for ``x``: ``(P, n, ...)``, evaluation mode, no grad."""
        self._check_data(x, None, "predict")
        for module in self._modules:
            module.eval()
        try:
            if self.backend_ == "hand":
                return self._forward_hand(self._stack_hand(grad=False), x)
            if self.backend_ == "vmap":
                try:
                    with _quiet_rnn_fallback():
                        return self._predict_vmap(x)
                except Exception as error:
                    self.backend_ = "loop"
                    self.backend_reason_ = f"vmap failed ({type(error).__name__}: {error}); loop"
            return torch.stack([module(x) for module in self._modules])
        finally:
            for module in self._modules:
                module.train()

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor, loss: LossFn | None = None) -> Tensor:
        """Each candidate's loss on ``(x, y)``: ``(P,)``, evaluation mode, no grad."""
        self._check_data(x, y, "evaluate")
        prediction = self.predict(x)
        loss_fn = loss if loss is not None else _mse
        return _per_candidate(loss_fn, prediction, y).detach()

    # ------------------------------------------------------------------ shared pieces

    def _check_data(self, x: Tensor, y: Tensor | None, verb: str) -> None:
        if not isinstance(x, Tensor) or (y is not None and not isinstance(y, Tensor)):
            raise TypeError(f"PopulationTrainer.{verb} takes tensors, got {type(x).__name__}")
        if x.ndim == 0 or x.shape[0] == 0:
            raise ValueError(f"PopulationTrainer.{verb}: x has no samples (shape {tuple(x.shape)})")
        if y is not None and y.shape[0] != x.shape[0]:
            raise ValueError(
                f"PopulationTrainer.{verb}: x has {x.shape[0]} samples but y has {y.shape[0]}"
            )

    @staticmethod
    def _sgd_step(
        params: list[Tensor],
        grads: list[Tensor],
        buffers: list[Tensor],
        lr: Tensor,
        momentum: Tensor,
        weight_decay: Tensor,
        grad_clip: float | None,
    ) -> None:
        """One SGD step on stacked ``(P, ...)`` tensors, in place, as torch.optim.SGD does it.

        ``lr``, ``momentum`` and ``weight_decay`` are ``(P, 1)`` so they broadcast over each
        flattened parameter.
        """
        size = params[0].shape[0]
        grads = [g.reshape(size, -1) for g in grads]
        if grad_clip is not None:
            norm = torch.stack([g.pow(2).sum(1) for g in grads]).sum(0).sqrt()
            # clip_grad_norm_: scale by max_norm / (norm + 1e-6), never up.
            scale = (grad_clip / (norm + 1e-6)).clamp(max=1.0).unsqueeze(1)
            grads = [g * scale for g in grads]
        # Fused in-place updates, and no weight-decay or momentum pass when every candidate's
        # is zero: at MNIST sizes the step is memory-bound and these passes cost more than the
        # matrix products of the forward and backward passes.
        decay = bool((weight_decay != 0).any())
        heavy = bool((momentum != 0).any())
        for p, g, buf in zip(params, grads, buffers, strict=True):
            flat = p.view(size, -1)
            d = g.addcmul(weight_decay, flat) if decay else g
            if heavy:
                d = buf.mul_(momentum).add_(d)
            flat.addcmul_(lr, d, value=-1.0)

    @staticmethod
    @torch.no_grad()
    def _adamw_step(
        params: list[Tensor],
        grads: list[Tensor],
        moments: list[tuple[Tensor, Tensor]],
        step: int,
        lr: Tensor,
        beta1: Tensor,
        beta2: float,
        weight_decay: Tensor,
        grad_clip: float | None,
    ) -> None:
        """One AdamW step (``step`` counts from 1) on stacked ``(P, ...)`` tensors, in place,
        as ``torch.optim.AdamW`` does it; ``lr``, ``beta1``, ``weight_decay`` are ``(P, 1)``."""
        size = params[0].shape[0]
        grads = [g.reshape(size, -1) for g in grads]
        if grad_clip is not None:
            norm = torch.stack([g.pow(2).sum(1) for g in grads]).sum(0).sqrt()
            scale = (grad_clip / (norm + 1e-6)).clamp(max=1.0).unsqueeze(1)
            grads = [g * scale for g in grads]
        correction1 = 1 - beta1**step
        correction2_sqrt = math.sqrt(1 - beta2**step)
        step_size = lr / correction1
        for p, g, (m, v) in zip(params, grads, moments, strict=True):
            flat = p.view(size, -1)
            flat.mul_(1 - lr * weight_decay)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / correction2_sqrt).add_(_EPS)
            flat.sub_(step_size * (m / denom))

    def _stepper(
        self, tensors: list[Tensor], hyper: dict[str, Tensor], steps: int, grad_clip
    ) -> Callable[[int, list[Tensor]], None]:
        """``update(t, grads)``: step ``t`` of the optimiser chosen in :meth:`train` on the
        stacked ``tensors``, with its state (momentum buffers or Adam moments) kept inside."""
        kind, beta2 = getattr(self, "_optimizer", ("sgd", 0.999))
        rates = self._schedule(hyper, steps, tensors[0].dtype, tensors[0].device)
        momentum = hyper["momentum"].to(tensors[0]).unsqueeze(1)
        weight_decay = hyper["weight_decay"].to(tensors[0]).unsqueeze(1)
        if kind == "adamw":
            moments = [
                (torch.zeros_like(t).view(self.size, -1), torch.zeros_like(t).view(self.size, -1))
                for t in tensors
            ]

            def update(t: int, grads: list[Tensor]) -> None:
                self._adamw_step(
                    tensors, grads, moments, t + 1, rates[t], momentum, beta2, weight_decay,
                    grad_clip,
                )  # fmt: skip

            return update
        momenta = [torch.zeros_like(t).view(self.size, -1) for t in tensors]

        def update(t: int, grads: list[Tensor]) -> None:
            with torch.no_grad():
                self._sgd_step(tensors, grads, momenta, rates[t], momentum, weight_decay, grad_clip)

        return update

    @staticmethod
    def _schedule(hyper: dict[str, Tensor], steps: int, dtype: torch.dtype, device: Any) -> Tensor:
        """``(steps, P, 1)`` learning rates: ``lr * lr_decay ** t``."""
        t = torch.arange(steps, dtype=torch.float64).unsqueeze(1)
        rates = hyper["lr"].unsqueeze(0) * hyper["lr_decay"].unsqueeze(0) ** t
        return rates.to(dtype=dtype, device=device).unsqueeze(2)

    # ------------------------------------------------------------------ loop

    def _train_loop(self, x, y, index, hyper, grad_clip, loss_fn, generator) -> Tensor:
        from torch.func import functional_call

        steps = index.shape[0]
        losses = torch.empty(self.size, steps)
        for i, module in enumerate(self._modules):
            params = [p for p in module.parameters() if p.requires_grad]
            forward = module
            if _has_dropout(module):
                # The same network with its dropout drawing from `generator`, called on the
                # module's own parameters: gradients reach them, the global RNG stays untouched.
                base = _generator_dropout(copy.deepcopy(module).to("meta"), generator)
                state = {**dict(module.named_parameters()), **dict(module.named_buffers())}

                def forward(inputs, base=base, state=state):
                    return functional_call(base, state, (inputs,))

            lr0 = float(hyper["lr"][i])
            decay = float(hyper["lr_decay"][i])
            kind, beta2 = self._optimizer
            if kind == "adamw":
                optimizer = torch.optim.AdamW(
                    params,
                    lr=lr0,
                    betas=(float(hyper["momentum"][i]), beta2),
                    weight_decay=float(hyper["weight_decay"][i]),
                    eps=_EPS,
                )
            else:
                optimizer = torch.optim.SGD(
                    params,
                    lr=lr0,
                    momentum=float(hyper["momentum"][i]),
                    weight_decay=float(hyper["weight_decay"][i]),
                )
            history = []
            for t in range(steps):
                batch = index[t]
                value = loss_fn(forward(x[batch]), y[batch])
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                if grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                optimizer.param_groups[0]["lr"] = lr0 * decay**t
                optimizer.step()
                history.append(value.detach())
            losses[i] = torch.stack(history).float().cpu()
        return losses

    # ------------------------------------------------------------------ vmap

    def _functional(
        self, generator: torch.Generator | None = None
    ) -> tuple[Callable[..., Tensor], dict[str, Tensor], Any, bool]:
        from torch.func import functional_call, stack_module_state

        params, buffers = stack_module_state(self._modules)
        params = {k: v.detach().clone() for k, v in params.items()}
        # Buffers equal in every module (index buffers, constants) go in once, unbatched.
        first = dict(self._modules[0].named_buffers())
        shared = all(
            torch.equal(first[name], buf)
            for module in self._modules[1:]
            for name, buf in module.named_buffers()
        )
        base = copy.deepcopy(self._modules[0]).to("meta")
        if generator is not None:
            base = _generator_dropout(base, generator)

        def call(p: dict[str, Tensor], b: dict[str, Tensor], inputs: Tensor) -> Tensor:
            return functional_call(base, (p, b), (inputs,))

        return call, params, (first if shared else buffers), shared

    def _train_vmap(self, x, y, index, hyper, grad_clip, loss_fn, generator) -> Tensor:
        from torch.func import grad_and_value, vmap

        call, params, buffers, shared = self._functional(generator)
        names = list(params)

        def candidate_loss(p, b, xb, yb):
            return loss_fn(call(p, b, xb), yb)

        step = vmap(
            grad_and_value(candidate_loss),
            in_dims=(0, None if shared else 0, None, None),
            randomness="different",
        )
        tensors = [params[n] for n in names]
        update = self._stepper(tensors, hyper, index.shape[0], grad_clip)
        history = []
        for t in range(index.shape[0]):
            batch = index[t]
            grads, value = step(params, buffers, x[batch], y[batch])
            update(t, [grads[n] for n in names])
            history.append(value.detach())
        self._write_back(params)
        return torch.stack(history, 1).float().cpu()

    def _predict_vmap(self, x: Tensor) -> Tensor:
        from torch.func import vmap

        call, params, buffers, shared = self._functional()
        return vmap(call, in_dims=(0, None if shared else 0, None))(params, buffers, x)

    @torch.no_grad()
    def _write_back(self, params: dict[str, Tensor]) -> None:
        for i, module in enumerate(self._modules):
            for name, p in module.named_parameters():
                p.copy_(params[name][i])

    # ------------------------------------------------------------------ hand-batched

    def _linears(self, module: nn.Module) -> list[nn.Linear]:
        return [layer for layer in _layers(module) if isinstance(layer, nn.Linear)]

    def _stack_hand(self, grad: bool) -> list[Tensor]:
        """``[W1, b1, W2, b2, ...]``: weights ``(P, in, out)``, biases ``(P, 1, out)``."""
        per_module = [self._linears(m) for m in self._modules]
        stacked = []
        for j in range(len(per_module[0])):
            weight = torch.stack([layers[j].weight.detach().t() for layers in per_module])
            stacked.append(weight.contiguous().requires_grad_(grad))
            if per_module[0][j].bias is not None:
                bias = torch.stack([layers[j].bias.detach() for layers in per_module])
                stacked.append(bias.unsqueeze(1).contiguous().requires_grad_(grad))
        return stacked

    @torch.no_grad()
    def _unstack_hand(self, stacked: list[Tensor]) -> None:
        for i, module in enumerate(self._modules):
            k = 0
            for layer in self._linears(module):
                layer.weight.copy_(stacked[k][i].t())
                k += 1
                if layer.bias is not None:
                    layer.bias.copy_(stacked[k][i, 0])
                    k += 1

    def _plan(self) -> tuple[list[nn.Module | None], bool]:
        """The activation after each linear layer (None: none) and whether every one of them
        has a hand-written derivative."""
        activations: list[nn.Module | None] = []
        for layer in _layers(self._modules[0]):
            if isinstance(layer, nn.Dropout):
                continue
            if isinstance(layer, nn.Linear):
                activations.append(None)
            elif activations[-1] is None:
                activations[-1] = layer
            else:  # two activations in a row: compose them, autograd differentiates
                activations[-1] = nn.Sequential(activations[-1], layer)
        manual = all(
            a is None or (type(a) in _ACTIVATIONS and _ACTIVATIONS[type(a)] is not None)
            for a in activations
        )
        return activations, manual

    def _has_bias(self) -> list[bool]:
        return [layer.bias is not None for layer in self._linears(self._modules[0])]

    def _inputs(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """The first layer's input ``(n, in)`` and what to add to the output, for WindowMLP."""
        module = self._modules[0]
        if isinstance(module, (nn.Linear, nn.Sequential)):
            return x, None
        if module.subtract_last:
            last = x[:, -1:, :]
            return (x - last).flatten(1), last[:, :, module.target_index]
        return x.flatten(1), None

    def _output_shape(self, n: int, x: Tensor) -> tuple[int, ...]:
        module = self._modules[0]
        if isinstance(module, (nn.Linear, nn.Sequential)):
            return (self.size, *x.shape[:-1], -1)
        return (self.size, n, module.horizon, module.n_targets)

    def _forward_hand(self, stacked: list[Tensor], x: Tensor) -> Tensor:
        """``(P, n, ...)`` outputs through autograd-able batched products."""
        activations, _ = self._plan()
        bias = self._has_bias()
        h, offset = self._inputs(x)
        lead = h.shape[:-1]
        h = h.reshape(-1, h.shape[-1])
        k = 0
        for j, has_bias in enumerate(bias):
            weight = stacked[k]
            k += 1
            # The first layer's input is shared by every candidate: one broadcast matmul.
            h = torch.matmul(h, weight)
            if has_bias:
                h = h + stacked[k]
                k += 1
            if j < len(activations) and activations[j] is not None:
                h = activations[j](h)
        out = h.reshape(self.size, *lead, -1)
        out = out.reshape(self._output_shape(out.shape[1], x))
        return out if offset is None else out + offset

    def _train_hand(self, x, y, index, hyper, grad_clip, loss) -> Tensor:
        stacked = self._stack_hand(grad=False)
        activations, manual = self._plan()
        manual = manual and loss is None and all(self._has_bias())
        update = self._stepper(stacked, hyper, index.shape[0], grad_clip)
        history = []
        for t in range(index.shape[0]):
            batch = index[t]
            xb, yb = x[batch], y[batch]
            if manual:
                grads, value = self._manual_grads(stacked, activations, xb, yb)
            else:
                for tensor in stacked:
                    tensor.requires_grad_(True)
                prediction = self._forward_hand(stacked, xb)
                if loss is None:
                    value = (prediction - yb).pow(2).flatten(1).mean(1)
                else:
                    value = _per_candidate(loss, prediction, yb)
                grads = torch.autograd.grad(value.sum(), stacked)
                for tensor in stacked:
                    tensor.requires_grad_(False)
            update(t, list(grads))
            history.append(value.detach())
        self._unstack_hand(stacked)
        return torch.stack(history, 1).float().cpu()

    @torch.no_grad()
    def _manual_grads(self, stacked, activations, xb, yb) -> tuple[list[Tensor], Tensor]:
        """Mean-squared-error gradients of an all-bias MLP stack, backward written out."""
        h, offset = self._inputs(xb)
        n = h.shape[0]
        h = h.reshape(-1, h.shape[-1])
        inputs, pre = [], []
        layers = len(stacked) // 2
        for j in range(layers):
            inputs.append(h)
            z = torch.matmul(h, stacked[2 * j]).add_(stacked[2 * j + 1])
            act = activations[j] if j < len(activations) else None
            pre.append(z)
            h = act(z) if act is not None else z
        out = h.reshape(self._output_shape(n, xb))
        if offset is not None:
            out = out + offset
        error = out - yb
        value = error.pow(2).flatten(1).mean(1)
        delta = (error * (2.0 / error[0].numel())).reshape(self.size, inputs[0].shape[0], -1)
        grads: list[Tensor] = [torch.empty(0)] * len(stacked)
        for j in reversed(range(layers)):
            a_in = inputs[j]
            if a_in.ndim == 2:  # the shared first-layer input
                grads[2 * j] = torch.matmul(a_in.t(), delta)
            else:
                grads[2 * j] = torch.bmm(a_in.transpose(1, 2), delta)
            grads[2 * j + 1] = delta.sum(1, keepdim=True)
            if j > 0:
                delta = torch.bmm(delta, stacked[2 * j].transpose(1, 2))
                act = activations[j - 1]
                if act is not None:
                    delta = delta * _ACTIVATIONS[type(act)](pre[j - 1], inputs[j])
        return grads, value


class _GeneratorDropout(nn.Module):
    """``nn.Dropout`` drawing its mask from a given generator instead of the global RNG."""

    def __init__(self, p: float, generator: torch.Generator):
        super().__init__()
        self.p = p
        self.generator = generator

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        noise = torch.rand(x.shape, generator=self.generator, device=self.generator.device)
        return x * (noise.to(x.device) >= self.p).to(x.dtype) / (1 - self.p)


def _has_dropout(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules())


def _generator_dropout(module: nn.Module, generator: torch.Generator) -> nn.Module:
    """``module`` (changed in place) with every ``nn.Dropout`` drawing from ``generator``."""
    for name, child in list(module.named_modules()):
        if type(child) is nn.Dropout:
            parent, _, attr = name.rpartition(".")
            holder = module.get_submodule(parent) if parent else module
            replacement = _GeneratorDropout(child.p, generator)
            replacement.train(child.training)
            setattr(holder, attr, replacement)
    return module


def _per_candidate(loss_fn: LossFn, prediction: Tensor, target: Tensor) -> Tensor:
    """``(P,)``: ``loss_fn`` of each candidate's prediction, vmapped where the loss allows."""
    from torch.func import vmap

    try:
        return vmap(loss_fn, in_dims=(0, None))(prediction, target)
    except Exception:  # a loss vmap cannot run is computed one by one
        return torch.stack([loss_fn(p, target) for p in prediction])


def _describe(shapes: dict[str, torch.Size]) -> str:
    return ", ".join(f"{name} {tuple(shape)}" for name, shape in shapes.items()) or "none"


@contextlib.contextmanager
def _quiet_rnn_fallback() -> Iterator[None]:
    """Silence torch's note that vmap has no batching rule for its CPU RNN kernel: vmap then
    loops over the candidates inside, which is correct, and torch says so at every call."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="There is a performance drop because we have not yet implemented"
        )
        yield
