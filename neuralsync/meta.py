"""Meta-adaptation: a meta-learned initialisation that recovers from a regime change in k steps.

Three parts, each usable alone:

- :class:`RegimeMemory` keeps the segments between detected regime changes (the newest
  samples of each, within a bound on segments) and cuts them into meta-learning tasks: a
  support window and the query window right after it, in time order.
- :func:`meta_gradient` and :class:`MetaLearner` train the initialisation on those tasks with
  ``torch.func``: second-order MAML, first-order MAML (FOMAML) or Reptile, optionally with a
  learned learning rate per parameter element (Meta-SGD). Parameters are a dict of tensors
  and the loss a pure function of them, as in PyTorch's ``functorch`` MAML example.
- :class:`MetaAdapter` is the pipeline's adapter: at a regime change it stores the regime that
  ended, runs a bounded number of meta-updates, adapts the initialisation with k gradient steps
  on the newest samples (the support window, data since the change) and proposes the result to
  the gate. Its whole state (initialisation, inner rates, optimiser, memory, counters) is in
  :meth:`MetaAdapter.state_dict`, so a resumed run continues bit-identically.

Meta-training runs on the stream's thread, at the regime change, for ``meta_steps`` updates:
deterministic by construction, and cheap on the window MLP (``docs/adaptation.md`` has the
measured cost). A background thread would have to be joined at a fixed stream position to keep
resume exact, for a saving of a few hundred milliseconds per regime change.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap
from torch.utils._pytree import tree_map

from neuralsync.base import Adapter, Deferred, Proposal, RegimeChange
from neuralsync.config import MetaConfig, Scenario
from neuralsync.learner import OnlineLearner

__all__ = [
    "MetaAdapter",
    "MetaLearner",
    "RegimeMemory",
    "adapt",
    "meta_gradient",
    "mse_loss",
]

Params = dict[str, torch.Tensor]
Task = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def mse_loss(module: nn.Module, params: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error of ``module`` run with ``params`` on windows ``x`` against ``y``."""
    return ((functional_call(module, params, (x,)) - y) ** 2).mean()


def adapt(
    module: nn.Module,
    params: Params,
    rates: dict[str, torch.Tensor | float],
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    *,
    first_order: bool = False,
    clip: float | None = None,
) -> Params:
    """``steps`` gradient steps of the MSE on ``(x, y)`` from ``params``: the inner loop.

    ``rates`` holds a learning rate per parameter, a number or a tensor of the parameter's shape
    (Meta-SGD). Differentiable in ``params`` and ``rates`` (through the inner gradients too,
    unless ``first_order``, which treats them as constants: FOMAML). ``clip`` scales each
    step's gradient down to that norm at most, as the live learner's ``grad_clip`` does: a
    step too large for one task would otherwise blow the whole meta-update up.

    >>> net = nn.Linear(2, 1)
    >>> params = {k: v.detach() for k, v in net.named_parameters()}
    >>> x, y = torch.randn(16, 2), torch.randn(16, 1)
    >>> after = adapt(net, params, {k: 0.1 for k in params}, x, y, steps=20)
    >>> bool(mse_loss(net, after, x, y) < mse_loss(net, params, x, y))
    True

    """
    loss_grad = grad(lambda p: mse_loss(module, p, x, y))
    for _ in range(steps):
        gradients = loss_grad(params)
        if first_order:
            gradients = {k: g.detach() for k, g in gradients.items()}
        if clip is not None:
            norm = torch.sqrt(sum((g * g).sum() for g in gradients.values()))
            scale = torch.clamp(clip / (norm + 1e-12), max=1.0)
            gradients = {k: g * scale for k, g in gradients.items()}
        params = {k: params[k] - rates[k] * gradients[k] for k in params}
    return params


def meta_gradient(
    module: nn.Module,
    init: Params,
    rates: Params | None,
    tasks: list[Task],
    *,
    algorithm: str = "maml",
    inner_steps: int = 5,
    inner_lr: float = 0.1,
    clip: float | None = None,
) -> tuple[Params, Params | None, float]:
    """The meta-gradient of the initialisation (and of the inner rates), averaged over tasks.

    Each task is ``(support_x, support_y, query_x, query_y)``. The meta-loss of a task is the
    query MSE after adapting ``init`` on the support with ``inner_steps`` steps.

    - ``maml``: the exact gradient of the meta-loss, second-order terms included (grad of a
      function that itself takes gradients);
    - ``fomaml``: the same with the inner gradients held constant (first order);
    - ``reptile``: not a gradient but the direction ``init - adapted``, adapting on support and
      query together; an optimiser step along it moves ``init`` towards the adapted weights.

    ``rates`` (Meta-SGD) are per-element inner learning rates with the shapes of ``init``;
    ``None`` uses ``inner_lr`` everywhere and returns ``None`` as their gradient. Reptile
    ignores them. Returns ``(init gradient, rates gradient, mean query loss after adapting)``.
    """
    if algorithm not in ("maml", "fomaml", "reptile"):
        raise ValueError(f"unknown meta-learning algorithm {algorithm!r}")
    fixed = {k: inner_lr for k in init}

    def task_loss(meta: dict[str, Params], sx, sy, qx, qy) -> torch.Tensor:
        adapted = adapt(
            module,
            meta["init"],
            meta.get("rates", fixed),
            sx,
            sy,
            inner_steps,
            first_order=algorithm == "fomaml",
            clip=clip,
        )
        return mse_loss(module, adapted, qx, qy)

    def reptile_direction(params: Params, sx, sy, qx, qy) -> tuple[Params, torch.Tensor]:
        x, y = torch.cat([sx, qx]), torch.cat([sy, qy])
        adapted = adapt(module, params, fixed, x, y, inner_steps, clip=clip)
        scored = adapt(module, params, fixed, sx, sy, inner_steps, clip=clip)
        return {k: params[k] - adapted[k] for k in params}, mse_loss(module, scored, qx, qy)

    meta: dict[str, Params] = {"init": init}
    if rates is not None and algorithm != "reptile":
        meta["rates"] = rates
    if algorithm == "reptile":
        per_task = reptile_direction
        head: Any = init
    else:
        per_task = grad_and_value(task_loss)
        head = meta
    if len({tuple(tuple(t.shape) for t in task) for task in tasks}) == 1:
        # Tasks of one shape run batched: vmap over the task axis is several times faster
        # than a loop (one dispatch per operation instead of one per task and operation).
        stacked = [torch.stack([task[i] for task in tasks]) for i in range(4)]
        gradients, losses = vmap(per_task, in_dims=(None, 0, 0, 0, 0))(head, *stacked)
        gradients = tree_map(lambda g: g.mean(0), gradients)
        loss = float(losses.mean())
    else:
        results = [per_task(head, *task) for task in tasks]
        gradients = tree_map(lambda *g: torch.stack(g).mean(0), *[r[0] for r in results])
        loss = sum(float(r[1]) for r in results) / max(len(results), 1)
    if algorithm == "reptile":
        return {k: g.detach() for k, g in gradients.items()}, None, loss
    rate_grad = gradients.get("rates")
    return gradients["init"], rate_grad, loss


class RegimeMemory:
    """The segments between detected regime changes, kept as meta-learning tasks.

    Each segment holds the newest ``segment_size`` samples of one regime, oldest first. Past
    ``max_segments`` the oldest segment is evicted. A task is a support window and the query
    window right after it, cut from one segment: the query is always later than the support.

    >>> memory = RegimeMemory(max_segments=2, segment_size=100)
    >>> for level in (0.0, 1.0, 2.0):
    ...     memory.add(torch.full((150, 4, 1), level), torch.full((150, 1, 1), level))
    >>> [len(x) for x, _ in memory.segments], [float(x[0, 0, 0]) for x, _ in memory.segments]
    ([100, 100], [1.0, 2.0])
    >>> tasks = memory.sample_tasks(3, support=16, query=8, generator=torch.Generator())
    >>> [tuple(t.shape[0] for t in task) for task in tasks][0]
    (16, 16, 8, 8)

    """

    def __init__(self, max_segments: int = 8, segment_size: int = 128):
        self.max_segments = max_segments
        self.segment_size = segment_size
        self.segments: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __len__(self) -> int:
        return len(self.segments)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Keep a regime's samples (time order); the oldest segment goes when full."""
        self.segments.append(
            (x[-self.segment_size :].detach().clone(), y[-self.segment_size :].detach().clone())
        )
        del self.segments[: max(0, len(self.segments) - self.max_segments)]

    def sample_tasks(
        self, n: int, support: int, query: int, generator: torch.Generator, gap: int = 0
    ) -> list[Task]:
        """``n`` tasks, each from a segment drawn at random, at a random place in it.

        ``gap`` samples separate the support from the query: with forecasts ``H`` steps ahead,
        neighbouring samples share ``H - 1`` target steps, and a query right after its support
        would reward an adaptation for memorising targets the query repeats (at a regime
        change the live model's next forecasts are issued before those targets are known).
        A segment shorter than ``support + gap + query`` gives proportionally shorter windows.
        """
        tasks: list[Task] = []
        if not self.segments:
            return tasks
        for _ in range(n):
            index = int(torch.randint(len(self.segments), (1,), generator=generator))
            x, y = self.segments[index]
            length = len(x)
            g = min(gap, max(0, length - 2))
            s, q = support, query
            if s + g + q > length:
                s = max(1, (length - g) * support // (support + query))
                q = max(1, length - g - s)
            start = int(torch.randint(length - s - g - q + 1, (1,), generator=generator))
            middle, begin, end = start + s, start + s + g, start + s + g + q
            tasks.append((x[start:middle], y[start:middle], x[begin:end], y[begin:end]))
        return tasks

    def state_dict(self) -> dict[str, Any]:
        return {"x": [x for x, _ in self.segments], "y": [y for _, y in self.segments]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.segments = [
            (x.clone(), y.clone()) for x, y in zip(state["x"], state["y"], strict=True)
        ]


class MetaLearner:
    """A meta-initialisation (and Meta-SGD rates) trained by Adam on meta-gradients.

    Parameters
    ----------
    module
        A network whose parameter names and shapes the initialisation has; used only as the
        function that :func:`torch.func.functional_call` runs.
    init
        Starting initialisation (copied).
    config
        Algorithm, inner steps and rates, meta learning rate.

    """

    def __init__(self, module: nn.Module, init: Params, config: MetaConfig):
        self.module = module
        self.config = config
        self.init = {k: v.detach().clone() for k, v in init.items()}
        self.rates: Params | None = None
        if config.meta_sgd and config.algorithm != "reptile":
            self.rates = {k: torch.full_like(v, config.inner_lr) for k, v in self.init.items()}
        self.optimizer = torch.optim.Adam(self._leaves(), lr=config.meta_lr)
        self.skipped_ = 0

    def _leaves(self) -> list[torch.Tensor]:
        leaves = list(self.init.values()) + list((self.rates or {}).values())
        for leaf in leaves:
            leaf.requires_grad_(False)
        return leaves

    def step(self, tasks: list[Task]) -> float:
        """One meta-update on ``tasks``; returns their mean query loss before it."""
        c = self.config
        init_grad, rate_grad, loss = meta_gradient(
            self.module,
            self.init,
            self.rates,
            tasks,
            algorithm=c.algorithm,
            inner_steps=c.inner_steps,
            inner_lr=c.inner_lr,
            clip=c.inner_grad_clip,
        )
        finite = all(bool(torch.isfinite(g).all()) for g in init_grad.values()) and all(
            bool(torch.isfinite(g).all()) for g in (rate_grad or {}).values()
        )
        if not finite:  # a task that diverged: skip the update, keep the initialisation
            self.skipped_ += 1
            return loss
        for k, leaf in self.init.items():
            leaf.grad = init_grad[k]
        if self.rates is not None and rate_grad is not None:
            for k, leaf in self.rates.items():
                leaf.grad = rate_grad[k]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.rates is not None:
            for leaf in self.rates.values():
                leaf.clamp_(min=0.0)  # a negative rate would climb the loss
        return loss

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> Params:
        """The initialisation after ``inner_steps`` steps on ``(x, y)`` (detached)."""
        rates = self.rates or {k: self.config.inner_lr for k in self.init}
        steps, clip = self.config.inner_steps, self.config.inner_grad_clip
        adapted = adapt(self.module, self.init, rates, x, y, steps, clip=clip)
        return {k: v.detach() for k, v in adapted.items()}

    def state_dict(self) -> dict[str, Any]:
        return {
            "init": dict(self.init),
            "rates": None if self.rates is None else dict(self.rates),
            "optimizer": self.optimizer.state_dict(),
            "skipped": self.skipped_,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.init = {k: v.detach().clone() for k, v in state["init"].items()}
        rates = state["rates"]
        self.rates = None if rates is None else {k: v.detach().clone() for k, v in rates.items()}
        self.optimizer = torch.optim.Adam(self._leaves(), lr=self.config.meta_lr)
        self.optimizer.load_state_dict(state["optimizer"])
        self.skipped_ = int(state["skipped"])


class MetaAdapter(Adapter):
    """At a regime change, propose the meta-initialisation adapted on the newest samples.

    The pipeline consults it ``support_delay`` labelled samples after the detection (the
    canary window plus ``after_detection``), so that the newest samples of its support window
    come from after the detection, and the ones just before them most likely from after the
    change (detectors need a few dozen samples to fire). It then:

    1. stores the regime that ended (the support samples from before the detection, since the
       previous change) in the :class:`RegimeMemory`;
    2. runs ``meta_steps`` meta-updates on tasks drawn from the memory (the first change
       starts the initialisation from the live model's weights);
    3. adapts the initialisation with ``inner_steps`` gradient steps on the newest
       ``support_window`` samples and proposes it; the pipeline emits ``meta_adapt``, then
       ``gate_decision`` (and ``swap`` when the canary check accepts it). For an ``rls`` live
       model only the network is adapted and the proposal keeps the live experts, which have
       learned the canary window: it is returned as a :class:`~neuralsync.base.Deferred`,
       judged on the samples that arrive next (:meth:`resume` rebuilds it from a snapshot).

    Parameters
    ----------
    config
        The meta-adaptation settings (``adaptation.meta`` of a scenario).
    canary_size
        The pipeline's canary window (``adaptation.canary_size``).
    seed
        Seeds the task sampling (with the number of meta-updates so far, so no generator state
        needs saving).

    Examples
    --------
    >>> from neuralsync.config import MetaConfig, ModelConfig
    >>> _ = torch.manual_seed(0)
    >>> live = OnlineLearner(ModelConfig(hidden=[8]), n_inputs=1, lookback=4, horizon=1,
    ...                      target_index=[0])
    >>> adapter = MetaAdapter(MetaConfig(meta_steps=3, support_window=8, query_size=8),
    ...                       canary_size=16)
    >>> adapter.support_delay
    32
    >>> x = torch.randn(64, 4, 1)
    >>> proposal = adapter.on_regime_change(None, live, x, x[:, -1:, :] * -0.5)
    >>> proposal.event, proposal.details["steps"], proposal.details["support_size"]
    ('meta_adapt', 5, 8)
    >>> adapter.meta_updates_, len(adapter.memory)
    (3, 1)

    """

    name = "meta"

    def __init__(self, config: MetaConfig | None = None, canary_size: int = 64, seed: int = 0):
        self.config = config or MetaConfig()
        self.canary_size = canary_size
        self.seed = seed
        self.support_delay = canary_size + self.config.after_detection
        self.memory = RegimeMemory(self.config.memory_segments, self.config.segment_size)
        self.learner_: MetaLearner | None = None
        self.meta_updates_ = 0
        self.changes_ = 0
        self.last_change_position_: int | None = None

    @classmethod
    def from_scenario(cls, scenario: Scenario) -> MetaAdapter:
        a = scenario.adaptation
        return cls(a.meta, canary_size=a.canary_size, seed=scenario.seed)

    def _meta_learner(self, live: OnlineLearner) -> MetaLearner:
        module = copy.deepcopy(live.module_)
        params = {k: v.detach().clone() for k, v in module.named_parameters()}
        learner = self.learner_
        if learner is None or {k: v.shape for k, v in learner.init.items()} != {
            k: v.shape for k, v in params.items()
        }:  # the first change, or a live model of another shape: start from the live weights
            learner = self.learner_ = MetaLearner(module, params, self.config)
        learner.module = module
        return learner

    def on_regime_change(
        self,
        change: RegimeChange | None,
        live: OnlineLearner,
        support_x: torch.Tensor,
        support_y: torch.Tensor,
    ) -> Proposal | Deferred:
        c = self.config
        device = live.device
        support_x = support_x.to(device, torch.float32)
        support_y = support_y.to(device, torch.float32)
        n = len(support_x)
        # The newest samples of the support came after the detection (the pipeline waited for
        # them); older ones, back to the previous change, belong to the regime that ended. The
        # samples between the change and its detection cannot be told apart: a guard of one
        # support window drops most of them.
        after = min(n, max(0, self.support_delay - self.canary_size))
        ended = n - after - c.support_window
        if change is not None and self.last_change_position_ is not None:
            ended = min(ended, change.position - self.last_change_position_)
        if ended >= 2:
            stop = n - after - c.support_window
            self.memory.add(support_x[stop - ended : stop], support_y[stop - ended : stop])
        meta = self._meta_learner(live)
        losses = []
        for _ in range(c.meta_steps if len(self.memory) else 0):
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.meta_updates_)
            tasks = self.memory.sample_tasks(
                c.tasks_per_step, c.support_window, c.query_size, generator, gap=live.horizon - 1
            )
            losses.append(meta.step([tuple(t.to(device) for t in task) for task in tasks]))
            self.meta_updates_ += 1
        window_x, window_y = support_x[-c.support_window :], support_y[-c.support_window :]
        adapted = meta.adapt(window_x, window_y)
        before = float(mse_loss(meta.module, meta.init, window_x, window_y))
        after_loss = float(mse_loss(meta.module, adapted, window_x, window_y))
        self.changes_ += 1
        if change is not None:
            self.last_change_position_ = change.position
        details = {
            "algorithm": c.algorithm,
            "meta_sgd": meta.rates is not None,
            "steps": c.inner_steps,
            "support_size": len(window_x),
            "support_mse_before": before,
            "support_mse_after": after_loss,
            "meta_updates": self.meta_updates_,
            "meta_query_mse": losses[-1] if losses else None,
            "memory_segments": len(self.memory),
        }
        if hasattr(live, "with_network"):
            # A live model with more than its network (rls): only its network is adapted, and
            # the proposal keeps the live linear experts, which have already learned the
            # canary window. Judged on it, the proposal would win on hindsight (and, accepted,
            # learn it twice), so it is judged later, on samples neither model has seen.
            job = {
                "live": copy.deepcopy(live.state_dict()),
                "network": {k: v.detach().clone() for k, v in adapted.items()},
                "details": details,
                "device": str(device),
            }
            return self.resume(job)
        proposal = OnlineLearner(
            live.config, live.n_inputs, live.lookback, live.horizon, live.target_index, device
        )
        with torch.no_grad():
            for name, param in proposal.module_.named_parameters():
                param.copy_(adapted[name])
        return Proposal(proposal, self.name, details, event="meta_adapt")

    def resume(self, job: dict[str, Any]) -> Deferred:
        """The proposal ``job`` describes, already worked out: an rls live model, as it was at
        the consultation, with the adapted network. Nothing runs in the background; the
        pipeline delivers it a canary window later."""
        from neuralsync.rls import learner_from_state_dict

        live = learner_from_state_dict(job["live"], torch.device(job["device"]))
        module = copy.deepcopy(live.module_)
        with torch.no_grad():
            for name, param in module.named_parameters():
                param.copy_(job["network"][name])
        future: Future[Proposal | None] = Future()
        future.set_result(
            Proposal(live.with_network(module), self.name, dict(job["details"]), event="meta_adapt")
        )
        return Deferred(future, job)

    def state_dict(self) -> dict[str, Any]:
        return {
            "learner": None if self.learner_ is None else self.learner_.state_dict(),
            "memory": self.memory.state_dict(),
            "meta_updates": self.meta_updates_,
            "changes": self.changes_,
            "last_change_position": self.last_change_position_,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.memory.load_state_dict(state["memory"])
        self.meta_updates_ = int(state["meta_updates"])
        self.changes_ = int(state["changes"])
        self.last_change_position_ = state["last_change_position"]
        learner = state["learner"]
        if learner is None:
            self.learner_ = None
            return
        # The module is only the function run on the parameters: any network of their shapes.
        self.learner_ = MetaLearner.__new__(MetaLearner)
        self.learner_.module = None  # type: ignore[assignment]  # set from the live model
        self.learner_.config = self.config
        self.learner_.load_state_dict(learner)


#: Factory of the ``meta`` adapter, by scenario (see :data:`neuralsync.adaptation.ADAPTERS`).
make_meta_adapter: Callable[[Scenario], MetaAdapter] = MetaAdapter.from_scenario
