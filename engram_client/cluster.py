"""`connect`: a `ShardedClient` from a cluster spec. The spec forms (comma list, `pattern*count`,
cluster file) and their checks live in `memstore.cluster`, shared with the admin CLI."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from engram_client.sharded import ShardedClient
from memstore.cluster import ClusterSpecError, resolve_targets

__all__ = ["ClusterSpecError", "connect", "resolve_targets"]


def connect(spec: str | Sequence[str] | None = None, **client_kwargs: Any) -> ShardedClient:
    """A `ShardedClient` over the shards named by `spec` (None: `MEMSTORE_TARGET`); `client_kwargs`
    go to each shard's `MemStoreClient` (token, tls, timeouts). Shard layouts are checked on
    create/describe."""
    return ShardedClient(spec, **client_kwargs)
