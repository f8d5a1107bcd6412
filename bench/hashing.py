"""Section 3: what hashing one [B, T] token batch costs, numpy vs torch (CPU, 1 and 2 threads).

The reference EngramConfig (orders 2-3, 8 heads each, layers [1, 15]) over a DeepSeek-V3-sized
vocabulary (129,280 ids): `NgramHasher.hash` gives every layer's [B, T, 16] head indices, and
`row_ids` one layer's global row ids (head offsets added), which is what a training step needs.
"""
from __future__ import annotations

import numpy as np
import torch

from bench.config import BenchConfig
from bench.report import Section
from bench.timing import Measurement, side_by_side
from engram_client.config import EngramConfig
from engram_client.hashing import NgramHasher

VOCAB = 129_280


def run(cfg: BenchConfig, work) -> Section:
    B, T = cfg.hash_batch
    config = EngramConfig()
    hasher = NgramHasher(config, vocab_size=VOCAB)
    section = Section("hashing", f"Hashing: one [{B}, {T}] batch, {config.num_heads} heads x "
                                 f"{len(config.layer_ids)} layers (reference config)")
    rng = np.random.default_rng(cfg.seed)
    batches = [rng.integers(0, VOCAB, (B, T), dtype=np.int64) for _ in range(4)]
    tensors = [torch.from_numpy(b) for b in batches]
    layer = config.layer_ids[0]
    threads_before = torch.get_num_threads()

    def torch_call(threads: int, fn):
        def call(i: int):
            torch.set_num_threads(threads)
            return fn(tensors[i % len(tensors)])
        return call

    calls = {
        "numpy hash (all layers)": lambda i: hasher.hash(batches[i % len(batches)]),
        "torch 1 thread hash (all layers)": torch_call(1, hasher.hash),
        "torch 2 threads hash (all layers)": torch_call(2, hasher.hash),
        "numpy row_ids (1 layer)": lambda i: hasher.row_ids(batches[i % len(batches)], layer),
        "torch 2 threads row_ids (1 layer)": torch_call(2, lambda t: hasher.row_ids(t, layer)),
    }
    try:
        seconds = side_by_side(calls, cfg.rounds, cfg.min_sample_s)
    finally:
        torch.set_num_threads(threads_before)
    for name, s in seconds.items():
        m = Measurement(name, s, B * T, 0)
        indices = B * T * config.num_heads * (len(config.layer_ids) if "all layers" in name else 1)
        section.records.append(m.record(batch=[B, T]))
        section.table.append({"path": name, "ms/batch": f"{1e3 * m.median_s:.2f}",
                              "spread ms": f"{1e3 * min(s):.2f}-{1e3 * max(s):.2f}",
                              "M tokens/s": f"{m.rate / 1e6:.1f}",
                              "ns/index": f"{1e9 * m.median_s / indices:.2f}"})
    return section
