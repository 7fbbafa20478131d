"""A character-level GPT for the seed benchmarks: the text, its windows, a small causal transformer.

The model is plain torch (no ``nn.MultiheadAttention``, no fused attention kernel) so that
``torch.func.vmap`` trains a population of them together
(:class:`~neuralsync.evolution.population.PopulationTrainer`'s ``vmap`` backend).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["CharGPT", "CharText", "bits_per_char", "char_windows", "load_text", "sequence_loss"]


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a GELU MLP, both residual."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(c, dim=-1)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)
        scores = scores.masked_fill(~mask[:t, :t], float("-inf"))
        h = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(h)
        return x + self.mlp(self.norm2(x))


class CharGPT(nn.Module):
    """A small causal transformer over characters: token and position embeddings, ``layers``
    pre-norm blocks, a final norm and a linear head. Input ``(B, T)`` integer codes with
    ``T <= block``; output ``(B, T, vocab)`` logits for the next character.

    >>> model = CharGPT(vocab=10, block=8, width=16, heads=2, layers=1)
    >>> model(torch.zeros(3, 8, dtype=torch.long)).shape
    torch.Size([3, 8, 10])

    """

    def __init__(self, vocab: int, block: int = 32, width: int = 48, heads: int = 4,
                 layers: int = 2):  # fmt: skip
        super().__init__()
        if width % heads:
            raise ValueError(f"CharGPT: width {width} is not a multiple of heads {heads}")
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.randn(block, width) * 0.02)
        self.blocks = nn.ModuleList(_Block(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        # A causal mask, identical in every member: PopulationTrainer passes it once, unbatched.
        self.register_buffer("mask", torch.tril(torch.ones(block, block, dtype=torch.bool)))
        with torch.no_grad():
            self.token.weight.normal_(0.0, 0.02)

    def forward(self, codes: Tensor) -> Tensor:
        t = codes.shape[-1]
        x = self.token(codes) + self.position[:t]
        for block in self.blocks:
            x = block(x, self.mask)
        return self.head(self.norm(x))


def sequence_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-character cross-entropy (nats) of ``(B, T, V)`` logits and ``(B, T)`` codes."""
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def bits_per_char(nats: float) -> float:
    """A cross-entropy in nats per character as bits per character."""
    return nats / math.log(2)


@dataclass
class CharText:
    """A text as integer codes, with its alphabet; split into train and validation."""

    alphabet: str
    train: np.ndarray
    validation: np.ndarray

    @classmethod
    def from_text(cls, text: str, train_fraction: float = 0.9) -> CharText:
        """The first ``train_fraction`` of the characters train, the rest validate."""
        if len(text) < 100:
            raise ValueError(f"text has {len(text)} characters, expected at least 100")
        alphabet = "".join(sorted(set(text)))
        lookup = {c: i for i, c in enumerate(alphabet)}
        codes = np.fromiter((lookup[c] for c in text), dtype=np.int64, count=len(text))
        cut = int(len(codes) * train_fraction)
        return cls(alphabet, codes[:cut], codes[cut:])


def load_text(path: Path) -> CharText:
    """The text at ``path`` (UTF-8), split 90 % / 10 %."""
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: expected a plain-text corpus (tinyshakespeare)"
        )
    return CharText.from_text(path.read_text(encoding="utf-8"))


def char_windows(codes: np.ndarray, block: int, stride: int) -> tuple[Tensor, Tensor]:
    """Windows of ``block`` codes starting every ``stride`` characters, and their targets (the
    same windows shifted by one): two ``(n, block)`` int64 tensors."""
    if len(codes) <= block:
        raise ValueError(f"{len(codes)} codes cannot fill one window of {block} plus its target")
    starts = np.arange(0, len(codes) - block, stride)
    index = starts[:, None] + np.arange(block)[None, :]
    return torch.from_numpy(codes[index]), torch.from_numpy(codes[index + 1])
