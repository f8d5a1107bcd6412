"""Cluster specs: comma lists, patterns with a count, cluster files, and clear errors."""
from __future__ import annotations

import numpy as np
import pytest

from engram_client.cluster import ClusterSpecError, connect, resolve_targets
from memstore.errors import FailedPrecondition
from tests.servers import in_process

K8S = ["memstore-0.memstore.engram.svc:50051", "memstore-1.memstore.engram.svc:50051",
       "memstore-2.memstore.engram.svc:50051"]


@pytest.mark.parametrize("spec, expected", [
    ("localhost:50051", ["localhost:50051"]),
    ("a:1, b:2 ,c:3", ["a:1", "b:2", "c:3"]),
    ("[::1]:50051,10.0.0.2:50051", ["[::1]:50051", "10.0.0.2:50051"]),
    ("dns:///memstore.svc:50051,unix:/tmp/ms.sock", ["dns:///memstore.svc:50051", "unix:/tmp/ms.sock"]),
    ("memstore-{i}.memstore.engram.svc:50051*3", K8S),
    ("  memstore-{i}.memstore.engram.svc:50051 * 3 ", K8S),
    ("127.0.0.1:5005{i}*2", ["127.0.0.1:50050", "127.0.0.1:50051"]),
    (["a:1", "b:2"], ["a:1", "b:2"]),
])
def test_strings_and_lists(spec, expected):
    assert resolve_targets(spec) == expected


@pytest.mark.parametrize("name, text", [
    ("cluster.toml", 'shards = ["a:1", "b:2"]\n'),
    ("cluster.yaml", "shards:\n  - a:1\n  - b:2\n"),
    ("cluster.yml", "shards: [a:1, b:2]\n"),
])
def test_cluster_files(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    assert resolve_targets(f"@{path}") == ["a:1", "b:2"]
    assert resolve_targets(str(path)) == ["a:1", "b:2"]  # the suffix alone marks a file


def test_cluster_file_with_a_pattern(tmp_path):
    path = tmp_path / "cluster.toml"
    path.write_text('shards = "memstore-{i}.memstore.engram.svc:50051*3"\n')
    assert resolve_targets(f"@{path}") == K8S


@pytest.mark.parametrize("spec, message", [
    ("", "empty cluster spec"),
    ("a:1,,b:2", "'' is not host:port"),
    ("localhost", "'localhost' is not host:port"),
    ("a:99999", "'a:99999' is not host:port"),
    ("a:1,b:2,a:1", "a:1 is listed as shard 0 and shard 2"),
    ("memstore-{i}:50051", "needs a shard count"),
    ("memstore-{i}:50051*0", "shard count '0'"),
    ("memstore-{i}:50051*x", "shard count 'x'"),
    ("memstore-{i}:50051*3,other:1", "shard count '3,other:1'"),
    ("memstore-{j}-{i}:50051*2", "only {i} may appear in braces"),
    ("memstore:50051*3", "needs a pattern with {i}"),
    ([], "no shards listed"),
])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ClusterSpecError, match=message.replace("{", r"\{").replace("*", r"\*")):
        resolve_targets(spec)


@pytest.mark.parametrize("name, text, message", [
    ("c.toml", 'shards = ["a:1"]\ntoken = "x"\n', r"unknown keys \['token'\]"),
    ("c.toml", 'shard = ["a:1"]\n', r"unknown keys \['shard'\]"),
    ("c.toml", "hosts = 3\n", "unknown keys"),
    ("c.toml", "", "missing key 'shards'"),
    ("c.toml", "shards = [1, 2]\n", "must be a list of host:port strings"),
    ("c.toml", "shards = [\n", "not valid TOML"),
    ("c.yaml", "- a:1\n", "expected a mapping"),
    ("c.yaml", "shards: [a:1\n", "not valid YAML"),
    ("c.yaml", "shards: []\n", "no shards listed"),
])
def test_bad_cluster_files(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ClusterSpecError, match=message):
        resolve_targets(f"@{path}")


def test_missing_or_unsupported_files(tmp_path):
    with pytest.raises(ClusterSpecError, match="cannot read cluster file"):
        resolve_targets(f"@{tmp_path / 'nope.toml'}")
    with pytest.raises(ClusterSpecError, match="use a .toml/.yaml/.yml file"):
        resolve_targets(f"@{tmp_path / 'cluster.json'}")


def test_connect_reaches_real_shards_in_file_order(tmp_path):
    servers = [in_process(tmp_path / f"shard{i}", shard_index=str(i), shard_count=2) for i in range(2)]
    for server in servers:
        server.start()
    try:
        ordered, reversed_ = tmp_path / "ok.toml", tmp_path / "reversed.toml"
        ordered.write_text(f'shards = ["{servers[0].target}", "{servers[1].target}"]\n')
        reversed_.write_text(f'shards = ["{servers[1].target}", "{servers[0].target}"]\n')
        with connect(f"@{ordered}", retry_timeout_s=5) as client:
            client.create_table("t", 10, 4, init="zeros")
            client.update("t", np.arange(10), np.ones((10, 4), np.float32))
            assert [s.describe_table("t").rows_materialized for s in client.shards] == [5, 5]
        with connect(f"@{reversed_}") as client, pytest.raises(FailedPrecondition, match="fix the target order"):
            client.describe_table("t")
    finally:
        for server in servers:
            server.stop()
