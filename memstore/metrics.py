"""Prometheus metrics, on a registry per server (several servers can share one test process).

Request-level metrics come from `MetricsInterceptor`; row/byte counters from the servicer's data
path; table sizes are read from the store when Prometheus scrapes (no background polling).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from memstore.store import Store

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._http = None  # the /metrics server, once started
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, process_cpu_seconds_total, open fds, ...
        self.requests = Counter("memstore_requests", "RPCs by method and status code",
                                ["method", "code"], registry=r)
        self.latency = Histogram("memstore_request_seconds", "RPC latency by method", ["method"],
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.inflight = Gauge("memstore_inflight_requests", "RPCs in progress", ["method"], registry=r)
        self.rows = Counter("memstore_rows", "rows looked up or updated", ["method", "table"], registry=r)
        self.bytes = Counter("memstore_bytes", "payload bytes sent (Lookup) or received (Update)",
                             ["method", "table"], registry=r)

    def watch_store(self, store: Store) -> None:
        self.registry.register(_TableCollector(store))

    def serve_http(self, port: int, host: str) -> int:
        """Expose /metrics; returns the bound port (port 0 picks one)."""
        self._http, _thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class _TableCollector:
    def __init__(self, store: Store):
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rows = GaugeMetricFamily("memstore_table_rows_materialized", "rows holding storage", labels=["table"])
        size = GaugeMetricFamily("memstore_table_bytes", "bytes of the materialised rows + their optimizer state",
                                 labels=["table"])
        reserved = GaugeMetricFamily("memstore_table_reserved_bytes",
                                     "bytes the table has claimed: RAM dense arrays, LMDB map", labels=["table"])
        resident = GaugeMetricFamily("memstore_table_resident_bytes", "bytes of the table in memory now",
                                     labels=["table"])
        for view in self.store.list_tables():
            rows.add_metric([view.spec.name], view.rows_materialized)
            size.add_metric([view.spec.name], view.bytes_used)
            reserved.add_metric([view.spec.name], view.bytes_reserved)
            resident.add_metric([view.spec.name], view.bytes_resident)
        yield from (rows, size, reserved, resident)
