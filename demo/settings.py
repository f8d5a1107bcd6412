"""The demo's default sizes and the `--quick` preset (every key is also a command-line flag)."""

from __future__ import annotations

from pathlib import Path

CACHE_DIR = Path(".cache/demo")  # tokenizer, token streams, token map (gitignored)

DEFAULTS = {
    "steps": 300, "batch_size": 16, "block_size": 128, "n_layer": 4, "n_head": 4, "n_embd": 256, "lr": 2e-3,
    "vocab_size": 4096, "max_corpus_mb": 0, "val_tokens": 0, "eval_interval": 50, "eval_windows": 48,
    "table_rows": 100_003, "embed_per_ngram": 128, "sample_tokens": 120, "threads": 0,
}

# --quick: tiny model, few steps, a slice of the corpus (the smoke test in `make test` runs it).
# One torch thread: for a model this small a second one only adds synchronisation.
QUICK = {
    "steps": 60, "batch_size": 8, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 64,
    "vocab_size": 1024, "max_corpus_mb": 0.5, "val_tokens": 16_384, "eval_interval": 20, "eval_windows": 16,
    "table_rows": 10_007, "embed_per_ngram": 64, "sample_tokens": 40, "threads": 1,
}
