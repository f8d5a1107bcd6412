"""What an operator sees (issue 15, items 6-9): memory that matches the process, messages instead
of tracebacks, plain JSON and honest --help, and a drain that load balancers can observe."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from memstore import __version__
from memstore.backends.ram import dense_bytes
from memstore.cli import main
from memstore.client import MemStoreClient
from memstore.config import build_config
from tests.servers import ServeProcess, in_process

ROWS, DIM = 1 << 18, 16  # 16 MiB of float32 rows: a few MiB of rows materialised, all of it resident


def cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ---- item 6: memory ---------------------------------------------------------------------------

@pytest.mark.parametrize("shm_dir", ["auto", ""], ids=["shared-memory", "private"])
def test_ram_tables_report_resident_and_reserved_bytes(tmp_path, capsys, shm_dir):
    """Issue 15's report: `ls` said 61 MiB (materialised rows) while the process held 6.3 GiB."""
    with in_process(tmp_path / "data", shm_dir=shm_dir, metrics_port=0) as server, \
            MemStoreClient(server.target, shared_memory="off") as client:
        client.create_table("t", ROWS, DIM)
        client.lookup("t", np.random.default_rng(0).integers(0, ROWS, 1 << 16))  # hashed ids: every page
        client.update("t", np.arange(1000), np.ones((1000, DIM)))
        info = client.describe_table("t")
        assert info.bytes_reserved == dense_bytes(server.server.store.backend.get("t").spec)
        assert info.bytes_resident >= 0.9 * info.bytes_reserved > 4 * info.bytes_used

        code, listing, _ = cli(capsys, "ls", "--target", server.target)
        assert code == 0 and listing.split("\n")[0].split()[-4:] == ["USED", "RESIDENT", "RESERVED", "SHARDS"]
        described = json.loads(cli(capsys, "describe", "t", "--target", server.target)[1])
        assert described["bytes_resident"] >= 0.9 * described["bytes_reserved"]
        stats = json.loads(cli(capsys, "stats", "--target", server.target)[1])
        assert stats["process_resident_bytes"] > 0 and stats["ram_max_bytes"] > 0

        metrics = urllib.request.urlopen(f"http://127.0.0.1:{server.server.metrics_port}/metrics").read().decode()
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
                 'memstore_table_resident_bytes{table="t"}', 'memstore_table_reserved_bytes{table="t"}'):
        assert f"\n{name} " in metrics, name


def test_lmdb_tables_report_their_map_and_page_cache(tmp_path):
    with in_process(tmp_path / "data", "lmdb") as server, MemStoreClient(server.target) as client:
        client.create_table("t", ROWS, DIM)
        client.update("t", np.arange(5000), np.ones((5000, DIM)))
        info = client.describe_table("t")
    assert info.bytes_reserved >= info.bytes_used > 5000 * DIM * 4   # the map holds the written pages
    assert 0 < info.bytes_resident <= info.bytes_reserved            # just written: in the page cache


# ---- item 7: messages, not tracebacks ---------------------------------------------------------

def serve_fails(tmp_path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "memstore.cli", "serve", "--data-dir", str(tmp_path / "data"), *args],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    return done.stderr


@pytest.mark.subprocess
def test_a_port_in_use_is_a_message_and_the_data_dir_is_not_touched(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in serve_fails(tmp_path, "--port", str(port))
        assert "cannot serve metrics on 127.0.0.1" in serve_fails(tmp_path, "--port", "0", "--metrics-port", str(port))
    assert not (tmp_path / "data").exists()  # refused before a RAM reload or an LMDB open
    assert "tls_key" in serve_fails(tmp_path, "--port", "0", "--tls-cert", "/missing.pem", "--tls-key", "/missing.key")


@pytest.mark.parametrize("arg", ["beta2", "beta2=", "=0.9", "beta2=fast"])
def test_an_optimizer_arg_without_a_number_is_a_usage_error(capsys, arg):
    with pytest.raises(SystemExit) as exited:
        main(["create-table", "t", "--rows", "10", "--dim", "2", "--optimizer", "adam", "--optimizer-arg", arg])
    assert exited.value.code == 2
    assert "expected KEY=NUMBER (e.g. beta2=0.99)" in capsys.readouterr().err


# ---- item 8: output and help ------------------------------------------------------------------

def test_stats_prints_plain_json_like_describe(tmp_path, capsys):
    with in_process(tmp_path / "data") as server, MemStoreClient(server.target, shared_memory="off") as client:
        client.create_table("t", 100, 4)
        client.lookup("t", [1, 2])
        stats = json.loads(cli(capsys, "stats", "--target", server.target)[1])
        described = json.loads(cli(capsys, "describe", "t", "--target", server.target)[1])
    assert stats["shard_index"] == 0 and stats["shard_count"] == 1 and stats["read_only"] is False  # zeros too
    assert stats["counters"] == {"duplicate_updates": 0, "lookup_rows": 2, "update_rows": 0}    # ints
    assert stats["tables"] == [described]                                  # "float32", not "FLOAT32"


def test_help_shows_choices_meanings_and_defaults_but_no_test_flags_or_secrets(capsys, monkeypatch):
    def help_of(*command: str) -> str:
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        return " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    serve = help_of("serve")
    for shown in ("--backend {ram,lmdb}", "--shard-index {N,auto}", "--log-format {text,json}",
                  "off (-1) disables (default: off;", "--drain-s FLOAT"):
        assert shown in serve
    assert "--fault-lookup-delay-ms" not in serve
    monkeypatch.setenv("MEMSTORE_TOKEN", "s3cret")
    create = help_of("create-table")
    for shown in ("(default: sgd)", "(default: 0.01)", "(default: normal)", "(default: 30.0)", "(default: 0)"):
        assert shown in create
    assert "s3cret" not in create
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"memstore {__version__}"
    assert build_config(flags={"metrics_port": "off", "drain_s": "off"}, environ={}).metrics_port == -1


# ---- item 9: the drain ------------------------------------------------------------------------

@pytest.mark.subprocess
def test_sigterm_drains_observably_then_stops(tmp_path, capsys):
    """Health says NOT_SERVING while RPCs are still served for drain_s, then the process exits."""
    drain_s = 3.0
    srv = ServeProcess(tmp_path / "data", "ram", "--drain-s", str(drain_s)).start()
    with MemStoreClient(srv.target, shared_memory="off", retry_timeout_s=0) as client:
        client.create_table("t", 100, 4)
        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        deadline = signalled + drain_s
        while "NOT_SERVING" not in (status := cli(capsys, "health", "--target", srv.target)[1]):
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert client.lookup("t", [1, 2]).shape == (2, 4)  # still served, after NOT_SERVING was seen
        assert time.monotonic() < deadline
    assert srv.proc.wait(30) == 0
    assert time.monotonic() - signalled >= drain_s


@pytest.mark.subprocess
def test_a_second_signal_ends_the_drain(tmp_path, capsys):
    srv = ServeProcess(tmp_path / "data", "ram", "--drain-s", "120").start()
    srv.proc.send_signal(signal.SIGTERM)
    while "NOT_SERVING" not in cli(capsys, "health", "--target", srv.target)[1]:
        time.sleep(0.05)
    signalled = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0 and time.monotonic() - signalled < 30
