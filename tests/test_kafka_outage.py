"""The broker unreachable mid-stream (frozen with SIGSTOP: the memory-only test broker would
lose its data on a real restart): the daemon says so, keeps its state, and loses nothing."""

from __future__ import annotations

import json
import time

from kafka_support import (
    KAFKA,
    KafkaRun,
    broker_fixture,  # noqa: F401 - the fixture `broker`
    expected_state,
    good_records,
)

from connectors.kafka.daemon import BATCH_DELAY_ENV

pytestmark = KAFKA


def test_the_daemon_rides_out_5_s_and_20_s_broker_outages(broker, tmp_path):
    run = KafkaRun(broker, tmp_path, max_poll_records=10, stall_timeout_s=3.0)
    records = good_records(180)  # 720 records: three chunks of 240
    try:
        daemon = run.start(env={BATCH_DELAY_ENV: "0.05"})  # ~1 s of work a chunk a partition
        for chunk, outage in enumerate((5.0, 20.0, None)):
            run.produce_good(records[chunk * 240 : (chunk + 1) * 240])
            if outage is None:
                break
            # Freeze while the daemon works through the chunk: its sends, checkpoint flushes,
            # commits, fetches and heartbeats all meet a broker that does not answer.
            deadline = time.monotonic() + 180
            while sum(run.checkpoint_offsets().values()) <= chunk * 240:
                assert time.monotonic() < deadline, run.logs()
                assert daemon.poll() is None, run.logs()
                time.sleep(0.05)
            broker.freeze()
            time.sleep(outage)
            broker.thaw()
        run.wait_for_offsets({p: len(v) for p, v in run.values.items()}, 120, [daemon])
        assert run.stop(daemon) == 0
    finally:
        broker.thaw()
        run.kill_all()

    assert run.final_state() == expected_state(run)
    reference = run.reference()
    ids = {json.loads(m.value)["id"] for m in run.read("predictions")}
    assert ids == set().union(*(ref.prediction_ids for ref in reference.values()))
    events = [e.get("event") for e in run.log_events(daemon)]
    assert "stall" in events and "stall_over" in events  # noticed, and said so
    assert "broker_unreachable" in events and "broker_back" in events
