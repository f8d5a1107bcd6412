"""What one `make bench` run measures: sizes, repeats and sections, as one dataclass.

Two presets: the full run (~15 minutes on a 2-core VM) and `--quick` (~1 minute, smaller tables,
fewer sizes and repeats: a smoke run whose numbers are indicative only). Every field can be
overridden from the command line (see `bench/__main__.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

SECTIONS = ("lookup", "update", "hashing", "e2e", "decode", "scaling", "cache")


@dataclass
class E2EShape:
    """The end-to-end model. Default: the demo's GPT (4 layers x 256, T=128, BPE vocabulary 4096)
    with an Engram block in layer index 1: 2-grams and 3-grams, 4 heads each of ~100k rows x 32
    (~800k rows, ~100 MiB fp32)."""
    vocab_size: int = 4096
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    table_rows: int = 100_003      # target rows per head (the next unused prime is taken)
    heads_per_ngram: int = 4
    embed_per_ngram: int = 128     # row width = embed_per_ngram // heads_per_ngram


@dataclass
class DecodeShape:
    """The generation benchmark (modelled on the paper's Table 4): a GPT with Engram blocks in
    layers 1 and n_layer-2, serving `requests` real-text prompts of uniform(100, 1024) tokens,
    `batch` sequences decoding together (continuous batching). Tables: 2-grams and 3-grams,
    4 heads each of `table_rows` rows x 32 (~800k rows per layer), and a large size of
    `large_table_rows` per head (~20M rows, 1.2 GiB fp16 per layer) whose lookups hit cold memory."""
    vocab_size: int = 4096                          # the demo's BPE over its corpus
    corpus_mb: float = 0                            # train text the BPE sees (0 = all, as `make demo`)
    n_layer: int = 6
    n_head: int = 4
    n_embd: int = 256
    prompt_tokens: tuple[int, int] = (100, 1024)   # uniform, inclusive
    new_tokens: tuple[int, int] = (64, 192)        # uniform, inclusive
    requests: int = 16
    batch: int = 8
    table_rows: int = 100_003
    large_table_rows: int = 2_500_009              # 0: no large-table rows
    heads_per_ngram: int = 4
    embed_per_ngram: int = 128
    cache_mib: int = 16                            # row cache per layer for the cached variant


@dataclass
class BenchConfig:
    # Which parts run, in this order.
    sections: tuple[str, ...] = SECTIONS
    # Lookup tables: rows x dim. 2M x 64 is 256 MiB in fp16, 512 MiB in fp32: far beyond the
    # 32 MiB L3, so every gather goes to DRAM like a production table would.
    rows: int = 2_000_000
    dim: int = 64
    dtypes: tuple[str, ...] = ("float16", "float32")
    lookup_sizes: tuple[int, ...] = (4096, 65536, 524288)   # ids per lookup
    zipf_size: int = 65536                                   # batch size of the Zipfian runs
    zipf_s: float = 1.1                                      # exponent: real n-gram traffic is Zipfian
    rounds: int = 7               # side-by-side rounds: each round times every system once
    min_sample_s: float = 0.05    # a timed sample repeats a call until it lasts at least this long
    # Updates: one table per optimizer, `update_rows` rows, `update_size` unique ids per update.
    update_rows: int = 1_000_000
    update_size: int = 65536
    optimizers: tuple[str, ...] = ("sgd", "adagrad", "adam")
    # Hashing: a [batch, seq_len] token batch with the reference EngramConfig (2 orders x 8 heads).
    hash_batch: tuple[int, int] = (8, 4096)
    # End to end: demo GPT steps per round and rounds (interleaved local / memstore).
    e2e_shape: E2EShape = field(default_factory=E2EShape)
    e2e_rounds: int = 3
    e2e_steps: int = 10
    e2e_batch: int = 16
    # Decode: generation throughput, rounds interleave the variants.
    decode_shape: DecodeShape = field(default_factory=DecodeShape)
    decode_rounds: int = 3
    # Scaling: shard counts over loopback, each a `memstore serve` process.
    shard_counts: tuple[int, ...] = (1, 2, 4)
    scaling_sizes: tuple[int, ...] = (65536, 524288)
    # Cache: capacities as fractions of the table's bytes.
    cache_fractions: tuple[float, ...] = (0.001, 0.01, 0.05, 0.2)
    cache_batches: int = 24
    seed: int = 0
    plots: bool = True
    profile_prefix: str = ""      # --profile: py-spy files start with this path ("" = no profiling)


def quick_config() -> BenchConfig:
    """~1 minute: one dtype, two sizes, few rounds; tables still exceed the L3 cache."""
    return replace(BenchConfig(), rows=500_000, dtypes=("float16",), lookup_sizes=(4096, 65536),
                   rounds=3, min_sample_s=0.02, update_rows=200_000, update_size=16384,
                   e2e_shape=E2EShape(vocab_size=1024, block_size=64, n_layer=2, n_head=2, n_embd=64,
                                      table_rows=10_007, embed_per_ngram=64),
                   e2e_rounds=2, e2e_steps=6, e2e_batch=8,
                   decode_shape=DecodeShape(vocab_size=1024, corpus_mb=0.5, n_layer=4, n_embd=64, n_head=2, prompt_tokens=(50, 200),
                                            new_tokens=(16, 48), requests=8, batch=4, table_rows=10_007,
                                            large_table_rows=0, embed_per_ngram=64, cache_mib=1),
                   decode_rounds=1, shard_counts=(1, 2), scaling_sizes=(65536,),
                   cache_fractions=(0.01, 0.1), cache_batches=8)
