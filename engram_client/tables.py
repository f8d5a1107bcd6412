"""Where an Engram layer's embedding rows live.

An `EngramBlock` only needs "give me rows [B, T, H] -> vectors [B, T, H, D], differentiably".
`TableSource` is that interface; `LocalTables` keeps the table as an ordinary parameter. Remote
sources (a memstore server, host RAM with async copies) implement the same interface, so the block
never knows where its rows come from.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TableSource(nn.Module):
    """A table of `num_rows` rows of width `dim`, read by global row id.

    Subclasses implement `forward(row_ids: LongTensor [B, T, H], prefetched=None) -> Tensor
    [B, T, H, dim]`; the result must carry gradients back to the rows that were read (how the rows
    are then updated, by a local optimizer or by a server, is the source's business).

    Sources whose rows take time to arrive override `prefetch(row_ids)`: it starts fetching and
    returns a handle that a later `forward(row_ids, prefetched=handle)` consumes (decoding starts
    the lookups at model entry, see `engram_client.decode`). Local rows need no head start.
    """

    num_rows: int
    dim: int

    def prefetch(self, row_ids: torch.Tensor) -> object | None:
        """Start fetching the rows of `row_ids` (B, T, H); None: nothing to fetch ahead."""
        return None

    def forward(self, row_ids: torch.Tensor, prefetched: object | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class LocalTables(TableSource):
    """All heads of one Engram layer in a single [num_rows, dim] parameter (like nn.Embedding).

    Args:
        num_rows: rows of the layer's table (`NgramHasher.total_rows(layer_id)`).
        dim: row width D = n_embed_per_ngram // n_head_per_ngram.
        sparse: produce sparse gradients (only the looked-up rows), for torch.optim.SparseAdam /
            SGD / Adagrad or `RowwiseAdam`; dense gradients otherwise.
        init_std: rows start as N(0, init_std^2). 0.02 matches the memstore's default
            `init_scale`; the reference demo's nn.Embedding uses 1.0.
    """

    def __init__(self, num_rows: int, dim: int, *, sparse: bool = False, init_std: float = 0.02) -> None:
        super().__init__()
        if num_rows < 1 or dim < 1:
            raise ValueError(f"LocalTables needs num_rows >= 1 and dim >= 1, got {num_rows} x {dim}")
        self.num_rows, self.dim, self.sparse, self.init_std = int(num_rows), int(dim), sparse, init_std
        self.weight = nn.Parameter(torch.empty(self.num_rows, self.dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)

    def forward(self, row_ids: torch.Tensor, prefetched: object | None = None) -> torch.Tensor:
        row_ids = row_ids.to(self.weight.device, non_blocking=True)  # ids may be hashed on the CPU
        return F.embedding(row_ids, self.weight, sparse=self.sparse)  # (B, T, H, D)

    def extra_repr(self) -> str:
        return f"num_rows={self.num_rows}, dim={self.dim}, sparse={self.sparse}"
