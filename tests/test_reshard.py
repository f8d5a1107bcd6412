"""`memstore reshard`: N shards' snapshots → M shards, every row, its optimizer state and the dedup
memory carried over exactly. Shards here are real backends behind a real `Store` (the request
layer that maps global ids to a shard's rows), without a gRPC server; the multi-process version
is tests/test_shards_processes.py."""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from memstore import cli
from memstore.backends.common import DataDirLock
from memstore.backends.lmdbstore import LmdbBackend
from memstore.backends.ram import RamBackend
from memstore.errors import InvalidArgument
from memstore.reshard import ReshardConfig, ReshardError, merge_dedup, reshard
from memstore.snapshot import CorruptSnapshot, latest_snapshot, read_snapshot
from memstore.spec import OptimizerSpec, TableSpec
from memstore.store import ShardLayout, Store

ROWS, DIM = 997, 6


def make_spec(optimizer: str = "adam", dtype: str = "float32", name: str = "emb", dim: int = DIM) -> TableSpec:
    return TableSpec(name, ROWS, dim, dtype, optimizer=OptimizerSpec(optimizer, 0.05))


def open_shards(dirs: list[Path], backend: type = RamBackend) -> list[Store]:
    return [Store(backend(d), ShardLayout(i, len(dirs))) for i, d in enumerate(dirs)]


def train(stores: list[Store], spec: TableSpec, steps: int = 4, seed: int = 0, first_seq: int = 1) -> None:
    """The same updates on every layout: each shard gets its part, from its own client (like
    ShardedClient: one client_id and seq stream per shard)."""
    rng = np.random.default_rng(seed)
    for step in range(steps):
        ids = rng.integers(0, spec.num_rows, 400)                      # (400,) with duplicates
        grads = rng.standard_normal((400, spec.dim)).astype(np.float32)  # (400, dim)
        for index, store in enumerate(stores):
            mine = ids % len(stores) == index
            if mine.any():
                store.update(spec.name, ids[mine], grads[mine], f"client-{index}", first_seq + step)


def lookup_all(stores: list[Store], name: str) -> np.ndarray:
    """Every row of the table, each read from the shard that owns it."""
    ids = np.arange(ROWS)
    rows = None
    for index, store in enumerate(stores):
        mine = ids[ids % len(stores) == index]
        part = store.lookup(name, mine)
        rows = np.empty((ROWS, part.shape[1]), part.dtype) if rows is None else rows
        rows[mine] = part
    return rows


def merged_snapshot(dirs: list[Path], name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, rows, state) of the newest snapshots of all shards, by ascending global id."""
    snaps = [read_snapshot(latest_snapshot(d / "snapshots" / name)) for d in dirs]
    ids = np.concatenate([s.ids for s in snaps])
    order = np.argsort(ids)
    return ids[order], np.concatenate([s.rows for s in snaps])[order], np.concatenate([s.state for s in snaps])[order]


def trained_cluster(root: Path, shards: int, spec: TableSpec) -> list[Path]:
    """`shards` RAM data dirs holding a trained, snapshotted table; the backends are closed."""
    dirs = [root / f"in{i}" for i in range(shards)]
    stores = open_shards(dirs)
    for store in stores:
        store.create_table(spec)
    train(stores, spec)
    for store in stores:
        store.snapshot(spec.name)
        store.backend.close()
    return dirs


def config(sources: list[Path], out: Path, shards: int, **kwargs) -> ReshardConfig:
    return ReshardConfig(tuple(sources), out, shards, chunk_rows=97, **kwargs)  # small chunks: many steps


@pytest.mark.parametrize("n, m, optimizer, dtype", [
    (3, 2, "adam", "float32"),
    (2, 5, "adagrad", "bfloat16"),
    (1, 3, "rowwise_adagrad", "float16"),
    (4, 1, "sgd", "float32"),
    (2, 2, "adam", "float16"),
])
def test_resharded_table_equals_the_unsharded_one(tmp_path, n, m, optimizer, dtype):
    spec = make_spec(optimizer, dtype)
    sources = trained_cluster(tmp_path, n, spec)
    reference = open_shards([tmp_path / "reference"])  # one shard, same updates
    reference[0].create_table(spec)
    train(reference, spec)

    [report] = reshard(config(sources, tmp_path / "out", m), log=lambda _: None)
    outputs = [tmp_path / "out" / f"shard-{j}" for j in range(m)]
    assert report.checksum_in == report.checksum_out
    assert sum(report.rows_in) == sum(report.rows_out) == reference[0].describe("emb").rows_materialized

    reference[0].snapshot("emb")  # before any lookup: RAM lookups materialize the rows they read
    for got, want in zip(merged_snapshot(outputs, "emb"), merged_snapshot([tmp_path / "reference"], "emb")):
        np.testing.assert_array_equal(got, want)  # ids, rows and optimizer state

    resharded = open_shards(outputs)  # RAM backends restore from the output as it is
    assert [s.spec("emb").shard_index for s in resharded] == list(range(m))
    assert {s.spec("emb").shard_count for s in resharded} == {m}
    np.testing.assert_array_equal(lookup_all(resharded, "emb"), lookup_all(reference, "emb"))

    train(resharded, spec, steps=2, seed=1, first_seq=100)  # training goes on from the same state
    train(reference, spec, steps=2, seed=1, first_seq=100)
    np.testing.assert_array_equal(lookup_all(resharded, "emb"), lookup_all(reference, "emb"))


def test_every_table_and_the_report(tmp_path):
    sources = trained_cluster(tmp_path, 3, make_spec())
    for store in open_shards(sources):  # a second table, never updated
        store.create_table(make_spec("sgd", name="cold", dim=3))
        store.backend.close()
    reports = reshard(config(sources, tmp_path / "out", 2), log=lambda _: None)
    assert [r.name for r in reports] == ["cold", "emb"]
    assert reports[0].rows_in == [0, 0, 0] and reports[0].rows_out == [0, 0]
    saved = json.loads((tmp_path / "out" / "reshard-report.json").read_text())
    assert saved["shards_in"] == 3 and saved["shards_out"] == 2
    assert [t["rows_out"] for t in saved["tables"]] == [r.rows_out for r in reports]
    assert saved["tables"][1]["checksum_in"] == saved["tables"][1]["checksum_out"]


def test_checksum_is_the_same_for_every_layout(tmp_path):
    sources = trained_cluster(tmp_path, 3, make_spec())
    first = reshard(config(sources, tmp_path / "to2", 2), log=lambda _: None)[0]
    second = reshard(config([tmp_path / "to2" / f"shard-{j}" for j in range(2)], tmp_path / "to5", 5),
                     log=lambda _: None)[0]
    assert first.checksum_in == second.checksum_in == second.checksum_out


def test_dedup_memory_carries_the_max_seq_of_each_client_into_every_shard(tmp_path):
    sources = trained_cluster(tmp_path, 2, make_spec())  # client-0 and client-1 both reached seq 4
    stores = open_shards(sources)
    stores[0].update("emb", np.array([0]), np.ones((1, DIM), np.float32), "late", 9)
    stores[1].update("emb", np.array([1]), np.ones((1, DIM), np.float32), "late", 7)
    for store in stores:
        store.snapshot("emb")
        store.backend.close()
    reshard(config(sources, tmp_path / "out", 3), log=lambda _: None)
    for j in range(3):
        snap = read_snapshot(latest_snapshot(tmp_path / "out" / f"shard-{j}" / "snapshots" / "emb"))
        assert snap.dedup == {"client-0": 4, "client-1": 4, "late": 9}
    stores = open_shards([tmp_path / "out" / f"shard-{j}" for j in range(3)])
    ids = np.array([0, 1, 2])  # one row per new shard: a stale retry is refused on each
    assert not any(s.update("emb", ids[j:j + 1], np.ones((1, DIM), np.float32), "late", 9)[0]
                   for j, s in enumerate(stores))
    assert all(s.update("emb", ids[j:j + 1], np.ones((1, DIM), np.float32), "late", 10)[0]
               for j, s in enumerate(stores))


def test_merged_dedup_memory_keeps_the_most_recent_clients():
    memories = [{"a": 1, "b": 5, "c": 2}, {"c": 9, "d": 1}]  # oldest first in each shard
    assert list(merge_dedup(memories).items()) == [("a", 1), ("b", 5), ("c", 9), ("d", 1)]  # oldest first
    assert merge_dedup(memories, max_clients=2) == {"c": 9, "d": 1}  # the newest of each shard


@pytest.mark.parametrize("optimizer", ["adagrad", "sgd"])
def test_lmdb_output_serves_the_same_rows_state_and_dedup(tmp_path, optimizer):
    spec = make_spec(optimizer, "bfloat16")
    sources = trained_cluster(tmp_path, 3, spec)
    reshard(config(sources, tmp_path / "out", 2, backend="lmdb"), log=lambda _: None)
    outputs = [tmp_path / "out" / f"shard-{j}" for j in range(2)]
    ram_view = merged_snapshot(outputs, "emb")
    expected_rows = lookup_all(open_shards(sources), "emb")  # the RAM inputs restore from their snapshots

    lmdb = open_shards(outputs, LmdbBackend)
    np.testing.assert_array_equal(lookup_all(lmdb, "emb"), expected_rows)
    for store in lmdb:
        store.snapshot("emb")  # an LMDB export of what was imported
        assert read_snapshot(latest_snapshot(store.backend.data_dir / "snapshots" / "emb")).dedup == {
            "client-0": 4, "client-1": 4, "client-2": 4}
    for got, want in zip(merged_snapshot(outputs, "emb"), ram_view):
        np.testing.assert_array_equal(got, want)


def test_lmdb_inputs_changed_after_the_snapshot_are_refused_unless_allowed(tmp_path):
    spec = make_spec("rowwise_adagrad")
    dirs = [tmp_path / f"in{i}" for i in range(2)]
    stores = open_shards(dirs, LmdbBackend)
    for store in stores:
        store.create_table(spec)
    train(stores, spec)
    expected = lookup_all(stores, "emb")
    for store in stores:
        store.snapshot("emb")
    time.sleep(0.05)  # file times tick coarsely
    stores[1].update("emb", np.array([1]), np.ones((1, DIM), np.float32), "late", 1)  # not in the snapshot
    for store in stores:
        store.backend.close()
    with pytest.raises(ReshardError, match="changed after snapshot .* --allow-stale"):  # refused by default
        reshard(config(dirs, tmp_path / "refused", 3))
    messages: list[str] = []
    reshard(dataclasses.replace(config(dirs, tmp_path / "out", 3), allow_stale=True), log=messages.append)
    warnings = [m for m in messages if m.startswith("warning:")]
    assert len(warnings) == 1  # shard 1 only
    assert warnings[0].startswith(f"warning: {dirs[1]}/tables/emb/data.mdb changed after snapshot")
    resharded = open_shards([tmp_path / "out" / f"shard-{j}" for j in range(3)])
    np.testing.assert_array_equal(lookup_all(resharded, "emb"), expected)  # the snapshotted state


def test_before_picks_an_older_snapshot(tmp_path):
    sources = trained_cluster(tmp_path, 2, make_spec())
    first = [read_snapshot(latest_snapshot(d / "snapshots" / "emb")) for d in sources]
    before = max(datetime.fromisoformat(s.created) for s in first)
    stores = open_shards(sources)
    train(stores, make_spec(), steps=1, seed=5, first_seq=50)
    for store in stores:
        store.snapshot("emb")
        store.backend.close()
    [old] = reshard(config(sources, tmp_path / "old", 1, before=before), log=lambda _: None)
    [new] = reshard(config(sources, tmp_path / "new", 1), log=lambda _: None)
    assert old.sources == [str(s.path) for s in first]
    assert old.checksum_in != new.checksum_in


# ---- refusals ------------------------------------------------------------------------------------


def test_missing_shard(tmp_path):
    sources = trained_cluster(tmp_path, 3, make_spec())
    with pytest.raises(ReshardError, match=r"2 data dirs given, but the snapshots are .*shard 2 of 3"):
        reshard(config([sources[0], sources[2]], tmp_path / "out", 2))
    assert not (tmp_path / "out").exists()  # nothing written


def test_same_shard_twice(tmp_path):
    sources = trained_cluster(tmp_path, 2, make_spec())
    with pytest.raises(ReshardError, match="each input data dir once"):
        reshard(config([sources[0], sources[0]], tmp_path / "out", 2))
    shutil.copytree(sources[0], tmp_path / "copy")
    with pytest.raises(ReshardError, match=r"not shards 0\.\.1 once each"):
        reshard(config([sources[0], tmp_path / "copy"], tmp_path / "out", 2))


def test_shards_of_different_tables(tmp_path):
    first = trained_cluster(tmp_path / "a", 2, make_spec())
    second = trained_cluster(tmp_path / "b", 2, make_spec(dim=DIM + 1))
    with pytest.raises(ReshardError, match=r"different tables \(dim: 6 vs 7\)"):
        reshard(config([first[0], second[1]], tmp_path / "out", 3))


def test_table_missing_on_one_shard(tmp_path):
    sources = trained_cluster(tmp_path, 2, make_spec())
    shutil.rmtree(sources[1] / "snapshots" / "emb")
    with pytest.raises(ReshardError, match=r"no snapshot in .*in1/snapshots/emb"):
        reshard(config(sources, tmp_path / "out", 3))


def test_damaged_snapshot(tmp_path):
    sources = trained_cluster(tmp_path, 2, make_spec())
    rows_file = latest_snapshot(sources[1] / "snapshots" / "emb") / "rows.npy"
    data = bytearray(rows_file.read_bytes())
    data[-1] ^= 0xFF
    rows_file.write_bytes(bytes(data))
    with pytest.raises(CorruptSnapshot, match="rows checksum mismatch"):
        reshard(config(sources, tmp_path / "out", 3), log=lambda _: None)


def test_running_shard(tmp_path):
    sources = trained_cluster(tmp_path, 2, make_spec())
    held = DataDirLock(sources[1])  # what a running daemon holds
    try:
        with pytest.raises(ReshardError, match="in use by another memstore.*stop every shard"):
            reshard(config(sources, tmp_path / "out", 3))
    finally:
        held.release()


def test_bad_arguments(tmp_path):
    sources = trained_cluster(tmp_path, 2, make_spec())
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(ReshardError, match="is not empty"):
        reshard(config(sources, tmp_path / "full", 2))
    with pytest.raises(ReshardError, match="--shards must be >= 1"):
        reshard(config(sources, tmp_path / "out", 0))
    with pytest.raises(ReshardError, match="does not exist"):
        reshard(config([*sources, tmp_path / "nope"], tmp_path / "out", 2))
    with pytest.raises(InvalidArgument, match="invalid table name"):
        reshard(config(sources, tmp_path / "out", 2, tables=("../etc",)))
    with pytest.raises(ReshardError, match="no snapshot"):
        reshard(config(sources, tmp_path / "out", 2, tables=("absent",)))


def test_command_line(tmp_path, capsys):
    sources = trained_cluster(tmp_path, 3, make_spec())
    argv = ["reshard", "--from", *map(str, sources), "--to", str(tmp_path / "out"), "--shards", "2", "--table", "emb"]
    assert cli.main(argv) == 0
    out = capsys.readouterr()
    assert "in == out" in out.out and "reshard-report.json" in out.out
    assert "emb: writing shard 1" in out.err  # progress
    assert cli.main(argv) == 1  # the output dir is no longer empty
    assert "is not empty" in capsys.readouterr().err


def test_lmdb_tables_built_by_reshard_are_not_stale_inputs(tmp_path):
    """Tables `reshard --backend lmdb` builds are newer files than their snapshots, but hold
    exactly them: resharding them again (unchanged) must not be refused."""
    sources = trained_cluster(tmp_path, 2, make_spec())
    reshard(config(sources, tmp_path / "lmdb", 3, backend="lmdb"))
    time.sleep(0.05)  # file times tick coarsely
    again = [tmp_path / "lmdb" / f"shard-{j}" for j in range(3)]
    reshard(config(again, tmp_path / "back", 2))  # no ReshardError
    stores = open_shards([tmp_path / "back" / f"shard-{j}" for j in range(2)])
    np.testing.assert_array_equal(lookup_all(stores, "emb"), lookup_all(open_shards(sources), "emb"))
