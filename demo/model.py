"""A small GPT (nanoGPT-style), optionally with an EngramBlock in one layer.

    idx (B, T) -> wte + wpe -> [Block] x n_layer -> LayerNorm -> lm_head (tied to wte) -> logits (B, T, V)

    Block(x):  x = x + engram(x, idx)      only in the Engram layer (the reference's order: the
               x = x + attn(ln_1(x))       memory is read before attention, the block output is
               x = x + mlp(ln_2(x))        a residual added to the hidden states)

The baseline and the Engram model are the same class; `engram` says which layer gets the block.
Layer indices count from 0 like the reference's `layer_ids` (its default [1, 15] is the paper's
"layers 2 and 15" counting from 1), so the demo's default `engram_layer = 1` is "layer 2".

Decoding keeps a KV cache per attention layer and the EngramBlock's own `EngramState` (last N-1
tokens for the hash, the ShortConv's left context), so each new token costs one position. The
Engram rows of the new tokens are requested at model entry (`engram_client.decode.EntryPrefetch`),
so their lookup overlaps the layers below the Engram layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engram_client.block import EngramBlock, EngramState
from engram_client.decode import EntryPrefetch


@dataclass
class GPTConfig:
    vocab_size: int = 4096  # BPE vocabulary (token ids in [0, vocab_size))
    block_size: int = 128  # T: longest context the position embedding covers
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256  # C: hidden size; head size is n_embd // n_head
    dropout: float = 0.0  # small models on little data overfit late; the demo trains < 1 epoch
    engram_layer: int | None = None  # 0-based index of the block holding an EngramBlock; None = baseline


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)  # q, k, v fused
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            k, v, mask = cache.append(k, v)  # (B, nh, S, hs) with S = cached + T; mask (T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, engram: EngramBlock | None = None) -> None:
        super().__init__()
        self.engram = engram
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, idx: torch.Tensor, kv: KVCache | None = None,
                engram_state: EngramState | None = None) -> torch.Tensor:
        """x (B, T, C), idx (B, T) -> (B, T, C); `kv`/`engram_state` only when decoding."""
        if self.engram is not None:
            x = x + self.engram(x, idx, state=engram_state)  # memory read first, as in the reference
        x = x + self.attn(self.ln_1(x), kv)
        return x + self.mlp(self.ln_2(x))


@dataclass
class KVCache:
    """Keys and values of the positions seen so far, for one attention layer."""

    k: torch.Tensor | None = None  # (B, nh, S, hs)
    v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        past = 0 if self.k is None else self.k.shape[2]
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        T, S = k.shape[2], self.k.shape[2]
        # new query i (absolute position past + i) sees keys 0..past + i
        mask = torch.ones(T, S, dtype=torch.bool, device=k.device).tril(diagonal=past)  # (T, S)
        return self.k, self.v, mask


@dataclass
class DecodeState:
    """Everything incremental decoding carries from one forward call to the next."""

    kv: list[KVCache]  # one per block
    engram: list[EngramState]  # one per Engram block, in layer order
    pos: int = 0  # positions consumed so far


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, engram_factory: Callable[[int, int], EngramBlock] | None = None,
                 seed: int = 0) -> None:
        """`engram_factory(layer_id, hidden_size) -> EngramBlock` builds the Engram layer's block
        (it decides where the tables live); required when config.engram_layer is set. The backbone
        is initialised from `seed` alone, so a baseline and an Engram model built with the same
        seed start from identical backbone weights."""
        super().__init__()
        self.config = config
        if config.engram_layer is not None:
            if engram_factory is None:
                raise ValueError("engram_layer is set but no engram_factory was given")
            if not 0 <= config.engram_layer < config.n_layer:
                raise ValueError(f"engram_layer {config.engram_layer} is outside [0, {config.n_layer})")
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(
            Block(config, engram_factory(i, config.n_embd) if i == config.engram_layer else None)
            for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying
        self.entry = EntryPrefetch(self.engram_blocks)  # starts the Engram lookups when decoding
        self._init_backbone(torch.Generator().manual_seed(seed))

    def _init_backbone(self, generator: torch.Generator) -> None:
        """GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer). The Engram
        block keeps its own init and is skipped, so it does not shift the backbone's random draws."""
        for name, p in self.named_parameters():
            if ".engram." in name or p.dim() < 2 or name == "lm_head.weight":
                continue  # norms start at 1/0; lm_head is tied to wte
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if name.endswith("c_proj.weight") else 0.02
            nn.init.normal_(p, mean=0.0, std=std, generator=generator)

    @property
    def engram_blocks(self) -> list[EngramBlock]:
        return [b.engram for b in self.blocks if b.engram is not None]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                state: DecodeState | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx (B, T) -> logits (B, T, V), and the mean cross-entropy when targets (B, T) are given.
        With `state`, idx continues the sequences held in it (incremental decoding)."""
        T = idx.shape[1]
        start = 0 if state is None else state.pos
        if start + T > self.config.block_size:
            raise ValueError(f"sequence length {start + T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)  # (T,)
        if state is not None:
            self.entry.start(idx, state.engram)  # rows travel while the layers below compute
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        engram_states = iter(state.engram if state is not None else ())
        for layer, block in enumerate(self.blocks):
            if state is None:
                x = block(x, idx)
            else:
                engram_state = next(engram_states) if block.engram is not None else None
                x = block(x, idx, state.kv[layer], engram_state)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        if state is not None:
            state.pos += T
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        return logits, loss

    # ---- decoding ------------------------------------------------------------------------------
    def init_state(self, batch_size: int) -> DecodeState:
        return DecodeState(kv=[KVCache() for _ in self.blocks], engram=self.entry.init_states(batch_size))

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.8,
                 top_k: int | None = 50, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample continuations of prompt (B, T0) -> (B, T0 + max_new_tokens), one position per step
        after the prompt's single prefill pass."""
        max_new_tokens = min(max_new_tokens, self.config.block_size - prompt.shape[1])
        state = self.init_state(prompt.shape[0])
        logits, _ = self(prompt, state=state)  # prefill: (B, T0, V)
        out = [prompt]
        for _ in range(max_new_tokens):
            next_logits = logits[:, -1, :] / temperature  # (B, V)
            if top_k is not None:
                kth = torch.topk(next_logits, min(top_k, next_logits.size(-1))).values[:, -1:]  # (B, 1)
                next_logits = next_logits.masked_fill(next_logits < kth, float("-inf"))
            probs = F.softmax(next_logits, dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            out.append(token)
            logits, _ = self(token, state=state)  # one new position: (B, 1, V)
        return torch.cat(out, dim=1)

    # ---- accounting ----------------------------------------------------------------------------
    def param_counts(self) -> dict[str, int]:
        """dense: every nn.Parameter (the backbone and the Engram projections, wte counted once);
        table: Engram table rows x width, wherever they live (local or on memstore)."""
        dense = sum(p.numel() for n, p in self.named_parameters() if ".tables." not in n)
        table = sum(b.tables.num_rows * b.tables.dim for b in self.engram_blocks)
        return {"dense": dense, "table": table, "total": dense + table}

    def flops_per_token(self, seq_len: int | None = None) -> dict[str, float]:
        """Matmul FLOPs per token, counted from the modules (see docs/demo.md for the convention).

        forward = 2 x (weights of every Linear, lm_head included) + 2 x (depthwise conv weights)
                  + 4 x n_layer x T x C for attention (QK^T and AV, the PaLM convention with the
                  full T; the causal mask makes the true average T/2).
        train   = 3 x forward (backward costs twice the forward).
        Embedding and Engram table lookups, norms, gates and activations are not matmuls: 0.
        """
        T = self.config.block_size if seq_len is None else seq_len
        linear = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        conv = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Conv1d))
        attention = 4 * self.config.n_layer * T * self.config.n_embd
        forward = 2 * linear + 2 * conv + attention
        return {"forward": float(forward), "train": 3.0 * forward}
