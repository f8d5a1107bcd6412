"""The Engram side of the demo: config, token compression, hashing, tables, collision counts.

Where the tables live (`--tables`):
- "memstore" (default): `MemStoreTables` on the demo's own daemon or on `--memstore` shards; the
  server's row-wise Adam applies the gradients (none of the table's parameters are in the model).
- "local": the same rows as an in-model parameter trained by `RowwiseAdam` (the same update rule),
  to separate what memstore costs from what Engram gains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engram_client.block import EngramBlock
from engram_client.compression import build_token_map
from engram_client.config import EngramConfig
from engram_client.hashing import NgramHasher
from engram_client.optim import RowwiseAdam
from engram_client.remote import MemStoreTables, RemoteTables
from engram_client.tables import LocalTables


@dataclass
class EngramSettings:
    """The demo's Engram knobs (each one a command-line flag)."""

    layer: int = 1  # 0-based block index: 1 = "layer 2" of the paper, counting from 1
    max_ngram_size: int = 3  # N: 2-grams and 3-grams
    heads_per_ngram: int = 4  # K hash heads per order
    embed_per_ngram: int = 128  # width of one order's embedding (K heads x 32)
    table_rows: int = 100_003  # target rows per head (the next unused prime is taken)
    kernel_size: int = 4  # ShortConv kernel
    tables: str = "memstore"  # memstore | local
    table_lr: float = 1e-2  # Adam lr of the table rows: the paper's 5x the backbone's (2e-3)
    table_lr_schedule: str = "constant"  # constant | follow: the backbone's warm-up + cosine, scaled
    # Training-time dropout of whole looked-up rows (EngramBlock.row_dropout): kept the tables from
    # memorising repeated text and cost nothing within the first epoch (docs/demo.md, "Longer runs").
    row_dropout: float = 0.2
    table_dtype: str = "float32"
    mode: str = "sync"  # memstore consistency: sync | async (rows at most one step stale)


class EngramMemory:
    """Builds the Engram block of one model and knows how its tables are trained."""

    def __init__(self, settings: EngramSettings, tokenizer, eos_id: int, cache_dir: Path,
                 client=None, table_prefix: str = "demo") -> None:
        self.settings, self.client = settings, client
        if settings.tables == "memstore" and client is None:
            raise ValueError("tables='memstore' needs a memstore client")
        # Compression merges ids that differ only in case/spacing ("Return", " return") so they
        # share n-gram rows; the hash runs on compressed ids.
        self.token_map = build_token_map(tokenizer, cache_dir=cache_dir)
        self.config = EngramConfig(
            engram_vocab_size=[settings.table_rows] * (settings.max_ngram_size - 1),
            max_ngram_size=settings.max_ngram_size,
            n_embed_per_ngram=settings.embed_per_ngram,
            n_head_per_ngram=settings.heads_per_ngram,
            layer_ids=[settings.layer],
            pad_id=eos_id,  # "before the start" reads like "right after a file boundary"
            doc_sep_id=eos_id,  # n-gram windows restart at file boundaries of the packed stream
            kernel_size=settings.kernel_size,
        )
        self.hasher = NgramHasher(self.config, token_map=self.token_map)
        self.table_name = f"{table_prefix}_layer{settings.layer}"
        self.block: EngramBlock | None = None

    @property
    def num_rows(self) -> int:
        return self.hasher.total_rows(self.settings.layer)

    @property
    def compressed_vocab(self) -> int:
        return int(self.token_map.max()) + 1

    def make_block(self, layer_id: int, hidden_size: int) -> EngramBlock:
        """The `engram_factory` of `demo.model.GPT`."""
        s = self.settings
        if s.tables == "memstore":
            tables = MemStoreTables(self.client, self.table_name, self.num_rows, self.config.head_dim,
                                    dtype=s.table_dtype, optimizer="adam", lr=s.table_lr, mode=s.mode,
                                    init_scale=0.02, seed=0)
        elif s.tables == "local":
            tables = LocalTables(self.num_rows, self.config.head_dim, sparse=True, init_std=0.02)
        else:
            raise ValueError(f"--tables must be memstore or local, got {s.tables!r}")
        self.block = EngramBlock(self.config, layer_id, hidden_size, tables=tables, hasher=self.hasher,
                                 row_dropout=s.row_dropout)
        return self.block

    def table_optimizer(self) -> torch.optim.Optimizer | None:
        """Local tables need a client-side optimizer; memstore tables are stepped by the server."""
        if self.block is None or not isinstance(self.block.tables, LocalTables):
            return None
        return RowwiseAdam(self.block.tables.parameters(), lr=self.settings.table_lr)

    def follow_schedule(self, scale: float, table_opt: torch.optim.Optimizer | None) -> None:
        """Set the tables' lr for this step: `table_lr * scale`, where scale = the backbone's lr
        now / its peak. Memstore tables send it with the step's update (`RemoteTables.lr`)."""
        if self.settings.table_lr_schedule == "constant":
            return
        lr = self.settings.table_lr * scale
        if self.remote is not None:
            self.remote.lr = lr
        for group in table_opt.param_groups if table_opt is not None else ():
            group["lr"] = lr

    @property
    def remote(self) -> RemoteTables | None:
        tables = None if self.block is None else self.block.tables
        return tables if isinstance(tables, RemoteTables) else None

    def flush(self) -> None:
        """Wait until every table update sent so far is applied."""
        if self.remote is not None:
            self.remote.flush()

    def collisions(self, token_ids: np.ndarray, seq_len: int) -> dict:
        """Hash collisions among the n-grams of `token_ids`, per head (see `count_collisions`)."""
        usable = len(token_ids) // seq_len * seq_len
        windows = np.asarray(token_ids[:usable], dtype=np.int64).reshape(-1, seq_len)  # (W, T)
        return count_collisions(self.hasher, windows, self.settings.layer)


def count_collisions(hasher: NgramHasher, input_ids: np.ndarray, layer_id: int) -> dict:
    """How often different n-grams share a table row, per hash head of one layer.

    An n-gram (n compressed ids, padding included) always hashes to the same row of a head, so per
    head: take the distinct n-grams seen in `input_ids` (B, T), look at their rows, and call an
    n-gram colliding when another distinct n-gram has the same row. Across the K heads of an order
    an n-gram is only fully confused when it collides in every head (`colliding_all_heads`): the
    reason Engram uses several heads with different primes.
    """
    cfg = hasher.config
    K, N = cfg.n_head_per_ngram, cfg.max_ngram_size
    heads = hasher.hash_layer(input_ids, layer_id).reshape(-1, cfg.num_heads)  # (B*T, H)
    grams = _ngram_tokens(hasher, input_ids)  # (B*T, N): compressed ids at t, t-1, ..., t-N+1
    sizes = hasher.head_sizes(layer_id)
    per_head, by_order = [], {}
    for order in range(2, N + 1):
        _, first = np.unique(grams[:, :order], axis=0, return_index=True)  # one position per n-gram
        collides = np.zeros((len(first), K), dtype=bool)  # (G, K)
        for k in range(K):
            j = (order - 2) * K + k
            rows = heads[first, j]  # (G,) row of each distinct n-gram
            _, inverse, grams_per_row = np.unique(rows, return_inverse=True, return_counts=True)
            collides[:, k] = grams_per_row[inverse] > 1
            per_head.append({"head": j, "order": order, "table_size": sizes[j],
                             "distinct_ngrams": len(first), "distinct_rows": len(grams_per_row),
                             "colliding_ngrams": int(collides[:, k].sum())})
        by_order[order] = {
            "distinct_ngrams": len(first),
            "table_size_per_head": int(np.mean(sizes[(order - 2) * K:(order - 1) * K])),
            "collision_rate_per_head": float(collides.mean()),
            "colliding_all_heads": int(collides.all(axis=1).sum()),
        }
    return {"positions": int(heads.shape[0]), "by_order": by_order, "per_head": per_head}


def _ngram_tokens(hasher: NgramHasher, input_ids: np.ndarray) -> np.ndarray:
    """(B*T, N) compressed ids of the n-gram ending at each position, as the hasher sees them
    (left padding and file-boundary resets included)."""
    shifts = hasher.ngram_tokens(input_ids)  # N arrays (B, T); k-th = token at t-k
    return np.stack([s.reshape(-1) for s in shifts], axis=1)
