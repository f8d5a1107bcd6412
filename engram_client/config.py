"""Configuration of the Engram n-gram memory (field names follow DeepSeek's reference demo)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EngramConfig:
    """Hyper-parameters shared by the hasher, the tables and every `EngramBlock`.

    The first eight fields (names and defaults) are those of DeepSeek's `engram_demo_v1.py`, so a
    config written for the reference means the same thing here.
    """

    # Target table size per n-gram order (2-gram, 3-gram, ...). Each head's table holds the
    # smallest unused prime above this number, so the actual sizes are a little larger.
    engram_vocab_size: list[int] = field(default_factory=lambda: [129280 * 5, 129280 * 5])
    # N: n-grams of order 2..N are hashed; len(engram_vocab_size) == N - 1.
    max_ngram_size: int = 3
    # Width of one n-gram order's embedding, split evenly across its heads.
    n_embed_per_ngram: int = 512
    # K: hash heads per order. Every head has its own prime modulus (= its own table).
    n_head_per_ngram: int = 8
    # Transformer layers that hold an Engram block; each layer has its own hash multipliers.
    layer_ids: list[int] = field(default_factory=lambda: [1, 15])
    # Token id used to left-pad positions before the start of the sequence (raw id: with a
    # token map it is compressed like any other token).
    pad_id: int = 2
    # Seed of the per-layer hash multipliers.
    seed: int = 0
    # Kernel size of the causal depthwise ShortConv (its dilation is max_ngram_size).
    kernel_size: int = 4
    # Not in the reference: a raw token id (e.g. BOS/EOS) at which the n-gram window restarts,
    # for packed sequences. None (default) = never reset, exactly like the reference.
    doc_sep_id: int | None = None

    def __post_init__(self) -> None:
        self.engram_vocab_size = [int(v) for v in self.engram_vocab_size]
        self.layer_ids = [int(i) for i in self.layer_ids]
        if self.max_ngram_size < 2:
            raise ValueError(f"max_ngram_size must be >= 2, got {self.max_ngram_size}")
        if len(self.engram_vocab_size) != self.max_ngram_size - 1:
            raise ValueError(
                f"engram_vocab_size needs one entry per order 2..{self.max_ngram_size} "
                f"({self.max_ngram_size - 1}), got {len(self.engram_vocab_size)}"
            )
        if min(self.engram_vocab_size) < 1:
            raise ValueError(f"engram_vocab_size entries must be >= 1, got {self.engram_vocab_size}")
        if self.n_head_per_ngram < 1 or self.n_embed_per_ngram % self.n_head_per_ngram:
            raise ValueError(
                f"n_embed_per_ngram ({self.n_embed_per_ngram}) must be a positive multiple of "
                f"n_head_per_ngram ({self.n_head_per_ngram})"
            )
        if len(set(self.layer_ids)) != len(self.layer_ids):
            raise ValueError(f"layer_ids must be distinct, got {self.layer_ids}")
        if self.kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {self.kernel_size}")
        if isinstance(self.pad_id, bool) or not isinstance(self.pad_id, int) or self.pad_id < 0:
            raise ValueError(f"pad_id must be a token id (an int >= 0), got {self.pad_id!r}: a model without a "
                             "pad token can use its eos token id (what fills positions before a sequence starts)")

    @property
    def num_heads(self) -> int:
        """H = (N-1) * K hash heads per layer, order-major (all 2-gram heads first)."""
        return (self.max_ngram_size - 1) * self.n_head_per_ngram

    @property
    def head_dim(self) -> int:
        """D: embedding width of one head's table row."""
        return self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def engram_dim(self) -> int:
        """Width of the flattened n-gram embedding fed to the key/value projections."""
        return (self.max_ngram_size - 1) * self.n_embed_per_ngram
