"""Poison records against a real broker: 1,000 malformed records, generated with hypothesis,
mixed into good ones. Each lands once in the dead-letter topic with its original bytes and the
reason; the final state equals a run over the good records alone."""

from __future__ import annotations

import json
import math

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kafka_support import (
    KAFKA,
    KEYS,
    KafkaRun,
    broker_fixture,  # noqa: F401 - the fixture `broker`
    encode,
    good_records,
    partition_of,
    reference_run,
)

pytestmark = KAFKA

BAD = 1000
GOOD_ROWS = 100  # a key
MAX_BYTES = 2048


def _not_a_record(raw: bytes) -> bool:
    try:
        return not isinstance(json.loads(raw), dict)
    except ValueError:
        return True


_WRONG_NUMBER = st.one_of(
    st.text(max_size=8), st.booleans(), st.none(), st.lists(st.integers(), max_size=3)
)
_WRONG_KEY = st.one_of(
    st.booleans(), st.none(), st.floats(allow_nan=False), st.lists(st.text(max_size=2), max_size=2)
)
_KIND = st.one_of(
    st.tuples(st.just("bytes"), st.binary(max_size=40).filter(_not_a_record)),
    st.tuples(st.just("missing"), st.sampled_from(["t", "k", "x", "y"])),
    st.tuples(st.just("type"), st.sampled_from(["t", "x", "y"]), _WRONG_NUMBER),
    st.tuples(st.just("type"), st.just("k"), _WRONG_KEY),
    st.tuples(
        st.just("nonfinite"),
        st.sampled_from(["t", "x", "y"]),
        st.sampled_from([math.nan, math.inf, -math.inf]),
    ),
    st.tuples(st.just("backwards"), st.integers(0, 5)),
    st.tuples(st.just("oversized"), st.integers(MAX_BYTES, 3 * MAX_BYTES)),
)
#: Where a bad record goes (before which good record), whose key it claims, what is wrong.
_BAD = st.tuples(st.integers(0, GOOD_ROWS * len(KEYS)), st.sampled_from(KEYS), _KIND)


def _materialise(spec, last_time: dict[str, int]) -> bytes:
    _, key, (kind, *args) = spec
    after = last_time.get(key, -1)
    record = {"t": after + 0.5, "k": key, "x": 0.1, "y": 0.2}  # valid but for the flaw
    if kind == "bytes":
        return args[0]
    if kind == "missing":
        del record[args[0]]
    elif kind in ("type", "nonfinite"):
        record[args[0]] = args[1]
    elif kind == "backwards":
        record["t"] = after - args[0]  # a duplicate time when 0
    elif kind == "oversized":
        record["pad"] = "z" * args[0]
    return json.dumps(record).encode()  # NaN and Infinity as the bare tokens JSON lacks


def _generate_bad_specs(count: int) -> list:
    """``count`` bad-record specs drawn by hypothesis (reproducibly: derandomised)."""
    drawn: list = []

    @settings(
        max_examples=count,
        phases=[Phase.generate],
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(_BAD)
    def collect(spec) -> None:
        drawn.append(spec)

    collect()
    assert len(drawn) >= count // 2, f"hypothesis drew only {len(drawn)} records"
    return [drawn[i % len(drawn)] for i in range(count)]


def test_each_malformed_record_is_dead_lettered_once_and_the_state_unaffected(broker, tmp_path):
    bad_specs = _generate_bad_specs(BAD)
    run = KafkaRun(broker, tmp_path, max_record_bytes=MAX_BYTES, max_poll_records=200)
    good = good_records(GOOD_ROWS)
    by_place: dict[int, list] = {}
    for spec in bad_specs:
        # A backwards time needs the key to have a time already: after every key's first row.
        place = max(spec[0], len(KEYS)) if spec[2][0] == "backwards" else spec[0]
        by_place.setdefault(place, []).append(spec)
    stream: list[tuple[int, bytes, bool]] = []  # (partition, value, bad)
    last_time: dict[str, int] = {}
    for i in range(len(good) + 1):
        for spec in by_place.get(i, []):
            stream.append(
                (partition_of(spec[1], run.partitions), _materialise(spec, last_time), True)
            )
        if i < len(good):
            stream.append((partition_of(good[i]["k"], run.partitions), encode(good[i]), False))
            last_time[good[i]["k"]] = good[i]["t"]
    expected_bad: dict[tuple[int, int], bytes] = {}
    offsets = dict.fromkeys(range(run.partitions), 0)
    for partition, value, bad in stream:
        if bad:
            expected_bad[(partition, offsets[partition])] = value
        offsets[partition] += 1
    assert len(expected_bad) == BAD

    run.produce([(p, v) for p, v, _ in stream])
    try:
        daemon = run.start()
        run.wait_for_offsets(offsets, 180, [daemon])
        assert run.stop(daemon) == 0
    finally:
        run.kill_all()

    letters = run.read("dead_letter")
    assert len(letters) == BAD  # once each: none lost, none repeated
    seen = {}
    for letter in letters:
        headers = {k: v.decode() for k, v in letter.headers}
        where = (int(headers["partition"]), int(headers["offset"]))
        assert headers["topic"] == run.topics["input"]
        assert letter.value == expected_bad[where]  # the original bytes
        assert headers["reason"].strip()
        seen[where] = headers["reason"]
    assert set(seen) == set(expected_bad)
    reasons = " | ".join(seen.values())
    for phrase in (
        "invalid JSON",
        "is missing",
        "expected a number",
        "finite",
        "limit is 2048",
        "timestamp",
    ):
        assert phrase in reasons

    filtered = {
        p: reference_run(
            run.scenario, run.topics["input"], p, [v for q, v, bad in stream if q == p and not bad]
        )
        for p in range(run.partitions)
    }
    assert run.final_state() == {p: (offsets[p], ref.digest) for p, ref in filtered.items()}
