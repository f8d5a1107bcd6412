"""engram_client: the model side of Engram (hashing, token compression, EngramBlock, table sources).

Exports are loaded lazily (PEP 562): `import memstore.client` must work in the
server image, which has no torch, so this file imports nothing heavy up front.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from engram_client.config import EngramConfig

# public name -> module that defines it
_EXPORTS = {
    "EngramBlock": "engram_client.block",
    "EngramState": "engram_client.block",
    "ShortConv": "engram_client.block",
    "CompressedTokenizer": "engram_client.compression",
    "build_token_map": "engram_client.compression",
    "tokenizer_fingerprint": "engram_client.compression",
    "NgramHasher": "engram_client.hashing",
    "RowwiseAdam": "engram_client.optim",
    "LocalTables": "engram_client.tables",
    "TableSource": "engram_client.tables",
    # ---- remote tables: clients, table sources, prefetch, cache ---------------------------------
    "MemStoreClient": "memstore.client",
    "TlsConfig": "memstore.client",
    "ShardedClient": "engram_client.sharded",
    "RemoteTables": "engram_client.remote",
    "MemStoreTables": "engram_client.remote",
    "HostTables": "engram_client.host",
    "InProcessStore": "engram_client.host",
    "Prefetcher": "engram_client.prefetch",
    "EntryPrefetch": "engram_client.decode",
    "select_states": "engram_client.decode",
    "cat_states": "engram_client.decode",
    "RowCache": "engram_client.cache",
    # ---- training jobs: steps, data-parallel ranks, checkpoints, lr schedules ---------------------
    "Job": "memstore.client",
    "StepFailed": "engram_client.steps",
    "checkpoint_tables": "engram_client.checkpoint",
    "restore_tables": "engram_client.checkpoint",
    "TableLR": "engram_client.checkpoint",
}

__all__ = [
    "CompressedTokenizer",
    "EngramBlock",
    "EngramConfig",
    "EngramState",
    "EntryPrefetch",
    "HostTables",
    "InProcessStore",
    "Job",
    "LocalTables",
    "MemStoreClient",
    "MemStoreTables",
    "NgramHasher",
    "Prefetcher",
    "RemoteTables",
    "RowCache",
    "RowwiseAdam",
    "ShardedClient",
    "ShortConv",
    "StepFailed",
    "TableLR",
    "TableSource",
    "TlsConfig",
    "build_token_map",
    "cat_states",
    "checkpoint_tables",
    "restore_tables",
    "select_states",
    "tokenizer_fingerprint",
]

if TYPE_CHECKING:  # static analysers and IDEs see ordinary imports
    from engram_client.block import EngramBlock, EngramState, ShortConv
    from engram_client.cache import RowCache
    from engram_client.checkpoint import TableLR, checkpoint_tables, restore_tables
    from engram_client.compression import CompressedTokenizer, build_token_map, tokenizer_fingerprint
    from engram_client.decode import EntryPrefetch, cat_states, select_states
    from engram_client.hashing import NgramHasher
    from engram_client.host import HostTables, InProcessStore
    from engram_client.optim import RowwiseAdam
    from engram_client.prefetch import Prefetcher
    from engram_client.remote import MemStoreTables, RemoteTables
    from engram_client.sharded import ShardedClient
    from engram_client.steps import StepFailed
    from engram_client.tables import LocalTables, TableSource
    from memstore.client import Job, MemStoreClient, TlsConfig


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engram_client' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
