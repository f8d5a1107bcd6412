"""The portable snapshot format (memstore.snapshot)."""
from __future__ import annotations

import os
from pathlib import Path

import msgpack
import numpy as np
import pytest

from memstore import dtypes
from memstore.snapshot import (
    CorruptSnapshot,
    SnapshotWriter,
    latest_snapshot,
    list_snapshots,
    new_snapshot_path,
    prune_snapshots,
    read_snapshot,
    write_snapshot,
)
from memstore.spec import OptimizerSpec, TableSpec

SPEC = TableSpec("emb", num_rows=1000, dim=4, dtype="bfloat16",
                 optimizer=OptimizerSpec("adagrad", lr=0.1), shard_index=1, shard_count=3)


def _arrays(m: int = 5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = np.sort(rng.choice(np.arange(1, 1000, 3), m, replace=False)).astype(np.int64)  # shard 1 of 3
    rows = dtypes.from_float32(rng.normal(size=(m, 4)).astype(np.float32), "bfloat16")
    state = rng.random((m, 4)).astype(np.float32)
    return ids, rows, state


def test_round_trip(tmp_path: Path) -> None:
    ids, rows, state = _arrays()
    dedup = {"trainer-0": 7, "trainer-1": 3}
    dest = write_snapshot(tmp_path / "s1", SPEC, ids, rows, state, dedup)
    snap = read_snapshot(dest)
    assert snap.spec == SPEC and snap.dedup == dedup and list(snap.dedup) == ["trainer-0", "trainer-1"]
    np.testing.assert_array_equal(snap.ids, ids)
    np.testing.assert_array_equal(snap.rows, rows)
    np.testing.assert_array_equal(snap.state, state)
    np.testing.assert_array_equal(snap.local_ids(), ids // 3)
    assert snap.rows.dtype == np.uint16
    assert sorted(os.listdir(dest)) == ["ids.npy", "meta.msgpack", "rows.npy", "state.npy"]
    assert all(v.startswith("blake2b:") for v in snap.checksums.values())


def test_streamed_chunks_equal_one_write(tmp_path: Path) -> None:
    ids, rows, state = _arrays(9)
    with SnapshotWriter(tmp_path / "streamed", SPEC, num_rows=9, dedup={}) as writer:
        for start in range(0, 9, 4):
            writer.append(ids[start:start + 4], rows[start:start + 4], state[start:start + 4])
    write_snapshot(tmp_path / "whole", SPEC, ids, rows, state, {})
    assert read_snapshot(tmp_path / "streamed").checksums == read_snapshot(tmp_path / "whole").checksums


def test_empty_table(tmp_path: Path) -> None:
    spec = TableSpec("e", num_rows=10, dim=3)  # sgd: state width 0
    empty = np.zeros(0, np.int64)
    snap = read_snapshot(write_snapshot(tmp_path / "s", spec, empty, np.zeros((0, 3), np.float32),
                                        np.zeros((0, 0), np.float32), {}))
    assert snap.ids.shape == (0,) and snap.rows.shape == (0, 3) and snap.state.shape == (0, 0)


def test_checksum_detects_a_flipped_byte(tmp_path: Path) -> None:
    dest = write_snapshot(tmp_path / "s", SPEC, *_arrays(), {})
    data = bytearray((dest / "rows.npy").read_bytes())
    data[-1] ^= 0xFF
    (dest / "rows.npy").write_bytes(bytes(data))
    with pytest.raises(CorruptSnapshot, match="rows checksum"):
        read_snapshot(dest)
    read_snapshot(dest, verify=False)  # readable when asked not to verify


@pytest.mark.parametrize("damage", ["missing_file", "truncated", "bad_meta", "wrong_format"])
def test_damaged_snapshots_are_rejected(tmp_path: Path, damage: str) -> None:
    dest = write_snapshot(tmp_path / "s", SPEC, *_arrays(), {})
    if damage == "missing_file":
        (dest / "state.npy").unlink()
    elif damage == "truncated":
        data = (dest / "ids.npy").read_bytes()
        (dest / "ids.npy").write_bytes(data[:-8])
    elif damage == "bad_meta":
        (dest / "meta.msgpack").write_bytes(b"\xc1garbage")
    else:
        meta = msgpack.unpackb((dest / "meta.msgpack").read_bytes())
        meta["version"] = 99
        (dest / "meta.msgpack").write_bytes(msgpack.packb(meta))
    with pytest.raises(CorruptSnapshot):
        read_snapshot(dest)


def test_ids_must_belong_to_the_shard(tmp_path: Path) -> None:
    ids, rows, state = _arrays()
    write_snapshot(tmp_path / "s", SPEC, ids + 1, rows, state, {})  # shard 2's rows
    with pytest.raises(CorruptSnapshot, match="ids"):
        read_snapshot(tmp_path / "s")
    with pytest.raises(ValueError, match="ascending"):
        write_snapshot(tmp_path / "t", SPEC, ids[::-1].copy(), rows, state, {})


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    ids, rows, state = _arrays()
    with pytest.raises(ValueError):
        write_snapshot(tmp_path / "s", SPEC, ids, rows[:, :2], state, {})  # wrong row width
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileExistsError):
        write_snapshot(tmp_path, SPEC, ids, rows, state, {})


def test_arrays_never_hold_pickles(tmp_path: Path) -> None:
    dest = write_snapshot(tmp_path / "s", SPEC, *_arrays(), {})
    np.save(dest / "ids.npy", np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(CorruptSnapshot):
        read_snapshot(dest, mmap=False)


def test_latest_and_prune(tmp_path: Path) -> None:
    table_dir = tmp_path / "emb"
    assert latest_snapshot(table_dir) is None
    made = [write_snapshot(new_snapshot_path(table_dir), SPEC, *_arrays(), {}) for _ in range(4)]
    assert list_snapshots(table_dir) == made
    stale = table_dir / ".tmp-crashed"
    stale.mkdir()
    os.utime(stale, (0, 0))
    (table_dir / "20000101T000000.000000Z").mkdir()  # no meta: incomplete, never listed
    assert latest_snapshot(table_dir) == made[-1]
    removed = prune_snapshots(table_dir, keep=2)
    assert set(removed) == {made[0], made[1], stale}
    assert list_snapshots(table_dir) == made[2:]
