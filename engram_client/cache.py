"""A hot-row cache for remote Engram tables, on the model's device.

n-gram traffic is Zipfian: a few rows are read all the time. `RowCache` keeps them next to the
model so they never cross the network again. It is direct-mapped (row id → one slot, by a
multiplicative hash) with frequency-based replacement: every slot has a small saturating
counter, a hit adds one, a miss that maps onto an occupied slot takes one away, and a new row
replaces the resident only once that counter is zero. Hot rows survive a stream of one-off
rows, and every operation is a handful of vectorised tensor ops over the batch's unique ids.

Training is safe: `invalidate(ids)` (called by `RemoteTables` for every pushed update) drops
rows whose server copy changed.
"""
from __future__ import annotations

import torch

_MIX = -7046029254386353131  # 0x9E3779B97F4A7C15 as int64: Fibonacci hashing spreads nearby ids
_MAX_COUNT = 7


class RowCache:
    def __init__(self, capacity_bytes: int, dim: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        row_bytes = dim * torch.empty((), dtype=dtype).element_size() + 8 + 1  # row + tag + counter
        self.slots = max(1, int(capacity_bytes) // row_bytes)
        self.dim = dim
        self.tags = torch.full((self.slots,), -1, dtype=torch.int64, device=device)     # (S,) row id or -1
        self.counts = torch.zeros(self.slots, dtype=torch.uint8, device=device)        # (S,)
        self.rows = torch.zeros(self.slots, dim, dtype=dtype, device=device)          # (S, D)
        self.lookups = 0
        self.hits = 0

    @property
    def capacity_bytes(self) -> int:
        return self.rows.nbytes + self.tags.nbytes + self.counts.nbytes

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def _slot(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.remainder(ids * _MIX, self.slots)

    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For unique `ids` (U,): (hit mask (U,), rows (U, D) valid where hit)."""
        ids = ids.to(self.tags.device)
        slots = self._slot(ids)                                                    # (U,)
        hit = self.tags.index_select(0, slots) == ids                              # (U,)
        hit_slots = slots[hit]
        self.counts[hit_slots] = (self.counts[hit_slots] + 1).clamp_max(_MAX_COUNT)
        self.lookups += len(ids)
        self.hits += int(hit.sum())
        # index_select, not rows[slots]: advanced indexing is several times slower on the CPU
        return hit, self.rows.index_select(0, slots)

    def insert(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Offer rows that missed; each takes its slot only if the resident has gone cold."""
        ids, rows = ids.to(self.tags.device), rows.to(self.rows.device, self.rows.dtype)
        slots = self._slot(ids)                                                    # (M,)
        # Several ids of one batch can share a slot: let the first of each slot compete.
        unique_slots, inverse = torch.unique(slots, return_inverse=True)
        first = torch.full_like(unique_slots, len(ids)).scatter_reduce(
            0, inverse, torch.arange(len(ids), device=ids.device), reduce="amin")   # (S',)
        ids, rows, slots = ids[first], rows[first], unique_slots
        counts = self.counts[slots]
        free = (self.tags[slots] < 0) | (counts == 0)
        self.counts[slots[~free]] = counts[~free] - 1                              # pressure on the resident
        take = slots[free]
        self.tags[take] = ids[free]
        self.rows.index_copy_(0, take, rows[free])
        self.counts[take] = 1

    def invalidate(self, ids: torch.Tensor) -> None:
        """Forget rows whose stored value changed (an update was pushed for them)."""
        ids = ids.to(self.tags.device)
        slots = self._slot(ids)
        stale = slots[self.tags[slots] == ids]
        self.tags[stale] = -1
        self.counts[stale] = 0

    def clear(self) -> None:
        self.tags.fill_(-1)
        self.counts.zero_()
        self.lookups = self.hits = 0
