"""What an operator meets first: the admin CLI over a whole cluster, the token and target from the
environment, retries that say what they do, and safe defaults (protected mode, periodic RAM
snapshots, drop-table confirmation). Real servers on port 0, real gRPC; the CLI runs in-process
through `memstore.cli.main` (the same code as the `memstore` command) unless a terminal is needed.
"""
from __future__ import annotations

import json
import logging
import os
import pty
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest

from engram_client.cluster import connect
from engram_client.sharded import ShardedClient
from memstore import cli
from memstore.client import MemStoreClient, TlsConfig
from memstore.cluster import host_port
from memstore.config import ConfigError, ServerConfig, build_config
from memstore.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    NotFound,
    Unauthenticated,
    Unavailable,
)
from memstore.server import bind_failure
from tests.servers import in_process
from tests.test_security import pki  # noqa: F401 -- the module-scoped PKI fixture

TOKEN = "s3cret-token-for-tests"


@pytest.fixture
def two_shards(tmp_path):
    with in_process(tmp_path / "s0", shard_index="0", shard_count=2) as s0, \
            in_process(tmp_path / "s1", shard_index="1", shard_count=2) as s1:
        yield [s0.target, s1.target]


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """`memstore ARGS` in this process: (exit code, stdout, stderr)."""
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ---- item 3: the admin CLI acts on every shard ----------------------------------------------

def test_cli_admin_commands_act_on_every_shard(two_shards, tmp_path, capsys):
    spec = ",".join(two_shards)
    code, out, _ = run_cli(capsys, "create-table", "emb", "--rows", "1000", "--dim", "4", "--target", spec)
    assert code == 0 and "on 2 shards" in out
    for target in two_shards:   # each shard has its part of the table
        with MemStoreClient(target) as client:
            assert [t.spec.name for t in client.list_tables()] == ["emb"]

    cluster_file = tmp_path / "cluster.toml"   # every cluster-spec form works, here a file
    cluster_file.write_text(f"shards = {json.dumps(two_shards)}\n")
    code, out, _ = run_cli(capsys, "ls", "--target", f"@{cluster_file}")
    assert code == 0 and "emb" in out and "2/2" in out
    described = json.loads(run_cli(capsys, "describe", "emb", "--target", spec)[1])
    assert described["num_rows"] == 1000 and [s["target"] for s in described["shards"]] == two_shards
    stats = json.loads(run_cli(capsys, "stats", "--target", spec)[1])
    assert [(s["shard"], s["target"]) for s in stats["shards"]] == list(enumerate(two_shards))
    code, out, _ = run_cli(capsys, "snapshot", "emb", "--target", spec)
    assert code == 0 and len(out.split()) == 2   # one snapshot per shard
    assert run_cli(capsys, "health", "--target", spec)[1].count("SERVING") == 2

    code, _, err = run_cli(capsys, "drop-table", "emb", "--target", spec)  # no terminal, no --yes
    assert code == 1 and "pass --yes" in err
    assert "emb" in run_cli(capsys, "ls", "--target", spec)[1]
    code, out, _ = run_cli(capsys, "drop-table", "emb", "--yes", "--target", spec)
    assert code == 0 and "dropped emb (on 2 shards)" in out
    for target in two_shards:
        with MemStoreClient(target) as client:
            assert client.list_tables() == []


def test_a_table_missing_on_one_shard_is_named(two_shards, capsys):
    spec = ",".join(two_shards)
    with MemStoreClient(two_shards[0]) as shard0:   # what the old single-shard CLI left behind
        shard0.create_table("half", 100, 2)
    code, out, err = run_cli(capsys, "ls", "--target", spec)
    assert code == 0 and "1/2" in out and f"missing on shard 1 ({two_shards[1]})" in err
    code, _, err = run_cli(capsys, "describe", "half", "--target", spec)
    assert code == 1 and "NOT_FOUND" in err and f"shard 1 ({two_shards[1]})" in err
    with ShardedClient(two_shards) as client, pytest.raises(NotFound, match=rf"shard 1 \({two_shards[1]}\)") as raised:
        client.lookup("half", np.arange(10))
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    with MemStoreClient(two_shards[0]) as shard0, MemStoreClient(two_shards[1]) as shard1:
        shard0.drop_table("half")
        shard1.create_table("only1", 100, 2)   # on shard 1 alone: shard 0 is the one named
    with ShardedClient(two_shards) as client:
        for call in (client.list_tables, lambda: client.describe_table("only1")):
            with pytest.raises(NotFound, match=rf"only1.* missing on shard 0 \({two_shards[0]}\)|"
                                               rf"shard 0 \({two_shards[0]}\): table 'only1' does not exist"):
                call()
    [listed] = json.loads(run_cli(capsys, "ls", "--json", "--target", spec)[1])
    assert listed["shards"][0]["missing"] and listed["shard_count"] == 2


def test_cli_refuses_a_misordered_cluster_and_a_bad_spec(two_shards, capsys):
    code, _, err = run_cli(capsys, "create-table", "t", "--rows", "10", "--dim", "2",
                           "--target", ",".join(reversed(two_shards)))
    assert code == 1 and "fix the target order" in err
    for target in two_shards:   # nothing was created anywhere
        with MemStoreClient(target) as client:
            assert client.list_tables() == []
    code, _, err = run_cli(capsys, "ls", "--target", "a:1,a:1")
    assert code == 2 and "listed as shard 0 and shard 1" in err


def test_create_touches_no_shard_when_one_holds_the_table_already(two_shards, capsys):
    spec = ",".join(two_shards)
    with MemStoreClient(two_shards[1]) as shard1:   # a leftover of another table of that name
        shard1.create_table("emb", 1000, 4)
    code, _, err = run_cli(capsys, "create-table", "emb", "--rows", "1000", "--dim", "8", "--target", spec)
    assert code == 1 and "ALREADY_EXISTS" in err and "nothing was created" in err
    assert f"shard 1 ({two_shards[1]}): dim: existing 4, requested 8" in err
    with ShardedClient(two_shards) as client, pytest.raises(AlreadyExists, match="dim: existing 4, requested 8"):
        client.create_table("emb", 1000, 8)
    code, _, err = run_cli(capsys, "create-table", "emb", "--rows", "1000", "--dim", "4", "--target", spec)
    assert code == 1 and f"exists on shard 1 ({two_shards[1]}): nothing was created" in err
    with MemStoreClient(two_shards[0]) as shard0:
        assert shard0.list_tables() == []   # none of the three refusals created anything
    code, out, _ = run_cli(capsys, "create-table", "emb", "--rows", "1000", "--dim", "4", "--if-not-exists",
                           "--target", spec)   # completes a partial create
    assert code == 0 and "emb: 1000 rows x 4" in out
    assert "2/2" in run_cli(capsys, "ls", "--target", spec)[1]


def test_shards_whose_specs_differ_are_named(two_shards, capsys):
    spec = ",".join(two_shards)
    for target, dim in zip(two_shards, (8, 4)):
        with MemStoreClient(target) as client:
            client.create_table("emb", 1000, dim)
            client.create_table("fine", 10, 2)
    differ = f"shard 1 ({two_shards[1]}) differs from shard 0 ({two_shards[0]}) in dim: shard 0 8, shard 1 4"
    with ShardedClient(two_shards) as client:
        for call in (lambda: client.describe_table("emb"), client.list_tables):
            with pytest.raises(FailedPrecondition, match=re.escape(differ)):
                call()
    code, _, err = run_cli(capsys, "describe", "emb", "--target", spec)
    assert code == 1 and "FAILED_PRECONDITION" in err and differ in err
    code, out, err = run_cli(capsys, "ls", "--target", spec)   # the other tables are still listed
    assert code == 0 and "specs differ" in out and "fine" in out and differ in err
    listed = json.loads(run_cli(capsys, "ls", "--json", "--target", spec)[1])
    assert [t["name"] for t in listed] == ["emb", "fine"] and differ in listed[0]["error"]


def test_describe_shows_a_shards_own_place_and_a_clusters_size(two_shards, capsys):
    spec = ",".join(two_shards)
    assert run_cli(capsys, "create-table", "emb", "--rows", "1000", "--dim", "4", "--target", spec)[0] == 0
    for index, target in enumerate(two_shards):   # one server: its own spec fields
        alone = json.loads(run_cli(capsys, "describe", "emb", "--target", target)[1])
        assert (alone["shard_index"], alone["shard_count"]) == (index, 2) and "shards" not in alone
        [listed] = json.loads(run_cli(capsys, "ls", "--json", "--target", target)[1])
        assert (listed["shard_index"], listed["shard_count"]) == (index, 2)
    whole = json.loads(run_cli(capsys, "describe", "emb", "--target", spec)[1])
    assert whole["shard_count"] == 2 and "shard_index" not in whole and len(whole["shards"]) == 2


def test_restore_rolls_back_every_shard_or_none(two_shards, capsys):
    spec, ids = ",".join(two_shards), np.arange(10)
    with ShardedClient(two_shards) as client:
        client.create_table("rt", 100, 4, init="zeros")
        client.update("rt", ids, np.ones((10, 4), np.float32))         # rows -0.01
        client.shards[0].snapshot("rt", tag="only0")                    # shard 1 has no such checkpoint
        client.update("rt", ids, np.ones((10, 4), np.float32))         # rows -0.02
        code, out, err = run_cli(capsys, "restore", "rt", "--tag", "only0", "--target", spec)
        assert code == 1 and out == "" and "NOT_FOUND" in err and "nothing was restored" in err
        assert f"no checkpoint 'only0' on shard 1 ({two_shards[1]}) (shard 1 has: none)" in err
        with pytest.raises(NotFound, match=rf"no checkpoint 'only0' on shard 1 \({two_shards[1]}\)"):
            client.restore("rt", "only0")
        np.testing.assert_allclose(client.lookup("rt", ids), -0.02)   # no shard was rolled back
        client.snapshot("rt", tag="both")
        client.update("rt", ids, np.ones((10, 4), np.float32))
        assert client.describe_table("rt").checkpoints == ("both",)   # the tags every shard has
        code, out, _ = run_cli(capsys, "restore", "rt", "--tag", "both", "--target", spec)
        assert code == 0 and len(out.split()) == 2
        np.testing.assert_allclose(client.lookup("rt", ids), -0.02)


def test_drop_touches_no_shard_while_one_is_down_and_a_rerun_finishes_it(tmp_path, capsys):
    shard0 = in_process(tmp_path / "s0", shard_index="0", shard_count=2).start()
    shard1 = in_process(tmp_path / "s1", shard_index="1", shard_count=2).start()
    targets, port1 = [shard0.target, shard1.target], shard1.port
    try:
        with ShardedClient(targets) as client:
            client.create_table("t", 100, 2)
            client.shards[1].drop_table("t")   # a drop that stopped half-way
        shard1.stop()
        code, _, err = run_cli(capsys, "drop-table", "t", "--yes", "--target", ",".join(targets))
        assert code == 1 and "UNAVAILABLE" in err and f"shard 1 ({targets[1]})" in err
        with ShardedClient(targets, retry_timeout_s=0) as client, pytest.raises(Unavailable, match="shard 1"):
            client.drop_table("t")
        with MemStoreClient(targets[0]) as client:
            assert [t.spec.name for t in client.list_tables()] == ["t"]   # nothing was dropped
        shard1 = in_process(tmp_path / "s1", shard_index="1", shard_count=2, port=port1).start()
        code, out, _ = run_cli(capsys, "drop-table", "t", "--yes", "--target", ",".join(targets))
        assert code == 0 and f"dropped t (on 2 shards; already dropped on shard 1 ({targets[1]}))" in out
        code, _, err = run_cli(capsys, "drop-table", "t", "--yes", "--target", ",".join(targets))
        assert code == 1 and "NOT_FOUND" in err and "does not exist on any of the 2 shards" in err
    finally:
        shard0.stop()
        if shard1.server is not None:
            shard1.stop()


def test_one_shard_alone_or_a_misordered_list_drops_and_describes_nothing(two_shards, capsys):
    targets = two_shards
    with ShardedClient(targets) as client:
        client.create_table("t", 100, 2)
    code, _, err = run_cli(capsys, "drop-table", "t", "--yes", "--target", targets[1])
    assert code == 1 and "is shard 1 of 2" in err
    code, _, err = run_cli(capsys, "describe", "t", "--target", ",".join(reversed(targets)))
    assert code == 1 and "FAILED_PRECONDITION" in err
    with ShardedClient(targets) as client:
        assert client.describe_table("t").spec.num_rows == 100  # still on both shards


# ---- item 4: token and target from the environment ------------------------------------------

def test_clients_take_token_and_target_from_the_environment(tmp_path, monkeypatch):
    with in_process(tmp_path / "a", token=TOKEN, shard_index="0", shard_count=2) as s0, \
            in_process(tmp_path / "b", token=TOKEN, shard_index="1", shard_count=2) as s1:
        monkeypatch.setenv("MEMSTORE_TOKEN", TOKEN)
        monkeypatch.setenv("MEMSTORE_TARGET", f"{s0.target},{s1.target}")
        with ShardedClient() as client:   # both from the environment
            client.create_table("t", 100, 2)
            assert client.targets == [s0.target, s1.target]
        with connect() as client:
            assert [t.spec.name for t in client.list_tables()] == ["t"]
        with pytest.raises(ValueError, match="names 2 shards"):
            MemStoreClient()
        monkeypatch.setenv("MEMSTORE_TARGET", s0.target)
        with MemStoreClient() as client:
            assert client.target == s0.target and client.list_tables()
        # An explicit argument always wins: "" sends no token, whatever the environment says.
        with MemStoreClient(s0.target, token="", retry_timeout_s=0) as client, pytest.raises(Unauthenticated):
            client.list_tables()
        monkeypatch.delenv("MEMSTORE_TOKEN")
        with MemStoreClient(retry_timeout_s=0) as client, pytest.raises(Unauthenticated):
            client.list_tables()
        with MemStoreClient(token=TOKEN) as client:
            assert client.list_tables()


def test_demo_passes_its_token_to_the_shards(tmp_path):
    from demo.__main__ import _connect, parse_args
    with in_process(tmp_path / "d", token=TOKEN) as srv:
        client = _connect(parse_args(["--memstore", srv.target, "--token", TOKEN]), None)
        with client:
            assert client.list_tables() == []


# ---- item 5: retries that say what they do --------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_retries_are_logged_and_the_final_error_says_what_was_tried(caplog):
    target = f"127.0.0.1:{free_port()}"   # nobody listens there
    caplog.set_level(logging.WARNING, "memstore.client")
    started = time.monotonic()
    with MemStoreClient(target, retry_timeout_s=1.0) as client, pytest.raises(Unavailable) as raised:
        client.list_tables()
    assert time.monotonic() - started < 10
    message = str(raised.value)
    assert target in message and "attempts in" in message and "retry_timeout_s=1" in message
    assert any("retrying" in r.getMessage() and target in r.getMessage() for r in caplog.records)


def test_a_server_that_comes_up_late_is_waited_for(tmp_path, caplog):
    port = free_port()
    caplog.set_level(logging.WARNING, "memstore.client")
    config = ServerConfig(port=port, data_dir=str(tmp_path / "late"), grace_s=1.0)
    server_box = {}

    def start_late() -> None:
        time.sleep(1.0)
        from memstore.server import ServerThread
        server_box["server"] = ServerThread(config).start()
    starter = threading.Thread(target=start_late)
    starter.start()
    try:
        with MemStoreClient(f"127.0.0.1:{port}", retry_timeout_s=30) as client:
            assert client.list_tables() == []
    finally:
        starter.join()
        server_box["server"].stop()
    messages = [r.getMessage() for r in caplog.records]
    assert any("retrying" in m for m in messages) and any("answered after" in m for m in messages)


def test_a_tls_mismatch_fails_at_once(tmp_path, pki):  # noqa: F811 -- the fixture
    with in_process(tmp_path / "data", tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)) as srv:
        started = time.monotonic()
        with MemStoreClient(srv.target, retry_timeout_s=60) as client, pytest.raises(Unavailable, match="speaks TLS"):
            client.list_tables()   # plaintext client, TLS server
        with MemStoreClient(srv.target, tls=TlsConfig(ca_cert=str(pki.rogue_ca)), retry_timeout_s=60) as client, \
                pytest.raises(Unavailable, match="TLS handshake failed"):
            client.list_tables()   # a CA that did not sign the server's certificate
        assert time.monotonic() - started < 15, "no 60 s of retrying"
    with in_process(tmp_path / "plain") as srv, \
            MemStoreClient(srv.target, tls=TlsConfig(ca_cert=str(pki.ca)), retry_timeout_s=60) as client, \
            pytest.raises(Unavailable, match="TLS handshake failed"):
        client.list_tables()   # TLS client, plaintext server


def test_a_missed_deadline_is_deadline_exceeded_not_internal(tmp_path, capsys):
    with in_process(tmp_path / "d", fault_lookup_delay_ms=1000) as srv, \
            MemStoreClient(srv.target, timeout_s=0.2, shared_memory="off") as client:
        client.create_table("t", 10, 2)
        with pytest.raises(DeadlineExceeded) as raised:
            client.lookup("t", [1])
    assert raised.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and not getattr(raised.value, "retryable", False)


def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not ipv6_loopback(), reason="this machine has no IPv6 loopback")
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_serve_listens_on_an_ipv6_host(tmp_path, host):
    with in_process(tmp_path / "d", host=host, metrics_port=0) as srv, \
            MemStoreClient(f"[::1]:{srv.port}", shared_memory="off") as client:
        client.create_table("t", 10, 2)
        assert [t.spec.name for t in client.list_tables()] == ["t"]
        with urllib.request.urlopen(f"http://[::1]:{srv.server.metrics_port}/metrics", timeout=10) as page:
            assert b"memstore_table_rows_materialized" in page.read()


def test_bind_addresses_bracket_ipv6_and_blame_tls_only_with_tls():
    hosts = ("::1", "[::1]", "fd00::2", "127.0.0.1", "memstore-0.svc")
    assert [host_port(h, 5) for h in hosts] == ["[::1]:5", "[::1]:5", "[fd00::2]:5", "127.0.0.1:5", "memstore-0.svc:5"]
    port = free_port()   # the OS binds it: gRPC's refusal is all there is to say
    assert bind_failure("127.0.0.1", port) == "gRPC refused it"
    assert "tls_cert and tls_key" in bind_failure("127.0.0.1", port, tls=True)


# ---- item 10: safe defaults -----------------------------------------------------------------

@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "memstore.example", ""])
def test_protected_mode_refuses_an_open_address_without_authentication(host):
    with pytest.raises(ConfigError, match=f"refusing to serve {host} without authentication"):
        ServerConfig(host=host).validate()
    ServerConfig(host=host, token=TOKEN).validate()
    ServerConfig(host=host, allow_unauthenticated=True).validate()
    ServerConfig(host=host, tls_cert="c.pem", tls_key="k.pem", tls_client_ca="ca.pem").validate()
    build_config(None, {"host": host}, {"MEMSTORE_ALLOW_UNAUTHENTICATED": "true"})


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"])
def test_loopback_needs_no_token(host):
    ServerConfig(host=host).validate()


def test_serve_refuses_an_open_address_without_a_token(tmp_path, capsys):
    code, _, err = run_cli(capsys, "serve", "--host", "0.0.0.0", "--port", "0", "--data-dir", str(tmp_path))
    assert code == 2 and "--allow-unauthenticated" in err and "MEMSTORE_TOKEN" in err


def test_ram_tables_are_snapshotted_periodically_by_default(tmp_path):
    assert ServerConfig().snapshot_interval_s == 300
    with in_process(tmp_path / "d", "ram", snapshot_interval_s=0.2) as srv, MemStoreClient(srv.target) as client:
        client.create_table("t", 100, 2)
        client.update("t", [1], np.ones((1, 2)))
        snapshots = tmp_path / "d" / "snapshots" / "t"
        deadline = time.monotonic() + 20
        while not (snapshots.is_dir() and any(snapshots.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert any(snapshots.iterdir()), "no periodic snapshot"


@pytest.mark.subprocess
def test_drop_table_asks_on_a_terminal(tmp_path):
    with in_process(tmp_path / "d") as srv:
        with MemStoreClient(srv.target) as client:
            client.create_table("t", 10, 2)
        for answer, dropped in ((b"n\n", False), (b"yes\n", True)):
            leader, follower = pty.openpty()
            os.write(leader, answer)
            done = subprocess.run([sys.executable, "-m", "memstore.cli", "drop-table", "t", "--target", srv.target],
                                  stdin=follower, capture_output=True, timeout=60, check=False)
            os.close(follower)
            os.close(leader)
            assert (done.returncode == 0) == dropped, done.stderr
            with MemStoreClient(srv.target) as client:
                assert (client.list_tables() == []) == dropped


@pytest.mark.parametrize("token", [" ", "secret\n"])
def test_a_blank_or_padded_token_is_refused(token):
    with pytest.raises(ConfigError, match="token must not start or end with whitespace"):
        ServerConfig(host="0.0.0.0", token=token).validate()
