"""Cluster specs: one string (or file) that names every memstore shard, in shard order.

A trainer needs the shard targets in shard-index order (target i is shard i, see
`engram_client.sharded`); so does the admin CLI (`memstore ls --target ...`). `resolve_targets`
accepts three spellings of that list:

    host0:50051,host1:50051,host2:50051           comma-separated targets
    memstore-{i}.memstore.engram.svc:50051*3       a pattern and a count: {i} = 0, 1, 2
    @cluster.toml   (or any path ending in .toml, .yaml, .yml)   a cluster file

The pattern form fits a Kubernetes StatefulSet behind a headless Service, whose pods are named
`<statefulset>-<ordinal>.<service>.<namespace>.svc`; the count is the StatefulSet's `replicas`
(= the servers' `--shard-count`). A cluster file holds one key, `shards`: a list of targets or
a pattern string. Any other key is an error, so a typo cannot silently drop a setting:

    # cluster.toml                                # cluster.yaml
    shards = ["10.0.0.1:50051", "10.0.0.2:50051"]  shards: memstore-{i}.memstore:50051*3

A list given as a Python list is taken as targets as is (each one checked). Targets are
`host:port` (IPv6 as `[::1]:50051`) or a gRPC URI with a scheme (`dns:///h:p`, `unix:/path`),
passed to gRPC unchanged. Every target must be distinct: two shards cannot share an address.

Where no spec is given, clients and the CLI read `MEMSTORE_TARGET` (then 127.0.0.1:50051), and the
token from `MEMSTORE_TOKEN`: an explicit argument always wins (`spec_or_env`, `token_or_env`).
"""
from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memstore.config import ConfigError

CLUSTER_FILE_SUFFIXES = (".toml", ".yaml", ".yml")
CLUSTER_FILE_KEYS = {"shards"}
MAX_SHARDS = 4096  # a sanity bound on `pattern*count`, far above any real cluster

_PATTERN_RE = re.compile(r"^(?P<template>.*\{i\}.*)\*(?P<count>[^*]*)$")
_HOST_PORT_RE = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(?P<port>\d{1,5})$")
_URI_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")
ENV_TARGET, ENV_TOKEN = "MEMSTORE_TARGET", "MEMSTORE_TOKEN"
DEFAULT_TARGET = "127.0.0.1:50051"


class ClusterSpecError(ConfigError):
    """A cluster spec that cannot be turned into a list of shard targets."""


def spec_or_env(spec: str | Sequence[str] | None) -> str | Sequence[str]:
    """`spec` when given, else `MEMSTORE_TARGET`, else the default local target."""
    if spec is not None:
        return spec
    return os.environ.get(ENV_TARGET) or DEFAULT_TARGET


def token_or_env(token: str | None) -> str:
    """`token` when given ("" means none, whatever the environment says), else `MEMSTORE_TOKEN`."""
    return os.environ.get(ENV_TOKEN, "") if token is None else token


def resolve_targets(spec: str | Sequence[str]) -> list[str]:
    """The shard targets named by `spec`, in shard order (see the module doc for the forms)."""
    if not isinstance(spec, str):
        return _checked(list(spec), f"target list {list(spec)!r}")
    text = spec.strip()
    if not text:
        raise ClusterSpecError("empty cluster spec: give host:port[,host:port...], "
                               "a pattern like memstore-{i}.memstore:50051*3, or @cluster.toml")
    if text.startswith("@") or (text.endswith(CLUSTER_FILE_SUFFIXES) and "," not in text):
        return _from_file(Path(text.removeprefix("@")))
    return _from_string(text, f"cluster spec {text!r}")


def _from_string(text: str, where: str) -> list[str]:
    """Comma-separated targets, or `template*count` when the text holds `{i}`."""
    if "{i}" in text:
        return _checked(_expand_pattern(text, where), where)
    if "*" in text:
        raise ClusterSpecError(f"{where}: '*count' needs a pattern with {{i}}, "
                               "e.g. memstore-{i}.svc:50051*3")
    return _checked([t.strip() for t in text.split(",")], where)


def _expand_pattern(text: str, where: str) -> list[str]:
    match = _PATTERN_RE.match(text)
    if match is None:
        raise ClusterSpecError(f"{where}: a pattern needs a shard count after it, e.g. {text}*3")
    template, count = match["template"].strip(), match["count"].strip()
    if not count.isdigit() or not 1 <= int(count) <= MAX_SHARDS:
        raise ClusterSpecError(f"{where}: shard count {count!r} must be an integer in [1, {MAX_SHARDS}]")
    if re.search(r"\{(?!i\})|(?<!\{i)\}", template):
        raise ClusterSpecError(f"{where}: only {{i}} may appear in braces in a pattern")
    return [template.replace("{i}", str(i)) for i in range(int(count))]


def _from_file(path: Path) -> list[str]:
    if path.suffix not in CLUSTER_FILE_SUFFIXES:
        raise ClusterSpecError(f"cluster file {path}: use a {'/'.join(CLUSTER_FILE_SUFFIXES)} file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ClusterSpecError(f"cannot read cluster file {path}: {exc.strerror}") from None
    data = _parse_file(path, raw)
    if not isinstance(data, dict):
        raise ClusterSpecError(f"cluster file {path}: expected a mapping with key 'shards', "
                               f"got {type(data).__name__}")
    unknown = set(data) - CLUSTER_FILE_KEYS
    if unknown:
        raise ClusterSpecError(f"cluster file {path}: unknown keys {sorted(unknown)}; "
                               f"allowed: {sorted(CLUSTER_FILE_KEYS)}")
    if "shards" not in data:
        raise ClusterSpecError(f"cluster file {path}: missing key 'shards' "
                               "(a list of host:port, or a pattern)")
    shards = data["shards"]
    where = f"cluster file {path}: shards"
    if isinstance(shards, str):
        return _from_string(shards.strip(), where)
    if isinstance(shards, list) and all(isinstance(t, str) for t in shards):
        return _checked([t.strip() for t in shards], where)
    raise ClusterSpecError(f"{where} must be a list of host:port strings or a pattern string, got {shards!r}")


def _parse_file(path: Path, raw: bytes) -> Any:
    try:
        if path.suffix == ".toml":
            return tomllib.loads(raw.decode())
        import yaml  # a server dependency already; imported here so the module stays light
        return yaml.safe_load(raw)
    except Exception as exc:  # noqa: BLE001 -- tomllib and yaml raise unrelated types; say which file
        raise ClusterSpecError(f"cluster file {path} is not valid {path.suffix[1:].upper()}: {exc}") from None


def _checked(targets: list[str], where: str) -> list[str]:
    """Every target well-formed and distinct."""
    if not targets:
        raise ClusterSpecError(f"{where}: no shards listed")
    for target in targets:
        if not isinstance(target, str) or not _is_target(target):
            raise ClusterSpecError(f"{where}: {target!r} is not host:port (IPv6 as [addr]:port) "
                                   f"or a gRPC URI ({', '.join(_URI_SCHEMES)})")
    seen: dict[str, int] = {}
    for index, target in enumerate(targets):
        if target in seen:
            raise ClusterSpecError(f"{where}: {target} is listed as shard {seen[target]} and shard {index}; "
                                   "every shard needs its own address")
        seen[target] = index
    return targets


def _is_target(target: str) -> bool:
    if target.startswith(_URI_SCHEMES):
        return len(target) > target.index(":") + 1
    match = _HOST_PORT_RE.match(target)
    return match is not None and 0 < int(match["port"]) < 65536


def host_port(host: str, port: int) -> str:
    """The address `host:port`, an IPv6 literal in brackets (`[::1]:50051`), given with or without."""
    bare = host.strip("[]")
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def single_target(target: str | None) -> str:
    """The one target this client talks to: `target`, or `MEMSTORE_TARGET` when it names one shard."""
    if target is not None:
        return target
    targets = resolve_targets(spec_or_env(None))
    if len(targets) > 1:
        raise ValueError(f"MEMSTORE_TARGET names {len(targets)} shards; MemStoreClient talks to one: "
                         "use engram_client.ShardedClient() or connect() for a cluster")
    return targets[0]
