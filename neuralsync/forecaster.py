"""The library facade: the whole pipeline behind river's time-series verbs.

:class:`OnlineForecaster` is what a backtest, a notebook or a trading loop calls bar by bar:
``learn_one(y, x)`` observes the newest values, ``forecast(horizon)`` returns the next ones.
It drives the very same :class:`~neuralsync.pipeline.Pipeline` as ``neuralsync replay``, one
row per call, so it keeps the same contracts: no look-ahead (a value is learned from only once
it completes a forecast's horizon), determinism, one snapshot of the whole state, and every
decision an event.
"""

from __future__ import annotations

import datetime as dt
import io
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import ValidationError

from neuralsync.base import Adapter, Batch, Gate
from neuralsync.config import Scenario, _describe_validation_error, load_scenario
from neuralsync.errors import CheckpointError, ConfigError, DataError, StreamOrderError, suggest
from neuralsync.events import Event, EventBus, format_stream_time
from neuralsync.pipeline import Pipeline
from neuralsync.sources import frame_to_batch
from neuralsync.state import FORMAT_VERSION

__all__ = ["OnlineForecaster"]

#: The scenario of ``OnlineForecaster()``: one float series ``y`` with a step count as time.
DEFAULT_SETTINGS: dict[str, Any] = {"name": "online", "timestamp": "t", "targets": ["y"]}
_SNAPSHOT_KIND = "neuralsync.OnlineForecaster"


class OnlineForecaster:
    """Forecast a stream online, learning from each value once its truth has arrived.

    The pipeline of ``neuralsync replay`` (online normalisation, the live model, the label
    delay, regime detection, adapters and their canary gate) behind river's forecaster verbs.
    Each :meth:`learn_one` is one row of the stream; :meth:`forecast` returns the forecast the
    live model issued at that row, made from that row and earlier ones only.

    Parameters
    ----------
    scenario
        The settings, as for the command line: a :class:`~neuralsync.config.Scenario`, a
        scenario YAML path, or the name of a bundled scenario. ``None``: one float series
        ``y`` with numbered steps as time, every other setting at its default.
    adapters
        Components that react to a regime change; default: those the scenario names.
    gate
        Decides on the adapters' proposals; default: the canary comparison.
    **options
        Scenario options set on top, e.g. ``lookback=16, horizon=3, model={"lr": 0.05}``
        (nested mappings update the scenario's, they do not replace them).

    Examples
    --------
    >>> import math
    >>> from neuralsync import OnlineForecaster
    >>> model = OnlineForecaster(lookback=8, horizon=3, detector={"type": "none"})
    >>> for t in range(300):
    ...     model.learn_one(math.sin(t / 5))
    >>> [round(v, 2) for v in model.forecast(3)]  # at t = 299, for t = 300, 301, 302
    [-0.25, -0.36, -0.45]
    >>> [round(math.sin(t / 5), 2) for t in (300, 301, 302)]
    [-0.3, -0.49, -0.65]
    >>> scores = model.metrics()
    >>> scores["mse"] < scores["baseline_last_value"]["mse"]  # beats "next = last value"
    True
    >>> model.learn_one(0.5, t=299)
    Traceback (most recent call last):
    ...
    neuralsync.errors.StreamOrderError: learn_one: timestamp 299.0 is not after the last one ...

    """

    def __init__(
        self,
        scenario: Scenario | str | Path | None = None,
        *,
        adapters: Sequence[Adapter] | None = None,
        gate: Gate | None = None,
        **options: Any,
    ):
        self.scenario = _build_scenario(scenario, options)
        if adapters is None:
            from neuralsync.adaptation import build_adapters

            adapters = build_adapters(self.scenario)
        self.pipeline = Pipeline(self.scenario, adapters=adapters, gate=gate)
        self._inputs = self.scenario.inputs
        self._targets = self.scenario.targets
        self._features = list(self.scenario.features)
        self._target_columns = [self._inputs.index(t) for t in self._targets]
        self._feature_columns = [self._inputs.index(f) for f in self._features]

    # -- properties -------------------------------------------------------------------------

    @property
    def events(self) -> EventBus:
        """Every decision, as in a replay's ``events.jsonl``: ``events.subscribe(callback)``."""
        return self.pipeline.events

    @property
    def horizon(self) -> int:
        """Steps each forecast covers (the scenario's ``horizon``)."""
        return self.scenario.horizon

    @property
    def lookback(self) -> int:
        """Values of a series observed before its first forecast."""
        return self.scenario.lookback

    @property
    def frozen(self) -> bool:
        """Whether the model has stopped learning (see :meth:`freeze`)."""
        return self.pipeline.frozen

    def __repr__(self) -> str:
        return (
            f"OnlineForecaster(scenario={self.scenario.name!r}, lookback={self.lookback}, "
            f"horizon={self.horizon}, rows={self.pipeline.position_})"
        )

    # -- learning ---------------------------------------------------------------------------

    def learn_one(
        self,
        y: float | Mapping[str, float],
        x: Mapping[str, float] | None = None,
        *,
        t: Any = None,
        key: str | None = None,
    ) -> None:
        """Observe the newest values of a series: one bar, one row of the stream.

        The value completes the horizon of earlier forecasts: they are scored, and those
        issued ``label_delay`` bars ago are learned from. Then the series' window moves on and,
        once it holds ``lookback`` values, the model issues the forecast :meth:`forecast`
        returns.

        Parameters
        ----------
        y
            The target's value, or ``{target: value}`` for a scenario with several targets. In
            the literature this is called the endogenous variable.
        x
            ``{feature: value}`` for the scenario's ``features``, observed at the same bar. In
            the literature these are called the exogenous variables.
        t
            The bar's time: a number, or a date and time (``datetime``, ``pd.Timestamp``,
            ISO-8601 text). Each key's times must increase. Default: the key's previous time
            plus one (numbered steps).
        key
            The series (e.g. a symbol) for a forecaster watching several; all keys share the
            model, each has its own window, normaliser, detector and forecasts.

        Raises
        ------
        StreamOrderError
            ``t`` is not after the key's previous bar: a bar observed twice or time going
            backwards would corrupt the stream.
        DataError
            A missing or infinite value the scenario's policies say to stop on.
        TypeError, ValueError
            Values that are not numbers, unknown or missing target and feature names.

        """
        values = np.full((1, len(self._inputs)), np.nan)
        for column, value in zip(self._target_columns, self._target_values(y), strict=True):
            values[0, column] = value
        for column, value in zip(self._feature_columns, self._feature_values(x), strict=True):
            values[0, column] = value
        key = _check_key(key)
        stamp, kind = self._time_of(t, key)
        self._check_values(values[0], "learn_one")
        batch = Batch(
            columns=self._inputs,
            values=values,
            timestamps=np.array([stamp], dtype=np.int64 if kind == "datetime" else np.float64),
            keys=None if key is None else np.array([key], dtype=object),
            source_name="learn_one",
            time_kind=kind,
        )
        self.pipeline.process_columns(batch)  # the values are not read: no records

    def learn_many(self, frame: pd.DataFrame) -> None:
        """Observe many rows at once, in order: several bars, several keys, or both.

        ``frame`` holds one row per bar and series, in stream order, with the scenario's
        target and feature columns, its ``key`` column when it has one, and its ``timestamp``
        column (else a ``DatetimeIndex`` is the time, else each row is its key's next step).
        The result is the same as :meth:`learn_one` row by row, and the same as a replay of
        these rows. The whole frame is checked before any row is learned: on an error, the
        forecaster is left as it was.
        """
        if not isinstance(frame, pd.DataFrame):
            raise TypeError(f"learn_many takes a pandas DataFrame, got {type(frame).__name__}")
        if frame.empty:
            return
        scenario = self.scenario
        columns = list(frame.columns)
        for column in [*self._inputs, *([scenario.key] if scenario.key else [])]:
            if column not in columns:
                raise ConfigError(
                    f"learn_many: column '{column}' is not in the frame{suggest(column, columns)}"
                    f"; columns present: {', '.join(map(str, columns))}"
                )
        time_column = scenario.timestamp
        if time_column in columns:
            frame = frame.reset_index(drop=True)
        elif isinstance(frame.index, pd.DatetimeIndex):
            frame = frame.reset_index(drop=True).assign(**{time_column: frame.index.to_numpy()})
        else:
            frame = frame.reset_index(drop=True)
            frame = frame.assign(**{time_column: self._auto_steps(frame)})
        batch = frame_to_batch(
            frame,
            timestamp=time_column,
            columns=self._inputs,
            key=scenario.key,
            timestamp_format=scenario.timestamp_format,
            time_kind=self._time_kind(),
            origins=np.arange(len(frame)),
            source_name="learn_many row",
        )
        self._check_batch(batch)
        self.pipeline.process_columns(batch)  # the values are not read: no records

    def freeze(self) -> None:
        """Stop learning: forecasts are still issued and scored, the model no longer changes.

        The series' windows and normalisers go on following the data (they are the model's
        inputs, not its weights); no learning step is taken and no adapter is consulted. A
        frozen model is the baseline that shows what online learning adds.
        """
        self.pipeline.frozen = True

    def unfreeze(self) -> None:
        """Learn again from the forecasts issued from now on."""
        self.pipeline.frozen = False

    # -- forecasting ------------------------------------------------------------------------

    def forecast(
        self,
        horizon: int | None = None,
        xs: Sequence[Mapping[str, float]] | None = None,
        *,
        key: str | None = None,
    ) -> list[float] | list[dict[str, float]]:
        """The next ``horizon`` values of a series, forecast at its newest bar.

        Parameters
        ----------
        horizon
            Steps ahead, 1 to the scenario's ``horizon`` (the default).
        xs
            Future values of the features, one mapping per step, as river's evaluation
            passes them. The model forecasts from the observed window only, so they are checked
            and not used.
        key
            The series.

        Returns
        -------
        list
            One float per step, or ``{target: value}`` per step for several targets. NaN while
            the series has fewer than ``lookback`` values: there is no window to forecast from.

        """
        horizon = self._check_horizon(horizon)
        if xs is not None:
            if isinstance(xs, Mapping) or len(xs) != horizon:
                raise ValueError(
                    f"xs must hold one mapping of features per step ({horizon}), "
                    f"got {type(xs).__name__}"
                    + ("" if isinstance(xs, Mapping) else f" of length {len(xs)}")
                )
            for x in xs:
                self._feature_values(x, name="xs")
        values = self._latest(_check_key(key), horizon)
        if len(self._targets) == 1:
            return [float(v) for v in values[:, 0]]
        return [dict(zip(self._targets, map(float, row), strict=True)) for row in values]

    def forecast_many(
        self, horizon: int | None = None, keys: Sequence[str] | None = None
    ) -> pd.DataFrame:
        """The newest forecast of every key (or of ``keys``), one row per key.

        Columns are the steps ``1..horizon`` for one target, ``(target, step)`` pairs for
        several. A key whose newest bar issued no forecast yet has NaN.
        """
        horizon = self._check_horizon(horizon)
        if keys is None:
            keys = [k or None for k in self.pipeline.series]
        keys = [_check_key(k) for k in keys]
        rows = [self._latest(k, horizon).T.reshape(-1) for k in keys]
        steps = list(range(1, horizon + 1))
        if len(self._targets) == 1:
            columns: Any = pd.Index(steps, name="step")
        else:
            columns = pd.MultiIndex.from_product([self._targets, steps], names=["target", "step"])
        index = pd.Index(keys, name=self.scenario.key or "key", dtype=object)
        data = np.stack(rows) if rows else np.empty((0, len(columns)))
        return pd.DataFrame(data, index=index, columns=columns)

    def metrics(self) -> dict[str, Any]:
        """Prequential figures so far, as in a replay's ``metrics.json``."""
        return self.pipeline.metrics()

    # -- state ------------------------------------------------------------------------------

    def snapshot(self) -> bytes:
        """The whole state as bytes: settings, weights, optimiser, windows, detectors, RNGs.

        :meth:`restore` rebuilds a forecaster that continues exactly as this one would, in
        this process or another. Emits a ``checkpoint`` event.
        """
        buffer = io.BytesIO()
        torch.save(
            {
                "format_version": FORMAT_VERSION,
                "kind": _SNAPSHOT_KIND,
                "scenario": self.scenario.model_dump_json(),
                "frozen": self.frozen,
                "pipeline": self.pipeline.state_dict(),
            },
            buffer,
        )
        data = buffer.getvalue()
        self.pipeline.events.emit(
            Event(
                "checkpoint",
                self.pipeline.position_,
                format_stream_time(self.pipeline.stream_time_, self.pipeline.time_kind),
                {"bytes": len(data)},
            )
        )
        return data

    @classmethod
    def restore(
        cls,
        data: bytes,
        *,
        adapters: Sequence[Adapter] | None = None,
        gate: Gate | None = None,
    ) -> OnlineForecaster:
        """A forecaster from :meth:`snapshot` 's bytes, continuing where that one stood.

        The bytes are read without unpickling code (``torch.load(weights_only=True)``).
        Adapters and a gate that are not named in the scenario are passed again here.
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(f"restore takes the bytes of snapshot(), got {type(data).__name__}")
        try:
            state = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for damaged or foreign bytes
            raise CheckpointError(f"cannot read the snapshot ({exc})") from None
        if not isinstance(state, dict) or state.get("kind") != _SNAPSHOT_KIND:
            raise CheckpointError("not a snapshot of an OnlineForecaster")
        if state.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"snapshot format {state.get('format_version')}; this version reads "
                f"format {FORMAT_VERSION}"
            )
        forecaster = cls(
            Scenario.model_validate_json(state["scenario"]), adapters=adapters, gate=gate
        )
        forecaster.pipeline.load_state_dict(state["pipeline"])
        forecaster.pipeline.frozen = bool(state["frozen"])
        return forecaster

    # -- checks -----------------------------------------------------------------------------

    def _target_values(self, y: Any) -> list[float]:
        if isinstance(y, Mapping):
            _check_names(y, self._targets, "y", "target")
            return [_number(y[t], f"y['{t}']") for t in self._targets]
        if len(self._targets) != 1:
            raise TypeError(
                f"this forecaster has {len(self._targets)} targets "
                f"({', '.join(self._targets)}): pass y as {{target: value}}"
            )
        return [_number(y, "y")]

    def _feature_values(self, x: Any, name: str = "x") -> list[float]:
        if x is None:
            if self._features:
                raise TypeError(
                    f"this forecaster's scenario has features ({', '.join(self._features)}): "
                    f"pass their values as {name}={{feature: value}}"
                )
            return []
        if not isinstance(x, Mapping):
            raise TypeError(f"{name} must be a mapping of feature → value, got {type(x).__name__}")
        if x and not self._features:
            raise TypeError(
                f"{name} has features ({', '.join(map(str, x))}) but this forecaster was built "
                "without any: name them with features=[...]"
            )
        _check_names(x, self._features, name, "feature")
        return [_number(x[f], f"{name}['{f}']") for f in self._features]

    def _time_kind(self) -> str | None:
        """``datetime`` or ``number`` once a row has been seen, else ``None``."""
        return self.pipeline.time_kind if self.pipeline.position_ else None

    def _time_of(self, t: Any, key: str | None) -> tuple[int | float, str]:
        kind = self._time_kind()
        state = self.pipeline.series.get(key or "")
        last = None if state is None else state.last_timestamp
        if t is None:
            if kind == "datetime":
                raise TypeError("this forecaster's times are dates: pass t= with each bar")
            stamp: int | float = 0.0 if last is None else float(last) + 1.0
            return stamp, "number"
        stamp, given = _timestamp(t)
        if kind is not None and given != kind:
            raise TypeError(
                f"t={t!r} is a {given}, but this forecaster's times are "
                f"{'dates' if kind == 'datetime' else 'numbers'}"
            )
        if last is not None and stamp <= last:
            what = (
                "is not after the last one observed"
                if stamp == last
                else "goes back before the last one observed"
            )
            where = f" for key '{key}'" if key is not None else ""
            raise StreamOrderError(
                f"timestamp {format_stream_time(stamp, given)}{where} {what}, "
                f"{format_stream_time(last, given)}: each bar is observed once, in time order",
                "learn_one",
            )
        return stamp, given

    def _auto_steps(self, frame: pd.DataFrame) -> np.ndarray:
        """Numbered steps for rows without a time: each key's next steps after its last one."""
        if self._time_kind() == "datetime":
            raise TypeError(
                f"learn_many: this forecaster's times are dates; the frame needs a "
                f"'{self.scenario.timestamp}' column or a DatetimeIndex"
            )
        key = self.scenario.key
        keys = pd.Series([""] * len(frame)) if key is None else frame[key].astype(str)
        keys = keys.reset_index(drop=True)

        def last(k: str) -> float:
            state = self.pipeline.series.get(k)
            return -1.0 if state is None or state.last_timestamp is None else state.last_timestamp

        start = keys.map(last)
        return (start + keys.groupby(keys).cumcount() + 1.0).to_numpy(dtype=np.float64)

    def _check_values(self, row: np.ndarray, origin: str) -> None:
        """Refuse, before the pipeline sees it, a row the scenario's policies would stop on."""
        if np.isinf(row).any() and self.scenario.bad_records == "error":
            column = self._inputs[int(np.argmax(np.isinf(row)))]
            raise DataError(
                f"infinite value {row[np.isinf(row)][0]} in column '{column}'; expected a "
                "finite number",
                origin,
            )
        if np.isnan(row).any() and self.scenario.missing == "error":
            column = self._inputs[int(np.argmax(np.isnan(row)))]
            raise DataError(
                f"missing value (NaN) in column '{column}'; expected a number (set "
                "missing='drop' or 'ffill' to skip or fill such values)",
                origin,
            )

    def _check_batch(self, batch: Batch) -> None:
        """The checks of :meth:`learn_one`, over a whole batch, before any row is learned."""
        usable = np.ones(len(batch), dtype=bool)
        for i in sorted(batch.errors):
            if self.scenario.bad_records == "error":
                raise DataError(batch.errors[i][0], batch.origin(i))
            usable[i] = False
        for i in np.flatnonzero(usable & ~np.isfinite(batch.values).all(axis=1)):
            self._check_values(batch.values[i], batch.origin(int(i)))
        keys = (np.full(len(batch), "", dtype=object) if batch.keys is None else batch.keys).astype(
            str
        )
        times = batch.timestamps
        last: dict[str, Any] = {}
        for i in np.flatnonzero(usable):
            k = keys[i]
            if k not in last:
                state = self.pipeline.series.get(k)
                last[k] = None if state is None else state.last_timestamp
            previous = last[k]
            if previous is not None and times[i] <= previous:
                what = "is not after" if times[i] == previous else "goes back before"
                where = f" for key '{k}'" if k else ""
                raise StreamOrderError(
                    f"timestamp {format_stream_time(times[i].item(), batch.time_kind)}{where} "
                    f"{what} the previous one, "
                    f"{format_stream_time(previous, batch.time_kind)}: each bar is observed "
                    "once, in time order",
                    batch.origin(int(i)),
                )
            last[k] = times[i].item()

    def _check_horizon(self, horizon: int | None) -> int:
        if horizon is None:
            return self.horizon
        if isinstance(horizon, bool) or not isinstance(horizon, numbers.Integral):
            raise TypeError(f"horizon must be an integer, got {horizon!r}")
        if not 1 <= horizon <= self.horizon:
            raise ValueError(
                f"horizon {horizon}: this forecaster forecasts 1 to {self.horizon} steps ahead; "
                f"build it with horizon={horizon} to forecast further"
            )
        return int(horizon)

    def _latest(self, key: str | None, horizon: int) -> np.ndarray:
        latest = self.pipeline.latest_forecast(key)
        if latest is None:
            return np.full((horizon, len(self._targets)), np.nan)
        return latest[1][:horizon]


# -- helpers ------------------------------------------------------------------------------------


def _build_scenario(scenario: Scenario | str | Path | None, options: dict[str, Any]) -> Scenario:
    if scenario is None:
        raw: dict[str, Any] = dict(DEFAULT_SETTINGS)
    elif isinstance(scenario, Scenario):
        raw = scenario.model_dump()
    elif isinstance(scenario, str | Path):
        from neuralsync.scenarios import resolve_scenario

        raw = load_scenario(resolve_scenario(scenario)).model_dump()
    else:
        raise TypeError(
            "scenario must be a Scenario, a scenario YAML path or a bundled scenario's name, "
            f"got {type(scenario).__name__}"
        )
    if not options:
        return scenario if isinstance(scenario, Scenario) else Scenario.model_validate(raw)
    try:
        return Scenario.model_validate(_merge(raw, options))
    except ValidationError as exc:
        raise ConfigError(_describe_validation_error(exc, "OnlineForecaster", {})) from None


def _merge(base: dict[str, Any], updates: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``updates``; nested mappings are updated, not replaced."""
    merged = dict(base)
    for name, value in updates.items():
        if isinstance(value, Mapping) and isinstance(merged.get(name), dict):
            merged[name] = _merge(merged[name], value)
        else:
            merged[name] = value
    return merged


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    return float(value)


def _check_names(given: Mapping[str, Any], expected: list[str], name: str, what: str) -> None:
    for column in given:
        if column not in expected:
            raise ValueError(
                f"{name} names an unknown {what} '{column}'{suggest(str(column), expected)}; "
                f"this forecaster's {what}s: {', '.join(expected)}"
            )
    for column in expected:
        if column not in given:
            raise ValueError(f"{name} lacks the {what} '{column}'; expected {', '.join(expected)}")


def _check_key(key: Any) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str):
        raise TypeError(f"key must be a string (e.g. a symbol), got {key!r}")
    if key == "":
        raise ValueError("key must not be empty")
    return key


def _timestamp(t: Any) -> tuple[int | float, str]:
    """``(nanoseconds since the epoch, "datetime")`` or ``(number, "number")``."""
    if isinstance(t, bool):
        raise TypeError(f"t must be a number or a date and time, got {t!r}")
    if isinstance(t, numbers.Real):
        if not math.isfinite(float(t)):
            raise ValueError(f"t must be finite, got {t!r}")
        return float(t), "number"
    if isinstance(t, str | dt.date | np.datetime64):
        try:
            stamp = pd.Timestamp(t)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"cannot read t={t!r} as a date and time ({exc})") from None
        if pd.isna(stamp):
            raise ValueError(f"t must be a date and time, got {t!r}")
        if stamp.tzinfo is not None:
            stamp = stamp.tz_convert("UTC").tz_localize(None)
        return int(stamp.as_unit("ns").value), "datetime"
    raise TypeError(f"t must be a number or a date and time, got {t!r} ({type(t).__name__})")
