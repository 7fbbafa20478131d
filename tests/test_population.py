"""Tests of PopulationTrainer: every backend takes the same SGD steps as torch.optim.SGD."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from neuralsync.evolution.population import PopulationTrainer, hand_batch_reason
from neuralsync.models import WindowMLP

P = 4
SETTINGS = {
    "steps": 5,
    "batch_size": 8,
    "lr": [0.05, 0.02, 0.1, 0.01],
    "momentum": [0.0, 0.5, 0.9, 0.8],
    "weight_decay": [0.0, 1e-2, 1e-3, 0.1],
    "lr_decay": [1.0, 0.9, 0.95, 0.99],
}


def _seeded(factory, n: int = P, seed: int = 0) -> list[nn.Module]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = [factory() for _ in range(n)]
        for module in modules:  # move zero-initialised heads off zero: every weight matters
            with torch.no_grad():
                for p in module.parameters():
                    p.add_(0.05 * torch.randn_like(p))
    return modules


def _window_data(n: int = 64, lookback: int = 6, inputs: int = 2, horizon: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, lookback, inputs, generator=g).cumsum(1)
    y = x[:, -1:, :1].expand(n, horizon, 1) * 0.8 + 0.1 * torch.randn(n, horizon, 1, generator=g)
    return x, y.contiguous()


class _GRUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(2, 8, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        out, _ = self.gru(x)
        return self.head(out[:, -1]).unsqueeze(-1)


class _LSTMNet(_GRUNet):
    def __init__(self):
        super().__init__()
        self.gru = nn.LSTM(2, 8, batch_first=True)


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, kernel_size=3, dilation=2)
        self.head = nn.Linear(4 * 2, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x.transpose(1, 2)))
        return self.head(h.flatten(1)).unsqueeze(-1)


class _AttentionNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(2, 8)
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.embed(x)
        h, _ = self.attention(h, h, h, need_weights=False)
        return self.head(h[:, -1]).unsqueeze(-1)


def _train(modules, backend, x, y, **overrides):
    trainer = PopulationTrainer(copy.deepcopy(modules), backend)
    settings = {**SETTINGS, "grad_clip": 0.5, **overrides}
    losses = trainer.train(x, y, generator=torch.Generator().manual_seed(7), **settings)
    params = [torch.cat([p.detach().flatten() for p in m.parameters()]) for m in trainer.modules()]
    return trainer, losses, torch.stack(params)


MLPS = {
    "window_mlp": lambda: WindowMLP(2, 6, 2, [0], hidden=[16]),
    "window_mlp_raw": lambda: WindowMLP(2, 6, 2, [0], hidden=[8, 8], subtract_last=False),
    "window_linear_tanh": lambda: WindowMLP(2, 6, 2, [0], hidden=[8], activation="tanh"),
    "window_linear": lambda: WindowMLP(2, 6, 2, [0], hidden=[]),
    "window_gelu": lambda: WindowMLP(2, 6, 2, [0], hidden=[8], activation="gelu"),
}


@pytest.mark.parametrize("name", sorted(MLPS))
def test_loop_vmap_and_hand_agree_on_mlps(name):
    x, y = _window_data()
    modules = _seeded(MLPS[name])
    _, loss_loop, loop = _train(modules, "loop", x, y)
    for backend in ("vmap", "hand"):
        trainer, losses, params = _train(modules, backend, x, y)
        assert trainer.backend_ == backend
        torch.testing.assert_close(params, loop, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(losses, loss_loop, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(loop, torch.stack([torch.cat([p.flatten() for p in m.parameters()])
                                                 for m in modules]))  # fmt: skip


def test_hand_agrees_on_a_plain_sequential_with_a_custom_loss():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 5, generator=g)
    y = (x[:, 0] > x[:, 1]).long()
    modules = _seeded(lambda: nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 2)))
    loss = nn.functional.cross_entropy
    _, losses_loop, loop = _train(modules, "loop", x, y, loss=loss)
    for backend in ("vmap", "hand"):
        _, losses, params = _train(modules, backend, x, y, loss=loss)
        torch.testing.assert_close(params, loop, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(losses, losses_loop, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["window_mlp", "window_gelu"])
def test_adamw_steps_agree_with_torch_adamw_on_every_backend(name):
    x, y = _window_data()
    modules = _seeded(MLPS[name])
    adam = {"optimizer": "adamw", "beta2": 0.99, "lr": [1e-3, 3e-3, 1e-2, 3e-4]}
    _, loss_loop, loop = _train(modules, "loop", x, y, **adam)
    _, _, sgd = _train(modules, "loop", x, y)
    assert not torch.allclose(loop, sgd)
    for backend in ("vmap", "hand"):
        trainer, losses, params = _train(modules, backend, x, y, **adam)
        assert trainer.backend_ == backend
        torch.testing.assert_close(params, loop, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(losses, loss_loop, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        _train(modules, "vmap", x, y, optimizer="adam")
    with pytest.raises(ValueError, match="beta1"):
        _train(modules, "vmap", x, y, optimizer="adamw", momentum=1.0)


@pytest.mark.parametrize("factory", [_GRUNet, _LSTMNet, _ConvNet, _AttentionNet])
def test_vmap_trains_recurrent_conv_and_attention_modules_like_the_loop(factory):
    x, y = _window_data()
    modules = _seeded(factory)
    _, losses_loop, loop = _train(modules, "loop", x, y)
    trainer, losses, params = _train(modules, "auto", x, y)
    assert trainer.backend_ == "vmap", trainer.backend_reason_
    assert "not an MLP stack" in trainer.backend_reason_
    torch.testing.assert_close(params, loop, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses, losses_loop, rtol=1e-4, atol=1e-6)
    predictions = trainer.predict(x)
    assert predictions.shape == (P, *y.shape)


class _DataDependent(nn.Module):
    """Python control flow on a tensor's value: vmap cannot run it."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x):
        out = self.linear(x)
        return out * 2 if float(out.detach().mean()) > 100 else out


def test_vmap_falls_back_to_the_loop_and_says_why():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, generator=g), torch.randn(32, 1, generator=g)
    modules = _seeded(_DataDependent, n=3)
    trainer = PopulationTrainer(copy.deepcopy(modules), "vmap")
    losses = trainer.train(x, y, steps=3, batch_size=4, lr=0.1)
    assert trainer.backend_ == "loop"
    assert "vmap failed" in trainer.backend_reason_
    assert losses.shape == (3, 3) and torch.isfinite(losses).all()


def test_auto_picks_hand_for_mlp_stacks_and_hand_refuses_others():
    assert PopulationTrainer(_seeded(MLPS["window_mlp"], n=2)).backend_ == "hand"
    assert hand_batch_reason(WindowMLP(1, 4, 1, [0], dropout=0.2)) is not None
    with pytest.raises(ValueError, match="backend 'hand' cannot train this module: GRU"):
        PopulationTrainer([nn.GRU(2, 3)], "hand")


def test_gradient_clipping_is_per_candidate():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, generator=g), 10 * torch.randn(16, 1, generator=g)
    modules = _seeded(lambda: nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)), n=2)
    lr = [0.1, 0.01]
    for backend in ("loop", "vmap", "hand"):
        trainer = PopulationTrainer(copy.deepcopy(modules), backend)
        trainer.train(x, y, steps=1, batch_size=16, lr=lr, grad_clip=0.25)
        for i, (old, new) in enumerate(zip(modules, trainer.modules(), strict=True)):
            moved = torch.cat(
                [(a - b).flatten() for a, b in zip(old.parameters(), new.parameters(), strict=True)]
            ).norm()
            # The raw gradient is far larger than 0.25, so each step is exactly lr × 0.25.
            assert moved.item() == pytest.approx(lr[i] * 0.25, rel=1e-4), backend


def test_training_is_deterministic_and_leaves_the_global_rng_alone():
    x, y = _window_data()
    modules = _seeded(MLPS["window_mlp"])
    state = torch.get_rng_state()
    for backend in ("loop", "vmap", "hand"):
        _, first, a = _train(modules, backend, x, y)
        _, second, b = _train(modules, backend, x, y)
        assert torch.equal(a, b) and torch.equal(first, second)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("backend", ["loop", "vmap"])
def test_dropout_draws_from_the_generator_not_the_global_rng(backend):
    x, y = _window_data()
    modules = _seeded(lambda: WindowMLP(2, 6, 2, [0], hidden=[16], dropout=0.5))
    assert PopulationTrainer(modules).backend_ == "vmap"  # dropout is not hand-batched
    state = torch.get_rng_state()
    _, losses, a = _train(modules, backend, x, y)
    _, again, b = _train(modules, backend, x, y)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and torch.equal(losses, again)
    # The masks are real: without dropout the same steps land elsewhere.
    plain = copy.deepcopy(modules)
    for module in plain:
        module.net[2].p = 0.0
    _, _, c = _train(plain, backend, x, y)
    assert not torch.allclose(a, c)


def test_training_lowers_held_out_loss_and_writes_back_into_the_modules():
    x, y = _window_data(n=256)
    modules = _seeded(MLPS["window_mlp"])
    trainer = PopulationTrainer(modules)
    before = trainer.evaluate(x[200:], y[200:])
    losses = trainer.train(x[:200], y[:200], steps=150, batch_size=16, lr=0.02, momentum=0.9)
    after = trainer.evaluate(x[200:], y[200:])
    assert before.shape == after.shape == (P,)
    assert (after < before).all()
    assert trainer.train_losses_ is losses and losses.shape == (P, 150)
    assert trainer.modules()[0] is modules[0]
    direct = nn.functional.mse_loss(modules[2](x[200:]), y[200:])
    assert after[2].item() == pytest.approx(direct.item(), rel=1e-5)


def test_bad_input_gets_a_clear_error():
    x, y = _window_data()
    with pytest.raises(ValueError, match="shares one architecture"):
        PopulationTrainer(
            [WindowMLP(2, 6, 2, [0], hidden=[8]), WindowMLP(2, 6, 2, [0], hidden=[9])]
        )
    with pytest.raises(ValueError, match="at least one module"):
        PopulationTrainer([])
    with pytest.raises(ValueError, match="backend must be one of"):
        PopulationTrainer(_seeded(MLPS["window_mlp"], n=1), "jit")
    trainer = PopulationTrainer(_seeded(MLPS["window_mlp"], n=2))
    with pytest.raises(ValueError, match="lr has 3 values, expected 1 or 2"):
        trainer.train(x, y, steps=1, batch_size=4, lr=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="x has 64 samples but y has 63"):
        trainer.train(x, y[:63], steps=1, batch_size=4, lr=0.1)
    with pytest.raises(ValueError, match="grad_clip must be positive"):
        trainer.train(x, y, steps=1, batch_size=4, lr=0.1, grad_clip=0.0)
