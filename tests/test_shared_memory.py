"""Same-host data plane: a client on the daemon's host maps RAM tables read-only and gathers rows
itself (memstore/shm.py). Whatever happens to the table, those rows equal what gRPC returns."""
from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from memstore.client import MemStoreClient
from memstore.errors import FailedPrecondition, Unauthenticated
from tests.servers import ServeProcess, in_process

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(7)


def pair(target: str, **kwargs) -> tuple[MemStoreClient, MemStoreClient]:
    return MemStoreClient(target, shared_memory="on", **kwargs), MemStoreClient(target, shared_memory="off", **kwargs)


def assert_same(shared: MemStoreClient, grpc_client: MemStoreClient, name: str, ids: np.ndarray) -> None:
    np.testing.assert_array_equal(shared.lookup(name, ids), grpc_client.lookup(name, ids))


@contextlib.contextmanager
def reading(client: MemStoreClient, name: str, ids: np.ndarray, threads: int = 1):
    """Lookups of `ids` on `threads` threads until the block ends; yields (rows seen, errors)."""
    seen, errors, stop = [], [], threading.Event()

    def read() -> None:
        while not stop.is_set():
            try:
                seen.append(client.lookup(name, ids))
            except Exception as exc:  # noqa: BLE001 - collected for the assertions
                errors.append(exc)
    workers = [threading.Thread(target=read) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        yield seen, errors
    finally:
        stop.set()
        for worker in workers:
            worker.join()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_shared_lookups_equal_grpc_lookups_through_updates(tmp_path, dtype):
    with in_process(tmp_path / "d") as server:
        shared, plain = pair(server.target)
        shared.create_table("t", 5000, 16, dtype=dtype, optimizer="adagrad", lr=0.1)
        ids = RNG.integers(0, 5000, 3000)
        assert_same(shared, plain, "t", ids)                      # never-written rows: initial values
        for step in range(3):
            shared.update("t", ids[:1000], RNG.standard_normal((1000, 16)).astype(np.float32), step=step)
            assert_same(shared, plain, "t", ids)
        assert shared._views["t"] is not None                      # it really went through the mapping


def test_drop_recreate_and_restore_never_serve_rows_of_the_old_table(tmp_path):
    with in_process(tmp_path / "d") as server:
        shared, plain = pair(server.target)
        shared.create_table("t", 100, 4, init="zeros", optimizer="sgd", lr=1.0)
        shared.update("t", [1], np.ones((1, 4)))
        old_view = shared._view("t")
        shared.snapshot("t", tag="ck")
        plain.drop_table("t")                                      # by another client: this one is not told
        plain.create_table("t", 100, 8, init="uniform", init_scale=0.5)
        assert shared.lookup("t", np.arange(10)).shape == (10, 8)
        assert_same(shared, plain, "t", np.arange(100))
        assert shared._view("t") is not old_view                   # the stale mapping was replaced
        plain.drop_table("t")
        plain.create_table("t", 100, 4, init="zeros", optimizer="sgd", lr=1.0)
        plain.update("t", [2], np.ones((1, 4)))
        plain.snapshot("t", tag="ck2")
        plain.update("t", [2], np.ones((1, 4)))
        plain.restore("t", "ck2")                                  # in place: the mapping stays valid
        assert_same(shared, plain, "t", np.arange(100))
        assert shared.lookup("t", [2])[0, 0] == -1.0


@pytest.mark.subprocess
def test_a_daemon_restart_is_followed(tmp_path):
    with ServeProcess(tmp_path / "d", "ram") as daemon:
        shared, plain = pair(daemon.target)
        shared.create_table("t", 100, 4, init="zeros", optimizer="sgd", lr=1.0)
        shared.update("t", [3], np.ones((1, 4)))
        assert shared.lookup("t", [3])[0, 0] == -1.0
        daemon.stop()                                              # SIGTERM: snapshot, files retired
        daemon.restart()
        plain.retry_timeout_s = shared.retry_timeout_s = 30
        assert_same(shared, plain, "t", np.arange(100))
        assert shared.lookup("t", [3])[0, 0] == -1.0


def test_lookups_racing_updates_see_each_element_old_or_new(tmp_path):
    """The RAM backend's documented behaviour, for shared-memory readers too."""
    with in_process(tmp_path / "d") as server:
        shared, plain = pair(server.target)
        shared.create_table("t", 20_000, 8, init="zeros", optimizer="sgd", lr=1.0)
        ids = np.arange(20_000)
        with reading(shared, "t", ids) as (seen, errors):
            for _ in range(20):
                plain.update("t", ids, np.ones((20_000, 8), np.float32))
        assert errors == [] and seen and all(np.all((rows <= 0) & (rows >= -20) & (rows == np.round(rows))) for rows in seen)
        assert_same(shared, plain, "t", ids)


READER = """
import sys, numpy as np
from memstore.client import MemStoreClient
shared, plain = (MemStoreClient(sys.argv[1], shared_memory=m) for m in ("on", "off"))
ids = np.random.default_rng(int(sys.argv[2])).integers(0, 50_000, 20_000)
for _ in range(20):
    assert np.array_equal(shared.lookup("t", ids), plain.lookup("t", ids))
print("ok")
"""


@pytest.mark.subprocess
@pytest.mark.parametrize("backend", ["ram", "lmdb"])
def test_four_client_processes_read_one_table_at_once(tmp_path, backend):
    """Many ranks, one copy: each reader process maps the RAM table or opens the LMDB environment."""
    with ServeProcess(tmp_path / "d", backend) as daemon:
        MemStoreClient(daemon.target).create_table("t", 50_000, 16)
        readers = [subprocess.Popen([sys.executable, "-c", READER, daemon.target, str(i)], cwd=ROOT,
                                    stdout=subprocess.PIPE, text=True) for i in range(4)]
        outputs = [r.communicate(timeout=120)[0].strip() for r in readers]
    assert outputs == ["ok"] * 4


def test_a_client_without_the_token_maps_nothing(tmp_path):
    with in_process(tmp_path / "d", token="s3cret") as server:
        MemStoreClient(server.target, token="s3cret").create_table("t", 10, 2)
        intruder = MemStoreClient(server.target, retry_timeout_s=0)  # shared_memory="auto"
        with pytest.raises(Unauthenticated):
            intruder.lookup("t", [1])
        assert "t" not in intruder._views


@pytest.mark.parametrize("backend, overrides, why", [
    ("ram", {"shm_dir": ""}, "not in shared memory"),
    ("lmdb", {}, "the server runs in this process"),  # LMDB: never one environment twice in a process
])
def test_on_fails_clearly_where_the_same_host_path_is_impossible(tmp_path, backend, overrides, why):
    with in_process(tmp_path / "d", backend, **overrides) as server:
        client = MemStoreClient(server.target, shared_memory="on")
        client.create_table("t", 10, 2)
        with pytest.raises(FailedPrecondition, match=f"shared_memory='on' but .*{why}"):
            client.lookup("t", [1])
        assert MemStoreClient(server.target).lookup("t", [1]).shape == (1, 2)  # auto: gRPC, silently


@pytest.mark.subprocess
def test_lmdb_readers_in_other_processes_equal_grpc_through_updates_restore_and_drop(tmp_path):
    with ServeProcess(tmp_path / "d", "lmdb") as daemon:
        shared, plain = pair(daemon.target)
        shared.create_table("t", 300_000, 16, dtype="bfloat16", optimizer="adagrad", lr=0.1)
        ids = RNG.integers(0, 300_000, 20_000)
        assert_same(shared, plain, "t", ids)
        for step in range(3):  # 300k rows x 3: the LMDB map grows under the reader
            shared.update("t", np.arange(300_000), RNG.standard_normal((300_000, 16)).astype(np.float32), step=step)
            assert_same(shared, plain, "t", ids)
        assert type(shared._views["t"]).__name__ == "LmdbView"
        plain.snapshot("t", tag="ck")
        plain.update("t", ids[:10], np.ones((10, 16)))
        plain.restore("t", "ck")                                   # a new environment: the reader follows
        assert_same(shared, plain, "t", ids)
        plain.drop_table("t")
        plain.create_table("t", 300_000, 4)
        assert_same(shared, plain, "t", ids)


def test_shared_memory_files_are_private_to_the_daemons_user(tmp_path):
    with in_process(tmp_path / "d") as server:
        client = MemStoreClient(server.target, shared_memory="on")
        client.create_table("t", 10, 2)
        client.lookup("t", [1])
        directory = client._views["t"].files.path
        assert directory.stat().st_mode & 0o777 == 0o700


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 MiB tmpfs of our own (needs root, as CI and this project's machines have)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "tmpfs", str(mount)],
                          capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_table_the_tmpfs_cannot_hold_stays_in_private_memory(tmp_path, small_tmpfs):
    """Pages of a tmpfs file are allocated when written, and a write past the tmpfs size kills the
    daemon (SIGBUS): files are allocated in full at create, and a table that does not fit stays
    in private memory (clients read it over gRPC). Both tables then train without a crash."""
    from memstore.backends.ram import RamBackend
    from memstore.spec import InitSpec, OptimizerSpec, TableSpec
    backend = RamBackend(tmp_path / "data", shm_dir=small_tmpfs / "memstore" / "d")
    try:
        spec = {"num_rows": 20_000, "dim": 64, "init": InitSpec("zeros"), "optimizer": OptimizerSpec("sgd", 1.0)}
        first, second = (backend.create_table(TableSpec(name, **spec)) for name in ("a", "b"))  # 5.1 MB each
        assert first.shared is not None and second.shared is None
        for table in (first, second):
            table.apply_update(np.arange(20_000), np.ones((20_000, 64), np.float32), "", 0)  # every page
        assert first.lookup(np.array([19_999]))[0, 0] == second.lookup(np.array([19_999]))[0, 0] == -1.0
    finally:
        backend.close()


def test_shared_memory_outside_this_users_own_directories_is_refused(tmp_path):
    """/dev/shm is writable by everyone: a directory another user made (or a symlink) is never
    used by the daemon, nor mapped by a client."""
    import os

    from memstore import shm
    from memstore.backends.ram import RamBackend
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    os.chown(foreign, 65534, 65534)  # another user's (nobody), as a hostile pre-creation would be
    backend = RamBackend(tmp_path / "data", shm_dir=foreign / "d")
    assert backend.shm_dir is None  # shared memory off, logged; the tables stay private
    backend.close()
    (tmp_path / "link").symlink_to(tmp_path / "data")
    with pytest.raises(shm.UnsafeDirectory):
        shm.secure_dir(tmp_path / "link")


@pytest.mark.subprocess
def test_a_sigkilled_daemons_rows_are_never_served(tmp_path):
    """Its files stay behind with alive=1; its flock on the header went with it."""
    with ServeProcess(tmp_path / "d", "ram") as daemon:
        shared, _ = pair(daemon.target, retry_timeout_s=0)
        shared.create_table("t", 10, 2, init="zeros", optimizer="sgd", lr=1.0)
        shared.update("t", [1], np.ones((1, 2)))
        assert shared.lookup("t", [1])[0, 0] == -1.0
        daemon.kill()
        with pytest.raises(Exception, match="UNAVAILABLE"):
            shared.lookup("t", [1])  # as gRPC would: not the dead daemon's rows


# ---- staged Update payloads --------------------------------------------------------------------

def test_staged_updates_equal_grpc_updates_and_are_applied_once(tmp_path):
    with in_process(tmp_path / "d") as server:
        shared, plain = pair(server.target)
        for client, name in ((shared, "staged"), (plain, "streamed")):
            client.create_table(name, 50_000, 16, optimizer="adam", lr=0.01, seed=5)
        for step in range(3):
            ids = RNG.choice(50_000, 20_000, replace=False)
            grads = RNG.standard_normal((20_000, 16)).astype(np.float32)
            assert shared.update("staged", ids, grads, step=step)
            plain.update("streamed", ids, grads, step=step)
        assert shared._staged, "the payload did not go through the staging file"
        assert shared.update("staged", ids, grads, step=2) is False   # a re-sent step: acknowledged only
        everything = np.arange(50_000)
        np.testing.assert_array_equal(shared.lookup("staged", everything), plain.lookup("streamed", everything))
        staged_files = set(shared._staged)
        shared.close()
        assert not any(path.exists() for path in staged_files)        # a client cleans up after itself


@pytest.mark.parametrize("staging, why", [("../../etc/passwd", "not a plain file name"),
                                          ("missing.buf", "No such file"),
                                          ("link.buf", "Too many levels of symbolic links"),
                                          ("small.buf", "not a regular file of this user holding")])
def test_a_staged_update_is_refused_unless_it_names_a_good_file(tmp_path, staging, why):
    import grpc

    from memstore.wire import encode_update_chunk
    with in_process(tmp_path / "d") as server:
        client = MemStoreClient(server.target)
        client.create_table("t", 10, 4)
        client.lookup("t", [1])                                        # maps the table: learns the staging dir
        staging_dir = client._views["t"].staging_dir
        (staging_dir / "small.buf").write_bytes(b"\0" * 8)
        (staging_dir / "link.buf").symlink_to(tmp_path / "elsewhere")
        with grpc.insecure_channel(server.target) as channel:
            call = channel.stream_unary("/memstore.v1.MemStore/Update", request_serializer=None,
                                        response_deserializer=None)
            with pytest.raises(grpc.RpcError) as refused:
                call(iter([encode_update_chunk(b"", b"", table="t", total_rows=2, staging=staging)]), timeout=10)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in refused.value.details()
        assert client.lookup("t", [1]).shape == (1, 4)                 # and the server goes on


@pytest.mark.subprocess
def test_lmdb_readers_follow_a_daemon_restart_and_see_updates_whole(tmp_path):
    """One read transaction per lookup: a lookup racing updates sees each update entirely or not
    at all (every row of it moves together), and a restarted daemon serves the same committed rows."""
    with ServeProcess(tmp_path / "d", "lmdb", "--lmdb-sync", "false") as daemon:
        shared, plain = pair(daemon.target)
        shared.create_table("t", 5000, 4, init="zeros", optimizer="sgd", lr=1.0)
        ids = np.arange(5000)
        with reading(shared, "t", ids) as (seen, errors):
            for step in range(10):
                plain.update("t", ids, np.ones((5000, 4), np.float32), step=step)
        assert errors == [] and seen and all(len(np.unique(rows)) == 1 for rows in seen)  # never a half-applied update
        daemon.stop()
        daemon.restart()
        plain.retry_timeout_s = 30
        assert_same(shared, plain, "t", ids)
        assert shared.lookup("t", [0])[0, 0] == -10.0


@pytest.mark.subprocess
def test_lmdb_readers_on_several_threads_follow_map_growth(tmp_path):
    """Adopting a grown map needs no other read transaction open in the process: lookups of one
    client on four threads, while another client's updates grow the map, all succeed."""
    with ServeProcess(tmp_path / "d", "lmdb", "--lmdb-map-size", str(4 << 20)) as daemon:
        shared, plain = pair(daemon.target)
        shared.create_table("t", 400_000, 32)
        ids = np.arange(0, 400_000, 7)
        with reading(shared, "t", ids, threads=4) as (_, errors):
            for step in range(6):
                plain.update("t", np.arange(step * 60_000, (step + 1) * 60_000), np.ones((60_000, 32)), step=step)
        assert errors == []
        assert type(shared._views["t"]).__name__ == "LmdbView"
        assert_same(shared, plain, "t", ids)
