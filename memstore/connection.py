"""How a client call fails: which errors are retried, for how long, what is logged, what is said.

UNAVAILABLE (server down or restarting) and gRPC's own RESOURCE_EXHAUSTED (back-pressure) heal by
themselves, so they are retried with exponential backoff for up to `retry_timeout_s` (default 60 s).
The first retry of a call is logged as a warning (logger `memstore.client`) and so is every further
10 s of retrying, so a wrong port or a server that is not up yet is never a silent hang. When the
time is up, the error names the target, the attempts and the time spent.

A TLS mismatch never heals, so it fails at once with what to change: a TLS client whose handshake
fails (unknown CA, wrong name, plaintext server), and a plaintext client against a TLS server.
The latter only shows up as "Socket closed", which a restarting server also gives, so the client
then probes the port once with a TLS handshake to tell the two apart.
"""
from __future__ import annotations

import logging
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

from memstore.errors import MemStoreError, from_status
from memstore.protocol import ERROR_TRAILER

T = TypeVar("T")
log = logging.getLogger("memstore.client")

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
_MESSAGE_TOO_LARGE = ("Received message larger than max", "Sent message larger than max")  # gRPC's, final
# gRPC's words for a TLS handshake the client refused (bad CA, wrong name, plaintext server).
_TLS_HANDSHAKE_FAILED = ("Tls handshake failed", "Ssl handshake failed", "Hostname Verification Check failed",
                         "CERTIFICATE_VERIFY_FAILED")
_PLAINTEXT_HITS_TLS = "Socket closed"   # what a plaintext client sees from a TLS server (and from a restart)
_HOST_PORT = re.compile(r"^(?:ipv4:|ipv6:|dns:(?:///)?)?\[?(?P<host>[^\[\]]+?)\]?:(?P<port>\d+)$")
LOG_EVERY_S = 10.0
PROBE_TIMEOUT_S = 2.0


def as_error(exc: grpc.RpcError) -> MemStoreError:
    """The project error for a failed call; `.retryable` marks transient failures."""
    code, details = exc.code(), exc.details() or ""
    trailers = dict(exc.trailing_metadata() or ())
    error = from_status(code, details)
    # UNAVAILABLE: server down or restarting. RESOURCE_EXHAUSTED without our trailer: gRPC's own
    # concurrency limit (back-pressure). Ours (e.g. request too large, map full) is final.
    error.retryable = (code in RETRYABLE and ERROR_TRAILER not in trailers
                       and not details.startswith(_MESSAGE_TOO_LARGE))
    if code == grpc.StatusCode.UNAVAILABLE and any(words in details for words in _TLS_HANDSHAKE_FAILED):
        error.retryable = False
        error.message = (f"TLS handshake failed (retrying cannot fix this): {details}. Check tls= (the CA "
                         "that signed the server's certificate, server_name) and that the server runs with TLS")
    return error


class Retrying:
    """Runs one call of a client against `target`, retrying what heals (see the module doc)."""

    def __init__(self, target: str, *, tls: bool):
        self.target, self.tls = target, tls
        self._probed = False   # the TLS probe runs at most once per client

    def __call__(self, attempt: Callable[[], T], retry_timeout_s: float) -> T:
        """`attempt()`, retried for up to `retry_timeout_s` (the client's, read at each call)."""
        start = time.monotonic()
        deadline, delay, attempts, logged = start + retry_timeout_s, 0.05, 0, start
        while True:
            attempts += 1
            try:
                result = attempt()
            except MemStoreError as exc:
                if not getattr(exc, "retryable", False):
                    raise
                self._fail_fast_on_tls(exc)
                now = time.monotonic()
                if now >= deadline:
                    raise self._gave_up(exc, attempts, now - start, retry_timeout_s) from None
                if attempts == 1 or now - logged >= LOG_EVERY_S:
                    logged = now
                    log.warning("memstore %s: %s; retrying (attempt %d, %.0f s of retry_timeout_s=%g)",
                                self.target, exc, attempts, now - start, retry_timeout_s)
                time.sleep(min(delay, deadline - now))  # the last attempt lands on the deadline
                delay = min(delay * 2, 2.0)
                continue
            if attempts > 1:
                log.warning("memstore %s: answered after %d attempts in %.1f s", self.target, attempts,
                            time.monotonic() - start)
            return result

    def _gave_up(self, exc: MemStoreError, attempts: int, elapsed_s: float, retry_timeout_s: float) -> MemStoreError:
        """The last error, saying where, how often and how long; still marked retryable (a caller
        that re-sends a whole training step relies on that)."""
        tried = (f"{attempts} attempt{'s' if attempts > 1 else ''} in {elapsed_s:.1f} s "
                 f"(retry_timeout_s={retry_timeout_s:g})")
        hint = ""
        if exc.code == grpc.StatusCode.UNAVAILABLE:
            hint = "; is a memstore server listening there (address, port, --host)?"
        error = type(exc)(f"{self.target}: {exc.message} [{tried}]{hint}")
        error.retryable = True
        return error

    def _fail_fast_on_tls(self, exc: MemStoreError) -> None:
        if self.tls or self._probed or _PLAINTEXT_HITS_TLS not in exc.message:
            return
        self._probed = True
        if speaks_tls(self.target):
            exc.retryable = False
            exc.message = (f"{self.target} speaks TLS but this client connects in plaintext: pass "
                           "tls=TlsConfig(ca_cert=...) (CLI: --tls-ca); retrying cannot fix this")
            raise exc


def speaks_tls(target: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TLS handshake with `target` (host:port) succeeds. Certificates are not checked: this
    only tells a TLS server from a plaintext one, it never carries data."""
    match = _HOST_PORT.match(target)
    if match is None:
        return False   # unix sockets and other schemes: no probe
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((match["host"], int(match["port"])), timeout=timeout_s) as sock, \
                context.wrap_socket(sock, server_hostname=match["host"]):
            return True
    except (OSError, ValueError):   # ssl.SSLError is an OSError: a plaintext server, or nobody
        return False


@dataclass(frozen=True)
class TlsConfig:
    """PEM files: `ca_cert` verifies the server; `client_cert`/`client_key` for mutual TLS."""
    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    server_name: str | None = None  # override the name checked against the certificate

    def credentials(self) -> grpc.ChannelCredentials:
        read = lambda p: Path(p).read_bytes() if p else None
        return grpc.ssl_channel_credentials(read(self.ca_cert), read(self.client_key), read(self.client_cert))
