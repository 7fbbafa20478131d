"""Forecasting networks over a lookback window.

Every network maps ``(batch, lookback, inputs)`` to ``(batch, horizon, targets)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from neuralsync.config import ModelConfig

__all__ = ["WindowMLP", "build_module", "build_uninitialised"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}


class WindowMLP(nn.Module):
    """A multi-layer perceptron over the flattened window; no hidden layer makes it linear.

    With ``subtract_last`` the window is taken relative to its last row and the output is a
    change from the last observed target value (NLinear's normalisation). The output layer
    starts at zero, so an untrained model is exactly the last-value forecast.

    Parameters
    ----------
    n_inputs
        Columns per row of the window.
    lookback
        Rows in the window.
    horizon
        Steps ahead to forecast.
    target_index
        Positions of the target columns among the inputs.
    hidden
        Widths of the hidden layers; empty for a linear model.

    Examples
    --------
    >>> import torch
    >>> net = WindowMLP(n_inputs=3, lookback=8, horizon=2, target_index=[2], hidden=[16])
    >>> x = torch.randn(5, 8, 3)
    >>> net(x).shape
    torch.Size([5, 2, 1])
    >>> bool(torch.equal(net(x), x[:, -1:, [2]].expand(5, 2, 1)))
    True

    """

    def __init__(
        self,
        n_inputs: int,
        lookback: int,
        horizon: int,
        target_index: Sequence[int],
        hidden: Sequence[int] = (32,),
        activation: str = "relu",
        dropout: float = 0.0,
        subtract_last: bool = True,
    ):
        super().__init__()
        self.lookback = lookback
        self.horizon = horizon
        self.n_targets = len(target_index)
        self.subtract_last = subtract_last
        self.register_buffer("target_index", torch.as_tensor(list(target_index), dtype=torch.long))
        layers: list[nn.Module] = []
        width = lookback * n_inputs
        for size in hidden:
            layers += [nn.Linear(width, size), _ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        head = nn.Linear(width, horizon * self.n_targets)
        if subtract_last:
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        layers.append(head)
        self.net = nn.Sequential(*layers)

    def forward(self, window: torch.Tensor) -> torch.Tensor:
        batch = window.shape[0]
        if self.subtract_last:
            last = window[:, -1:, :]
            out = self.net((window - last).flatten(1)).view(batch, self.horizon, self.n_targets)
            return out + last[:, :, self.target_index]
        return self.net(window.flatten(1)).view(batch, self.horizon, self.n_targets)


def build_module(
    config: ModelConfig, n_inputs: int, lookback: int, horizon: int, target_index: Sequence[int]
) -> nn.Module:
    """Build the network a :class:`~neuralsync.config.ModelConfig` describes."""
    if config.type == "genome":
        from neuralsync.evolution.genome import Genome  # evolution loads only when used

        if config.genome is None:
            raise ValueError("model type 'genome' needs the 'genome' setting")
        return Genome.from_dict(config.genome).build(n_inputs, lookback, horizon, target_index)
    hidden = [] if config.type == "linear" else list(config.hidden)
    return WindowMLP(
        n_inputs=n_inputs,
        lookback=lookback,
        horizon=horizon,
        target_index=target_index,
        hidden=hidden,
        activation=config.activation,
        dropout=config.dropout,
        subtract_last=config.subtract_last,
    )


def build_uninitialised(
    make: Callable[[], nn.Module], target_index: Sequence[int], device: torch.device | str = "cpu"
) -> nn.Module:
    """``make()``'s network with its weights allocated but not drawn: built on the meta
    device, so torch's global generator is untouched (a background search must not move it),
    for a caller that loads or draws the weights next. The ``target_index`` buffer, not a
    weight, is set here.

    >>> net = build_uninitialised(lambda: WindowMLP(2, 4, 1, [1], hidden=[3]), [1])
    >>> net.target_index.tolist(), net.net[0].weight.shape
    ([1], torch.Size([3, 8]))

    """
    with torch.device("meta"):
        module = make()
    module = module.to_empty(device=device)
    if hasattr(module, "target_index"):
        module.target_index = torch.as_tensor(list(target_index), dtype=torch.long, device=device)
    return module
