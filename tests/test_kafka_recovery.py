"""Exact recovery against a real broker: SIGKILL anywhere, restart, end bit-identical.

A daemon killed at random points (during a checkpoint write included) and restarted, with a
checkpoint file torn in between, ends with the state of a run never interrupted, and every
record's prediction has one id, republished identically. Two daemons sharing a group hand a
killed member's partitions over through the checkpoint store.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from kafka_support import (
    KAFKA,
    SCENARIO,
    KafkaRun,
    broker_fixture,  # noqa: F401 - the fixture `broker`
    expected_state,
    good_records,
)

from connectors.kafka.checkpoint import WRITE_PAUSE_ENV
from connectors.kafka.daemon import BATCH_DELAY_ENV, START_WHEN_ENV

pytestmark = KAFKA

KILLS = 20
#: Kill number i is made while a checkpoint write is half done (the write pauses 3 s).
DURING_WRITE = {4, 11, 17}
#: After kill number i, the newest checkpoint of partition 0 is cut to half its length.
TRUNCATE_AFTER = {7, 14}


def _temporary_files(run: KafkaRun) -> list[Path]:
    return list(run.checkpoints.glob("*/.state-*.tmp-*"))


def _wait_for(condition, timeout: float, run: KafkaRun, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}\n{run.logs()}")


def test_sigkill_at_random_points_twenty_times_loses_and_repeats_nothing(broker, tmp_path):
    rng = random.Random(5)
    run = KafkaRun(broker, tmp_path, session_timeout_ms=2000, max_poll_records=10)
    records = good_records(200)  # 800 records, 400 a partition
    size = len(records) // KILLS
    torn = to_tear = 0

    # Each daemon is started, warmed up and held before its predecessor is killed, then
    # released at once: the restarts cost a group join, not an interpreter start.
    def spawn(kill: int):
        env = {BATCH_DELAY_ENV: "0.05", START_WHEN_ENV: str(tmp_path / f"go-{kill}")}
        if kill in DURING_WRITE:
            env[WRITE_PAUSE_ENV] = "3"
        return run.start(env=env)

    try:
        daemon = spawn(0)
        for kill in range(KILLS):
            following = spawn(kill + 1)
            saved = sum(run.checkpoint_offsets().values())
            (tmp_path / f"go-{kill}").touch()
            run.produce_good(records[kill * size : (kill + 1) * size])
            if kill in DURING_WRITE:
                _wait_for(lambda: _temporary_files(run), 180, run, "a checkpoint write")
            elif kill % 5 == 2:
                time.sleep(rng.uniform(0.0, 2.0))  # while connecting or joining the group
            else:
                # Once this daemon has made progress (a checkpoint), at a random point of
                # its processing or just after.
                _wait_for(
                    lambda n=saved: sum(run.checkpoint_offsets().values()) > n, 180, run, "progress"
                )
                time.sleep(rng.uniform(0.0, 1.0))
            daemon.kill()
            daemon.wait()
            if kill in DURING_WRITE:
                assert _temporary_files(run), "the kill was meant to cut a write short"
            if kill in TRUNCATE_AFTER:
                to_tear += 1
            newest = sorted(run.checkpoints.glob("*/state-*.pt"), key=lambda f: f.name)
            if to_tear and newest:  # a newest checkpoint to tear (there may be none yet)
                newest[-1].write_bytes(newest[-1].read_bytes()[: newest[-1].stat().st_size // 2])
                to_tear -= 1
                torn += 1
            daemon = following
        final = daemon
        (tmp_path / f"go-{KILLS}").touch()
        run.wait_for_offsets({p: len(v) for p, v in run.values.items()}, 180, [final])
        assert run.stop(final) == 0
    finally:
        run.kill_all()

    assert run.final_state() == expected_state(run)
    assert not _temporary_files(run)  # torn writes cleaned up on restore
    skipped = [
        e
        for p in run.processes
        for e in run.log_events(p)
        if "skipping a damaged checkpoint" in e.get("message", "")
    ]
    assert torn == len(TRUNCATE_AFTER)
    assert len(skipped) >= torn  # each torn file was noticed, and an older one used

    reference = run.reference()
    expected_ids = set().union(*(ref.prediction_ids for ref in reference.values()))
    seen: dict[str, bytes] = {}
    for message in run.read("predictions"):
        prediction = json.loads(message.value)
        # A record processed again after a crash republishes the very same prediction.
        assert seen.setdefault(prediction["id"], message.value) == message.value
    assert set(seen) == expected_ids
    # One id per record that has a full window: each key's first lookback-1 rows have none.
    assert len(expected_ids) == len(records) - 4 * (run.scenario["lookback"] - 1)


def test_a_second_daemon_takes_over_a_killed_ones_partitions(broker, tmp_path):
    run = KafkaRun(broker, tmp_path, partitions=4, session_timeout_ms=4000)
    records = good_records(150)
    run.produce_good(records[:300])
    try:
        first, second = run.start(name="first"), run.start(name="second")

        def split() -> bool:
            owned = [
                {e["partition"] for e in run.log_events(p) if e.get("event") == "assigned"}
                for p in (first, second)
            ]
            return all(owned)

        _wait_for(split, 180, run, "both daemons to own partitions")
        run.wait_for_offsets({p: len(v) for p, v in run.values.items()}, 180, [first, second])
        first.kill()
        first.wait()
        run.produce_good(records[300:])
        run.wait_for_offsets({p: len(v) for p, v in run.values.items()}, 180, [second])
        assert run.stop(second) == 0
    finally:
        run.kill_all()
    taken = [e for e in run.log_events(second) if e.get("event") == "assigned"]
    assert len({e["partition"] for e in taken}) == 4  # all of them, in the end
    restored = [e for e in taken if "restored" in e["message"]]
    assert restored, "the takeover should start from the killed daemon's checkpoints"
    assert run.final_state() == expected_state(run)


def test_a_rebalance_hands_partitions_over_through_the_checkpoint_store(broker, tmp_path):
    """No periodic checkpoints: the only way the second daemon can start the partitions it is
    given from where the first left them is the checkpoint the first writes as it gives them
    up. Keys are neither lost nor trained twice: the final state is the uninterrupted one."""
    run = KafkaRun(
        broker,
        tmp_path,
        partitions=4,
        session_timeout_ms=4000,
        checkpoint={"url": "checkpoints", "every_records": 100_000, "every_seconds": 3600},
    )
    records = good_records(150)
    reference_ids = set()
    try:
        first = run.start(name="first")
        run.produce_good(records[:300])
        reference_ids = _all_ids(run)
        _wait_for(lambda: _ids(run) >= reference_ids, 180, run, "the first half's predictions")
        assert run.checkpoint_offsets() == {}  # nothing saved yet
        second = run.start(name="second")
        _wait_for(
            lambda: any("restored" in e.get("message", "") for e in run.log_events(second)),
            180,
            run,
            "the second daemon to restore a partition",
        )
        run.produce_good(records[300:])
        reference_ids = _all_ids(run)
        _wait_for(lambda: _ids(run) >= reference_ids, 180, run, "every prediction")
        assert run.stop(first) == 0 and run.stop(second) == 0
    finally:
        run.kill_all()
    revoked = [e for e in run.log_events(first) if e.get("event") == "revoked"]
    assert revoked and all(e["offset"] > 0 for e in revoked)
    assert run.final_state() == expected_state(run)
    assert _ids(run) == reference_ids


def _all_ids(run: KafkaRun) -> set[str]:
    return set().union(*(ref.prediction_ids for ref in run.reference().values()))


def _ids(run: KafkaRun) -> set[str]:
    return {json.loads(m.value)["id"] for m in run.read("predictions")}


def test_default_adaptation_survives_a_kill_bit_identically(broker, tmp_path):
    """The default pipeline (ADWIN detector, meta-adaptation on) through a regime change,
    killed once mid-stream: the resumed daemon still ends in the uninterrupted run's state."""
    scenario = {k: v for k, v in SCENARIO.items() if k not in ("detector", "adaptation")}
    scenario["detector"] = {"cooldown": 20}
    run = KafkaRun(
        broker, tmp_path, scenario=scenario, session_timeout_ms=3000, max_poll_records=10
    )
    records = good_records(300, keys=("AAA", "BBB"), shift_at=150)
    run.produce_good(records[:400])
    try:
        daemon = run.start(env={BATCH_DELAY_ENV: "0.05"})
        run.wait_for_offsets({0: 100}, 180, [daemon])
        daemon.kill()
        daemon.wait()
        run.produce_good(records[400:])
        final = run.start()
        run.wait_for_offsets({p: len(v) for p, v in run.values.items()}, 180, [final])
        assert run.stop(final) == 0
    finally:
        run.kill_all()
    assert run.final_state() == expected_state(run)
    events = [json.loads(m.value) for m in run.read("events")]
    assert any(e["type"] == "regime_change" for e in events), "no regime change to adapt to"
