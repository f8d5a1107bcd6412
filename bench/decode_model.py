"""The decode benchmark's model: a GPT with Engram blocks in several layers, serving a stream of
requests with continuous batching (sequences of different lengths join and leave between steps).

    idx (B, T) -> [entry: every Engram block's lookup sent] -> wte + wpe -> [Block] x n_layer
               -> LayerNorm -> lm_head (tied) -> logits
    Block(x):  x = x + engram(x, idx, state)   in the Engram layers (memory read before attention)
               x = x + attn(ln_1(x), cache)
               x = x + mlp(ln_2(x))

The KV cache of a batch is left-padded: sequence b's keys are the last `lengths[b]` columns, so
every decode step appends one column for all sequences, and re-batching only pads or trims on
the left. Like the paper's Table 4 setup (nano-vLLM), the batch is refilled from the request
queue as sequences finish.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from engram_client.block import EngramBlock, EngramState
from engram_client.decode import EntryPrefetch, cat_states, select_states


@dataclass
class DecoderConfig:
    vocab_size: int = 4096
    block_size: int = 2048  # longest sequence: prompt + generated tokens
    n_layer: int = 6
    n_head: int = 4
    n_embd: int = 256  # C
    engram_layers: tuple[int, ...] = (1, 4)  # 0-based block indices holding an EngramBlock


@dataclass
class Batch:
    """The decoding state of the sequences generating together (row b = sequence b).

    KV buffers are preallocated and left-padded: columns [0, filled) are written, and sequence b
    owns the last lengths[b] of them, so a decode step writes one column for every sequence.
    """

    k: list[torch.Tensor]  # per layer (B, nh, capacity, hs)
    v: list[torch.Tensor]
    filled: int  # columns written (= the longest sequence's length)
    lengths: torch.Tensor  # (B,) positions each sequence has consumed
    engram: list[EngramState]  # one per Engram block

    def reserve(self, extra: int) -> None:
        """Room for `extra` more columns (capacity doubles, so appends are amortised O(1))."""
        capacity = self.k[0].shape[2]
        if self.filled + extra <= capacity:
            return
        grown = max(2 * capacity, self.filled + extra, 64)
        self.k = [_regrow(t, self.filled, grown) for t in self.k]
        self.v = [_regrow(t, self.filled, grown) for t in self.v]

    def select(self, index: list[int]) -> Batch:
        """The sequences at `index`; columns no remaining sequence uses are dropped."""
        ix = torch.tensor(index, dtype=torch.int64)
        lengths = self.lengths[ix]
        keep = int(lengths.max())
        part = lambda t: t.index_select(0, ix)[:, :, self.filled - keep:self.filled]
        return Batch([part(k) for k in self.k], [part(v) for v in self.v], keep, lengths,
                     select_states(self.engram, ix))

    @staticmethod
    def cat(batches: list[Batch]) -> Batch:
        S = max(b.filled for b in batches)
        pad = lambda t, filled: F.pad(t[:, :, :filled], (0, 0, S - filled, 0))  # zeros left of time
        layers = range(len(batches[0].k))
        return Batch([torch.cat([pad(b.k[i], b.filled) for b in batches]) for i in layers],
                     [torch.cat([pad(b.v[i], b.filled) for b in batches]) for i in layers],
                     S, torch.cat([b.lengths for b in batches]), cat_states([b.engram for b in batches]))


def _regrow(buffer: torch.Tensor, filled: int, capacity: int) -> torch.Tensor:
    B, nh, _, hs = buffer.shape
    grown = buffer.new_zeros(B, nh, capacity, hs)
    grown[:, :, :filled] = buffer[:, :, :filled]
    return grown


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, filled: int,
                lengths: torch.Tensor) -> torch.Tensor:
        """x (B, T, C); the new keys and values are written to columns [filled, filled + T)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        k_buf[:, :, filled:filled + T] = k
        v_buf[:, :, filled:filled + T] = v
        S = filled + T
        col = torch.arange(S)                                                 # (S,)
        first = (filled - lengths).view(B, 1, 1)                              # sequence b's first column
        last = (filled + torch.arange(T)).view(1, T, 1)                       # query i sees up to filled + i
        mask = ((col >= first) & (col <= last)).unsqueeze(1)                  # (B, 1, T, S)
        y = F.scaled_dot_product_attention(q, k_buf[:, :, :S], v_buf[:, :, :S], attn_mask=mask)  # (B, nh, T, hs)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, config: DecoderConfig, engram: EngramBlock | None) -> None:
        super().__init__()
        self.engram = engram
        self.ln_1, self.ln_2 = nn.LayerNorm(config.n_embd), nn.LayerNorm(config.n_embd)
        self.attn = Attention(config)
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_out = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)


class DecoderGPT(nn.Module):
    """`engram_factory(layer_id, hidden_size) -> EngramBlock` builds each Engram layer's block."""

    def __init__(self, config: DecoderConfig, engram_factory, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(
            Block(config, engram_factory(i, config.n_embd) if i in config.engram_layers else None)
            for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.entry = EntryPrefetch(self)
        self._init_weights(torch.Generator().manual_seed(seed))

    def _init_weights(self, generator: torch.Generator) -> None:
        """Every weight from `seed` alone, whatever the table sources drew from the global RNG,
        so models with local and with remote tables share their dense weights."""
        for name, p in self.named_parameters():
            if ".tables." in name:
                continue
            if p.dim() >= 2:
                torch.nn.init.normal_(p, 0.0, 0.02, generator=generator)
            elif name.endswith("bias"):
                torch.nn.init.zeros_(p)

    def new_batch(self, batch_size: int) -> Batch:
        hs = self.config.n_embd // self.config.n_head
        empty = lambda: torch.zeros(batch_size, self.config.n_head, 0, hs)
        return Batch([empty() for _ in self.blocks], [empty() for _ in self.blocks], 0,
                     torch.zeros(batch_size, dtype=torch.int64), self.entry.init_states(batch_size))

    @torch.no_grad()
    def forward(self, idx: torch.Tensor, batch: Batch, *, prefetch: bool = True,
                last_only: bool = False) -> torch.Tensor:
        """idx (B, T) continues the sequences of `batch` (advanced in place) -> logits (B, T or 1, V)."""
        B, T = idx.shape
        if int(batch.lengths.max()) + T > self.config.block_size:
            raise ValueError(f"a sequence would exceed block_size {self.config.block_size}")
        if prefetch:
            self.entry.start(idx, batch.engram)  # every layer's rows travel while the layers below compute
        batch.reserve(T)
        pos = batch.lengths.view(B, 1) + torch.arange(T)                       # (B, T)
        x = self.wte(idx) + self.wpe(pos)                                      # (B, T, C)
        states = iter(batch.engram)
        for i, block in enumerate(self.blocks):
            if block.engram is not None:
                x = x + block.engram(x, idx, state=next(states))
            x = x + block.attn(block.ln_1(x), batch.k[i], batch.v[i], batch.filled, batch.lengths)
            x = x + block.c_out(F.gelu(block.c_fc(block.ln_2(x))))
        batch.lengths = batch.lengths + T
        batch.filled += T
        x = self.ln_f(x[:, -1:] if last_only else x)
        return x @ self.wte.weight.T                                           # (B, T, V), tied head


@dataclass
class Request:
    prompt: torch.Tensor  # (T0,) token ids
    max_new_tokens: int
    forced: torch.Tensor | None = None  # fed as the generated tokens (teacher forcing: real text's ids)


@dataclass
class Generation:
    tokens: list[list[int]]  # per request, the generated tokens
    logits: list[list[torch.Tensor]] | None  # per request, the (V,) logits each token was chosen from
    seconds: float = 0.0  # the whole run: prefills and decode steps
    decode_seconds: float = 0.0  # in decode steps only
    steps: int = 0  # decode steps (prefills not counted)
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def generated(self) -> int:
        return sum(map(len, self.tokens))


def serve(model: DecoderGPT, requests: list[Request], batch_size: int, *, prefetch: bool = True,
          keep_logits: bool = False) -> Generation:
    """Greedy (or teacher-forced) generation with continuous batching: up to `batch_size`
    sequences decode together; a finished one leaves and the next request is prefilled and joins."""
    if any(r.max_new_tokens < 1 for r in requests):
        raise ValueError("every request generates at least one token (its prefill's)")
    out = Generation([[] for _ in requests], [[] for _ in requests] if keep_logits else None)
    queue, running, batch = deque(range(len(requests))), [], None
    started = time.perf_counter()

    def choose(i: int, logits: torch.Tensor) -> None:  # logits (V,)
        forced = requests[i].forced
        out.tokens[i].append(int(forced[len(out.tokens[i])]) if forced is not None else int(logits.argmax()))
        if keep_logits:
            out.logits[i].append(logits.clone())

    def leave(running: list[int], batch: Batch | None) -> tuple[list[int], Batch | None]:
        keep = [j for j, i in enumerate(running) if len(out.tokens[i]) < requests[i].max_new_tokens]
        if len(keep) == len(running):
            return running, batch
        return [running[j] for j in keep], batch.select(keep) if keep else None

    while queue or running:
        running, batch = leave(running, batch)
        joining = []
        while queue and len(running) + len(joining) < batch_size:  # prefill each newcomer alone
            i = queue.popleft()
            one = model.new_batch(1)
            choose(i, model(requests[i].prompt.view(1, -1), one, prefetch=prefetch, last_only=True)[0, -1])
            joining.append((i, one))
        if joining:
            running += [i for i, _ in joining]
            batch = Batch.cat(([batch] if batch is not None else []) + [one for _, one in joining])
        running, batch = leave(running, batch)
        if not running:
            continue
        step_started = time.perf_counter()
        last = torch.tensor([[out.tokens[i][-1]] for i in running])           # (B, 1)
        logits = model(last, batch, prefetch=prefetch, last_only=True)[:, -1]  # (B, V)
        for j, i in enumerate(running):
            choose(i, logits[j])
        out.decode_seconds += time.perf_counter() - step_started
        out.steps += 1
        out.batch_sizes.append(len(running))
    out.seconds = time.perf_counter() - started
    return out
