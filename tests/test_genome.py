"""Tests for :mod:`neuralsync.evolution.genome`: validation, JSON, hashes, encoding, building
real networks for any window shape, seeded initialisation, and Lamarckian inheritance."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neuralsync.config import ModelConfig
from neuralsync.evolution.genome import (
    Block,
    Genome,
    GenomeNet,
    SearchSpace,
    encoding_names,
    inherit_weights,
)
from neuralsync.evolution.operators import random_genome
from neuralsync.learner import OnlineLearner
from neuralsync.models import WindowMLP, build_module

SMALL = SearchSpace(max_width=16, life_steps_bounds=(1, 5))
MIXED = Genome(
    blocks=(
        Block("gru", 8),
        Block("tcn", 8, activation="gelu", dilation=2, residual=True),
        Block("attention", 6, dropout=0.1, residual=True),
        Block("lstm", 4),
        Block("mlp", 5, activation="silu", residual=True),
    ),
    lr=3e-3,
    momentum=0.5,
    weight_decay=1e-4,
)


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------- validation and JSON


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"blocks": [{"kind": "rnn", "width": 8}]}, r"blocks\[0\].*Block.kind.*'mlp'"),
        ({"blocks": [{"kind": "mlp", "width": 0}]}, r"blocks\[0\].*Block.width.*integer >= 1"),
        ({"blocks": [{"kind": "mlp", "width": 2.5}]}, r"Block.width.*got 2.5"),
        ({"blocks": [{"kind": "mlp", "width": True}]}, r"Block.width"),
        ({"blocks": [{"kind": "mlp", "width": 4, "dropout": 1.0}]}, r"Block.dropout.*\[0.0, 1.0\)"),
        ({"blocks": [{"kind": "mlp", "width": 4, "residual": "yes"}]}, r"Block.residual.*true"),
        ({"blocks": [{"kind": "mlp", "width": 4, "size": 3}]}, r"blocks\[0\].*unknown.*'size'"),
        ({"blocks": [{"kind": "mlp"}]}, r"blocks\[0\].*missing.*'width'"),
        ({"blocks": ["mlp"]}, r"blocks\[0\].*mapping"),
        ({"blocks": "mlp"}, r"genome.blocks.*list"),
        ({}, r"missing field 'blocks'"),
        ({"blocks": [], "lr": 0.0}, r"Genome.lr.*\(0.0, inf\)"),
        ({"blocks": [], "lr": float("nan")}, r"Genome.lr"),
        ({"blocks": [], "momentum": 1.0}, r"Genome.momentum"),
        ({"blocks": [], "batch_size": 0}, r"Genome.batch_size"),
        ({"blocks": [], "grad_clip": -1.0}, r"Genome.grad_clip"),
        ({"blocks": [], "optimizer": "rmsprop"}, r"Genome.optimizer.*'sgd', 'adam'"),
        ({"blocks": [], "learning_rate": 0.1}, r"unknown field.*'learning_rate'"),
        ([], r"genome: expected a mapping"),
    ],
)
def test_from_dict_names_the_bad_field(data, message):
    with pytest.raises(ValueError, match=message):
        Genome.from_dict(data)


def test_from_json_rejects_invalid_json():
    with pytest.raises(ValueError, match="not valid JSON"):
        Genome.from_json("{blocks: ")


def test_unused_genes_are_canonical():
    # A GRU's nonlinearity and a non-TCN dilation do nothing: they must not split the cache.
    assert Block("gru", 8, activation="relu", dilation=4) == Block("gru", 8, activation="gelu")
    assert Block("tcn", 8, dilation=4).dilation == 4
    assert Genome((Block("lstm", 8, "silu"),)).hash == Genome((Block("lstm", 8),)).hash


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_json_round_trip_keeps_genome_and_hash(seed):
    g = random_genome(SearchSpace(), np.random.default_rng(seed))
    back = Genome.from_json(g.to_json())
    assert back == g
    assert back.hash == g.hash
    json.dumps(g.to_dict(), allow_nan=False)  # plain JSON types only


def test_hash_is_stable_across_processes_and_float_noise():
    code = (
        "from neuralsync.evolution.genome import Genome, Block;"
        "print(Genome((Block('gru', 16), Block('mlp', 8, residual=True)), lr=0.003).hash)"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    g = Genome((Block("gru", 16), Block("mlp", 8, residual=True)), lr=0.003)
    assert other == g.hash
    assert len(g.hash) == 16 and int(g.hash, 16) >= 0
    assert Genome(g.blocks, lr=0.003 * (1 + 1e-14)).hash == g.hash
    assert Genome(g.blocks, lr=0.0031).hash != g.hash


def test_architecture_hash_groups_genomes_with_identical_shapes():
    a = Genome(MIXED.blocks, lr=0.1, momentum=0.9, batch_size=8)
    b = Genome(MIXED.blocks, lr=0.001, optimizer="adam")
    assert a.architecture_hash == b.architecture_hash and a.hash != b.hash
    assert _shapes(a.build(3, 10, 2, [0, 2])) == _shapes(b.build(3, 10, 2, [0, 2]))
    wider = Genome((*MIXED.blocks[:-1], Block("mlp", 6, activation="silu", residual=True)))
    assert wider.architecture_hash != a.architecture_hash
    assert Genome((), subtract_last=False).architecture_hash != Genome(()).architecture_hash


# ---------------------------------------------------------------------- encoding


def test_encoding_has_fixed_length_and_documented_values():
    space = SearchSpace(max_blocks=5)
    n = len(encoding_names(space))
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert random_genome(space, rng).encode(space).shape == (n,)
    code = dict(zip(encoding_names(space), MIXED.encode(space), strict=True))
    assert code["log10_lr"] == pytest.approx(math.log10(3e-3))
    assert code["momentum"] == 0.5
    assert code["log10_weight_decay"] == pytest.approx(math.log10(1e-4 + 1e-8))
    assert code["n_blocks"] == 5 and code["adam"] == 0.0
    assert code["b1_kind_tcn"] == 1.0 and code["b1_kind_gru"] == 0.0
    assert code["b1_log2_width"] == 3.0 and code["b1_act_gelu"] == 1.0
    assert code["b1_residual"] == 1.0 and code["b1_log2_dilation"] == 1.0
    assert code["b0_act_tanh"] == 0.0  # a recurrent cell's activation is not a gene
    assert code["b2_dropout"] == pytest.approx(0.1)


def test_encoding_pads_empty_slots_and_refuses_too_many_blocks():
    space = SearchSpace(max_blocks=3)
    names = encoding_names(space)
    code = Genome((Block("mlp", 8),)).encode(space)
    slot_1 = [i for i, name in enumerate(names) if name.startswith(("b1_", "b2_"))]
    assert not code[slot_1].any()
    with pytest.raises(ValueError, match="at most 3"):
        MIXED.encode(space)


# ---------------------------------------------------------------------- building


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    n_inputs=st.integers(1, 4),
    lookback=st.integers(1, 12),
    horizon=st.integers(1, 4),
    data=st.data(),
)
def test_every_genome_builds_a_working_network(seed, n_inputs, lookback, horizon, data):
    g = random_genome(SMALL, np.random.default_rng(seed))
    if data.draw(st.booleans()):
        g = Genome(g.blocks, subtract_last=data.draw(st.booleans()))
    targets = data.draw(
        st.lists(st.integers(0, n_inputs - 1), min_size=1, max_size=n_inputs, unique=True)
    )
    gen = torch.Generator().manual_seed(seed)
    net = g.build(n_inputs, lookback, horizon, targets, generator=gen)
    x = torch.randn(3, lookback, n_inputs, generator=gen)
    net.train(True)
    out = net(x)
    assert out.shape == (3, horizon, len(targets))
    loss = ((out - 1.0) ** 2).mean()
    loss.backward()
    assert torch.isfinite(out).all() and torch.isfinite(loss)
    grads = [p.grad for p in net.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    if g.subtract_last:
        # The head starts at zero: an untrained network forecasts the last value.
        net.train(False)
        expected = x[:, -1:, targets].expand(3, horizon, len(targets))
        assert torch.equal(net(x), expected)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="lookback: expected an integer >= 1"):
        MIXED.build(2, 0, 1, [0])
    with pytest.raises(ValueError, match=r"target_index.*\[0, 2\)"):
        MIXED.build(2, 5, 1, [2])


@pytest.mark.parametrize(
    "config",
    [
        ModelConfig(hidden=[16, 8]),
        ModelConfig(type="linear"),
        ModelConfig(hidden=[12], activation="tanh", dropout=0.2, subtract_last=False),
    ],
)
def test_live_mlp_genome_builds_the_same_network_as_the_live_model(config):
    g = Genome.from_model_config(config)
    torch.manual_seed(3)
    live = build_module(config, 3, 6, 2, [1])
    torch.manual_seed(3)
    net = g.build(3, 6, 2, [1])
    assert isinstance(net, WindowMLP)
    assert _shapes(net) == _shapes(live)
    assert all(
        torch.equal(a, b)
        for a, b in zip(net.state_dict().values(), live.state_dict().values(), strict=True)
    )
    assert g.to_model_config(config) == config
    child = g.build(3, 6, 2, [1], generator=torch.Generator().manual_seed(0))
    assert inherit_weights(child, live) == {
        "copied": len(live.state_dict()),
        "partial": 0,
        "fresh": 0,
    }


def test_model_config_round_trip_for_other_architectures():
    base = ModelConfig(hidden=[99], fast_path=False, activation="tanh")
    cfg = MIXED.to_model_config(base)
    assert cfg.type == "genome" and cfg.genome == MIXED.to_dict()
    assert (cfg.lr, cfg.momentum, cfg.weight_decay) == (MIXED.lr, MIXED.momentum, 1e-4)
    assert cfg.dropout == 0.1  # the learner enables training mode only when dropout is set
    assert cfg.fast_path is False and cfg.hidden == [99]  # the rest comes from base
    assert Genome.from_model_config(cfg) == MIXED
    # The config's optimiser settings win over those stored in the genome.
    tuned = cfg.model_copy(update={"lr": 0.2})
    assert Genome.from_model_config(tuned).lr == 0.2
    assert Genome((Block("mlp", 8, residual=True),)).to_model_config().type == "genome"
    assert Genome((Block("mlp", 8), Block("mlp", 4, "tanh"))).to_model_config().type == "genome"


def test_describe():
    g = Genome((Block("gru", 64), Block("mlp", 32, residual=True)), lr=3.2e-3)
    assert g.describe() == "gru64>mlp32+res | sgd lr=3.2e-03"
    assert Genome((), optimizer="adam", lr=1e-3).describe() == "linear | adam lr=1.0e-03"


def test_tcn_is_causal_and_attention_sees_the_whole_window():
    x = torch.randn(2, 9, 3)
    later = x.clone()
    later[:, 6:] += 5.0
    tcn = GenomeNet((Block("tcn", 4, dilation=2),), 3, 9, 1, [0]).blocks
    assert torch.equal(tcn(x)[:, :6], tcn(later)[:, :6])
    assert not torch.equal(tcn(x)[:, 6:], tcn(later)[:, 6:])
    attention = GenomeNet((Block("attention", 4),), 3, 9, 1, [0]).blocks
    assert not torch.equal(attention(x)[:, :6], attention(later)[:, :6])


# ---------------------------------------------------------------------- seeded initialisation


def test_build_with_generator_is_reproducible_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = MIXED.build(3, 10, 2, [0], generator=torch.Generator().manual_seed(7))
    b = MIXED.build(3, 10, 2, [0], generator=torch.Generator().manual_seed(7))
    c = MIXED.build(3, 10, 2, [0], generator=torch.Generator().manual_seed(8))
    assert torch.equal(torch.get_rng_state(), state)
    assert _shapes(a) == _shapes(MIXED.build(3, 10, 2, [0]))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert sa["target_index"].tolist() == [0]
    assert all(torch.isfinite(v).all() for v in sa.values())


def test_generator_init_follows_torch_default_distributions():
    g = Genome((Block("gru", 20), Block("tcn", 10), Block("mlp", 30)))
    net = g.build(4, 12, 3, [0], generator=torch.Generator().manual_seed(0))
    gru = net.blocks[0].main.rnn
    bound = 1 / math.sqrt(20)
    for p in gru.parameters():
        assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound
    conv = net.blocks[1].main.conv
    bound = 1 / math.sqrt(20 * 3)
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound
    linear = net.blocks[2].main
    bound = 1 / math.sqrt(12 * 10)
    assert linear.weight.abs().max() <= bound
    # Uniform on ±bound has standard deviation bound/sqrt(3).
    assert float(linear.weight.detach().std()) == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert not net.head.weight.any() and not net.head.bias.any()
    free = Genome(g.blocks, subtract_last=False).build(4, 12, 3, [0], generator=torch.Generator())
    assert free.head.weight.abs().max() > 0


# ---------------------------------------------------------------------- inheritance


def test_inherit_identical_architecture_copies_everything():
    parent = MIXED.build(3, 10, 2, [0], generator=torch.Generator().manual_seed(1))
    child = MIXED.build(3, 10, 2, [0], generator=torch.Generator().manual_seed(2))
    counts = inherit_weights(child, parent)
    assert counts == {"copied": len(parent.state_dict()), "partial": 0, "fresh": 0}
    x = torch.randn(4, 10, 3)
    assert torch.equal(child(x), parent(x))


def test_inherit_resized_layers_keeps_leading_units_and_gru_gates():
    parent_g = Genome((Block("gru", 8), Block("mlp", 6)), subtract_last=False)
    child_g = Genome((Block("gru", 12), Block("mlp", 4), Block("mlp", 5)), subtract_last=False)
    gen = torch.Generator().manual_seed(0)
    parent = parent_g.build(2, 5, 1, [0], generator=gen)
    child = child_g.build(2, 5, 1, [0], generator=gen)
    fresh_before = {k: v.clone() for k, v in child.state_dict().items()}
    counts = inherit_weights(child, parent)
    p, c = parent.state_dict(), child.state_dict()
    # GRU: weight_ih (3·H, in), per gate the first 8 of 12 units come from the parent.
    w_p = p["blocks.0.main.rnn.weight_hh_l0"].view(3, 8, 8)
    w_c = c["blocks.0.main.rnn.weight_hh_l0"].view(3, 12, 12)
    assert torch.equal(w_c[:, :8, :8], w_p)
    assert torch.equal(
        w_c[:, 8:], fresh_before["blocks.0.main.rnn.weight_hh_l0"].view(3, 12, 12)[:, 8:]
    )
    # The mlp block shrank 6 → 4: its first 4 units; its input grew with the GRU (8 → 12 per step).
    assert torch.equal(c["blocks.1.main.weight"][:4, :40], p["blocks.1.main.weight"][:4, :40])
    assert torch.equal(c["blocks.1.main.bias"], p["blocks.1.main.bias"][:4])
    # The added block keeps its fresh initialisation.
    assert torch.equal(c["blocks.2.main.weight"], fresh_before["blocks.2.main.weight"])
    assert counts["fresh"] == 2  # blocks.2.main weight and bias
    assert counts["copied"] == 2  # target_index and the head bias (same shape)
    assert counts["partial"] == len(c) - 4


def test_inherit_from_a_live_mlp_into_a_mutated_genome_net():
    live = build_module(ModelConfig(hidden=[16, 8]), 3, 6, 2, [1])
    with torch.no_grad():
        live.net[-1].weight.normal_()  # a trained head: not zero any more
    child_g = Genome((Block("mlp", 16), Block("mlp", 8, residual=True)))
    child = child_g.build(3, 6, 2, [1], generator=torch.Generator().manual_seed(0))
    assert isinstance(child, GenomeNet)
    counts = inherit_weights(child, live)
    assert counts == {"copied": 7, "partial": 0, "fresh": 1}  # only the new skip projection
    p, c = live.state_dict(), child.state_dict()
    assert torch.equal(c["blocks.0.main.weight"], p["net.0.weight"])
    assert torch.equal(c["blocks.1.main.bias"], p["net.2.bias"])
    assert torch.equal(c["head.weight"], p["net.4.weight"])
    # And back: a GenomeNet parent's weights reach a WindowMLP child.
    plain = Genome((Block("mlp", 16), Block("mlp", 8))).build(3, 6, 2, [1])
    assert inherit_weights(plain, child)["copied"] == 7
    assert torch.equal(plain.state_dict()["net.4.weight"], p["net.4.weight"])


def test_inherit_with_noise_scales_with_the_parent_spread():
    parent = MIXED.build(3, 10, 2, [0], generator=torch.Generator().manual_seed(1))
    child = MIXED.build(3, 10, 2, [0])
    with pytest.raises(ValueError, match=r"torch\.Generator"):
        inherit_weights(child, parent, noise_std=0.1)
    gen = torch.Generator().manual_seed(5)
    inherit_weights(child, parent, noise_std=0.1, generator=gen)
    name = "blocks.0.main.rnn.weight_ih_l0"
    src, dst = parent.state_dict()[name], child.state_dict()[name]
    ratio = float((dst - src).std() / src.std())
    assert 0.08 < ratio < 0.12
    assert torch.equal(child.state_dict()["target_index"], parent.state_dict()["target_index"])


# ---------------------------------------------------------------------- live learner


def _learner(config: ModelConfig, seed: int = 0) -> OnlineLearner:
    torch.manual_seed(seed)
    return OnlineLearner(config, n_inputs=2, lookback=8, horizon=1, target_index=[0])


def _sine_batches(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = np.arange(n + 9)
    series = np.stack([np.sin(0.3 * t), np.cos(0.3 * t)], axis=1).astype(np.float32)
    series += rng.normal(0, 0.01, series.shape).astype(np.float32)
    for i in range(n):
        yield series[None, i : i + 8], series[None, i + 8 : i + 9, :1]


def test_online_learner_with_a_gru_genome_learns():
    config = Genome(blocks=(Block("gru", 16),), lr=0.05).to_model_config()
    assert config.type == "genome"
    learner = _learner(config)
    assert learner.module_.__class__ is GenomeNet
    batches = list(_sine_batches(300))
    losses = [learner.learn(x, y) for x, y in batches]
    assert learner.steps_ == 300
    # An untrained network is the last-value forecast; the trained one must beat it clearly.
    persistence = np.mean([(y[0, 0, 0] - x[0, -1, 0]) ** 2 for x, y in batches[-100:]])
    assert losses[0] == pytest.approx((batches[0][1][0, 0, 0] - batches[0][0][0, -1, 0]) ** 2)
    assert np.mean(losses[-100:]) < 0.1 * persistence


def test_online_learner_state_round_trip_with_a_genome():
    config = MIXED.to_model_config()
    learner = _learner(config)
    for x, y in _sine_batches(20):
        learner.learn(x, y)
    state = learner.state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    restored = OnlineLearner.from_state_dict(torch.load(buffer, weights_only=True), "cpu")
    x, y = next(_sine_batches(1, seed=3))
    assert np.array_equal(restored.predict(x), learner.predict(x))
    # MIXED has dropout: the same masks for both, from the same global seed.
    torch.manual_seed(1)
    loss_restored = restored.learn(x, y)
    torch.manual_seed(1)
    assert loss_restored == learner.learn(x, y)
    assert np.array_equal(restored.predict(x), learner.predict(x))
