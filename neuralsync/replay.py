"""Replay a scenario's CSV through the pipeline into a run directory, with checkpoints and resume.

A run directory holds ``predictions.csv``, ``events.jsonl``, ``dead_letter.jsonl``,
``metrics.json``, ``report.png`` and ``checkpoints/``. :class:`ReplayRun` follows one commit
protocol at every checkpoint (see :meth:`ReplayRun.checkpoint`), so a run stopped anywhere —
by Ctrl-C, SIGTERM, ``--limit`` or a crash — resumes from its last checkpoint and ends
bit-identical to one never stopped.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neuralsync.adaptation import build_adapters
from neuralsync.base import PredictionSink, Source
from neuralsync.config import Scenario
from neuralsync.errors import CheckpointError, ConfigError
from neuralsync.events import Event, format_stream_time, json_safe
from neuralsync.files import ResumableFile
from neuralsync.pipeline import Pipeline
from neuralsync.registry import load_plugin
from neuralsync.scenarios import load_change_point_keys, load_change_points
from neuralsync.state import CheckpointStore, state_digest

__all__ = ["ReplayRun", "csv_source", "replay"]

#: Progress callback: ``(rows done, rows in total or None)``.
ProgressCallback = Callable[[int, int | None], None]


class _JsonLines(ResumableFile):
    """An append-only JSON-lines file whose byte position can be saved and returned to."""

    def write_record(self, record: dict[str, Any]) -> None:
        self.write(json.dumps(record) + "\n")


def csv_source(scenario: Scenario, *, paced: bool = True) -> Source:
    """The source that reads ``scenario``'s CSV (the ``csv`` source plugin); ``paced=False``
    ignores its ``realtime_factor``."""
    if scenario.csv is None:
        raise ConfigError(
            f"scenario '{scenario.name}': no `csv` to replay; name the CSV file in the scenario "
            "or pass a source"
        )
    return load_plugin("neuralsync.sources", "csv")(
        scenario.csv,
        timestamp=scenario.timestamp,
        columns=scenario.inputs,
        key=scenario.key,
        timestamp_format=scenario.timestamp_format,
        chunk_size=scenario.chunk_size,
        realtime_factor=scenario.realtime_factor if paced else None,
    )


class ReplayRun:
    """One replay of a scenario into ``out_dir``.

    Parameters
    ----------
    scenario
        What to replay.
    out_dir
        The run directory; created if needed. A fresh run overwrites what is there.
    resume
        Continue from the newest readable checkpoint in ``out_dir/checkpoints``.
    source, sink
        Override the scenario's CSV source and the predictions CSV (e.g. a DataFrame source).

    """

    def __init__(
        self,
        scenario: Scenario,
        out_dir: str | Path,
        *,
        resume: bool = False,
        source: Source | None = None,
        sink: PredictionSink | None = None,
    ):
        self.scenario = scenario
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.resume = resume
        self.store = CheckpointStore(self.out_dir / "checkpoints")
        self.pipeline = Pipeline(scenario, adapters=build_adapters(scenario))
        self.change_points = load_change_points(scenario)
        if self.change_points is not None:
            # Keyed scenarios score each change against its own key (when the file says which).
            keys = load_change_point_keys(scenario) if scenario.key else None
            self.pipeline.set_change_points(self.change_points, keys=keys)
        self.source = source or self._csv_source()
        snapshot = self._restore() if resume else None
        if snapshot is None:
            for stale in self.store.paths():
                stale.unlink()
        append = snapshot is not None
        self.sink = sink or load_plugin("neuralsync.sinks", "csv")(
            self.out_dir / "predictions.csv", append=append
        )
        self.events = _JsonLines(self.out_dir / "events.jsonl", append=append)
        self.dead_letters = _JsonLines(self.out_dir / "dead_letter.jsonl", append=append)
        if snapshot is not None:
            positions = snapshot["sinks"]
            self.sink.truncate(positions["predictions"])
            self.events.truncate(positions["events"])
            self.dead_letters.truncate(positions["dead_letter"])
        self.pipeline.events.subscribe(self._record_event)
        self.stop_requested = False
        self.rows_this_run = 0
        self.seconds_this_run = 0.0

    def _csv_source(self) -> Source:
        return csv_source(self.scenario)

    def _restore(self) -> dict[str, Any] | None:
        try:
            snapshot = self.store.latest()
        except CheckpointError:
            if not self.store.paths():
                raise CheckpointError(
                    f"{self.store.directory}: nothing to resume from; run without --resume "
                    "to start afresh"
                ) from None
            raise
        if snapshot["scenario"] != self.scenario.fingerprint():
            raise CheckpointError(
                f"{snapshot['path']}: written by a run with different settings; resume with "
                "the same scenario and options, or start a new run in another directory"
            )
        self.pipeline.load_state_dict(snapshot["pipeline"])
        self.source.seek(self.pipeline.position_)
        # Damaged snapshots newer than this one describe a future that is about to be redone:
        # left in place, pruning would count them and delete this good one instead.
        for path in self.store.paths():
            if path.name > Path(snapshot["path"]).name:
                path.unlink()
        return snapshot

    def _record_event(self, event: Event) -> None:
        record = event.to_dict()
        self.events.write_record(record)
        if event.type == "bad_record":
            self.dead_letters.write_record(record)

    # -- the loop ---------------------------------------------------------------------------

    def run(
        self, limit: int | None = None, progress: ProgressCallback | None = None
    ) -> dict[str, Any]:
        """Replay until the end of the stream, ``limit`` rows in all, or a stop request.

        Returns the metrics (also written to ``metrics.json``). ``metrics["completed"]`` says
        whether the stream was read to its end.
        """
        stream_rows = total = self.source.total_rows()
        if limit is not None:
            total = min(total, limit) if total is not None else limit
        every = self.scenario.checkpoint_every
        completed = True
        started = time.perf_counter()
        if progress:
            progress(self.pipeline.position_, total)
        for batch in self.source:
            start = 0
            while start < len(batch):
                position = self.pipeline.position_
                stop_at = (position // every + 1) * every
                if limit is not None:
                    stop_at = min(stop_at, limit)
                end = min(len(batch), start + stop_at - position)
                if end > start:
                    self.sink.write(self.pipeline.process(batch.slice(start, end)))
                    self.rows_this_run += end - start
                start = end
                if self.pipeline.position_ % every == 0:
                    self.checkpoint()
                if progress:
                    progress(self.pipeline.position_, total)
                at_end = stream_rows is not None and self.pipeline.position_ >= stream_rows
                if at_end:
                    break  # a limit that falls on the last row still completes the stream
                if (limit is not None and self.pipeline.position_ >= limit) or self.stop_requested:
                    completed = False
                    break
            if not completed:
                break
        self.seconds_this_run += time.perf_counter() - started
        if self.pipeline.position_ % every != 0:  # else the loop has just checkpointed here
            self.checkpoint()
        if completed:
            self.sink.write(self.pipeline.finish())
        return self._finish(completed)

    def checkpoint(self) -> Path:
        """Commit the run's progress; the steps, in order:

        1. emit the ``checkpoint`` event, so the event log says what the snapshot covers;
        2. flush the predictions, events and dead letters to disk (fsync);
        3. note each file's byte position, which a resumed run truncates back to;
        4. write the snapshot (pipeline state, file positions, scenario) atomically;
        5. prune snapshots older than the newest two.

        A crash before step 4 completes leaves the previous checkpoint in force, and a resume
        from it cuts the files back to what it covered, so nothing is written twice.
        """
        position = self.pipeline.position_
        path = self.store.directory / f"state-{position:012d}.pt"
        self.pipeline.events.emit(
            Event(
                "checkpoint",
                position,
                format_stream_time(self.pipeline.stream_time_, self.pipeline.time_kind),
                {"path": str(path)},
            )
        )
        for sink in (self.sink, self.events, self.dead_letters):
            sink.flush()
        sinks = {
            "predictions": self.sink.position(),
            "events": self.events.position(),
            "dead_letter": self.dead_letters.position(),
        }
        return self.store.save(
            {
                "scenario": self.scenario.fingerprint(),
                "sinks": sinks,
                "pipeline": self.pipeline.state_dict(),
            },
            position,
        )

    def _finish(self, completed: bool) -> dict[str, Any]:
        metrics = self.pipeline.metrics()
        kind = self.pipeline.time_kind
        metrics.update(
            {
                "name": self.scenario.name,
                "completed": completed,
                "horizon": self.scenario.horizon,
                "lookback": self.scenario.lookback,
                "label_delay": self.scenario.effective_label_delay,
                "device": str(self.pipeline.device),
                "rows_this_run": self.rows_this_run,
                "wall_seconds": self.seconds_this_run,
                "events_per_second": self.rows_this_run / max(self.seconds_this_run, 1e-9),
                "state_digest": state_digest(self.pipeline.state_dict()),
            }
        )
        if self.change_points is not None:
            metrics["change_points"] = [format_stream_time(t, kind) for t in self.change_points]
        for sink in (self.sink, self.events, self.dead_letters):
            sink.flush()
        metrics["adaptation_lag"] = self._adaptation_lag(metrics)
        (self.out_dir / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2) + "\n")
        return metrics

    def _adaptation_lag(self, metrics: dict[str, Any]) -> dict[str, Any] | None:
        """Lag and excess error after each true change (or detected one, when none is known),
        from the predictions file; ``None`` when the run writes none (a custom sink)."""
        from neuralsync.lag import lag_from_predictions

        path = self.out_dir / "predictions.csv"
        if not path.is_file() or path.stat().st_size == 0:
            return None
        if self.change_points is not None:
            return lag_from_predictions(path, metrics["change_points"], basis="true")
        return lag_from_predictions(path, metrics["regime_changes"], basis="detected")

    def close(self) -> None:
        for sink in (self.sink, self.events, self.dead_letters):
            sink.close()


def replay(
    scenario: Scenario,
    out_dir: str | Path,
    *,
    resume: bool = False,
    limit: int | None = None,
    progress: ProgressCallback | None = None,
    report: bool = True,
    handle_signals: bool = False,
) -> dict[str, Any]:
    """Replay ``scenario`` into ``out_dir`` and return its metrics.

    With ``handle_signals``, SIGINT and SIGTERM finish the current slice, checkpoint and
    return (``metrics["completed"]`` is then ``False``); resume with ``resume=True``.
    """
    run = ReplayRun(scenario, out_dir, resume=resume)
    previous: dict[int, Any] = {}

    def request_stop(signum: int, frame: Any) -> None:
        run.stop_requested = True

    if handle_signals:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, request_stop)
    try:
        metrics = run.run(limit=limit, progress=progress)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        run.close()
    if report:
        from neuralsync.report import write_evolution_report, write_report

        write_report(Path(out_dir))
        write_evolution_report(Path(out_dir))
    return metrics
