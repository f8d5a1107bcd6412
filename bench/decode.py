"""Section decode: generation throughput with the Engram tables local vs on memstore (the paper's
Table 4: a 100B-parameter table in host DRAM costs 1.9 % / 2.8 % of throughput).

The model (`bench.decode_model`) has Engram blocks in layers 1 and n_layer-2 and serves a queue
of requests with continuous batching. Prompts are real text (the demo corpus's validation
stream, uniform(100, 1024) tokens) and the generated tokens are the text that follows, fed back
as if sampled (teacher forcing): the compute is that of decoding, and the row ids, hence the row
cache's hit rate, are those of real text rather than of a random-weight model's babble.

Variants (each its own model, same dense weights; rounds interleave them):
- local (in-process): `LocalTables`, the baseline (1.00).
- memstore ... + entry prefetch: `MemStoreTables` on a `memstore serve` subprocess, every block's
  lookup sent at model entry (`EntryPrefetch`); "gRPC" or "same-host" (the table mapped read-only).
- memstore ..., no prefetch: each block looks its rows up when the forward reaches it.
- + row cache: a `RowCache` per layer in front of gRPC; its hit rate is reported.
- large tables: ~20M rows per layer (fp16, 1.2 GiB per table, materialised: lookups hit cold
  memory), RAM and LMDB daemons, ratios to local tables of the same size.
Every daemon is a `--read-only` serving replica of tables written beforehand.
Throughput = generated tokens / wall time of the whole run (prefills included, as Table 4);
"decode tokens/s" counts the decode steps only.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.config import BenchConfig, DecodeShape
from bench.decode_model import DecoderConfig, DecoderGPT, Request, serve
from bench.e2e import cpu_seconds
from bench.procs import MemstoreServer
from bench.report import Section
from bench.tables import NORMAL, optimizer_spec, preload
from engram_client.block import EngramBlock
from engram_client.cache import RowCache
from engram_client.config import EngramConfig
from engram_client.hashing import NgramHasher
from engram_client.remote import MemStoreTables, RemoteTables
from engram_client.tables import LocalTables
from memstore.client import MemStoreClient

LOCAL, LOCAL_LARGE = "local (in-process)", "local, large tables"
GRPC, SAME_HOST = "memstore gRPC + entry prefetch", "memstore same-host + entry prefetch"
DTYPE = "float16"  # served tables: half the bytes per row


def engram_layers(shape: DecodeShape) -> tuple[int, int]:
    return (1, shape.n_layer - 2)


def make_hasher(shape: DecodeShape, rows_per_head: int) -> NgramHasher:
    config = EngramConfig(engram_vocab_size=[rows_per_head] * 2, max_ngram_size=3,
                          n_embed_per_ngram=shape.embed_per_ngram, n_head_per_ngram=shape.heads_per_ngram,
                          layer_ids=list(engram_layers(shape)), pad_id=0, kernel_size=4)
    return NgramHasher(config, vocab_size=shape.vocab_size)


def real_text_requests(shape: DecodeShape, seed: int) -> list[Request]:
    """Prompts and continuations cut from the demo corpus's validation tokens."""
    from demo.corpus import load_corpus
    from demo.settings import CACHE_DIR
    from demo.tokenizer import tokenize_corpus
    corpus = load_corpus(max_train_bytes=int(shape.corpus_mb * 1e6))  # cached with the demo's tokenizer
    stream = torch.from_numpy(tokenize_corpus(corpus, shape.vocab_size, CACHE_DIR).val_ids.astype(np.int64))
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(shape.requests):
        prompt, new = (int(rng.integers(lo, hi + 1)) for lo, hi in (shape.prompt_tokens, shape.new_tokens))
        start = int(rng.integers(0, len(stream) - prompt - new))
        out.append(Request(stream[start:start + prompt], new, forced=stream[start + prompt:start + prompt + new]))
    return out


@dataclass
class Variant:
    name: str
    model: DecoderGPT
    prefetch: bool = True
    baseline: str = LOCAL
    server_pid: int | None = None
    tables: str = ""
    runs: list[dict] = field(default_factory=list)

    def run(self, requests: list[Request], batch: int) -> None:
        remote = self.remote_tables
        wait_before = sum(t.stats.wait_s for t in remote)
        cpu_before = cpu_seconds(self.server_pid)
        gen = serve(self.model, requests, batch, prefetch=self.prefetch)
        self.runs.append({"tokens": gen.generated, "seconds": gen.seconds, "decode_seconds": gen.decode_seconds,
                          "forwards": gen.steps + len(requests),
                          "wait_s": sum(t.stats.wait_s for t in remote) - wait_before,
                          "server_cpu_s": cpu_seconds(self.server_pid) - cpu_before})

    @property
    def remote_tables(self) -> list[RemoteTables]:
        return [b.tables for b in self.model.entry.blocks if isinstance(b.tables, RemoteTables)]

    def total(self, key: str) -> float:
        return float(sum(r[key] for r in self.runs))


def make_model(shape: DecodeShape, hasher: NgramHasher, tables_for) -> DecoderGPT:
    config = DecoderConfig(vocab_size=shape.vocab_size, block_size=shape.prompt_tokens[1] + shape.new_tokens[1],
                           n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd,
                           engram_layers=engram_layers(shape))
    return DecoderGPT(config, lambda layer, hidden: EngramBlock(hasher.config, layer, hidden,
                                                                tables=tables_for(layer), hasher=hasher)).eval()


def table_name(layer: int, rows_per_head: int) -> str:
    return f"decode_{rows_per_head}_l{layer}"


def serve_tables(work: Path, backend: str, hasher: NgramHasher, rows_per_head: int) -> MemstoreServer:
    """A read-only daemon (a serving replica) whose Engram tables, one per layer, are materialised:
    every row has been written."""
    dim = hasher.config.head_dim
    preload(work, backend, [(optimizer_spec(table_name(layer, rows_per_head), hasher.total_rows(layer), dim, DTYPE,
                                            "sgd", 0.01, NORMAL), None) for layer in hasher.config.layer_ids])
    return MemstoreServer(work, backend, "--read-only")


def remote_factory(client, hasher: NgramHasher, rows_per_head: int, cache_mib: int = 0):
    def tables_for(layer: int) -> MemStoreTables:
        dim = hasher.config.head_dim
        cache = RowCache(cache_mib << 20, dim) if cache_mib else None
        return MemStoreTables(client, table_name(layer, rows_per_head), hasher.total_rows(layer), dim, dtype=DTYPE,
                              optimizer="sgd", lr=0.01, init="normal", init_scale=0.02, seed=0, cache=cache)
    return tables_for


def local_factory(hasher: NgramHasher):
    return lambda layer: LocalTables(hasher.total_rows(layer), hasher.config.head_dim)


def memstore_variants(stack: contextlib.ExitStack, work: Path, backend: str, shape: DecodeShape,
                      rows_per_head: int, large: bool) -> list[Variant]:
    hasher = make_hasher(shape, rows_per_head)
    server = stack.enter_context(serve_tables(work / f"{backend}-{rows_per_head}", backend, hasher, rows_per_head))
    suffix = f", large {backend.upper()}" if large else ""
    out = []
    for shared, label in (("off", "gRPC"), ("on", "same-host")):
        client = stack.enter_context(MemStoreClient(server.target, shared_memory=shared))
        model = lambda cache=0, c=client: make_model(shape, hasher, remote_factory(c, hasher, rows_per_head, cache))
        base = LOCAL_LARGE if large else LOCAL
        out.append(Variant(f"memstore {label} + entry prefetch{suffix}", model(), True, base, server.pid))
        if not large:
            out.append(Variant(f"memstore {label}, no prefetch", model(), False, base, server.pid))
            if shared == "off":
                out.append(Variant(f"memstore {label} + entry prefetch + row cache", model(shape.cache_mib),
                                   True, base, server.pid))
    for v in out:
        v.tables = f"{hasher.total_rows(1) / 1e6:.1f} M rows/layer, {backend}"
    return out


def run(cfg: BenchConfig, work: Path) -> Section:
    shape = cfg.decode_shape
    small = make_hasher(shape, shape.table_rows)
    section = Section("decode", f"Generation: GPT {shape.n_layer} x {shape.n_embd} with Engram layers "
                                f"{engram_layers(shape)}, {shape.requests} real-text requests per round, "
                                f"batch {shape.batch} (continuous batching)")
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - 1))  # a core for the client's and server's threads
    # Attention over ~1000 keys yields denormal floats, which cost x/86 CPUs 100s of cycles each
    # and made whichever model met more of them up to 2x slower (measured): flush them, as GPUs do.
    torch.set_flush_denormal(True)
    with contextlib.ExitStack() as stack:
        stack.callback(torch.set_num_threads, threads_before)
        stack.callback(torch.set_flush_denormal, False)
        torch.manual_seed(cfg.seed)
        variants = [Variant(LOCAL, make_model(shape, small, local_factory(small)), tables=
                            f"{small.total_rows(1) / 1e6:.1f} M rows/layer, local fp32")]
        variants += memstore_variants(stack, work, "ram", shape, shape.table_rows, large=False)
        if shape.large_table_rows:
            large = make_hasher(shape, shape.large_table_rows)
            variants.append(Variant(LOCAL_LARGE, make_model(shape, large, local_factory(large)), baseline=LOCAL_LARGE,
                                    tables=f"{large.total_rows(1) / 1e6:.1f} M rows/layer, local fp32"))
            for backend in ("ram", "lmdb"):
                variants += memstore_variants(stack, work, backend, shape, shape.large_table_rows, large=True)
        warm_up = real_text_requests(shape, cfg.seed + 1000)[:shape.batch]
        for variant in variants:  # allocators, thread pools, first connections: not timed
            serve(variant.model, warm_up, shape.batch, prefetch=variant.prefetch)
        for round_index in range(cfg.decode_rounds):
            requests = real_text_requests(shape, cfg.seed + round_index)
            for variant in variants:
                variant.run(requests, shape.batch)
        report(section, variants, shape)
    return section


def report(section: Section, variants: list[Variant], shape: DecodeShape) -> None:
    rate = {v.name: v.total("tokens") / v.total("seconds") for v in variants}
    for v in variants:
        tokens, forwards = v.total("tokens"), v.total("forwards")
        hit_rates = [t.cache.hit_rate for t in v.remote_tables if t.cache is not None]
        record = {
            "variant": v.name, "tables": v.tables, "tokens": tokens, "tokens_per_s": rate[v.name],
            "decode_tokens_per_s": tokens / v.total("decode_seconds"), "ratio": rate[v.name] / rate[v.baseline],
            "baseline": v.baseline, "rows_wait_ms_per_forward": 1e3 * v.total("wait_s") / forwards,
            "server_cpu_ms_per_1k_tokens": 1e6 * v.total("server_cpu_s") / tokens,
            "cache_hit_rate": float(np.mean(hit_rates)) if hit_rates else None,
            "runs": v.runs}
        section.records.append(record)
        remote = bool(v.remote_tables)
        section.table.append({
            "variant": v.name, "tables": v.tables, "tokens/s": f"{record['tokens_per_s']:,.0f}",
            "decode tokens/s": f"{record['decode_tokens_per_s']:,.0f}",
            "ratio to local": f"{record['ratio']:.3f}",
            "rows wait ms/forward": f"{record['rows_wait_ms_per_forward']:.2f}" if remote else "-",
            "server CPU ms/1k tokens": f"{record['server_cpu_ms_per_1k_tokens']:.0f}" if remote else "-",
            "cache hit rate": f"{record['cache_hit_rate']:.1%}" if record["cache_hit_rate"] is not None else "-"})
    section.notes.append(
        f"Prompts uniform{shape.prompt_tokens} tokens, continuations uniform{shape.new_tokens}, cut from the demo "
        "corpus's validation stream and teacher-forced; each new request is prefilled alone and joins the batch. "
        f"torch uses {torch.get_num_threads()} thread(s): a core is left to the memstore client and server; "
        "denormal floats are flushed to zero (unflushed, they made local-table runs up to 2x slower).")
    section.notes.append(
        "The daemon runs on the same CPU cores as the model here, so its CPU time per token (last column) is "
        "taken from the model; on a GPU host the model runs on the GPU and the host cores serving the table "
        "are otherwise idle. Served tables are fp16 and materialised; local tables are fp32 parameters. "
        "Ratios of the large-table rows are to local tables of the same size.")
