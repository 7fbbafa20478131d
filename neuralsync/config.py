"""Scenario configuration: what to replay and how, validated with pydantic, loaded from YAML.

A scenario is a YAML file that names a CSV (relative to the YAML), its columns, and the
pipeline settings. Every mistake becomes a :class:`~neuralsync.errors.ConfigError` that names
the file, the line and key, and what was expected.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from neuralsync.errors import ConfigError, suggest

__all__ = [
    "AdaptationConfig",
    "DetectorConfig",
    "EvolutionConfig",
    "MetaConfig",
    "ModelConfig",
    "NormalizationConfig",
    "RollbackConfig",
    "Scenario",
    "apply_overrides",
    "load_scenario",
    "parse_override",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """The live model and how it learns online."""

    #: ``genome``: a network the evolution engine designed, described by ``genome``;
    #: ``rls``: the network mixed online with linear experts kept by recursive least squares
    #: (see ``neuralsync.rls``).
    type: Literal["mlp", "linear", "genome", "rls"] = "mlp"
    hidden: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [32])
    activation: Literal["relu", "tanh", "gelu", "silu"] = "relu"
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    #: Forecast the change from the last observed value (NLinear's "subtract last"): a model at
    #: zero weights is the last-value forecast, so a fresh or disturbed model starts from a
    #: sensible baseline instead of from noise.
    subtract_last: bool = True
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: Annotated[float, Field(gt=0.0)] = 0.01
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    grad_clip: Annotated[float, Field(gt=0.0)] | None = 1.0
    #: Samples per SGD step; 1 is plain test-then-train.
    batch_size: Annotated[int, Field(gt=0)] = 1
    #: Run forecasts and SGD steps on the compiled fast path when the model allows it (see
    #: ``neuralsync.fast``); false forces the reference torch path.
    fast_path: bool = True
    #: With ``type: genome``, the architecture as JSON (see ``neuralsync.evolution.genome``);
    #: the optimiser settings above still apply.
    genome: dict[str, Any] | None = None
    #: With ``type: rls``: ridge penalty the linear experts start from.
    rls_alpha: Annotated[float, Field(gt=0.0)] = 1.0
    #: With ``type: rls``: the linear experts' forgetting factor (1 never forgets).
    rls_forgetting: Annotated[float, Field(gt=0.0, le=1.0)] = 0.999
    #: With ``type: rls``: the window expert's forgetting factor; 1 never forgets. None: ``1 -
    #: (1 - rls_forgetting) / n_inputs`` (it has ``n_inputs`` times the channel expert's
    #: parameters, so it remembers that much longer).
    rls_window_forgetting: Annotated[float, Field(gt=0.0, le=1.0)] | None = 1.0
    #: With ``type: rls``: the window expert's ridge penalty. None: ``rls_alpha``.
    rls_window_alpha: Annotated[float, Field(gt=0.0)] | None = 100.0
    #: With ``type: rls`` and ``rls_window: levels``: the window expert's inputs are clipped,
    #: smoothly, at this many standard deviations of the rows it has learned from (``mean +
    #: c * std * tanh((x - mean) / (c * std))``), so that a level far outside them is not
    #: extrapolated. None: no clipping.
    rls_window_clip: Annotated[float, Field(gt=0.0)] | None = 3.0
    #: With ``type: rls``: how many of the window's last rows the window expert reads, every
    #: column of each. None: the whole lookback. Where the series is (close to) a first-order
    #: system, its last row holds what the window can say about the future, and a map over
    #: it has ``lookback`` times fewer weights to estimate.
    rls_window_lags: Annotated[int, Field(gt=0)] | None = None
    #: With ``type: rls``: forgetting factor, per step of the horizon, of the statistics that
    #: weight the experts (and, unless ``selection_forgetting`` is set, of the records
    #: ``rls_selection`` compares): at horizon H they forget H times slower, since
    #: neighbouring windows' targets overlap.
    mixture_forgetting: Annotated[float, Field(gt=0.0, le=1.0)] = 0.999
    #: With ``type: rls``: strengths of the mixture's prior, which pulls every expert's weight
    #: towards zero (the forecast towards the last value), each in samples of the target's
    #: mean square. One mixture per strength is kept; the forecast uses the one whose
    #: discounted out-of-sample error, over every step and target, is lowest so far.
    mixture_shrinkage: Annotated[list[Annotated[float, Field(gt=0.0)]], Field(min_length=1)] = [
        1.0,
        10.0,
        100.0,
        1000.0,
    ]
    #: With ``type: rls``: the mixture's forecast change is kept, per step and target, between
    #: the least and the greatest of the experts' forecast changes and zero (the last value),
    #: so that weights one bad row pulled far cannot forecast beyond every expert. False: the
    #: mixture as its weights say (what a checkpoint written before the setting does).
    mixture_hull: bool = True
    #: With ``type: rls``: ``mixture`` forecasts with the mixture of the experts; ``leader``, per
    #: step and target, with whichever of the mixture, each expert alone and the last value has
    #: the lowest discounted out-of-sample squared error so far; ``best``, with the one of them
    #: whose discounted error summed over every step and target is lowest (one choice for the
    #: whole forecast, steadier than one per step).
    rls_selection: Literal["mixture", "leader", "best"] = "mixture"
    #: With ``type: rls``: forgetting factor, per window, of the records ``leader`` and ``best``
    #: choose by. Not slowed down by the horizon as the mixture's statistics are: a record is
    #: one number per candidate, and it has to notice an expert that has matured (the window
    #: expert, with hundreds of weights per target, forecasts poorly for its first thousands
    #: of windows). None: the mixture's memory (``mixture_forgetting``, H times slower).
    selection_forgetting: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    #: With ``type: rls``: the window expert's inputs. ``levels``, the window's values as they
    #: are; ``relative``, each column minus its last value (blind to levels, so it never
    #: extrapolates a level the past never reached, but it cannot learn a pull towards one).
    rls_window: Literal["levels", "relative"] = "levels"


class DetectorConfig(_Strict):
    """Which river drift detector watches the live error, and its parameters."""

    type: Literal["adwin", "page_hinkley", "kswin", "none"] = "adwin"
    #: Passed to the river detector's constructor, e.g. ``{"delta": 0.002}`` for ADWIN.
    params: dict[str, Any] = Field(default_factory=dict)
    #: Detections within this many samples of the previous one (or of the start) are ignored:
    #: the error of a model that is still adapting is not a new regime.
    cooldown: Annotated[int, Field(ge=0)] = 100


class NormalizationConfig(_Strict):
    """Online normalisation of every input column, per key."""

    #: ``running``: cumulative mean and variance; ``ewm``: exponentially weighted with
    #: ``halflife`` rows; ``warmup``: fitted on the first ``warmup_rows`` rows, then frozen;
    #: ``none``: raw values.
    mode: Literal["running", "ewm", "warmup", "none"] = "running"
    warmup_rows: Annotated[int, Field(gt=1)] = 200
    halflife: Annotated[float, Field(gt=0.0)] = 1000.0


class MetaConfig(_Strict):
    """Meta-adaptation (``neuralsync.meta``): a meta-learned initialisation, adapted in a few
    steps on the data since a regime change and offered to the gate."""

    #: Use the ``meta`` adapter when ``adaptation.adapters`` names none (the default).
    enabled: bool = True
    #: ``maml`` (second order), ``fomaml`` (first order) or ``reptile``.
    algorithm: Literal["maml", "fomaml", "reptile"] = "fomaml"
    #: Learn a learning rate per parameter element for the inner loop (Meta-SGD); not with
    #: ``reptile``.
    meta_sgd: bool = True
    #: Gradient steps that adapt the meta-initialisation (k), in meta-training and at a change.
    inner_steps: Annotated[int, Field(gt=0)] = 5
    #: Inner-loop learning rate (the starting value of the per-parameter rates with Meta-SGD).
    inner_lr: Annotated[float, Field(gt=0.0)] = 0.1
    #: Largest gradient norm of an inner step; ``null`` turns clipping off.
    inner_grad_clip: Annotated[float, Field(gt=0.0)] | None = 1.0
    #: Adam step size of the meta-update.
    meta_lr: Annotated[float, Field(gt=0.0)] = 0.003
    #: Meta-updates at each regime change (bounded: they run on the stream's thread).
    meta_steps: Annotated[int, Field(ge=0)] = 20
    #: Tasks (support/query pairs from the regime memory) per meta-update.
    tasks_per_step: Annotated[int, Field(gt=0)] = 4
    #: Samples the initialisation is adapted on: the newest data since the change, at a
    #: change; the support half of a task, in meta-training.
    support_window: Annotated[int, Field(gt=0)] = 32
    #: Labelled samples after the detection to wait for before adapting (the canary window's
    #: samples come on top): the newest of the support window are then from the new regime.
    after_detection: Annotated[int, Field(ge=0)] = 16
    #: Samples after a task's support that its adapted model is scored on (meta-training).
    query_size: Annotated[int, Field(gt=0)] = 32
    #: Regimes (segments between detected changes) kept as meta-learning tasks; oldest evicted.
    memory_segments: Annotated[int, Field(gt=0)] = 8
    #: Newest samples of a regime kept in the memory.
    segment_size: Annotated[int, Field(gt=1)] = 128


class RecallConfig(_Strict):
    """Regime recall (``neuralsync.recall``): at a detection, the stored copy of the live model
    (one per past regime) that best fits the newest samples is offered to the canary gate."""

    #: Use the ``recall`` adapter when ``adaptation.adapters`` names none (the default).
    enabled: bool = True
    #: Copies of the live model kept, one stored at each detection; the oldest is evicted.
    models: Annotated[int, Field(gt=0)] = 8
    #: Newest support samples (just before the canary window) the copies are scored on.
    select: Annotated[int, Field(gt=0)] = 32
    #: Relative improvement over the live model's canary error a recalled copy must reach: a
    #: regime that truly recurs makes its own model far better than the live one.
    margin: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    #: Paired z-score (``gates.advantage_z``) a recalled copy's advantage on the canary window
    #: must also reach, as evolution's winners must: inside an extreme episode a 64-sample
    #: canary can show a margin that is noise.
    min_z: Annotated[float, Field(ge=0.0)] = 1.0


class EvolutionConfig(_Strict):
    """The evolution engine (``neuralsync.evolution``): at a regime change, a population of
    genomes (architecture and optimiser settings) is evolved in the background on the data
    since the change, and the best candidate is offered to the stability gate."""

    #: Use the ``evolution`` adapter when ``adaptation.adapters`` names none (the default).
    enabled: bool = True
    #: Candidates per generation.
    population: Annotated[int, Field(ge=2)] = 8
    #: Generations per search.
    generations: Annotated[int, Field(gt=0)] = 3
    #: Candidates drawn for each tournament (selection pressure).
    tournament_size: Annotated[int, Field(gt=0)] = 3
    #: Share of children made by crossover of two tournament winners (then mutated).
    crossover_rate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.3
    #: Chance that a child's mutation is structural (add, remove, resize, retype a block,
    #: change a block's activation, toggle a skip) rather than parametric.
    structural_rate: Annotated[float, Field(ge=0.0, le=1.0)] = 0.6
    #: Children mutate at 0.3σ, 1σ and 3σ; false mutates every child at 1σ.
    multiscale: bool = True
    #: Starting mutation scale σ (log space for learning rate and weight decay); progress
    #: shrinks it, stagnation grows it.
    sigma: Annotated[float, Field(gt=0.0)] = 0.5
    #: Chance that the best genome survives a generation unchanged; weaker ones mutate more.
    resonance_factor: Annotated[float, Field(ge=0.0, le=1.0)] = 0.7
    #: Simulated annealing of the learning rate: temperature at generation 0 and its decay.
    anneal_t0: Annotated[float, Field(ge=0.0)] = 1.0
    anneal_cooling: Annotated[float, Field(gt=0.0, le=1.0)] = 0.7
    #: Children start from their parent's trained weights where shapes match (Lamarckian).
    lamarckian: bool = True
    #: Relative noise added to inherited weights.
    inheritance_noise: Annotated[float, Field(ge=0.0)] = 0.01
    #: Use the surrogate: prefilter candidates predicted clearly worse, and the gate's risk check.
    surrogate: bool = True
    #: The gate refuses a candidate whose predicted risk (probability of being worse than
    #: the live model) is above this.
    risk_threshold: Annotated[float, Field(gt=0.0, le=1.0)] = 0.6
    #: Labelled samples after the detection to wait before the search starts, so that its
    #: data is from the new regime.
    after_detection: Annotated[int, Field(ge=0)] = 64
    #: Labelled samples between the start of a search and the delivery of its result. In
    #: ``deterministic`` mode the stream waits there for a search that has not finished, so
    #: every run makes the same swaps at the same positions; ``latency`` mode delivers as
    #: soon as the result is ready. Either way no sooner than ``canary_size`` samples, plus
    #: the label delay's gap, after the start: the gate judges a full canary window.
    result_delay: Annotated[int, Field(gt=0)] = 192
    #: The winner goes live with its own optimiser genes (learning rate, momentum, weight
    #: decay, batch size, clip). False (the default) keeps the live model's: the genes were
    #: measured in within-life training (mini-batches, several passes over the window), not
    #: online (one step per sample), and a rate tuned on a calm regime slows the recovery
    #: from the next change.
    online_genes: bool = False
    #: The gate judges a search's winner test-then-train on every sample since the search
    #: began; it goes live only if its advantage over the live model there has a paired
    #: z-score of at least this (0: any advantage). At horizons above 1 the z-score counts
    #: overlapping targets as the correlated evidence they are (``gates.advantage_z``).
    min_z: Annotated[float, Field(ge=0.0)] = 1.0
    #: Labelled samples a search learns from and is scored on: the newest at its start.
    window: Annotated[int, Field(ge=16)] = 256
    mode: Literal["deterministic", "latency"] = "deterministic"
    #: How a candidate is scored on the fitness slice: ``prequential``, its mean error in one
    #: test-then-train pass with the settings it would have live (how it would do if swapped
    #: in); ``holdout``, its loss on the slice after within-life training.
    fitness: Literal["prequential", "holdout"] = "prequential"
    #: Share of the search data held out as the fitness slice (the newest samples).
    fitness_fraction: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.25
    #: Which block types structural mutation may use. MLP blocks by default: an MLP winner
    #: keeps the compiled live path, and on the bundled ``recurring`` scenario a recurrent
    #: winner that won its canary and probation lost over the regimes that followed (see
    #: docs/evolution.md); the other kinds are one setting away.
    block_kinds: list[Literal["mlp", "gru", "lstm", "tcn", "attention"]] = Field(
        default_factory=lambda: ["mlp"]
    )
    #: Largest number of blocks in a genome.
    max_blocks: Annotated[int, Field(gt=0)] = 3


class RollbackConfig(_Strict):
    """After a swap, the replaced model keeps learning in the shadow for a probation window;
    if the new one's error over the window is worse by ``margin``, the old one comes back."""

    enabled: bool = True
    window: Annotated[int, Field(gt=0)] = 128
    margin: Annotated[float, Field(ge=0.0)] = 0.05


class AdaptationConfig(_Strict):
    """Who reacts to a regime change, and the canary check their proposals must pass."""

    #: Names of the adapters that react to a regime change (see ``neuralsync.adaptation``).
    #: Empty (the default) means regime recall, meta-adaptation and evolution, each while its
    #: ``enabled`` is true.
    adapters: list[str] = Field(default_factory=list)
    #: Labelled samples just before the canary window that adapters may train on.
    support_size: Annotated[int, Field(gt=0)] = 256
    #: Most recent labelled samples a proposal is scored on; it may not train on them.
    canary_size: Annotated[int, Field(gt=0)] = 64
    #: Relative improvement over the live model's error a proposal must reach to go live.
    margin: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    #: A proposal scored on the canary window (meta-adaptation's) goes live only if its
    #: advantage there has a paired z-score of at least this (``gates.advantage_z``, which
    #: counts overlapping horizon-step targets as the correlated evidence they are); 0 takes
    #: any advantage.
    min_z: Annotated[float, Field(ge=0.0)] = 0.0
    #: Regime recall settings.
    recall: RecallConfig = Field(default_factory=RecallConfig)
    #: Meta-adaptation settings.
    meta: MetaConfig = Field(default_factory=MetaConfig)
    #: Evolution settings.
    evolution: EvolutionConfig = Field(default_factory=EvolutionConfig)
    #: Rolling back a swap that made things worse.
    rollback: RollbackConfig = Field(default_factory=RollbackConfig)


class Scenario(_Strict):
    """A replayable scenario: the data, its columns, and the pipeline settings.

    Paths are resolved relative to the YAML file that holds them.

    >>> s = Scenario(name="demo", csv="prices.csv", timestamp="time", targets="close")
    >>> s.targets, s.inputs, s.effective_label_delay
    (['close'], ['close'], 1)

    """

    name: str
    description: str = ""
    #: The CSV that `neuralsync replay` reads; not needed when a DataFrame or other source feeds
    #: the pipeline directly.
    csv: Path | None = None
    timestamp: str
    #: strftime format of the timestamp column; inferred when omitted. Numeric columns are
    #: taken as plain numbers (seconds, steps).
    timestamp_format: str | None = None
    features: list[str] = Field(default_factory=list)
    targets: list[str]
    key: str | None = None
    lookback: Annotated[int, Field(gt=0)] = 32
    horizon: Annotated[int, Field(gt=0)] = 1
    #: Rows after a forecast until its truth may be learned from; defaults to ``horizon`` (the
    #: whole horizon observed). Larger values model truth that is published late.
    label_delay: Annotated[int, Field(gt=0)] | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    normalization: NormalizationConfig = Field(default_factory=NormalizationConfig)
    adaptation: AdaptationConfig = Field(default_factory=AdaptationConfig)
    #: ``error`` stops with the file and line; ``drop`` skips the row; ``ffill`` repeats the
    #: key's last value. Dropped and filled cells are counted in metrics.json.
    missing: Literal["error", "drop", "ffill"] = "error"
    #: Rows that cannot be used (non-numeric, infinite, out of order): ``error`` stops with the
    #: file and line; ``dead_letter`` writes them with the reason to dead_letter.jsonl and goes on.
    bad_records: Literal["error", "dead_letter"] = "error"
    #: Timestamps of the true regime changes (a JSON file beside the CSV, or a list).
    change_points: Path | list[Any] | None = None
    #: A detection counts for a true change when it comes within this many rows after it.
    change_point_tolerance: Annotated[int, Field(gt=0)] = 300
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    #: Torch threads; 1 is fastest for batch-1 work on small CPUs. ``None`` leaves torch's choice.
    num_threads: Annotated[int, Field(gt=0)] | None = 1
    checkpoint_every: Annotated[int, Field(gt=0)] = 2000
    chunk_size: Annotated[int, Field(gt=0)] = 4096
    #: Replay at this multiple of real time (stream seconds per wall second); ``None`` is as
    #: fast as possible.
    realtime_factor: Annotated[float, Field(gt=0.0)] | None = None

    @field_validator("targets", "features", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_columns(self) -> Scenario:
        if not self.targets:
            raise ValueError("at least one target column is required")
        named = [self.timestamp, *self.inputs] + ([self.key] if self.key else [])
        duplicated = {c for c in named if named.count(c) > 1 and c not in self.targets}
        if self.timestamp in self.inputs or (self.key and self.key in self.inputs):
            duplicated.add(self.timestamp if self.timestamp in self.inputs else self.key)
        if duplicated:
            raise ValueError(f"columns used twice: {sorted(duplicated)}")
        if self.label_delay is not None and self.label_delay < self.horizon:
            raise ValueError(
                f"label_delay ({self.label_delay}) must be at least horizon ({self.horizon}): "
                "a forecast can only be learned from once its whole horizon is observed"
            )
        return self

    @property
    def inputs(self) -> list[str]:
        """Model input columns: the features, then the targets' own past values."""
        return list(self.features) + [t for t in self.targets if t not in self.features]

    @property
    def effective_label_delay(self) -> int:
        return self.label_delay if self.label_delay is not None else self.horizon

    def resolve_paths(self, base: Path) -> Scenario:
        """Return a copy whose relative paths are taken relative to ``base``."""
        updates: dict[str, Any] = {}
        if self.csv is not None and not self.csv.is_absolute():
            updates["csv"] = (base / self.csv).resolve()
        if isinstance(self.change_points, Path) and not self.change_points.is_absolute():
            updates["change_points"] = (base / self.change_points).resolve()
        return self.model_copy(update=updates)

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run that wrote the checkpoint."""
        return self.model_dump(
            mode="json", exclude={"description", "realtime_factor", "chunk_size", "name"}
        )


# ---------------------------------------------------------------------------------------------
# Loading, with error messages that point at the file, line and key


def _yaml_key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path of a YAML mapping to its 1-based line, for error messages."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key_path = (*path, str(key_node.value))
                lines[key_path] = key_node.start_mark.line + 1
                walk(value_node, key_path)

    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return lines
    if root is not None:
        walk(root, ())
    return lines


def _field_names(model: type[BaseModel], path: tuple[str, ...]) -> list[str]:
    """Valid option names at ``path`` inside ``model``, for "did you mean" hints."""
    for part in path:
        field = model.model_fields.get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _describe_validation_error(
    error: ValidationError,
    origin: str,
    key_lines: dict[tuple[str, ...], int],
    overridden: frozenset[tuple[str, ...]] = frozenset(),
) -> str:
    messages = []
    for item in error.errors():
        path = tuple(str(p) for p in item["loc"])
        where = origin
        line = key_lines.get(path) or key_lines.get(path[:-1])
        if line:
            where = f"{origin}:{line}"
        from_command_line = any(path[: len(o)] == o for o in overridden)
        if from_command_line:
            where = "command line"
        dotted = ".".join(path) or "(top level)"
        if not path:
            messages.append(f"{where}: {item['msg'].removeprefix('Value error, ')}")
        elif item["type"] == "extra_forbidden":
            names = _field_names(Scenario, path[:-1])
            if from_command_line:  # --set takes the dotted name
                names = [".".join((*path[:-1], name)) for name in names]
            hint = suggest(dotted if from_command_line else path[-1], names)
            valid = ", ".join(_field_names(Scenario, path[:-1]))
            messages.append(f"{where}: unknown option '{dotted}'{hint}; valid options: {valid}")
        elif item["type"] == "missing":
            messages.append(f"{where}: required option '{dotted}' is missing")
        else:
            got = item.get("input")
            got_text = "" if isinstance(got, dict) else f" (got {got!r})"
            messages.append(f"{where}: option '{dotted}': {item['msg']}{got_text}")
    return "\n".join(messages)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse a ``--set`` override ``dotted.key=value``; the value is read as a YAML scalar.

    >>> parse_override("model.lr=0.05")
    (['model', 'lr'], 0.05)
    >>> parse_override("detector.type=kswin")
    (['detector', 'type'], 'kswin')

    """
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set model.lr=0.01")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: the key before '=' is empty")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({exc})") from None
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``{"model.lr": 0.05}``-style overrides applied.

    >>> apply_overrides({"model": {"lr": 0.1}}, {"model.lr": 0.05, "seed": 3})
    {'model': {'lr': 0.05}, 'seed': 3}

    """
    merged = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = merged
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return merged


def load_scenario(path: str | Path, overrides: dict[str, Any] | None = None) -> Scenario:
    """Load and validate a scenario YAML, applying ``overrides`` (dotted keys) on top.

    Raises
    ------
    ConfigError
        For a missing or malformed file, an unknown or invalid option; the message names the
        file, the line and the key, and what was expected.

    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: scenario file not found")
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: malformed YAML: {problem}") from None
    if raw is None:
        raise ConfigError(f"{path}: the scenario file is empty; expected a mapping of options")
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: expected a mapping of options at the top level, got {type(raw).__name__}"
        )
    raw.setdefault("name", path.stem)
    raw = apply_overrides(raw, overrides or {})
    try:
        scenario = Scenario.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(
            _describe_validation_error(
                exc,
                str(path),
                _yaml_key_lines(text),
                frozenset(tuple(k.split(".")) for k in overrides or {}),
            )
        ) from None
    return scenario.resolve_paths(path.parent)
