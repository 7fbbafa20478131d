"""Tests for :mod:`neuralsync.state`: atomic snapshots, safe loading, digests, the store."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from neuralsync.errors import CheckpointError
from neuralsync.state import (
    FORMAT_VERSION,
    CheckpointStore,
    load_snapshot,
    save_snapshot,
    state_digest,
)


def _state(value: float = 1.0) -> dict:
    return {
        "position": 10,
        "weights": torch.full((3, 4), value),
        "step": torch.tensor(5.0),  # 0-d, like Adam's step count
        "nested": {"rows": [1, 2, 3], "name": "AAA", "none": None, "flag": True},
        "floats": [0.1, 2.5e-300],
        "pair": (torch.arange(3), 4.5),
    }


def _assert_same(a, b) -> None:
    assert type(a) is type(b) or (isinstance(a, list | tuple) and isinstance(b, list | tuple))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name)


class _Unpicklable:
    def __reduce__(self):
        raise RuntimeError("refuses to be pickled")


class _Plain:
    """An ordinary user class: harmless, but still code a snapshot must not import."""

    def __init__(self):
        self.value = 3


class _Exploit:
    """Unpickling this would create ``marker``: proof that loading ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# -- save and load ------------------------------------------------------------------------------


def test_save_then_load_round_trips_tensors_and_plain_values(tmp_path):
    path = tmp_path / "snapshot.pt"
    save_snapshot(_state(), path)
    loaded = load_snapshot(path)
    assert loaded.pop("format_version") == FORMAT_VERSION
    _assert_same(loaded, _state())
    assert _leftovers(tmp_path) == []


def test_a_failed_save_keeps_the_previous_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "snapshot.pt"
    save_snapshot(_state(1.0), path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="refuses to be pickled"):
        save_snapshot({**_state(2.0), "bad": _Unpicklable()}, path)
    assert path.read_bytes() == before
    assert torch.equal(load_snapshot(path)["weights"], torch.full((3, 4), 1.0))
    assert _leftovers(tmp_path) == [], "a failed save left its temporary file behind"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["snapshot.pt"]


def test_a_failed_first_save_leaves_nothing_at_all(tmp_path):
    path = tmp_path / "snapshot.pt"
    with pytest.raises(RuntimeError):
        save_snapshot({"bad": _Unpicklable()}, path)
    assert list(tmp_path.iterdir()) == []


def test_save_replaces_the_file_in_one_step(tmp_path):
    path = tmp_path / "snapshot.pt"
    save_snapshot(_state(1.0), path)
    inode = path.stat().st_ino
    save_snapshot(_state(2.0), path)
    # A rename puts a new file in place; writing in place would keep the inode and could tear.
    assert path.stat().st_ino != inode
    assert torch.equal(load_snapshot(path)["weights"], torch.full((3, 4), 2.0))
    assert _leftovers(tmp_path) == []


def test_load_refuses_an_arbitrary_python_object_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format_version": FORMAT_VERSION, "payload": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt: cannot read the checkpoint"):
        load_snapshot(path)
    assert not marker.exists(), "loading a snapshot executed code from the file"


def test_load_refuses_a_plain_pickle_of_a_custom_class(tmp_path):
    path = tmp_path / "custom.pt"
    torch.save({"format_version": FORMAT_VERSION, "obj": _Plain()}, path)
    with pytest.raises(CheckpointError, match=r"custom\.pt"):
        load_snapshot(path)
    # and a bare pickle (not even a torch file) is refused as well
    raw = tmp_path / "raw.pt"
    payload = {"format_version": FORMAT_VERSION, "x": _Exploit(tmp_path / "m")}
    raw.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match=r"raw\.pt"):
        load_snapshot(raw)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"format_version": FORMAT_VERSION + 1, "x": 1}, "not a NeuralSync checkpoint of format"),
        ({"x": 1}, "not a NeuralSync checkpoint of format"),
        ([1, 2, 3], "not a NeuralSync checkpoint of format"),
    ],
)
def test_load_refuses_foreign_or_other_version_files(tmp_path, content, message):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=message):
        load_snapshot(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "missing"])
def test_load_of_a_damaged_file_is_a_checkpoint_error_naming_it(tmp_path, damage):
    path = tmp_path / "snapshot.pt"
    save_snapshot(_state(), path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    with pytest.raises(CheckpointError, match=r"snapshot\.pt"):
        load_snapshot(path)


# -- digest -------------------------------------------------------------------------------------


def test_digest_is_stable_across_key_order_copies_and_a_save_load_round_trip(tmp_path):
    a = _state()
    b = dict(reversed(list(_state().items())))
    assert state_digest(a) == state_digest(b)
    assert state_digest(a) == state_digest(a)
    path = tmp_path / "s.pt"
    save_snapshot(a, path)
    loaded = load_snapshot(path)
    assert state_digest(loaded) == state_digest({"format_version": FORMAT_VERSION, **a})
    assert len(state_digest(a)) == 64


@pytest.mark.parametrize(
    "change",
    [
        "one_ulp_in_a_tensor",
        "tensor_dtype",
        "tensor_shape",
        "zero_d_tensor",
        "float_last_digit",
        "int_vs_float",
        "list_order",
        "extra_key",
        "none_vs_false",
        "key_name",
        "string",
    ],
)
def test_digest_is_sensitive_to_any_change(change):
    base = _state()
    changed = _state()
    if change == "one_ulp_in_a_tensor":
        w = changed["weights"].clone()
        w[2, 3] = torch.nextafter(w[2, 3], torch.tensor(2.0))
        changed["weights"] = w
    elif change == "tensor_dtype":
        changed["weights"] = changed["weights"].double()
    elif change == "tensor_shape":
        changed["weights"] = changed["weights"].reshape(4, 3)
    elif change == "zero_d_tensor":
        changed["step"] = torch.tensor(6.0)
    elif change == "float_last_digit":
        changed["floats"] = [np.nextafter(0.1, 1.0), 2.5e-300]
    elif change == "int_vs_float":
        changed["position"] = 10.0
    elif change == "list_order":
        changed["nested"]["rows"] = [1, 3, 2]
    elif change == "extra_key":
        changed["nested"]["more"] = 0
    elif change == "none_vs_false":
        changed["nested"]["none"] = False
    elif change == "key_name":
        changed["nested"]["Name"] = changed["nested"].pop("name")
    elif change == "string":
        changed["nested"]["name"] = "AAB"
    assert state_digest(changed) != state_digest(base)


def test_digest_sees_every_element_of_a_numpy_array():
    """repr() of an array rounds to 8 digits and elides long arrays; the digest must not."""
    a = np.linspace(0.0, 1.0, 5000)
    b = a.copy()
    b[2500] = np.nextafter(b[2500], 2.0)
    assert state_digest({"x": a}) != state_digest({"x": b})
    assert state_digest({"x": np.array([1.0])}) != state_digest({"x": np.array([1.0 + 1e-12])})
    assert state_digest({"x": a}) == state_digest({"x": a.copy()})


# -- the store ----------------------------------------------------------------------------------


def test_store_keeps_the_newest_two_and_names_them_by_position(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", keep=2)
    assert store.paths() == []  # no directory yet
    for position in (100, 200, 300, 1000, 1500):
        store.save({"position": position, "w": torch.full((2,), float(position))}, position)
    names = [p.name for p in store.paths()]
    assert names == ["state-000000001500.pt", "state-000000001000.pt"]
    latest = store.latest()
    assert latest["position"] == 1500
    assert latest["path"] == str(tmp_path / "checkpoints" / "state-000000001500.pt")
    assert torch.equal(latest["w"], torch.full((2,), 1500.0))
    assert _leftovers(tmp_path / "checkpoints") == []


def test_store_keep_three_and_position_order_not_write_order(tmp_path):
    store = CheckpointStore(tmp_path, keep=3)
    for position in (5, 50, 500, 5000, 7):
        store.save({"position": position}, position)
    # 7 was written last but is the oldest position: it is pruned at once
    assert [p.name for p in store.paths()] == [
        "state-000000005000.pt",
        "state-000000000500.pt",
        "state-000000000050.pt",
    ]


def test_store_ignores_files_that_are_not_snapshots(tmp_path):
    store = CheckpointStore(tmp_path)
    store.save({"position": 1}, 1)
    for name in ("notes.txt", "state-1.pt", "state-000000000009.pt.bak", ".state-x.pt.tmp-1"):
        (tmp_path / name).write_text("junk")
    assert [p.name for p in store.paths()] == ["state-000000000001.pt"]
    assert store.latest()["position"] == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "foreign"])
def test_store_falls_back_to_the_previous_snapshot_when_the_newest_is_damaged(tmp_path, damage):
    store = CheckpointStore(tmp_path, keep=2)
    store.save({"position": 400, "w": torch.ones(64)}, 400)
    newest = store.save({"position": 800, "w": torch.zeros(64)}, 800)
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) - 20])
    elif damage == "garbage":
        newest.write_bytes(b"\x00not a zip" * 50)
    elif damage == "empty":
        newest.write_bytes(b"")
    else:
        torch.save({"something": "else"}, newest)
    latest = store.latest()
    assert latest["position"] == 400
    assert torch.equal(latest["w"], torch.ones(64))
    assert latest["path"].endswith("state-000000000400.pt")
    assert len(store.skipped_) == 1 and "state-000000000800.pt" in store.skipped_[0]


def test_store_with_no_readable_snapshot_is_a_checkpoint_error_listing_why(tmp_path):
    store = CheckpointStore(tmp_path)
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        store.latest()
    first = store.save({"position": 1}, 1)
    second = store.save({"position": 2}, 2)
    first.write_bytes(b"junk")
    second.write_bytes(b"")
    with pytest.raises(CheckpointError, match="no readable checkpoint") as info:
        store.latest()
    assert "state-000000000001.pt" in str(info.value)
    assert "state-000000000002.pt" in str(info.value)
