"""Server configuration: one dataclass, filled from defaults < config file < env vars < CLI flags.

Every field is settable three ways, with the same name:
- config file (TOML or YAML): `max_concurrent_requests = 64`
- environment: `MEMSTORE_MAX_CONCURRENT_REQUESTS=64`
- flag: `--max-concurrent-requests 64`
Unknown keys in a file or unknown `MEMSTORE_*` variables are errors, never silently ignored.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

ENV_PREFIX = "MEMSTORE_"
# Environment variables that are not config fields but belong to us (the CLI's client side).
_ENV_NOT_CONFIG = {"MEMSTORE_TARGET"}


class ConfigError(ValueError):
    """A bad configuration value, file or variable; the message says which and why."""


@dataclass
class ServerConfig:
    # Network
    host: str = "127.0.0.1"            # bind address; any other than loopback needs token (or allow_unauthenticated)
    port: int = 50051                  # 0 picks a free port (logged at start)
    metrics_port: int = -1             # Prometheus /metrics on this port; -1 disables, 0 picks one
    # Storage
    backend: str = "ram"               # ram | lmdb
    data_dir: str = "./memstore-data"
    keep_snapshots: int = 2            # newest snapshots kept per table
    snapshot_interval_s: float = 300.0  # RAM backend: periodic checkpoint (a crash loses at most this); 0 disables
    keep_checkpoints: int = 3          # newest tagged (training-job) checkpoints kept per table
    ram_memmap: bool = False           # RAM backend: back arrays by files in data_dir
    shm_dir: str = "auto"              # RAM backend: arrays in shared memory here, mapped by same-host clients; "" = off
    ram_max_bytes: int = 0             # RAM backend: dense bytes of all tables; 0 = auto (80 % of RAM/cgroup), -1 = no cap
    lmdb_sync: bool = True             # fsync each commit: acknowledged updates survive power loss
    lmdb_map_size: int = 1 << 30       # initial LMDB map size per table (grown automatically)
    lmdb_max_map_size: int = 0         # growth cap per table; 0 = no cap (disk is the limit)
    # Sharding
    shard_index: str = "0"             # this daemon's shard, or "auto": the trailing -N of the hostname
    shard_count: int = 1
    # Security
    token: str = ""                    # bearer token required on every RPC but health; "" = none
    tls_cert: str = ""                 # PEM server certificate (enables TLS)
    tls_key: str = ""                  # PEM private key
    tls_client_ca: str = ""            # PEM CA: clients must present a cert it signed (mutual TLS)
    allow_unauthenticated: bool = False  # serve a non-loopback host without token or client certs
    read_only: bool = False            # refuse CreateTable/DropTable/Update with PERMISSION_DENIED
    # Limits
    max_rows_per_request: int = 1 << 22       # 4M rows per Lookup/Update
    max_request_bytes: int = 1 << 30          # rows (Lookup) or gradients (Update) one request may hold
    max_concurrent_requests: int = 64         # beyond this: RESOURCE_EXHAUSTED, not a pile-up
    workers: int = 4                          # threads running backend work (numpy/LMDB release the GIL)
    # SIGTERM: health NOT_SERVING at once, yet RPCs are served for drain_s more, so probes and load
    # balancers see it and move traffic away before the port closes
    drain_s: float = 0.0
    grace_s: float = 10.0                     # SIGTERM: time in-flight RPCs get to finish
    max_step_timeout_s: float = 3600.0        # cap on the rank timeout a data-parallel job asks for
    # Testing only: sleep this long in every Lookup (a slow or distant server, for prefetch tests)
    fault_lookup_delay_ms: float = 0.0
    # Logs
    log_level: str = "info"
    log_format: str = "text"           # text | json (one JSON object per line)

    def validate(self) -> ServerConfig:
        _check(self.backend in CHOICES["backend"], f"backend must be ram or lmdb, got {self.backend!r}")
        _check(0 <= self.port < 65536, f"port must be in [0, 65535], got {self.port}")
        _check(-1 <= self.metrics_port < 65536, f"metrics_port must be -1 or a port, got {self.metrics_port}")
        _check(self.shard_count >= 1, f"shard_count must be >= 1, got {self.shard_count}")
        index = self.resolved_shard_index()
        _check(0 <= index < self.shard_count,
               f"shard_index {index} is outside [0, shard_count={self.shard_count})")
        _check(self.max_rows_per_request > 0, "max_rows_per_request must be > 0")
        _check(self.max_request_bytes > 0, "max_request_bytes must be > 0")
        _check(self.max_concurrent_requests > 0, "max_concurrent_requests must be > 0")
        _check(self.workers > 0, "workers must be > 0")
        _check(self.keep_snapshots >= 1, "keep_snapshots must be >= 1")
        _check(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
        _check(self.ram_max_bytes >= -1, "ram_max_bytes must be > 0, 0 (auto) or -1 (no cap)")
        _check(self.max_step_timeout_s > 0, "max_step_timeout_s must be > 0")
        _check(self.drain_s >= 0 and self.grace_s >= 0, "drain_s and grace_s must be >= 0")
        _check(self.snapshot_interval_s >= 0, "snapshot_interval_s must be >= 0 (0 disables)")
        _check(self.token == self.token.strip(), "token must not start or end with whitespace "
               "(a blank token protects nothing; a trailing newline from a file would lock every client out)")
        self._check_protected()
        _check(bool(self.tls_cert) == bool(self.tls_key), "tls_cert and tls_key go together")
        _check(not self.tls_client_ca or bool(self.tls_cert), "tls_client_ca needs tls_cert/tls_key")
        _check(self.log_format in ("text", "json"), f"log_format must be text or json, got {self.log_format!r}")
        _check(self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
               f"log_level must be debug/info/warning/error, got {self.log_level!r}")
        return self

    def _check_protected(self) -> None:
        """Protected mode (as Redis): whoever can reach a non-loopback address must prove who they
        are (token or a client certificate), unless the operator says the network does that."""
        if self.token or self.tls_client_ca or self.allow_unauthenticated or is_loopback(self.host):
            return
        raise ConfigError(
            f"refusing to serve {self.host} without authentication: anyone who reaches it could read, "
            "overwrite or drop every table. Set a token (MEMSTORE_TOKEN / --token), require client "
            "certificates (tls_client_ca), bind 127.0.0.1, or, on a network only trusted clients reach "
            "(a firewall, a NetworkPolicy, ports published on loopback), set allow_unauthenticated = true "
            "(--allow-unauthenticated, MEMSTORE_ALLOW_UNAUTHENTICATED=true)")

    def resolved_shard_index(self) -> int:
        """`auto` reads the pod ordinal of a Kubernetes StatefulSet from the hostname (memstore-2 → 2)."""
        if self.shard_index != "auto":
            try:
                return int(self.shard_index)
            except ValueError:
                raise ConfigError(f"shard_index must be an integer or 'auto', got {self.shard_index!r}") from None
        host = socket.gethostname()
        match = re.search(r"-(\d+)$", host)
        if not match:
            raise ConfigError(f"shard_index=auto needs a hostname ending in -<ordinal>, got {host!r}")
        return int(match.group(1))

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)


# What `memstore serve --help` says of each option (the comments above say why it is there).
HELP = {
    "host": "bind address; anything but loopback needs a token (or --allow-unauthenticated)",
    "port": "gRPC port; 0 picks a free one (printed at start)",
    "metrics_port": "Prometheus /metrics port; 0 picks a free one, off (-1) disables",
    "backend": "ram: dense numpy arrays, snapshotted; lmdb: memory-mapped LMDB, every update durable",
    "data_dir": "snapshots, checkpoints, LMDB tables",
    "keep_snapshots": "newest snapshots kept per table",
    "snapshot_interval_s": "RAM backend: snapshot changed tables this often; off (0) disables",
    "keep_checkpoints": "newest tagged (training-job) checkpoints kept per table",
    "ram_memmap": "RAM backend: back the arrays by files in the data dir (tables may exceed RAM)",
    "shm_dir": "RAM backend: tables in shared memory here, read by same-host clients; '' = off",
    "ram_max_bytes": "RAM backend: cap on the dense bytes of all tables; 0 = auto (80% of memory), -1 = no cap",
    "lmdb_sync": "fsync every commit (acknowledged updates survive power loss)",
    "lmdb_map_size": "initial LMDB map size per table (grown automatically)",
    "lmdb_max_map_size": "cap on an LMDB table's map; 0 = no cap",
    "shard_index": "this daemon's shard, or auto: the trailing -N of the hostname (Kubernetes)",
    "shard_count": "shards in the cluster",
    "token": "bearer token required on every RPC but health; '' = none",
    "tls_cert": "PEM server certificate (enables TLS)",
    "tls_key": "PEM private key of tls_cert",
    "tls_client_ca": "PEM CA: clients must present a certificate it signed (mutual TLS)",
    "allow_unauthenticated": "serve a non-loopback address without token or client certificates "
                             "(only where the network itself protects the port)",
    "read_only": "refuse CreateTable, DropTable, Update, Restore (PERMISSION_DENIED)",
    "max_rows_per_request": "rows one Lookup or Update may carry (RESOURCE_EXHAUSTED beyond)",
    "max_request_bytes": "rows (Lookup) or gradients (Update) bytes one request may hold",
    "max_concurrent_requests": "RPCs admitted at once; beyond: RESOURCE_EXHAUSTED, never a pile-up",
    "workers": "threads running backend work",
    "drain_s": "on SIGTERM: health turns NOT_SERVING but RPCs are still served this long, so load "
               "balancers move away first; a second signal ends it; off (0) skips it",
    "grace_s": "on SIGTERM, after the drain: time in-flight RPCs get to finish",
    "max_step_timeout_s": "cap on the rank timeout a data-parallel job may ask for",
    "log_level": "log level",
    "log_format": "text, or json (one object per line)",
}
# Values `--help` shows by their meaning, and options whose value is one of a few words.
DEFAULT_SHOWN = {"metrics_port": "off", "drain_s": "off", "ram_max_bytes": "auto",
                 "lmdb_max_map_size": "no cap", "token": "none", "tls_cert": "none", "tls_key": "none",
                 "tls_client_ca": "none"}
CHOICES = {"backend": ("ram", "lmdb"), "shard_index": ("N", "auto"), "log_format": ("text", "json"),
           "log_level": ("debug", "info", "warning", "error")}
OFF = {"metrics_port": -1, "snapshot_interval_s": 0.0, "drain_s": 0.0}  # options that also take the word "off"
TESTING_ONLY = {"fault_lookup_delay_ms"}  # settable, but not offered in --help
def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:   # a host name: it may resolve to anything
        return False


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


FIELDS = {f.name: f for f in fields(ServerConfig)}


def coerce(name: str, raw: Any) -> Any:
    """Turn a file/env/flag value into the field's type, with a message naming the field."""
    kind = type(getattr(ServerConfig(), name))
    if name in OFF and str(raw).strip().lower() == "off":
        return OFF[name]
    try:
        if kind is bool:
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError(raw)
            return text in ("1", "true", "yes", "on")
        return kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected {kind.__name__}, got {raw!r}") from None


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) file; unknown keys are errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} is not valid: {exc}") from None
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option = value")
    data = {key.replace("-", "_"): value for key, value in data.items()}
    unknown = sorted(set(data) - set(FIELDS))
    if unknown:
        raise ConfigError(f"config file {path}: unknown keys {unknown}; valid keys: {sorted(FIELDS)}")
    return {key: coerce(key, value) for key, value in data.items()}


def load_env(environ: dict[str, str] | None = None) -> dict[str, Any]:
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for var, raw in environ.items():
        if not var.startswith(ENV_PREFIX) or var in _ENV_NOT_CONFIG:
            continue
        name = var[len(ENV_PREFIX):].lower()
        if name not in FIELDS:
            raise ConfigError(f"unknown environment variable {var}; valid: "
                              f"{', '.join(ENV_PREFIX + f.upper() for f in sorted(FIELDS))}")
        values[name] = coerce(name, raw)
    return values


def build_config(file: str | Path | None = None, flags: dict[str, Any] | None = None,
                 environ: dict[str, str] | None = None) -> ServerConfig:
    """defaults < file < environment < flags (flags given as None are 'not set')."""
    values: dict[str, Any] = {}
    if file:
        values.update(load_file(file))
    values.update(load_env(environ))
    values.update({k: coerce(k, v) for k, v in (flags or {}).items() if v is not None})
    return dataclasses.replace(ServerConfig(), **values).validate()
