"""EngramBlock: gated n-gram memory lookup + causal short convolution (DeepSeek Engram).

Data flow for one layer (G = hc_mult branches, C = hidden_size, H = (N-1)*K heads, D = head dim,
E = (N-1) * n_embed_per_ngram = H * D):

    input_ids (B, T) --hash+offsets--> row_ids (B, T, H) --tables--> rows (B, T, H, D) --flatten--> e (B, T, E)
    key   = RMSNorm_g(key_proj_g(e))                      (B, T, G, C)
    query = RMSNorm_g(hidden_states)                      (B, T, G, C)
    gate  = sigmoid(signed_sqrt(<key, query> / sqrt(C)))  (B, T, G, 1)
    value = gate * value_proj(e)                          (B, T, G, C)   (value_proj shared by branches)
    out   = value + ShortConv(value)                      (B, T, G, C)   the caller adds the residual

The block returns `out` only; like the reference, the transformer layer does
`hidden_states = engram(hidden_states, input_ids) + hidden_states`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engram_client.config import EngramConfig
from engram_client.hashing import NgramHasher
from engram_client.tables import LocalTables, TableSource


@dataclass(eq=False)
class Lookahead:
    """Rows requested for the next positions of a state, before the forward reaches the block."""

    block: EngramBlock  # the block that requested them: only its forward may use them
    input_ids: torch.Tensor  # (B, T) the very tensor the rows were requested for
    version: int | None  # input_ids._version then (an in-place change since means other tokens);
    # None for inference tensors (torch.inference_mode), which keep no version: compared by value
    row_ids: torch.Tensor  # (B, T, H) their hashed rows (from the state's history at request time)
    handle: object | None  # the table source's `prefetch` handle; None for local rows

    def matches(self, block: EngramBlock, input_ids: torch.Tensor) -> bool:
        """For this block and these tokens? The same unchanged tensor needs no comparison (no
        device sync on a GPU); another tensor is compared by value."""
        if block is not self.block:
            return False
        if self.version is not None:
            if self.input_ids._version != self.version:
                return False  # its tokens were changed in place since
            if input_ids is self.input_ids:
                return True
        return input_ids.shape == self.input_ids.shape and torch.equal(
            input_ids, self.input_ids.to(input_ids.device))

    def __deepcopy__(self, memo) -> None:
        return None  # a copied state (e.g. a beam) starts without the in-flight request


@dataclass
class EngramState:
    """Decoding state of one EngramBlock for a batch of sequences (see `EngramBlock.init_state`).

    Holds exactly what the next token's output depends on besides its own inputs, so feeding a
    sequence in chunks (or token by token) gives the same outputs as one full forward. Row b is
    sequence b: `select` and `cat` re-batch sequences that leave or join (continuous batching).

    Invariants of `lookahead` (each tested in tests/test_decode.py):
    1. it was requested from this very history (`tokens`): only `forward` advances the history and
       it always consumes or discards the lookahead, and re-batching (`select`, `cat`) and copying
       drop it, so it is never used for a history it was not hashed from;
    2. only the block that requested it uses it (`Lookahead.block`), whatever order a model
       hands its blocks their states in;
    3. it is used for the very tokens it was requested for, else discarded.
    The table source guards what the rows reflect (`RemoteTables`: a handle from before a
    restore is never used).
    """

    tokens: torch.Tensor  # (B, N-1) raw ids of the last N-1 tokens; pad_id before the start
    conv: torch.Tensor  # (B, G*C, (kernel_size-1)*dilation) last normalised ShortConv inputs
    lookahead: Lookahead | None = None  # set by `EngramBlock.prefetch`, used by the next forward

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def select(self, index: torch.Tensor | list[int]) -> EngramState:
        """The state of the sequences at `index` (positions, in that order, or a bool mask of
        length B); an unused lookahead is dropped."""
        index = torch.as_tensor(index, device=self.tokens.device)
        if index.dtype == torch.bool:
            if index.shape != (self.batch_size,):
                raise ValueError(f"a bool mask must have shape ({self.batch_size},), got {tuple(index.shape)}")
            index = index.nonzero().squeeze(1)
        elif index.is_floating_point() or index.is_complex():
            raise TypeError(f"select takes positions or a bool mask, got {index.dtype}")
        index = index.to(torch.int64).reshape(-1)
        return EngramState(self.tokens.index_select(0, index), self.conv.index_select(0, index.to(self.conv.device)))

    @staticmethod
    def cat(states: list[EngramState]) -> EngramState:
        """One state for the sequences of `states`, in order; unused lookaheads are dropped."""
        return EngramState(torch.cat([s.tokens for s in states]), torch.cat([s.conv for s in states]))


class GroupRMSNorm(nn.Module):
    """One RMSNorm per hyper-connection branch, applied to x (..., G, C) in a single op.

    eps=None uses torch.finfo(dtype).eps, like nn.RMSNorm's default.
    """

    def __init__(self, groups: int, dim: int, eps: float | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(groups, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), eps=self.eps) * self.weight


class ShortConv(nn.Module):
    """Per-branch RMSNorm, then a causal depthwise dilated Conv1d over time, then SiLU.

    Causality comes from left context instead of padding: `cache` holds the previous
    (kernel_size-1)*dilation normalised inputs (zeros at the start of a sequence).
    """

    def __init__(self, hidden_size: int, kernel_size: int, dilation: int, hc_mult: int,
                 norm_eps: float = 1e-5, zero_init: bool = False) -> None:
        super().__init__()
        channels = hidden_size * hc_mult
        self.context_len = (kernel_size - 1) * dilation
        self.norm = GroupRMSNorm(hc_mult, hidden_size, eps=norm_eps)
        self.conv = nn.Conv1d(channels, channels, kernel_size, dilation=dilation, groups=channels, bias=False)
        if zero_init:
            nn.init.zeros_(self.conv.weight)  # the block then starts as "value" alone, as in the paper

    def forward(self, x: torch.Tensor, cache: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, G, C) -> (y (B, T, G, C), new cache (B, G*C, context_len))."""
        B, T, G, C = x.shape
        x_norm = self.norm(x).reshape(B, T, G * C).transpose(1, 2)  # (B, G*C, T)
        if cache is None:
            cache = x_norm.new_zeros(B, G * C, self.context_len)
        x_ctx = torch.cat([cache.to(x_norm.dtype), x_norm], dim=-1)  # (B, G*C, context + T)
        y = F.silu(self.conv(x_ctx))  # (B, G*C, T): a valid conv drops exactly the context
        new_cache = x_ctx[..., x_ctx.shape[-1] - self.context_len :]
        return y.transpose(1, 2).reshape(B, T, G, C), new_cache


class EngramBlock(nn.Module):
    """The Engram module of one transformer layer.

    Args:
        config: the shared EngramConfig.
        layer_id: this layer's index (must be in config.layer_ids; selects the hash multipliers).
        hidden_size: C, the backbone's hidden size.
        hc_mult: G, hyper-connection branches; 1 = a plain transformer ([B, T, C] hidden states).
        tables: a TableSource with `hasher.total_rows(layer_id)` rows of width config.head_dim;
            None builds LocalTables.
        hasher: a shared NgramHasher (built from vocab_size/token_map when None).
        vocab_size, token_map: the token space, when no hasher is given (see NgramHasher).
        zero_init_conv: start the ShortConv at zero (the paper's choice); default init otherwise.
        sparse_grads: for the default LocalTables, emit sparse row gradients.
        row_dropout: in training, each looked-up row (one position, one head) is zeroed with this
            probability and the rest scaled by 1 / (1 - p); a dropped row gets no gradient from
            that position. Keeps the tables from memorising n-grams seen over several epochs.
    """

    def __init__(
        self,
        config: EngramConfig,
        layer_id: int,
        hidden_size: int,
        hc_mult: int = 1,
        tables: TableSource | None = None,
        *,
        hasher: NgramHasher | None = None,
        vocab_size: int | None = None,
        token_map: np.ndarray | None = None,
        zero_init_conv: bool = False,
        sparse_grads: bool = False,
        row_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if not 0.0 <= row_dropout < 1.0:
            raise ValueError(f"row_dropout must be in [0, 1), got {row_dropout}")
        self.row_dropout = row_dropout
        if hasher is None:
            hasher = NgramHasher(config, vocab_size=vocab_size, token_map=token_map)
        elif hasher.config != config:
            raise ValueError("hasher was built for a different EngramConfig")
        if layer_id not in config.layer_ids:
            raise ValueError(f"layer {layer_id} is not an Engram layer (layer_ids={config.layer_ids})")
        self.config, self.layer_id, self.hasher = config, layer_id, hasher
        self.hidden_size, self.hc_mult = hidden_size, hc_mult

        num_rows, dim = hasher.total_rows(layer_id), config.head_dim
        if tables is None:
            tables = LocalTables(num_rows, dim, sparse=sparse_grads)
        if (tables.num_rows, tables.dim) != (num_rows, dim):
            raise ValueError(f"tables are {tables.num_rows} x {tables.dim}, layer {layer_id} needs {num_rows} x {dim}")
        self.tables = tables

        engram_dim = config.engram_dim
        self.key_proj = nn.Linear(engram_dim, hc_mult * hidden_size)  # the G per-branch key projections, fused
        self.key_norm = GroupRMSNorm(hc_mult, hidden_size)
        self.query_norm = GroupRMSNorm(hc_mult, hidden_size)
        self.value_proj = nn.Linear(engram_dim, hidden_size)
        self.short_conv = ShortConv(hidden_size, config.kernel_size, dilation=config.max_ngram_size,
                                    hc_mult=hc_mult, zero_init=zero_init_conv)

    # ---- hashing --------------------------------------------------------------------------
    def row_ids(self, input_ids: torch.Tensor, state: EngramState | None = None) -> torch.Tensor:
        """Rows of this layer's table for input_ids (B, T) -> (B, T, H), on input_ids' device.

        With `state`, the tokens before input_ids come from the state instead of padding.
        """
        history = None if state is None else state.tokens
        return self.hasher.row_ids(input_ids, self.layer_id, history=history)

    # ---- decoding state -------------------------------------------------------------------
    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> EngramState:
        """A fresh state for `batch_size` sequences that have not started yet."""
        weight = self.value_proj.weight
        device = weight.device if device is None else device
        tokens = torch.full((batch_size, self.config.max_ngram_size - 1), self.config.pad_id,
                            dtype=torch.int64, device=device)
        conv = torch.zeros(batch_size, self.hc_mult * self.hidden_size, self.short_conv.context_len,
                           dtype=dtype or weight.dtype, device=device)
        return EngramState(tokens=tokens, conv=conv)

    # ---- entry prefetch (decoding) ---------------------------------------------------------
    def prefetch(self, input_ids: torch.Tensor, state: EngramState) -> None:
        """Start the lookup of the rows of `input_ids` (B, T), the next positions of `state`.

        Call it as soon as the tokens are known (at model entry, before the layers below this
        block run); the next `forward(..., input_ids, state=state)` waits only for rows that have
        not arrived. Forwarding other tokens instead is safe: the lookahead is then discarded.
        """
        if not isinstance(state, EngramState):
            raise TypeError(f"prefetch needs this block's EngramState, got {type(state).__name__}")
        row_ids = self.row_ids(input_ids, state)  # (B, T, H)
        version = None if input_ids.is_inference() else input_ids._version
        state.lookahead = Lookahead(self, input_ids, version, row_ids, self.tables.prefetch(row_ids))

    def _take_lookahead(self, input_ids: torch.Tensor, state: EngramState | None) -> Lookahead | None:
        lookahead = None if state is None else state.lookahead
        if lookahead is None:
            return None
        state.lookahead = None  # used at most once, and never after the history moved on
        return lookahead if lookahead.matches(self, input_ids) else None

    # ---- forward --------------------------------------------------------------------------
    def forward(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.Tensor,
        row_ids: torch.Tensor | None = None,
        state: EngramState | None = None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Engram output for hidden_states (B, T, G, C) or (B, T, C) when hc_mult == 1.

        Args:
            input_ids: (B, T) raw token ids of these positions.
            row_ids: (B, T, H) precomputed `row_ids(input_ids, state)` (e.g. by a prefetcher);
                hashing is skipped when given.
            state: decoding state from `init_state`; the positions continue that sequence and the
                state is advanced in place (its tensors are replaced, detached). Rows that
                `prefetch(input_ids, state)` requested are used instead of a new lookup.
            padding_mask: (B, T), 0 at padding positions (e.g. the left padding of a batch of
                prompts): their value is zeroed before the ShortConv, so they add nothing to later
                positions, exactly like the zero context before a sequence starts. Hash padding
                positions as `config.pad_id` (the caller's job: it also hashes for prefetch).
        Returns the Engram contribution, same shape as hidden_states (add it as a residual).
        """
        squeeze_branch = hidden_states.dim() == 3
        if squeeze_branch:
            if self.hc_mult != 1:
                raise ValueError(f"hidden_states (B, T, C) needs hc_mult == 1, block has {self.hc_mult}")
            hidden_states = hidden_states.unsqueeze(2)  # (B, T, 1, C)
        B, T, G, C = hidden_states.shape
        if (G, C) != (self.hc_mult, self.hidden_size) or tuple(input_ids.shape) != (B, T):
            raise ValueError(f"expected hidden (B, T, {self.hc_mult}, {self.hidden_size}) and ids (B, T), "
                             f"got {tuple(hidden_states.shape)} and {tuple(input_ids.shape)}")
        lookahead = self._take_lookahead(input_ids, state)
        prefetched = None
        if row_ids is None and lookahead is not None:
            row_ids, prefetched = lookahead.row_ids, lookahead.handle
        elif row_ids is None:
            row_ids = self.row_ids(input_ids, state)

        # sources written to the plain `forward(row_ids)` contract only ever see that call
        rows = self.tables(row_ids) if prefetched is None else self.tables(row_ids, prefetched=prefetched)  # (B, T, H, D)
        if self.training and self.row_dropout > 0:
            keep = torch.rand(rows.shape[:-1] + (1,), device=rows.device) >= self.row_dropout  # (B, T, H, 1)
            rows = rows * keep.to(rows.dtype) / (1 - self.row_dropout)
        e = rows.flatten(-2).to(device=hidden_states.device, dtype=self.value_proj.weight.dtype)  # (B, T, E)
        key = self.key_norm(self.key_proj(e).view(B, T, G, C))  # (B, T, G, C)
        query = self.query_norm(hidden_states)  # (B, T, G, C)
        score = (key * query).sum(dim=-1) / math.sqrt(C)  # (B, T, G)
        # signed sqrt keeps the sign but compresses large scores before the sigmoid
        gate = torch.sigmoid(score.abs().clamp_min(1e-6).sqrt() * score.sign()).unsqueeze(-1)  # (B, T, G, 1)
        value = gate * self.value_proj(e).unsqueeze(2)  # (B, T, G, C)
        if padding_mask is not None:
            value = value * padding_mask.to(value.device, value.dtype).view(B, T, 1, 1)
        conv_out, conv_cache = self.short_conv(value, None if state is None else state.conv)
        out = value + conv_out  # (B, T, G, C)

        if state is not None:
            history = torch.cat([state.tokens, input_ids.to(state.tokens.device, torch.int64)], dim=1)
            state.tokens = history[:, history.shape[1] - state.tokens.shape[1] :]
            state.conv = conv_cache.detach()
        return out.squeeze(2) if squeeze_branch else out

    def extra_repr(self) -> str:
        return (f"layer_id={self.layer_id}, hidden_size={self.hidden_size}, hc_mult={self.hc_mult}, "
                f"row_dropout={self.row_dropout}")
