"""Building, running and stopping a memstore server.

- `create_server(config)` builds and starts a server (port 0 picks a free one) → (server, port).
- `serve(config)` runs one until SIGTERM/SIGINT, then stops gracefully: health flips to
  NOT_SERVING, RPCs are still served for `drain_s` (probes and load balancers see the flip and
  move away; a second signal ends the drain), then new RPCs are refused, in-flight ones get
  `grace_s` to finish, and RAM tables are snapshotted.
- `ServerThread` runs a server on a background event loop: tests, benchmarks and the demo use it
  to get a real server in-process.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from memstore import shm
from memstore.backends import open_backend
from memstore.cluster import host_port
from memstore.config import ConfigError, ServerConfig, is_loopback
from memstore.interceptors import (
    AuthInterceptor,
    ConcurrencyLimitInterceptor,
    ErrorInterceptor,
    MetricsInterceptor,
)
from memstore.metrics import Metrics
from memstore.servicer import MemStoreServicer, add_to_server
from memstore.snapshot import fsync_dir
from memstore.store import ShardLayout, Store
from memstore.v1 import memstore_pb2 as pb

log = logging.getLogger("memstore.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MemStore"].full_name  # "memstore.v1.MemStore"


@dataclass
class MemStoreServer:
    """A started server and the parts `stop()` has to wind down."""
    grpc_server: grpc.aio.Server
    port: int
    store: Store
    health: health.aio.HealthServicer
    executor: ThreadPoolExecutor
    metrics: Metrics
    metrics_port: int | None
    config: ServerConfig
    _checkpoint_task: asyncio.Task | None = None

    async def stop(self, grace: float | None = None, drain_s: float = 0.0,
                   drain_ended: asyncio.Event | None = None) -> None:
        """Health NOT_SERVING; keep serving for `drain_s` (or until `drain_ended` is set); then
        refuse new RPCs, let in-flight ones finish, persist RAM tables, release storage."""
        grace = self.config.grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if drain_s > 0:
            log.info("draining: health NOT_SERVING, still serving for %.1fs (a second signal ends it)", drain_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for((drain_ended or asyncio.Event()).wait(), drain_s)
        if self._checkpoint_task:
            self._checkpoint_task.cancel()
        await self.grpc_server.stop(grace)
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        await loop.run_in_executor(self.executor, self.store.backend.checkpoint)
        log.info("checkpointed tables in %.2fs", time.perf_counter() - started)
        await loop.run_in_executor(self.executor, self.store.backend.close)
        self.executor.shutdown(wait=True)
        self.metrics.stop_http()
        log.info("stopped")


def ram_cap(config: ServerConfig) -> int | None:
    """The RAM backend's cap on dense table bytes: explicit, none (-1, or memmap mode unless set),
    or 80 % of the memory this process may use (the machine's, or its cgroup's if lower):
    hashed traffic makes a RAM table resident at its dense size on its first lookups, so a table
    admitted beyond memory would get the daemon OOM-killed later, losing every table."""
    if config.ram_max_bytes > 0:
        return config.ram_max_bytes
    if config.ram_max_bytes == -1 or config.ram_memmap:
        return None
    return int(0.8 * usable_memory_bytes())


def shm_dir(config: ServerConfig) -> Path | None:
    """Where this daemon's RAM tables live in shared memory: one directory per data dir, so two
    daemons on one host never meet; "auto" is /dev/shm/memstore-<uid>/<data dir digest>."""
    if not config.shm_dir:
        return None
    root = shm.default_shm_root() if config.shm_dir == "auto" else Path(config.shm_dir)
    if root is None:
        return None
    digest = hashlib.blake2b(str(config.data_path.resolve()).encode(), digest_size=6).hexdigest()
    return root / digest


def usable_memory_bytes() -> int:
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def enable_reflection(server: grpc.aio.Server, services: list[str]) -> None:
    """Server reflection as `grpc.reflection.v1` (what current grpcurl and Postman ask first) and
    `v1alpha`. grpcio-reflection ships only v1alpha; v1's messages are the same on the wire, so
    the same servicer answers both."""
    names = [*services, reflection.SERVICE_NAME, REFLECTION_V1]
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo, request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),))


DATA_DIR_IDENTITY = "memstore-data-dir.json"


def check_data_dir(config: ServerConfig) -> None:
    """A data dir remembers what it holds (backend, shard layout); a server started on it with
    other settings is refused, instead of serving an empty or stale view of it. A data dir
    without the record (new, or from an older version) is judged by what is in it: LMDB tables
    are never opened as a RAM data dir. (A RAM data dir opened by the LMDB backend is the
    documented conversion: it builds its tables from the snapshots.)"""
    path = config.data_path / DATA_DIR_IDENTITY
    mine = _identity(config)
    if path.exists():
        try:
            recorded = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path} is damaged ({exc}); it says which backend and shard layout the data dir "
                              "holds: restore it, or delete it to have the next start record it again") from None
        if {k: recorded.get(k) for k in mine} != mine:
            raise ConfigError(
                f"data dir {config.data_path} holds a {recorded.get('backend')} memstore, shard "
                f"{recorded.get('shard_index')} of {recorded.get('shard_count')}, but this server was started as "
                f"{config.backend}, shard {mine['shard_index']} of {config.shard_count}: start it with the settings "
                "the data dir was created with (--backend, --shard-index, --shard-count), or move to another "
                "backend or layout offline (copy snapshots/ into a new --data-dir; `memstore reshard`)")
        return
    tables = config.data_path / "tables"
    if config.backend == "ram" and tables.is_dir() and any(not p.name.startswith(".") for p in tables.iterdir()):
        raise ConfigError(f"data dir {config.data_path} holds LMDB tables ({tables}), but this server was started "
                          "with the ram backend: start it with --backend lmdb")


def record_data_dir(config: ServerConfig) -> None:
    """Write the data dir's identity once a server has opened it with these settings."""
    path = config.data_path / DATA_DIR_IDENTITY
    if path.exists():
        return
    temp = path.with_suffix(".tmp")
    with open(temp, "w") as out:
        out.write(json.dumps({**_identity(config), "format": 1}) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(temp, path)
    fsync_dir(config.data_path)


def _identity(config: ServerConfig) -> dict:
    return {"backend": config.backend, "shard_index": config.resolved_shard_index(), "shard_count": config.shard_count}


def build_store(config: ServerConfig) -> Store:
    options = {"keep_snapshots": config.keep_snapshots, "keep_checkpoints": config.keep_checkpoints}
    if config.backend == "lmdb":
        options.update(sync=config.lmdb_sync, map_size=config.lmdb_map_size,
                       max_map_size=config.lmdb_max_map_size or None)
    else:
        options.update(memmap=config.ram_memmap, max_bytes=ram_cap(config), shm_dir=shm_dir(config))
    started = time.perf_counter()
    check_data_dir(config)
    backend = open_backend(config.backend, config.data_path, **options)
    tables = backend.tables()
    log.info("opened %s backend at %s: %d tables restored in %.2fs", config.backend, config.data_path,
             len(tables), time.perf_counter() - started)
    layout = ShardLayout(config.resolved_shard_index(), config.shard_count)
    for table in tables:
        spec = table.spec
        if (spec.shard_index, spec.shard_count) != (layout.index, layout.count):
            backend.close()
            raise ConfigError(
                f"table {spec.name!r} in {config.data_path} was created as shard {spec.shard_index} of "
                f"{spec.shard_count}, but this server is shard {layout.index} of {layout.count}: start it with "
                "that layout, or reshard offline (`memstore reshard`)")
    record_data_dir(config)  # only now: a refused start must not stamp the data dir with its settings
    return Store(backend, layout, max_rows_per_request=config.max_rows_per_request,
                 max_request_bytes=config.max_request_bytes, read_only=config.read_only)


class StartupError(Exception):
    """The server cannot start where it was told to (a port in use, an unreadable TLS file);
    the message says which and why. `memstore serve` prints it instead of a traceback."""


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert:
        return None

    def read(option: str) -> bytes:
        path = getattr(config, option)
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise StartupError(f"{option} {path}: {exc.strerror}") from None
    client_ca = read("tls_client_ca") if config.tls_client_ca else None
    return grpc.ssl_server_credentials([(read("tls_key"), read("tls_cert"))],
                                       root_certificates=client_ca, require_client_auth=client_ca is not None)


def _bind(server: grpc.aio.Server, config: ServerConfig) -> int:
    address = host_port(config.host, config.port)
    credentials = _credentials(config)
    try:
        return server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # gRPC says only "Failed to bind"; the OS says why
        why = bind_failure(config.host, config.port, tls=credentials is not None)
        raise StartupError(f"cannot listen on {address}: {why}") from None


def bind_failure(host: str, port: int, *, tls: bool = False) -> str:
    """Why an address cannot be bound: what the OS answers to binding it ourselves."""
    try:
        addresses = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"host {host!r} does not resolve ({exc.strerror})"
    for family, kind, proto, _, sockaddr in addresses:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                in_use = exc.errno == errno.EADDRINUSE
                return exc.strerror + (" (another memstore? choose another port, or 0 for a free one)" if in_use else "")
    return "gRPC refused it" + (" (are tls_cert and tls_key a valid PEM pair?)" if tls else "")


async def create_server(config: ServerConfig, store: Store | None = None) -> tuple[MemStoreServer, int]:
    """Build, bind and start a server; returns it and the port it bound. The ports are bound
    first: a port in use is a StartupError before the data dir is opened (a RAM reload can
    take minutes)."""
    config.validate()
    metrics = Metrics()
    # Outermost first: refuse unauthenticated calls before counting them, count before timing.
    admission = ConcurrencyLimitInterceptor(config.max_concurrent_requests)
    interceptors = [admission, MetricsInterceptor(metrics), ErrorInterceptor()]
    if config.token:
        interceptors.insert(0, AuthInterceptor(config.token))
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[("grpc.so_reuseport", 0)],  # never share a port with another process by accident
    )
    port = _bind(server, config)
    try:
        metrics_port = _serve_metrics(metrics, config)
        store = store or build_store(config)
    except BaseException:
        metrics.stop_http()
        await server.stop(None)  # releases the port
        raise
    metrics.watch_store(store)
    executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="memstore-io")
    add_to_server(MemStoreServicer(
        store, executor, config.backend, metrics, lookup_delay_s=config.fault_lookup_delay_ms / 1e3,
        max_step_timeout_s=config.max_step_timeout_s, admission=admission), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection(server, [SERVICE_NAME, health.SERVICE_NAME])
    await server.start()
    for service in ("", SERVICE_NAME):
        await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    running = MemStoreServer(server, port, store, health_servicer, executor, metrics, metrics_port, config)
    if config.snapshot_interval_s > 0 and config.backend == "ram":
        running._checkpoint_task = asyncio.create_task(_checkpoint_every(running, config.snapshot_interval_s))
    log.info("serving", extra={"fields": {
        "address": host_port(config.host, port), "backend": config.backend, "tls": bool(config.tls_cert),
        "auth": bool(config.token), "read_only": config.read_only, "metrics_port": metrics_port,
        "shard": f"{store.layout.index}/{store.layout.count}"}})
    if not (config.token or config.tls_client_ca or is_loopback(config.host)):
        log.warning("serving %s without authentication (allow_unauthenticated): anyone who reaches this port "
                    "can read, overwrite and drop every table", config.host)
    return running, port


def _serve_metrics(metrics: Metrics, config: ServerConfig) -> int | None:
    if config.metrics_port < 0:
        return None
    try:
        return metrics.serve_http(config.metrics_port, config.host.strip("[]"))
    except OSError as exc:
        address = host_port(config.host, config.metrics_port)
        raise StartupError(f"cannot serve metrics on {address}: {exc.strerror}"
                           + (" (choose another metrics_port)" if exc.errno == errno.EADDRINUSE else "")) from None


async def _checkpoint_every(server: MemStoreServer, interval_s: float) -> None:
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(interval_s)
        try:
            await loop.run_in_executor(server.executor, server.store.backend.checkpoint)
        except Exception:
            log.exception("periodic checkpoint failed")


def serve(config: ServerConfig) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully."""
    asyncio.run(_serve(config))


async def _serve(config: ServerConfig) -> None:
    server, port = await create_server(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"memstore listening on {host_port(config.host, port)}", flush=True)  # scripts wait for this line
    await stop.wait()
    stop.clear()  # from here a second signal ends the drain
    log.info("signal received: stopping (drain %.1fs, grace %.1fs)", config.drain_s, config.grace_s)
    await server.stop(drain_s=config.drain_s, drain_ended=stop)


class ServerThread:
    """A real server on a background event loop, for tests and in-process tools.

    >>> with ServerThread(ServerConfig(port=0, data_dir=tmp)) as srv:
    ...     client = MemStoreClient(f"127.0.0.1:{srv.port}")
    """

    def __init__(self, config: ServerConfig):
        self.config = config
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="memstore-server", daemon=True)
        self.server: MemStoreServer | None = None

    @property
    def port(self) -> int:
        assert self.server is not None, "start() first"
        return self.server.port

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        self._thread.start()
        self.server, _ = asyncio.run_coroutine_threadsafe(create_server(self.config), self.loop).result()
        return self

    def stop(self, grace: float = 1.0) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result()
            self.server = None
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
                 "msg": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in getattr(record, "fields", {}).items())
        return super().format(record) + (f" {fields}" if fields else "")


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else
                         _TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
