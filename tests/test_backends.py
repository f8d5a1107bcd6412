"""Storage backends (RAM, RAM memory-mapped, LMDB) against one set of expectations, on real files."""
from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from memstore import dtypes, optimizers
from memstore.backends import open_backend
from memstore.backends.base import Backend
from memstore.errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted
from memstore.init import init_rows
from memstore.snapshot import list_snapshots, read_snapshot
from memstore.spec import InitSpec, OptimizerSpec, TableSpec

KINDS = {"ram": ("ram", {}), "ram-memmap": ("ram", {"memmap": True}), "lmdb": ("lmdb", {"sync": False})}


@pytest.fixture(params=list(KINDS))
def kind(request) -> str:
    return request.param


def _open(kind: str, data_dir: Path, **options) -> Backend:
    backend_kind, defaults = KINDS[kind]
    return open_backend(backend_kind, data_dir, **{**defaults, **options})


@pytest.fixture
def backend(kind: str, tmp_path: Path):
    b = _open(kind, tmp_path / "data")
    yield b
    b.close()


def _spec(name: str = "emb", dtype: str = "float32", optimizer: str = "sgd", **kw) -> TableSpec:
    return TableSpec(name, num_rows=3000, dim=6, dtype=dtype, init=InitSpec("normal", 0.5, seed=9),
                     optimizer=OptimizerSpec(optimizer, lr=0.1), shard_index=1, shard_count=3, **kw)


def _initial(spec: TableSpec, local_ids: np.ndarray) -> np.ndarray:
    return init_rows(spec.init, spec.to_global(np.asarray(local_ids)), spec.dim)


def _grads(n: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def test_table_lifecycle(backend: Backend) -> None:
    spec = _spec()
    table = backend.create_table(spec)
    assert table.spec == spec and backend.get("emb") is table
    assert [t.spec.name for t in backend.tables()] == ["emb"]
    with pytest.raises(AlreadyExists):
        backend.create_table(spec)
    backend.drop_table("emb")
    assert backend.tables() == []
    with pytest.raises(NotFound):
        backend.get("emb")
    with pytest.raises(NotFound):
        backend.drop_table("emb")
    with pytest.raises(NotFound):
        table.lookup(np.array([1]))  # a dropped table refuses instead of reading freed storage


def test_untouched_rows_read_as_their_initial_value(backend: Backend, kind: str) -> None:
    spec = _spec(dtype="bfloat16")
    table = backend.create_table(spec)
    ids = np.array([0, 999, 5, 5, 17], dtype=np.int64)  # local rows of shard 1 of 3
    expected = dtypes.from_float32(_initial(spec, ids), "bfloat16")  # global ids 1, 2998, 16, ...
    for _ in range(2):  # RAM keeps what the first lookup computed; LMDB writes nothing
        rows = table.lookup(ids)
        assert rows.dtype == np.uint16 and rows.shape == (5, 6) and rows.flags.c_contiguous
        np.testing.assert_array_equal(rows, expected)
    assert table.usage().rows_materialized == (4 if kind.startswith("ram") else 0)


def test_lookup_order_and_duplicates(backend: Backend) -> None:
    spec = _spec()
    table = backend.create_table(spec)
    touched = np.array([3, 7, 11], dtype=np.int64)
    assert table.apply_update(touched, _grads(3, 6, 0), "c", 1)
    one_by_one = {i: table.lookup(np.array([i]))[0] for i in (3, 7, 11, 20)}
    ids = np.array([11, 20, 3, 11, 7, 20, 3], dtype=np.int64)
    rows = table.lookup(ids)
    np.testing.assert_array_equal(rows, np.stack([one_by_one[i] for i in ids]))
    np.testing.assert_array_equal(one_by_one[20], _initial(spec, [20])[0])  # untouched
    assert table.lookup(np.zeros(0, np.int64)).shape == (0, 6)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad", "adam"])
def test_optimizer_through_backend(backend: Backend, dtype: str, optimizer: str) -> None:
    """Two updates (the second on partly materialized rows) equal the optimizer run by hand."""
    spec = _spec(dtype=dtype, optimizer=optimizer)
    table = backend.create_table(spec)
    ref_rows = dtypes.to_float32(dtypes.from_float32(_initial(spec, np.arange(20)), dtype), dtype)  # (20, 6)
    ref_state = optimizers.initial_state(spec.optimizer, 20, 6)
    table.lookup(np.arange(10, dtype=np.int64))  # rows read before their first update start the same
    for step_no, ids in enumerate([np.array([2, 5, 9]), np.array([1, 5, 9, 19])]):
        grads = _grads(len(ids), 6, step_no)
        assert table.apply_update(ids.astype(np.int64), grads, "trainer", step_no + 1)
        rows, state = ref_rows[ids], ref_state[ids]
        optimizers.step(spec.optimizer, rows, state, grads)
        ref_rows[ids] = dtypes.to_float32(dtypes.from_float32(rows, dtype), dtype)  # stored precision
        ref_state[ids] = state
    got = table.lookup(np.arange(20, dtype=np.int64))
    np.testing.assert_array_equal(got, dtypes.from_float32(ref_rows, dtype))


def test_dedup(backend: Backend) -> None:
    table = backend.create_table(_spec())
    ids, grads = np.array([4], np.int64), np.ones((1, 6), np.float32)
    before = table.lookup(ids)
    assert table.apply_update(ids, grads, "a", 5)
    once = table.lookup(ids)
    assert not table.apply_update(ids, grads, "a", 5)   # a retried delivery
    assert not table.apply_update(ids, grads, "a", 3)   # an older one
    np.testing.assert_array_equal(table.lookup(ids), once)
    assert table.apply_update(ids, grads, "b", 1)       # clients are independent
    assert table.apply_update(ids, grads, "", 0)        # no client id: no check
    assert table.apply_update(ids, grads, "", 0)
    np.testing.assert_allclose(table.lookup(ids), before - 4 * 0.1 * grads, rtol=1e-5)


def test_restart_restores_rows_state_and_dedup(kind: str, tmp_path: Path) -> None:
    spec = _spec(dtype="float16", optimizer="adagrad")
    backend = _open(kind, tmp_path / "data")
    table = backend.create_table(spec)
    ids = np.arange(0, 1000, 7, dtype=np.int64)
    table.apply_update(ids, _grads(len(ids), 6, 1), "trainer", 41)
    backend.create_table(_spec("other"))
    expected, usage = table.lookup(np.arange(1000, dtype=np.int64)), table.usage()
    backend.checkpoint()  # what the server does on SIGTERM
    backend.close()

    backend = _open(kind, tmp_path / "data")
    assert sorted(t.spec.name for t in backend.tables()) == ["emb", "other"]
    table = backend.get("emb")
    assert table.spec == spec
    np.testing.assert_array_equal(table.lookup(np.arange(1000, dtype=np.int64)), expected)
    assert table.usage().rows_materialized == usage.rows_materialized >= len(ids)
    assert not table.apply_update(ids, _grads(len(ids), 6, 1), "trainer", 41)  # dedup survived
    # The optimizer state survived too: the next step equals one computed from the old state.
    assert table.apply_update(ids[:1], np.ones((1, 6), np.float32), "trainer", 42)
    backend.close()


def test_snapshot_exports_the_portable_format(backend: Backend, tmp_path: Path) -> None:
    spec = _spec(dtype="bfloat16", optimizer="rowwise_adagrad")
    table = backend.create_table(spec)
    ids = np.array([1, 2, 900], np.int64)
    table.apply_update(ids, _grads(3, 6, 2), "c", 3)
    paths = [backend.snapshot("emb") for _ in range(3)]
    table_dir = paths[0].parent
    assert table_dir == backend.data_dir / "snapshots" / "emb"
    assert list_snapshots(table_dir)[-2:] == paths[1:] and len(list_snapshots(table_dir)) == 2
    snap = read_snapshot(paths[-1])
    assert snap.spec == spec and snap.dedup == {"c": 3}
    np.testing.assert_array_equal(snap.ids, spec.to_global(ids))   # global ids
    np.testing.assert_array_equal(snap.rows, table.lookup(ids))
    assert snap.state.shape == (3, 1) and np.all(snap.state > 0)
    with pytest.raises(NotFound):
        backend.snapshot("missing")


def test_drop_removes_files(backend: Backend, kind: str) -> None:
    backend.create_table(_spec())
    backend.get("emb").apply_update(np.array([1], np.int64), np.ones((1, 6), np.float32), "c", 1)
    backend.snapshot("emb")
    table_files = {"lmdb": backend.data_dir / "tables" / "emb",
                   "ram-memmap": backend.data_dir / "memmap" / "emb",
                   "ram": backend.data_dir / "snapshots" / "emb"}[kind]
    assert table_files.exists()
    backend.drop_table("emb")
    assert not table_files.exists()
    assert not (backend.data_dir / "snapshots" / "emb").exists()


def test_concurrent_lookups_never_see_unwritten_rows(backend: Backend) -> None:
    """Rows are either their initial value or an updated one, never the zeros beneath."""
    spec = _spec()
    table = backend.create_table(spec)
    ids = np.arange(500, dtype=np.int64)
    initial = _initial(spec, ids)
    stop, bad = threading.Event(), []

    def reader() -> None:
        while not stop.is_set():
            rows = table.lookup(ids)
            if np.any(np.all(rows == 0, axis=1)):
                bad.append(rows)

    thread = threading.Thread(target=reader)
    thread.start()
    for start in range(0, 500, 25):
        chunk = ids[start:start + 25]
        table.apply_update(chunk, np.full((25, 6), -1.0, np.float32), "", 0)
    stop.set()
    thread.join()
    assert not bad
    np.testing.assert_allclose(table.lookup(ids), initial + 0.1, rtol=1e-6)


def test_data_dir_is_exclusive(backend: Backend, kind: str) -> None:
    with pytest.raises(FailedPrecondition, match="in use"):
        _open(kind, backend.data_dir)


def test_open_backend_rejects_unknown_kinds_and_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ram, lmdb"):
        open_backend("redis", tmp_path)
    with pytest.raises(ValueError, match="map_size"):
        open_backend("ram", tmp_path, map_size=1)


# ---- RAM specifics ---------------------------------------------------------------------------

def test_ram_create_is_lazy_and_capped(tmp_path: Path) -> None:
    backend = open_backend("ram", tmp_path, max_bytes=2 * 10**9)
    big = TableSpec("big", num_rows=10**8, dim=8, dtype="float16")  # 1.7 GB dense, none touched
    table = backend.create_table(big)
    assert table.usage().rows_materialized == 0
    np.testing.assert_array_equal(table.lookup(np.array([10**8 - 1])),
                                  dtypes.from_float32(init_rows(big.init, np.array([10**8 - 1]), 8),
                                                      "float16"))
    with pytest.raises(ResourceExhausted, match="max_bytes"):
        backend.create_table(TableSpec("more", num_rows=2 * 10**7, dim=8, dtype="float16"))
    backend.close()


def test_ram_memmap_files_live_under_the_data_dir(tmp_path: Path) -> None:
    backend = open_backend("ram", tmp_path, memmap=True)
    backend.create_table(TableSpec("m", num_rows=10**6, dim=16, optimizer=OptimizerSpec("adagrad")))
    files = {p.name: p for p in (tmp_path / "memmap" / "m").iterdir()}
    assert set(files) == {"rows.bin", "state.bin", "materialized.bin"}
    assert files["rows.bin"].stat().st_size == 10**6 * 64           # full size ...
    assert files["rows.bin"].stat().st_blocks * 512 < 10**6         # ... but sparse
    backend.close()


def test_ram_falls_back_to_an_older_snapshot(tmp_path: Path) -> None:
    backend = open_backend("ram", tmp_path, keep_snapshots=3)
    table = backend.create_table(_spec())
    table.apply_update(np.array([1], np.int64), np.ones((1, 6), np.float32), "c", 1)
    good = backend.snapshot("emb")
    expected = table.lookup(np.array([1]))
    table.apply_update(np.array([1], np.int64), np.ones((1, 6), np.float32), "c", 2)
    damaged = backend.snapshot("emb")
    backend.close()
    (damaged / "rows.npy").write_bytes((damaged / "rows.npy").read_bytes()[:-4] + b"\0\0\0\0")
    backend = open_backend("ram", tmp_path)
    np.testing.assert_array_equal(backend.get("emb").lookup(np.array([1])), expected)
    assert good.exists()
    backend.close()


# ---- LMDB specifics --------------------------------------------------------------------------

def test_lmdb_map_grows(tmp_path: Path) -> None:
    backend = open_backend("lmdb", tmp_path, sync=False, map_size=1 << 20)
    spec = TableSpec("g", num_rows=10**6, dim=64, optimizer=OptimizerSpec("adagrad"))
    table = backend.create_table(spec)
    for seq, start in enumerate(range(0, 40_000, 10_000), 1):  # 40k rows x 512 B: ~20 MB
        ids = np.arange(start, start + 10_000, dtype=np.int64)
        assert table.apply_update(ids, np.ones((10_000, 64), np.float32), "c", seq)
    assert table._map_size() > 20 << 20
    assert table.usage().rows_materialized == 40_000
    np.testing.assert_allclose(table.lookup(np.array([0, 39_999])), _initial_global(spec, [0, 39_999]) - 0.01,
                               rtol=1e-5, atol=1e-6)
    backend.close()


def _initial_global(spec: TableSpec, ids: list[int]) -> np.ndarray:
    return init_rows(spec.init, np.array(ids), spec.dim)


def test_lmdb_max_map_size_refuses_and_changes_nothing(tmp_path: Path) -> None:
    backend = open_backend("lmdb", tmp_path, sync=False, map_size=1 << 20, max_map_size=4 << 20)
    table = backend.create_table(TableSpec("full", num_rows=10**6, dim=64))
    small = np.arange(1000, dtype=np.int64)
    assert table.apply_update(small, np.ones((1000, 64), np.float32), "c", 1)
    before, usage = table.lookup(np.arange(20_000, dtype=np.int64)), table.usage()
    big = np.arange(20_000, dtype=np.int64)                           # 20k x 256 B > 4 MiB
    with pytest.raises(ResourceExhausted, match="max_map_size"):
        table.apply_update(big, np.ones((20_000, 64), np.float32), "c", 2)
    np.testing.assert_array_equal(table.lookup(big), before)
    assert table.usage().rows_materialized == usage.rows_materialized
    assert table.apply_update(small, np.ones((1000, 64), np.float32), "c", 2)  # seq 2 never recorded
    backend.close()


def test_lmdb_dedup_memory_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from memstore.backends import lmdb_table
    monkeypatch.setattr(lmdb_table, "MAX_CLIENTS", 3)
    backend = open_backend("lmdb", tmp_path, sync=False)
    table = backend.create_table(_spec())
    one, g = np.array([1], np.int64), np.ones((1, 6), np.float32)
    for seq, client in enumerate(["a", "b", "c", "a", "d"], 1):  # "b" is the oldest when "d" arrives
        assert table.apply_update(one, g, client, seq)
    with table._read_txn() as txn:
        assert list(table._dedup_memory(txn)) == ["c", "a", "d"]
    assert table.apply_update(one, g, "b", 1)   # forgotten: applied again (and "c" is evicted)
    assert not table.apply_update(one, g, "a", 4)
    backend.close()


def test_lmdb_refuses_use_after_fork(tmp_path: Path) -> None:
    backend = open_backend("lmdb", tmp_path, sync=False)
    table = backend.create_table(_spec())
    pid = os.fork()
    if pid == 0:  # child: must refuse, never touch the parent's environment
        try:
            table.lookup(np.array([1]))
            os._exit(1)
        except FailedPrecondition:
            os._exit(0)
        except Exception:  # noqa: BLE001 -- the child must exit here, never return into pytest
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert table.lookup(np.array([1])).shape == (1, 6)  # the parent is unaffected
    backend.close()


def test_lmdb_recovers_from_map_full_without_pre_growing(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """MapFullError mid-transaction: the txn is aborted, the map grown, the update retried."""
    from memstore.backends.lmdbstore import LmdbTable
    monkeypatch.setattr(LmdbTable, "_reserve", lambda self, rows: None)
    backend = open_backend("lmdb", tmp_path, sync=False, map_size=1 << 20)
    table = backend.create_table(TableSpec("g", num_rows=10**6, dim=64))
    ids = np.arange(20_000, dtype=np.int64)  # ~5 MB: several MapFullErrors in a row
    assert table.apply_update(ids, np.ones((20_000, 64), np.float32), "c", 1)
    assert table.usage().rows_materialized == 20_000
    assert not table.apply_update(ids, np.ones((20_000, 64), np.float32), "c", 1)  # applied exactly once
    backend.close()


def test_snapshots_are_consistent_during_updates(backend: Backend) -> None:
    """Every snapshot holds a whole number of updates, and the dedup memory matching them."""
    spec = TableSpec("c", num_rows=200, dim=4, init=InitSpec("zeros"), optimizer=OptimizerSpec("sgd", lr=1.0))
    table = backend.create_table(spec)
    ids = np.arange(200, dtype=np.int64)
    done = threading.Event()

    def writer() -> None:
        for seq in range(1, 61):
            table.apply_update(ids, np.full((200, 4), -1.0, np.float32), "w", seq)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    snapshots = []
    while not done.is_set() or not snapshots:
        snapshots.append(read_snapshot(backend.snapshot("c")))
    thread.join()
    for snap in snapshots:
        applied = snap.dedup.get("w", 0)
        assert len(snap.ids) == (200 if applied else 0)
        np.testing.assert_array_equal(snap.rows, np.full((len(snap.ids), 4), applied, np.float32))


_ACKING_WRITER = """
import sys, numpy as np
from memstore.backends import open_backend
from memstore.spec import InitSpec, OptimizerSpec, TableSpec
backend = open_backend("lmdb", sys.argv[1], sync=True)
table = backend.create_table(TableSpec("k", num_rows=10**6, dim=8, init=InitSpec("zeros"),
                                       optimizer=OptimizerSpec("sgd", lr=1.0)))
ids = np.arange(0, 10**6, 97, dtype=np.int64)
for seq in range(1, 10**6):
    table.apply_update(ids, np.full((len(ids), 8), -1.0, np.float32), "w", seq)
    print(seq, flush=True)  # the acknowledgement
"""


@pytest.mark.slow
def test_lmdb_acknowledged_updates_survive_kill_9(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    proc = subprocess.Popen([sys.executable, "-c", _ACKING_WRITER, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
    acked = 0
    while acked < 30:
        acked = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    backend = open_backend("lmdb", tmp_path)
    table = backend.get("k")
    rows = table.lookup(np.arange(0, 10**6, 97, dtype=np.int64))
    applied = rows[0, 0]
    assert applied >= acked                       # nothing acknowledged was lost ...
    np.testing.assert_array_equal(rows, applied)  # ... and no update is half-applied
    assert not table.apply_update(np.array([0]), np.ones((1, 8), np.float32), "w", int(applied))
    backend.close()


# ---- LMDB restore from snapshots ---------------------------------------------------------------

def _trained(kind: str, data_dir: Path) -> tuple[TableSpec, np.ndarray]:
    """A table with updates from two clients, snapshotted, the backend closed; returns its rows."""
    spec = _spec(dtype="float16", optimizer="adagrad")
    backend = _open(kind, data_dir)
    table = backend.create_table(spec)
    for seq, start in enumerate(range(0, 900, 300), 1):
        ids = np.arange(start, start + 400, 3, dtype=np.int64)
        table.apply_update(ids, _grads(len(ids), 6, seq), f"trainer-{seq % 2}", seq)
    rows = table.lookup(np.arange(1000, dtype=np.int64))
    backend.snapshot("emb")
    backend.close()
    return spec, rows


def _same_snapshot(a: Path, b: Path) -> None:
    got, want = read_snapshot(a), read_snapshot(b)
    assert got.spec == want.spec and got.dedup == want.dedup
    assert list(got.dedup) == list(want.dedup)  # oldest first: eviction order survives too
    for name in ("ids", "rows", "state"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))


@pytest.mark.parametrize("source", ["ram", "lmdb"])
def test_lmdb_restores_a_backup_at_start(source: str, tmp_path: Path) -> None:
    """The restore procedure of both backends: put `snapshots/<table>/` back, start."""
    spec, expected = _trained(source, tmp_path / "old")
    backup = list_snapshots(tmp_path / "old" / "snapshots" / "emb")[-1]
    restored = tmp_path / "new" / "snapshots" / "emb"
    restored.mkdir(parents=True)
    shutil.copytree(backup, restored / backup.name)

    backend = open_backend("lmdb", tmp_path / "new")
    table = backend.get("emb")
    assert table.spec == spec and sorted(os.listdir(tmp_path / "new" / "tables")) == ["emb"]
    np.testing.assert_array_equal(table.lookup(np.arange(1000, dtype=np.int64)), expected)
    _same_snapshot(backend.snapshot("emb"), backup)  # rows, optimizer state, dedup memory
    assert not table.apply_update(np.array([5]), np.ones((1, 6), np.float32), "trainer-1", 3)  # a retry
    assert table.apply_update(np.array([5]), np.ones((1, 6), np.float32), "trainer-1", 4)
    after = table.lookup(np.array([5]))
    backend.close()

    backend = open_backend("lmdb", tmp_path / "new")  # now an ordinary table: opened, not restored again
    np.testing.assert_array_equal(backend.get("emb").lookup(np.array([5])), after)
    backend.close()


def test_lmdb_rebuilds_a_missing_tables_dir_from_the_newest_valid_snapshot(tmp_path: Path) -> None:
    _, expected = _trained("lmdb", tmp_path)
    backend = open_backend("lmdb", tmp_path, keep_snapshots=3)
    backend.get("emb").apply_update(np.array([1]), np.ones((1, 6), np.float32), "late", 1)
    damaged = backend.snapshot("emb")  # newer, but damaged below: the older one is used
    backend.close()
    (damaged / "rows.npy").write_bytes((damaged / "rows.npy").read_bytes()[:-2] + b"\0\0")
    shutil.rmtree(tmp_path / "tables")

    backend = open_backend("lmdb", tmp_path)
    np.testing.assert_array_equal(backend.get("emb").lookup(np.arange(1000, dtype=np.int64)), expected)
    backend.close()


def test_lmdb_load_is_chunked_and_refuses_a_non_empty_table(tmp_path: Path) -> None:
    spec, _ = _trained("lmdb", tmp_path / "a")
    snap = read_snapshot(list_snapshots(tmp_path / "a" / "snapshots" / "emb")[-1])
    backend = open_backend("lmdb", tmp_path / "b", sync=False, map_size=1 << 20)
    table = backend.create_table(spec)
    assert table.load(snap, chunk_rows=7) == len(snap.ids) > 7
    _same_snapshot(backend.snapshot("emb"), snap.path)

    before = table.lookup(np.arange(1000, dtype=np.int64))
    with pytest.raises(FailedPrecondition, match="not empty"):
        table.load(snap)
    other = backend.create_table(_spec("other"))
    with pytest.raises(FailedPrecondition, match="another table spec"):
        other.load(snap)
    np.testing.assert_array_equal(table.lookup(np.arange(1000, dtype=np.int64)), before)
    backend.close()


def test_lmdb_failed_restore_leaves_no_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from memstore.backends.lmdbstore import LmdbTable
    _trained("lmdb", tmp_path)
    shutil.rmtree(tmp_path / "tables")

    def disk_full(*args) -> bool:
        raise ResourceExhausted("disk full (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(LmdbTable, "_append_chunk", disk_full)
        with pytest.raises(ResourceExhausted, match="simulated"):
            open_backend("lmdb", tmp_path)
    assert os.listdir(tmp_path / "tables") == []  # no table, no temp dir
    backend = open_backend("lmdb", tmp_path)  # the next start restores it
    assert backend.get("emb").usage().rows_materialized > 0
    backend.close()


_CRASHING_RESTORE = """
import os, sys
from memstore.backends import open_backend
from memstore.backends.lmdbstore import LmdbTable
LmdbTable._load_dedup = lambda self, txn, dedup: os._exit(9)  # rows loaded, dedup memory not yet
open_backend("lmdb", sys.argv[1])
"""


def test_lmdb_restore_killed_midway_is_never_opened_as_complete(tmp_path: Path) -> None:
    import subprocess
    import sys
    _, expected = _trained("lmdb", tmp_path)
    shutil.rmtree(tmp_path / "tables")
    crashed = subprocess.run([sys.executable, "-c", _CRASHING_RESTORE, str(tmp_path)], check=False)
    assert crashed.returncode == 9
    leftovers = os.listdir(tmp_path / "tables")
    assert len(leftovers) == 1 and leftovers[0].startswith(".restore-loading-emb-")  # the half table, hidden

    backend = open_backend("lmdb", tmp_path)
    assert os.listdir(tmp_path / "tables") == ["emb"]
    table = backend.get("emb")
    np.testing.assert_array_equal(table.lookup(np.arange(1000, dtype=np.int64)), expected)
    assert not table.apply_update(np.array([1]), np.ones((1, 6), np.float32), "trainer-1", 3)  # dedup too
    backend.close()


def _lmdb_with_checkpoint(tmp_path):
    from memstore.backends.lmdbstore import LmdbBackend
    backend = LmdbBackend(tmp_path, sync=False)
    table = backend.create_table(TableSpec("t", 8, 2, init=InitSpec("zeros"), optimizer=OptimizerSpec("sgd", 1.0)))
    table.apply_update(np.array([1]), np.ones((1, 2), np.float32), "c", 1)
    backend.checkpoint_table("t", "a")                                        # row 1 = -1
    backend.get("t").apply_update(np.array([1]), np.ones((1, 2), np.float32), "c", 2)  # row 1 = -2
    return backend


@pytest.mark.parametrize("crash_after", ["old moved away", "load only"])
def test_lmdb_restore_interrupted_by_a_crash_never_loses_the_table(tmp_path, crash_after):
    """The two directory renames of a checkpoint restore, cut short as a crash would."""
    import os
    import uuid

    from memstore.backends.lmdbstore import LmdbBackend
    from memstore.snapshot import read_snapshot
    backend = _lmdb_with_checkpoint(tmp_path)
    tables = tmp_path / "tables"
    temp = backend._load_temp(read_snapshot(backend._checkpoints().find("t", "a")))
    backend.close()
    if crash_after == "old moved away":  # the ready copy is there, the live table is not
        os.rename(temp, tables / f".restore-ready-t-{uuid.uuid4().hex[:8]}")
        os.rename(tables / "t", tables / f".restore-old-t-{uuid.uuid4().hex[:8]}")
    backend = LmdbBackend(tmp_path)
    expected = -1.0 if crash_after == "old moved away" else -2.0
    assert backend.get("t").lookup(np.array([1]))[0, 0] == expected
    assert [p.name for p in tables.iterdir()] == ["t"]
    backend.close()


def test_lmdb_lookups_racing_a_restore_always_find_the_table(tmp_path):
    from memstore.store import Store
    backend = _lmdb_with_checkpoint(tmp_path)
    store = Store(backend)
    errors, stop = [], threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                store.lookup("t", np.array([1, 2]))
                list(store.lookup_blocks("t", np.array([1, 2]), 16)[1])
            except Exception as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)
    reader = threading.Thread(target=read)
    reader.start()
    for _ in range(10):
        store.restore("t", "a")
        backend.get("t").apply_update(np.array([2]), np.ones((1, 2), np.float32), "", 0)  # not at the checkpoint now
    stop.set()
    reader.join()
    backend.close()
    assert errors == []


def test_lmdb_a_crashed_restore_of_a_table_named_like_a_temp_dir_kind_replaces_nothing(tmp_path):
    """A table named "old-t": its restore's loading dir must never pass for "t"'s old copy."""
    from memstore.backends.lmdbstore import LmdbBackend
    backend = _lmdb_with_checkpoint(tmp_path)                                  # table "t", row 1 = -2
    backend.create_table(TableSpec("old-t", 8, 2, init=InitSpec("zeros"), optimizer=OptimizerSpec("sgd", 1.0)))
    backend.checkpoint_table("old-t", "a")
    backend._load_temp(read_snapshot(backend._checkpoints().find("old-t", "a")))  # then the crash
    backend.close()
    backend = LmdbBackend(tmp_path)
    assert backend.get("t").lookup(np.array([1]))[0, 0] == -2.0
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == ["old-t", "t"]
    backend.close()
