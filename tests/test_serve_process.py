"""`memstore serve` as a real subprocess: CLI commands, graceful stop, and kill -9 durability."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from engram_client.memstore_client import MemStoreClient
from tests.servers import ServeProcess

pytestmark = pytest.mark.subprocess


def memstore(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "memstore.cli", *args], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_cli_talks_to_a_running_server(tmp_path):
    with ServeProcess(tmp_path / "data", "lmdb") as srv:
        target = ["--target", srv.target]
        assert "SERVING" in memstore("health", *target)
        memstore("create-table", "emb", "--rows", "1000", "--dim", "8", "--dtype", "float16",
                 "--optimizer", "adam", "--lr", "0.005", "--optimizer-arg", "beta2=0.99", *target)
        listing = memstore("ls", *target)
        assert "emb" in listing and "adam(0.005)" in listing
        described = json.loads(memstore("describe", "emb", *target))
        assert described["optimizer"]["args"]["beta2"] == 0.99
        stats = json.loads(memstore("stats", *target))
        assert stats["backend"] == "lmdb" and stats["tables"][0]["name"] == "emb"
        path = memstore("snapshot", "emb", *target).strip()
        assert (tmp_path / "data") in __import__("pathlib").Path(path).parents
        assert srv.stop() == 0


def test_bad_config_is_a_clear_error(tmp_path):
    config = tmp_path / "memstore.toml"
    config.write_text('backend = "ram"\nmax_rows_per_requets = 5\n')
    done = subprocess.run([sys.executable, "-m", "memstore.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "unknown keys ['max_rows_per_requets']" in done.stderr


def test_sigterm_snapshots_ram_tables(tmp_path):
    srv = ServeProcess(tmp_path / "data", "ram").start()
    with MemStoreClient(srv.target) as client:
        client.create_table("t", 100, 4, init="zeros", lr=1.0)
        client.update("t", [1, 2], np.ones((2, 4)))
    assert srv.stop() == 0
    srv.restart()
    with MemStoreClient(srv.target) as client:
        np.testing.assert_array_equal(client.lookup("t", [1, 2, 3]), [[-1] * 4, [-1] * 4, [0] * 4])
    srv.stop()


def test_lmdb_survives_sigkill_with_every_acknowledged_update_applied_once(tmp_path):
    """Updates stream from a client while the server is SIGKILLed and restarted on the same port.
    The client retries the in-flight update with the same (client_id, seq), so in the end every
    update was acknowledged, and each must be applied exactly once: row r == -(updates sent to r)."""
    rows, dim = 64, 4
    srv = ServeProcess(tmp_path / "data", "lmdb").start()
    sent = np.zeros(rows)
    done = threading.Event()
    errors: list[BaseException] = []

    def train():
        rng = np.random.default_rng(1)
        try:
            with MemStoreClient(srv.target, retry_timeout_s=60) as client:
                client.create_table("t", rows, dim, init="zeros", optimizer="sgd", lr=1.0)
                while not done.is_set():
                    ids = rng.integers(0, rows, size=32)
                    client.update("t", ids, np.ones((len(ids), dim), np.float32))  # acknowledged on return
                    np.add.at(sent, ids, 1)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    worker = threading.Thread(target=train)
    worker.start()
    for pause in (0.7, 0.3, 1.1):
        time.sleep(pause)
        srv.kill()
        srv.restart()
    time.sleep(0.5)
    done.set()
    worker.join(120)
    assert not errors, errors
    assert sent.sum() > 100
    with MemStoreClient(srv.target) as client:
        np.testing.assert_array_equal(client.lookup("t", np.arange(rows)), -np.repeat(sent[:, None], dim, 1))
    srv.stop()


def test_restart_with_another_shard_layout_is_refused(tmp_path):
    srv = ServeProcess(tmp_path / "data", "lmdb", "--shard-index", "0", "--shard-count", "2").start()
    with MemStoreClient(srv.target) as client:
        client.create_table("t", 100, 4)
    srv.stop()
    done = subprocess.run([sys.executable, "-m", "memstore.cli", "serve", "--backend", "lmdb", "--port", "0",
                           "--data-dir", str(tmp_path / "data"), "--shard-count", "3"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "shard 0 of 2" in done.stderr and "shard 0 of 3" in done.stderr
