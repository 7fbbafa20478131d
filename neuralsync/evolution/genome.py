"""The genome: a network architecture and its optimiser settings, as data evolution can mutate.

A :class:`Genome` is a tuple of :class:`Block` (MLP, GRU, LSTM, dilated causal convolution,
self-attention) plus hyperparameters. It builds a torch module for any window shape, has a
stable hash (the evaluation cache key), a fixed-length numeric encoding (the surrogate's input)
and round-trips through JSON. :func:`inherit_weights` copies a parent's trained weights into a
child wherever names and shapes allow (Lamarckian inheritance).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from neuralsync.config import ModelConfig
from neuralsync.models import _ACTIVATIONS, WindowMLP, build_uninitialised

__all__ = [
    "ACTIVATIONS",
    "KINDS",
    "Block",
    "Genome",
    "GenomeNet",
    "SearchSpace",
    "encoding_names",
    "inherit_weights",
]

#: Block kinds, in the order of their one-hot encoding.
KINDS: tuple[str, ...] = ("mlp", "gru", "lstm", "tcn", "attention")
#: Activations, in the order of their one-hot encoding.
ACTIVATIONS: tuple[str, ...] = ("relu", "tanh", "gelu", "silu")
_RECURRENT = {"gru": nn.GRU, "lstm": nn.LSTM}
_GATES = {nn.GRU: 3, nn.LSTM: 4}
#: Kernel size of a ``tcn`` block's causal convolution.
TCN_KERNEL = 3
_OPTIMIZERS = ("sgd", "adam")


def _bad(where: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"{where}: expected {expected}, got {value!r}")


def _check_int(where: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise _bad(where, f"an integer >= {low}", value)
    if not float(value).is_integer() or value < low:
        raise _bad(where, f"an integer >= {low}", value)
    return int(value)


def _check_float(where: str, value: Any, low: float, high: float, *, open_low=False) -> float:
    ok = isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)
    if ok:
        v = float(value)
        ok = math.isfinite(v) and (v > low if open_low else v >= low) and v < high
    if not ok:
        left = "(" if open_low else "["
        raise _bad(where, f"a number in {left}{low}, {high})", value)
    return float(value)


def _check_bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise _bad(where, "true or false", value)
    return bool(value)


def _check_choice(where: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise _bad(where, "one of " + ", ".join(repr(c) for c in choices), value)
    return value


@dataclass(frozen=True)
class Block:
    """One layer of a genome's network.

    Sequence blocks (``gru``, ``lstm``, ``tcn``, ``attention``) map ``(batch, time, channels)``
    to ``(batch, time, width)``. An ``mlp`` block flattens its whole input (time × channels) into
    one vector and maps it to ``width`` units, so after it the sequence is one step long: a run
    of ``mlp`` blocks is exactly :class:`~neuralsync.models.WindowMLP`'s hidden layers.

    Genes a kind does not use are canonicalised so that equal networks have equal hashes:
    recurrent blocks keep their cell's own nonlinearity (``activation`` becomes ``"tanh"``) and
    only ``tcn`` has a ``dilation`` (others get 1).

    Parameters
    ----------
    kind
        ``mlp``, ``gru``, ``lstm``, ``tcn`` (causal convolution, kernel 3, dilated) or
        ``attention`` (single-head self-attention over the window).
    width
        Output units or channels.
    activation
        ``relu``, ``tanh``, ``gelu`` or ``silu``, applied to the block's output.
    dropout
        Dropout after the activation, while learning.
    residual
        Add the block's input to its output (through a bias-free linear projection when the
        widths differ).
    dilation
        Dilation of a ``tcn`` block's convolution.

    Examples
    --------
    >>> Block("gru", 16, activation="relu", dilation=4)
    Block(kind='gru', width=16, activation='tanh', dropout=0.0, residual=False, dilation=1)

    """

    kind: str
    width: int
    activation: str = "relu"
    dropout: float = 0.0
    residual: bool = False
    dilation: int = 1

    def __post_init__(self):
        _check_choice("Block.kind", self.kind, KINDS)
        set_ = object.__setattr__  # frozen: normalise the validated values in place
        set_(self, "width", _check_int("Block.width", self.width, 1))
        set_(self, "activation", _check_choice("Block.activation", self.activation, ACTIVATIONS))
        set_(self, "dropout", _check_float("Block.dropout", self.dropout, 0.0, 1.0))
        set_(self, "residual", _check_bool("Block.residual", self.residual))
        set_(self, "dilation", _check_int("Block.dilation", self.dilation, 1))
        if self.kind in _RECURRENT:
            set_(self, "activation", "tanh")
        if self.kind != "tcn":
            set_(self, "dilation", 1)

    def label(self) -> str:
        """Short text such as ``tcn32d4+res``."""
        text = f"{self.kind}{self.width}"
        if self.kind == "tcn" and self.dilation > 1:
            text += f"d{self.dilation}"
        if self.kind not in _RECURRENT and self.activation != "relu":
            text += f"/{self.activation}"
        if self.dropout > 0:
            text += f"~{self.dropout:g}"
        return text + ("+res" if self.residual else "")


@dataclass(frozen=True)
class SearchSpace:
    """The genomes evolution may propose: allowed genes and their bounds.

    Examples
    --------
    >>> space = SearchSpace(max_blocks=2)
    >>> space.width_choices
    (4, 8, 16, 32, 64, 128)
    >>> len(Genome(blocks=()).encode(space)) == len(encoding_names(space))
    True

    """

    kinds: tuple[str, ...] = KINDS
    activations: tuple[str, ...] = ACTIVATIONS
    min_width: int = 4
    max_width: int = 128
    min_blocks: int = 0
    max_blocks: int = 4
    max_dropout: float = 0.3
    #: Chance that a random block has a skip connection.
    residual_rate: float = 0.3
    dilations: tuple[int, ...] = (1, 2, 4, 8)
    lr_bounds: tuple[float, float] = (1e-4, 0.3)
    momentum_bounds: tuple[float, float] = (0.0, 0.95)
    #: Weight decay is 0 or within these bounds.
    weight_decay_bounds: tuple[float, float] = (1e-7, 1e-2)
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    #: Gradient-norm clips; ``None`` is no clipping.
    grad_clips: tuple[float | None, ...] = (None, 0.5, 1.0, 5.0)
    life_steps_bounds: tuple[int, int] = (10, 200)
    optimizers: tuple[str, ...] = ("sgd", "adam")
    beta1_bounds: tuple[float, float] = (0.5, 0.99)

    def __post_init__(self):
        for name in (
            "kinds",
            "activations",
            "dilations",
            "batch_sizes",
            "grad_clips",
            "optimizers",
        ):
            object.__setattr__(self, name, tuple(getattr(self, name)))
            if not getattr(self, name):
                raise ValueError(f"SearchSpace.{name}: expected at least one choice, got none")
        for kind in self.kinds:
            _check_choice("SearchSpace.kinds", kind, KINDS)
        for act in self.activations:
            _check_choice("SearchSpace.activations", act, ACTIVATIONS)
        for opt in self.optimizers:
            _check_choice("SearchSpace.optimizers", opt, _OPTIMIZERS)
        if not 1 <= self.min_width <= self.max_width:
            raise _bad("SearchSpace.min_width/max_width", "1 <= min <= max", self.min_width)
        if not 0 <= self.min_blocks <= self.max_blocks:
            raise _bad("SearchSpace.min_blocks/max_blocks", "0 <= min <= max", self.min_blocks)
        for name in ("lr_bounds", "weight_decay_bounds", "momentum_bounds", "life_steps_bounds"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise _bad(f"SearchSpace.{name}", "0 <= low <= high", (low, high))
        if self.lr_bounds[0] <= 0 or self.weight_decay_bounds[0] <= 0:
            raise ValueError("SearchSpace.lr_bounds/weight_decay_bounds: lower bounds must be > 0")
        if self.momentum_bounds[1] >= 1 or self.beta1_bounds[1] >= 1:
            raise ValueError("SearchSpace.momentum_bounds/beta1_bounds: upper bounds must be < 1")

    @property
    def width_choices(self) -> tuple[int, ...]:
        """Powers of two within the width bounds (``min_width`` alone when there is none)."""
        out = tuple(2**k for k in range(0, 16) if self.min_width <= 2**k <= self.max_width)
        return out or (self.min_width,)


def _round(value: Any) -> Any:
    """Floats to 10 significant digits, recursively: hashes survive float noise."""
    if isinstance(value, float):
        return float(f"{value:.10g}")
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_round(v) for v in value]
    return value


def _digest(data: Any) -> str:
    text = json.dumps(_round(data), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_BLOCK_FIELDS = {f.name for f in fields(Block)}


@dataclass(frozen=True)
class Genome:
    """An architecture (a sequence of :class:`Block`) and the optimiser that trains it.

    Parameters
    ----------
    blocks
        Layers from the window to the output head; empty is a linear (NLinear-style) model.
    lr, momentum, weight_decay, batch_size, grad_clip, optimizer, beta1, beta2
        Optimiser settings (``momentum`` for SGD, the betas for Adam); ``grad_clip`` ``None``
        turns clipping off.
    life_steps
        Within-life SGD steps a candidate takes when evolution evaluates it.
    subtract_last
        Forecast the change from the last observed value; the head starts at zero, so an
        untrained network forecasts the last value.

    Examples
    --------
    >>> g = Genome(blocks=(Block("gru", 16), Block("mlp", 8, residual=True)), lr=3.2e-3)
    >>> g.describe()
    'gru16>mlp8+res | sgd lr=3.2e-03'
    >>> Genome.from_json(g.to_json()) == g, len(g.hash)
    (True, 16)
    >>> import torch
    >>> net = g.build(n_inputs=3, lookback=8, horizon=2, target_index=[0])
    >>> net(torch.randn(5, 8, 3)).shape
    torch.Size([5, 2, 1])

    """

    blocks: tuple[Block, ...]
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_size: int = 1
    grad_clip: float | None = 1.0
    life_steps: int = 50
    optimizer: str = "sgd"
    beta1: float = 0.9
    beta2: float = 0.999
    subtract_last: bool = True

    def __post_init__(self):
        set_ = object.__setattr__  # frozen: normalise the validated values in place
        if not isinstance(self.blocks, Sequence) or isinstance(self.blocks, str):
            raise _bad("Genome.blocks", "a sequence of Block", self.blocks)
        for i, block in enumerate(self.blocks):
            if not isinstance(block, Block):
                raise _bad(f"Genome.blocks[{i}]", "a Block", block)
        set_(self, "blocks", tuple(self.blocks))
        set_(self, "lr", _check_float("Genome.lr", self.lr, 0.0, math.inf, open_low=True))
        set_(self, "momentum", _check_float("Genome.momentum", self.momentum, 0.0, 1.0))
        wd = _check_float("Genome.weight_decay", self.weight_decay, 0.0, math.inf)
        set_(self, "weight_decay", wd)
        set_(self, "batch_size", _check_int("Genome.batch_size", self.batch_size, 1))
        if self.grad_clip is not None:
            clip = _check_float("Genome.grad_clip", self.grad_clip, 0.0, math.inf, open_low=True)
            set_(self, "grad_clip", clip)
        set_(self, "life_steps", _check_int("Genome.life_steps", self.life_steps, 0))
        _check_choice("Genome.optimizer", self.optimizer, _OPTIMIZERS)
        set_(self, "beta1", _check_float("Genome.beta1", self.beta1, 0.0, 1.0))
        set_(self, "beta2", _check_float("Genome.beta2", self.beta2, 0.0, 1.0))
        set_(self, "subtract_last", _check_bool("Genome.subtract_last", self.subtract_last))

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types; :meth:`from_dict` reads it back."""
        data = asdict(self)
        data["blocks"] = [asdict(b) for b in self.blocks]
        return data

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Genome:
        """Validate and read a :meth:`to_dict` mapping; a ``ValueError`` names a bad field.

        >>> Genome.from_dict({"blocks": [{"kind": "rnn", "width": 8}]})
        Traceback (most recent call last):
        ...
        ValueError: genome.blocks[0]: Block.kind: expected one of 'mlp', 'gru', ...

        """
        if not isinstance(d, dict):
            raise _bad("genome", "a mapping of genome fields", d)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"genome: unknown field(s) {unknown}; expected some of {sorted(known)}"
            )
        if "blocks" not in d:
            raise ValueError("genome: missing field 'blocks' (a list of blocks, may be empty)")
        raw = d["blocks"]
        if not isinstance(raw, list | tuple):
            raise _bad("genome.blocks", "a list of blocks", raw)
        blocks = []
        for i, item in enumerate(raw):
            if not isinstance(item, dict):
                raise _bad(f"genome.blocks[{i}]", "a mapping with 'kind' and 'width'", item)
            extra = sorted(set(item) - _BLOCK_FIELDS)
            missing = sorted({"kind", "width"} - set(item))
            if extra or missing:
                raise ValueError(
                    f"genome.blocks[{i}]: unknown field(s) {extra} / missing field(s) {missing};"
                    f" expected some of {sorted(_BLOCK_FIELDS)} with 'kind' and 'width'"
                )
            try:
                blocks.append(Block(**item))
            except ValueError as exc:
                raise ValueError(f"genome.blocks[{i}]: {exc}") from None
        try:
            return cls(**{**d, "blocks": tuple(blocks)})
        except ValueError as exc:
            raise ValueError(f"genome: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> Genome:
        try:
            data = json.loads(s)
        except json.JSONDecodeError as exc:
            raise ValueError(f"genome: not valid JSON ({exc})") from None
        return cls.from_dict(data)

    @property
    def hash(self) -> str:
        """16 hex digits of the SHA-256 of the canonical JSON; the same in every process."""
        return _digest(self.to_dict())

    @property
    def architecture_hash(self) -> str:
        """Hash of the blocks and ``subtract_last``: equal for genomes whose networks share
        their forward function and every parameter's shape (so they can train batched)."""
        data = self.to_dict()
        return _digest({"blocks": data["blocks"], "subtract_last": self.subtract_last})

    # ------------------------------------------------------------------ encoding

    def encode(self, space: SearchSpace | None = None) -> np.ndarray:
        """A fixed-length float vector for the surrogate (names: :func:`encoding_names`).

        Hyperparameters first (``log10(lr)``, momentum, ``log10(weight_decay + 1e-8)``,
        ``log2(batch_size)``, the clip or 0 for none, life steps, number of blocks, Adam flag,
        beta1, beta2, subtract_last), then for each of ``space.max_blocks`` slots: one-hot kind,
        ``log2(width)``, one-hot activation (none for recurrent blocks), dropout, residual,
        ``log2(dilation)``; empty slots are zeros.
        """
        space = space or SearchSpace()
        if len(self.blocks) > space.max_blocks:
            raise ValueError(
                f"genome has {len(self.blocks)} blocks; the search space encodes at most"
                f" {space.max_blocks} (max_blocks)"
            )
        head = [
            math.log10(self.lr),
            self.momentum,
            math.log10(self.weight_decay + 1e-8),
            math.log2(self.batch_size),
            0.0 if self.grad_clip is None else self.grad_clip,
            float(self.life_steps),
            float(len(self.blocks)),
            float(self.optimizer == "adam"),
            self.beta1,
            self.beta2,
            float(self.subtract_last),
        ]
        slot = len(space.kinds) + len(space.activations) + 4
        out = np.zeros(len(head) + slot * space.max_blocks)
        out[: len(head)] = head
        for i, b in enumerate(self.blocks):
            recurrent = b.kind in _RECURRENT  # its activation is the cell's own: not encoded
            if b.kind not in space.kinds or not (recurrent or b.activation in space.activations):
                raise ValueError(
                    f"block {i} ({b.kind}, {b.activation}) is outside the search space's kinds"
                    f" {space.kinds} / activations {space.activations}"
                )
            v = np.zeros(slot)
            v[space.kinds.index(b.kind)] = 1.0
            j = len(space.kinds)
            v[j] = math.log2(b.width)
            if not recurrent:
                v[j + 1 + space.activations.index(b.activation)] = 1.0
            j += 1 + len(space.activations)
            v[j : j + 3] = (b.dropout, float(b.residual), math.log2(b.dilation))
            start = len(head) + i * slot
            out[start : start + slot] = v
        return out

    # ------------------------------------------------------------------ live-model settings

    def _window_mlp_args(self) -> dict[str, Any] | None:
        """WindowMLP's arguments when the blocks are exactly its hidden layers, else None."""
        if not self.blocks:
            return {"hidden": [], "activation": "relu", "dropout": 0.0}
        first = self.blocks[0]
        plain = all(
            b.kind == "mlp"
            and not b.residual
            and b.activation == first.activation
            and b.dropout == first.dropout
            for b in self.blocks
        )
        if not plain:
            return None
        hidden = [b.width for b in self.blocks]
        return {"hidden": hidden, "activation": first.activation, "dropout": first.dropout}

    def to_model_config(self, base: ModelConfig | None = None) -> ModelConfig:
        """The live model's settings: ``mlp``/``linear`` when the network is a plain
        :class:`~neuralsync.models.WindowMLP` (so the compiled fast path applies), else type
        ``genome``. Optimiser fields come from the genome, the rest from ``base``.

        For type ``genome``, ``dropout`` is set to the largest block dropout: the learner
        switches the network to training mode only when its config has dropout.

        >>> Genome(blocks=(Block("mlp", 16),), lr=0.05).to_model_config().type
        'mlp'
        >>> Genome(blocks=(Block("gru", 16),)).to_model_config().type
        'genome'

        """
        base = base or ModelConfig()
        update: dict[str, Any] = {
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "grad_clip": self.grad_clip,
            "batch_size": self.batch_size,
            "optimizer": self.optimizer,
            "subtract_last": self.subtract_last,
        }
        args = self._window_mlp_args()
        if args is not None and args["hidden"]:
            update |= {"type": "mlp", "genome": None, **args}
        elif args is not None:  # a linear model has no hidden settings: base's stay as they are
            update |= {"type": "linear", "genome": None}
        else:
            dropout = max(b.dropout for b in self.blocks)
            update |= {"type": "genome", "genome": self.to_dict(), "dropout": dropout}
        return ModelConfig.model_validate({**base.model_dump(), **update})

    @classmethod
    def from_model_config(cls, config: ModelConfig) -> Genome:
        """The genome of a live model's settings (types ``mlp``, ``linear`` and ``genome``).

        >>> Genome.from_model_config(ModelConfig(hidden=[32, 8])).describe()
        'mlp32>mlp8 | sgd lr=1.0e-02'

        """
        optim = {
            "lr": config.lr,
            "momentum": config.momentum,
            "weight_decay": config.weight_decay,
            "grad_clip": config.grad_clip,
            "batch_size": config.batch_size,
            "optimizer": config.optimizer,
        }
        if config.type == "genome" or (config.type == "rls" and config.genome is not None):
            if config.genome is None:
                raise ValueError("model type 'genome' needs the 'genome' setting")
            return replace(cls.from_dict(config.genome), **optim)
        hidden = config.hidden if config.type in ("mlp", "rls") else []
        blocks = tuple(Block("mlp", w, config.activation, config.dropout) for w in hidden)
        return cls(blocks=blocks, subtract_last=config.subtract_last, **optim)

    def describe(self) -> str:
        """A short label such as ``gru64>mlp32+res | sgd lr=3.2e-03``."""
        arch = ">".join(b.label() for b in self.blocks) or "linear"
        text = f"{arch} | {self.optimizer} lr={self.lr:.1e}"
        if self.optimizer == "sgd" and self.momentum > 0:
            text += f" m={self.momentum:.2f}"
        if self.weight_decay > 0:
            text += f" wd={self.weight_decay:.0e}"
        if self.batch_size > 1:
            text += f" bs={self.batch_size}"
        return text

    # ------------------------------------------------------------------ building

    def build(
        self,
        n_inputs: int,
        lookback: int,
        horizon: int,
        target_index: Sequence[int],
        generator: torch.Generator | None = None,
    ) -> nn.Module:
        """The network: ``(batch, lookback, n_inputs)`` → ``(batch, horizon, targets)``.

        A :class:`~neuralsync.models.WindowMLP` when the blocks are plain MLP layers (same
        parameter names and shapes as the live ``mlp``/``linear`` model), else a
        :class:`GenomeNet`. With a ``generator``, every parameter is drawn from it and torch's
        global RNG is left untouched (torch's default distributions: uniform ±1/sqrt(fan_in),
        ±1/sqrt(hidden) for recurrent cells; a zero head with ``subtract_last``).
        """
        n_inputs = _check_int("n_inputs", n_inputs, 1)
        lookback = _check_int("lookback", lookback, 1)
        horizon = _check_int("horizon", horizon, 1)
        target_index = [int(i) for i in target_index]
        if not target_index or not all(0 <= i < n_inputs for i in target_index):
            raise _bad("target_index", f"one or more positions in [0, {n_inputs})", target_index)

        shape = (n_inputs, lookback, horizon, target_index)
        args = self._window_mlp_args()

        def make() -> nn.Module:
            if args is not None:
                return WindowMLP(*shape, subtract_last=self.subtract_last, **args)
            return GenomeNet(self.blocks, *shape, subtract_last=self.subtract_last)

        if generator is None:
            return make()
        module = build_uninitialised(make, target_index)
        _init_from(module, generator, zero_head=self.subtract_last)
        return module


def encoding_names(space: SearchSpace | None = None) -> list[str]:
    """The name of each entry of :meth:`Genome.encode`."""
    space = space or SearchSpace()
    names = ["log10_lr", "momentum", "log10_weight_decay", "log2_batch_size", "grad_clip"]
    names += ["life_steps", "n_blocks", "adam", "beta1", "beta2", "subtract_last"]
    for i in range(space.max_blocks):
        slot = [f"kind_{k}" for k in space.kinds] + ["log2_width"]
        slot += [f"act_{a}" for a in space.activations]
        slot += ["dropout", "residual", "log2_dilation"]
        names += [f"b{i}_{s}" for s in slot]
    return names


# ---------------------------------------------------------------------- the network


class _Attention(nn.Module):
    """Single-head self-attention over the window's steps (all of them are in the past)."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.query = nn.Linear(channels, width)
        self.key = nn.Linear(channels, width)
        self.value = nn.Linear(channels, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query(x), self.key(x), self.value(x)
        weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.out(weights @ v)


class _CausalConv(nn.Module):
    """Dilated causal convolution: step t sees steps t, t-d, t-2d only."""

    def __init__(self, channels: int, width: int, dilation: int):
        super().__init__()
        self.pad = (TCN_KERNEL - 1) * dilation
        self.conv = nn.Conv1d(channels, width, TCN_KERNEL, dilation=dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = nn.functional.pad(x.transpose(1, 2), (self.pad, 0))
        return self.conv(h).transpose(1, 2)


class _Recurrent(nn.Module):
    def __init__(self, cell: type[nn.RNNBase], channels: int, width: int):
        super().__init__()
        self.rnn = cell(channels, width, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


class _Layer(nn.Module):
    """One block: main path, activation, dropout, optional (projected) skip connection."""

    def __init__(self, block: Block, steps: int, channels: int):
        super().__init__()
        self.flatten = block.kind == "mlp"
        fan_in = steps * channels if self.flatten else channels
        if block.kind == "mlp":
            self.main: nn.Module = nn.Linear(fan_in, block.width)
        elif block.kind in _RECURRENT:
            self.main = _Recurrent(_RECURRENT[block.kind], channels, block.width)
        elif block.kind == "tcn":
            self.main = _CausalConv(channels, block.width, block.dilation)
        else:
            self.main = _Attention(channels, block.width)
        post: list[nn.Module] = []
        if block.kind not in _RECURRENT:
            post.append(_ACTIVATIONS[block.activation]())
        if block.dropout > 0:
            post.append(nn.Dropout(block.dropout))
        self.post = nn.Sequential(*post)
        self.residual = block.residual
        if block.residual and fan_in != block.width:
            self.skip: nn.Module = nn.Linear(fan_in, block.width, bias=False)
        else:
            self.skip = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flatten:
            x = x.flatten(1).unsqueeze(1)
        y = self.post(self.main(x))
        return y + self.skip(x) if self.residual else y


class GenomeNet(nn.Module):
    """The network of a genome whose blocks are not a plain MLP.

    The window ``(batch, lookback, inputs)`` passes through the blocks as a sequence
    ``(batch, steps, channels)`` (an ``mlp`` block collapses it to one step); the head flattens
    the last representation into ``horizon × targets``. With ``subtract_last`` the window is
    taken relative to its last row, the head starts at zero, and the output is added to the last
    target value: an untrained network forecasts the last value.

    Examples
    --------
    >>> import torch
    >>> net = GenomeNet((Block("tcn", 8, dilation=2),), 2, 6, 3, [1])
    >>> x = torch.randn(4, 6, 2)
    >>> bool(torch.equal(net(x), x[:, -1:, [1]].expand(4, 3, 1)))
    True

    """

    def __init__(
        self,
        blocks: Sequence[Block],
        n_inputs: int,
        lookback: int,
        horizon: int,
        target_index: Sequence[int],
        subtract_last: bool = True,
    ):
        super().__init__()
        self.horizon = horizon
        self.n_targets = len(target_index)
        self.subtract_last = subtract_last
        self.register_buffer("target_index", torch.as_tensor(list(target_index), dtype=torch.long))
        layers = []
        steps, channels = lookback, n_inputs
        for block in blocks:
            layers.append(_Layer(block, steps, channels))
            steps, channels = (1 if block.kind == "mlp" else steps), block.width
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(steps * channels, horizon * self.n_targets)
        if subtract_last:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        batch = window.shape[0]
        last = window[:, -1:, :]
        x = window - last if self.subtract_last else window
        out = self.head(self.blocks(x).flatten(1)).view(batch, self.horizon, self.n_targets)
        return out + last[:, :, self.target_index] if self.subtract_last else out


def _head(module: nn.Module) -> nn.Module:
    return module.head if isinstance(module, GenomeNet) else module.net[-1]


def _uniform_(tensor: torch.Tensor, bound: float, generator: torch.Generator) -> None:
    with torch.no_grad():
        sample = torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype)
        tensor.copy_(sample.mul_(2 * bound).sub_(bound))


def _init_from(module: nn.Module, generator: torch.Generator, zero_head: bool) -> None:
    """Draw every parameter from ``generator`` with torch's default distributions."""
    for sub in module.modules():
        if isinstance(sub, nn.RNNBase):
            for p in sub.parameters(recurse=False):
                _uniform_(p, 1.0 / math.sqrt(sub.hidden_size), generator)
        elif isinstance(sub, nn.Linear | nn.Conv1d):
            bound = 1.0 / math.sqrt(sub.weight[0].numel())
            for p in sub.parameters(recurse=False):
                _uniform_(p, bound, generator)
    if zero_head:
        with torch.no_grad():
            for p in _head(module).parameters():
                p.zero_()


# ---------------------------------------------------------------------- inheritance


def _shared_names(module: nn.Module) -> dict[str, str]:
    """State names of a WindowMLP under GenomeNet's names (other modules: unchanged)."""
    if not isinstance(module, WindowMLP):
        return {}
    linears = [i for i, m in enumerate(module.net) if isinstance(m, nn.Linear)]
    targets = [f"blocks.{k}.main" for k in range(len(linears) - 1)] + ["head"]
    return {
        f"net.{i}.{p}": f"{target}.{p}"
        for i, target in zip(linears, targets, strict=True)
        for p in ("weight", "bias")
    }


def inherit_weights(
    child: nn.Module,
    parent: nn.Module,
    noise_std: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, int]:
    """Lamarckian inheritance: start ``child`` from ``parent``'s weights where they fit.

    Every parameter and buffer whose name and shape match is copied. A
    :class:`~neuralsync.models.WindowMLP`'s layers answer to :class:`GenomeNet`'s names (hidden
    layer ``k`` is ``blocks.k.main``, the output layer ``head``), so a live MLP's weights pass to
    a child whose mutation made it a ``GenomeNet`` (a skip connection added, a block retyped).
    A same-name parameter whose shape differs (a resized layer) gets the overlapping leading
    slice along every dimension: a layer that grew keeps the parent's units first, one that
    shrank keeps the parent's first units (for GRU/LSTM weights the slice is taken per gate, so
    gates stay aligned). Everything else keeps its fresh initialisation. With ``noise_std > 0`` the
    inherited part of each floating parameter gets Gaussian noise of
    ``noise_std × std(parent's tensor)``, drawn from ``generator``.

    Returns counts of tensors (parameters and buffers): ``copied`` whole, ``partial`` (a
    slice) and ``fresh`` (left as initialised).

    Examples
    --------
    >>> parent = Genome(blocks=(Block("mlp", 8),)).build(2, 4, 1, [0])
    >>> child = Genome(blocks=(Block("mlp", 16),)).build(2, 4, 1, [0])
    >>> inherit_weights(child, parent)
    {'copied': 2, 'partial': 3, 'fresh': 0}

    """
    if noise_std < 0 or not math.isfinite(noise_std):
        raise _bad("noise_std", "a finite number >= 0", noise_std)
    if noise_std > 0 and generator is None:
        raise ValueError("noise_std > 0 needs a torch.Generator to draw the noise from")
    gates = {}
    for name, sub in child.named_modules():
        if isinstance(sub, nn.RNNBase):
            for pname, _ in sub.named_parameters(recurse=False):
                gates[f"{name}.{pname}" if name else pname] = _GATES.get(type(sub), 1)
    names = _shared_names(parent)
    source = {names.get(k, k): v for k, v in parent.state_dict().items()}
    child_names = _shared_names(child)
    counts = {"copied": 0, "partial": 0, "fresh": 0}
    with torch.no_grad():
        for name, dst in child.state_dict().items():
            src = source.get(child_names.get(name, name))
            if src is None or src.dim() != dst.dim() or src.dtype != dst.dtype:
                counts["fresh"] += 1
                continue
            src = src.to(dst.device)
            g = gates.get(name, 1)
            if src.shape == dst.shape:
                target, origin = dst, src
                counts["copied"] += 1
            else:
                # Per-gate view: (gates, hidden, ...) so that a resized cell keeps its gates.
                d = dst.view(g, dst.shape[0] // g, *dst.shape[1:]) if g > 1 else dst
                s = src.view(g, src.shape[0] // g, *src.shape[1:]) if g > 1 else src
                region = tuple(slice(0, min(a, b)) for a, b in zip(d.shape, s.shape, strict=True))
                target, origin = d[region], s[region]
                counts["partial"] += 1
            target.copy_(origin)
            if noise_std > 0 and dst.is_floating_point() and src.numel() > 1:
                scale = noise_std * float(src.float().std())
                noise = torch.randn(target.shape, generator=generator, dtype=target.dtype)
                target.add_(noise.mul_(scale).to(target.device))
    return counts
