"""Decoding with Engram tables off the device: every layer's lookups start at model entry.

The row ids of a position depend only on its token and the N-1 tokens before it, so they are
known as soon as the token is: before the embedding, long before the forward reaches an Engram
layer. `EntryPrefetch` sends every Engram block's lookup at the start of each forward (prefill
or decode step); each block then waits only for what has not arrived by the time the layers
below it are done. This is how the paper keeps a host-DRAM table within 2-3 % of local tables at
inference (its Table 4).

    model.entry = EntryPrefetch(model)              # finds the model's EngramBlocks, in order
    states = model.entry.init_states(batch_size)    # one EngramState per block (per-sequence rows)
    logits = model(prompt, engram_states=states)    # its forward calls model.entry.start(ids, states)
                                                    # first, then each block(x, ids, state=its state)

Sequences join and leave between steps (continuous batching) by re-batching the states:
`select_states(states, keep)` and `cat_states([running, joined])`. Any table source works: local
tables have nothing to fetch (their lookahead only saves the second hash); memstore tables over
gRPC (sharded, with a row cache) send the request, which travels while the layers below run;
host tables and same-host memstore tables gather a decode step's few hundred rows right away in
`start` (microseconds: a hand-off to a thread would cost more), large batches in the background.
Forwarding tokens other than the prefetched ones is safe: the block then looks them up itself.
"""
from __future__ import annotations

import torch
from torch import nn

from engram_client.block import EngramBlock, EngramState
from engram_client.remote import RemoteTables


class EntryPrefetch:
    """The Engram blocks of one model, for starting their lookups at model entry.

    Args:
        model: any module containing EngramBlocks (found in `model.modules()` order, i.e. layer
            order for a usual decoder), or a list of the blocks themselves.
    """

    def __init__(self, model: nn.Module | list[EngramBlock]) -> None:
        modules = model.modules() if isinstance(model, nn.Module) else model
        self.blocks: list[EngramBlock] = [m for m in modules if isinstance(m, EngramBlock)]

    def init_states(self, batch_size: int, device: torch.device | str | None = None,
                    dtype: torch.dtype | None = None) -> list[EngramState]:
        """Fresh states, one per block, for `batch_size` sequences that have not started."""
        return [block.init_state(batch_size, device, dtype) for block in self.blocks]

    def start(self, input_ids: torch.Tensor, states: list[EngramState]) -> None:
        """Send the lookups of `input_ids` (B, T), the next positions of `states`, for every block
        (nearest the input first: it has the least time to wait)."""
        if len(states) != len(self.blocks):
            raise ValueError(f"{len(states)} states for {len(self.blocks)} Engram blocks")
        for i, state in enumerate(states):  # all checked before anything is sent
            if not isinstance(state, EngramState) or state.batch_size != input_ids.shape[0]:
                raise ValueError(f"states[{i}] must be an EngramState of batch size {input_ids.shape[0]} "
                                 f"(input_ids {tuple(input_ids.shape)}), got {_describe(state)}")
        with torch.no_grad():
            for block, state in zip(self.blocks, states):
                block.prefetch(input_ids, state)

    @property
    def wait_s(self) -> float:
        """Seconds the forwards so far spent blocked on rows, summed over the remote blocks."""
        return sum(b.tables.stats.wait_s for b in self.blocks if isinstance(b.tables, RemoteTables))


def select_states(states: list[EngramState], index: torch.Tensor | list[int]) -> list[EngramState]:
    """Every block's state for the sequences at `index` (those that stay in the batch)."""
    return [state.select(index) for state in states]


def cat_states(groups: list[list[EngramState]]) -> list[EngramState]:
    """One list of per-block states from several groups of sequences (e.g. running + joining);
    every group holds one state per block, in the same block order."""
    if len({len(group) for group in groups}) > 1:
        raise ValueError(f"every group needs one state per Engram block, got {[len(g) for g in groups]}")
    for per_block in zip(*groups):
        if len({tuple(s.conv.shape[1:]) for s in per_block}) > 1:
            raise ValueError("groups list their blocks' states in different orders (ShortConv shapes differ)")
    return [EngramState.cat(list(per_block)) for per_block in zip(*groups)]


def _describe(state: object) -> str:
    return f"batch size {state.batch_size}" if isinstance(state, EngramState) else type(state).__name__
