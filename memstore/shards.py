"""Every shard of a cluster at once: one `MemStoreClient` per target, in shard order.

`Shards.each` runs a call on every shard in parallel and returns the answers in shard order; an
error names the shard (index and target) that raised it, so "table not found" says where. The
admin CLI and `engram_client.ShardedClient` both stand on it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Self, TypeVar

from memstore.client import MemStoreClient, TableInfo
from memstore.cluster import resolve_targets, spec_or_env
from memstore.errors import FailedPrecondition, MemStoreError

T = TypeVar("T")


def on_shard(exc: BaseException, index: int, target: str) -> BaseException:
    """`exc`, its message prefixed with the shard it came from (a project error keeps its class,
    status code and retryability; anything else is returned as is)."""
    if not isinstance(exc, MemStoreError) or exc.message.startswith("shard "):
        return exc
    named = type(exc)(f"shard {index} ({target}): {exc.message.removeprefix(f'{target}: ')}")
    named.retryable = getattr(exc, "retryable", False)
    return named


def merge_infos(infos: list[TableInfo]) -> TableInfo:
    """One view of a table from its shards' views: the spec, with usage summed."""
    spec = replace(infos[0].spec, shard_index=0, shard_count=1)
    totals = [sum(getattr(i, f) for i in infos) for f in
              ("rows_materialized", "bytes_used", "lookups", "updates", "bytes_reserved", "bytes_resident")]
    return TableInfo(spec, *totals)


class Shards:
    """The shards named by `spec` (any cluster-spec form, see `memstore.cluster`; None:
    `MEMSTORE_TARGET`); `client_kwargs` go to each `MemStoreClient` (token, tls, timeouts)."""

    def __init__(self, spec: str | Sequence[str] | None = None, **client_kwargs: Any):
        self.targets = resolve_targets(spec_or_env(spec))
        self.clients = [MemStoreClient(t, **client_kwargs) for t in self.targets]
        self.pool = ThreadPoolExecutor(max(2, len(self.clients)), thread_name_prefix="memstore-shards")

    def __len__(self) -> int:
        return len(self.clients)

    def each(self, call: Callable[[MemStoreClient], T]) -> list[T]:
        """`call(client)` on every shard at once; the answers in shard order. Every shard finishes
        before an error is raised (the first in shard order, naming its shard)."""
        futures = [self.pool.submit(call, client) for client in self.clients]
        errors = [f.exception() for f in futures]
        for index, error in enumerate(errors):
            if error is not None:
                raise on_shard(error, index, self.targets[index])
        return [f.result() for f in futures]

    def check_layout(self, layouts: list[tuple[int, int]] | None = None) -> None:
        """Each target's (shard_index, shard_count), asked from the servers unless given, must be
        (its place in the list, the number of targets): a misordered list must touch nothing."""
        if layouts is None:
            layouts = [(s.shard_index, s.shard_count or 1) for s in self.each(lambda c: c.stats())]
        for index, (shard_index, shard_count) in enumerate(layouts):
            if (shard_index, shard_count) != (index, len(self)):
                raise FailedPrecondition(
                    f"{self.targets[index]} is shard {shard_index} of {shard_count}, but this "
                    f"client lists it as shard {index} of {len(self)}: fix the target order or the servers' "
                    "--shard-index/--shard-count")

    def merge(self, infos: list[TableInfo]) -> TableInfo:
        """One table's per-shard views as one, after checking each shard is where we think."""
        self.check_layout([(i.spec.shard_index, i.spec.shard_count) for i in infos])
        return merge_infos(infos)

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.pool.shutdown(wait=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
