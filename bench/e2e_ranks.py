"""Section e2e, data-parallel rows: 2 ranks of the demo GPT, each a process (torch.distributed gloo).

- "2 ranks: DDP, local tables": the table is an in-model parameter with dense gradients, which
  DDP all-reduces whole every step (gloo cannot all-reduce sparse gradients), then `RowwiseAdam`.
- "2 ranks: memstore+prefetch (sync|async)": the table on the section's `memstore serve`, one job
  of 2 ranks: every step each rank sends its rows' gradients and the server applies their mean
  once (DDP semantics); the dense part is DDP as above.
Each rank trains on its half of the 1-rank rows' batch (the same global batch), one torch thread
per rank (2 ranks on the machine's cores, plus the server). Ratio = step time / the local 2-rank
step time.

Run by `bench.e2e`; each rank is `python -m bench.e2e_ranks ...` with torchrun's environment.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

LOCAL_2 = "2 ranks: DDP, local tables"
MEMSTORE_2 = {"sync": "2 ranks: memstore+prefetch (sync)", "async": "2 ranks: memstore+prefetch (async)"}
WORLD = 2


def run_variants(cfg, work: Path, target: str) -> dict[str, list[float]]:
    """Per variant: rank 0's step seconds over all rounds (warm-up steps dropped)."""
    from bench.procs import free_port
    steps = cfg.e2e_rounds * cfg.e2e_steps
    results = {}
    for name, variant in [(LOCAL_2, "local"), *((n, m) for m, n in MEMSTORE_2.items())]:
        out = work / f"ranks-{variant}.json"
        port, procs = str(free_port()), []
        for rank in range(WORLD):
            env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "bench.e2e_ranks", "--variant", variant, "--target", target,
                 "--steps", str(steps), "--batch", str(max(1, cfg.e2e_batch // WORLD)), "--seed", str(cfg.seed),
                 "--quick", str(int(cfg.e2e_shape.n_embd < 128)), "--job", f"bench-{variant}-{port}",
                 "--out", str(out)], env=env))
        codes = [p.wait(1800) for p in procs]
        if codes != [0] * WORLD:
            raise RuntimeError(f"2-rank run {variant!r} failed: exit codes {codes}")
        results[name] = json.loads(out.read_text())["step_s"]
    return results


def _rank_main() -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from bench.config import BenchConfig, quick_config
    from bench.e2e import TABLE_LR, WARMUP_STEPS, engram_config, token_batches
    from bench.timing import ZipfIds
    from demo.model import GPT, GPTConfig
    from engram_client import EngramBlock, MemStoreTables, NgramHasher, Prefetcher, ShardedClient
    from engram_client.optim import RowwiseAdam
    from engram_client.tables import LocalTables

    p = argparse.ArgumentParser()
    for flag in ("--variant", "--target", "--job", "--out"):
        p.add_argument(flag, required=True)
    for flag in ("--steps", "--batch", "--seed", "--quick"):
        p.add_argument(flag, type=int, required=True)
    args = p.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    shape = (quick_config() if args.quick else BenchConfig()).e2e_shape
    hasher = NgramHasher(engram_config(shape), vocab_size=shape.vocab_size)
    rows, dim = hasher.total_rows(1), hasher.config.head_dim
    client = None
    if args.variant == "local":
        tables = LocalTables(rows, dim, sparse=False, init_std=0.02)
    else:
        client = ShardedClient(args.target, shared_memory="off")  # over gRPC, as the 1-rank rows it sits beside
        tables = MemStoreTables(client, f"e2e_ranks_{args.variant}", rows, dim, optimizer="adam", lr=TABLE_LR,
                                mode=args.variant, job=args.job, rank=rank, world_size=WORLD)
    torch.manual_seed(args.seed)
    gpt = GPTConfig(vocab_size=shape.vocab_size, block_size=shape.block_size, n_layer=shape.n_layer,
                    n_head=shape.n_head, n_embd=shape.n_embd, engram_layer=1)
    model = GPT(gpt, lambda layer, hidden: EngramBlock(hasher.config, layer, hidden, tables=tables, hasher=hasher))
    ddp = DistributedDataParallel(model)
    dense = [p for n, p in model.named_parameters() if ".tables." not in n]
    optimizers = [torch.optim.AdamW(dense, lr=1e-3)]
    if args.variant == "local":
        optimizers.append(RowwiseAdam(tables.parameters(), lr=TABLE_LR))
    batches = token_batches(shape, args.batch, args.steps + WARMUP_STEPS, ZipfIds(shape.vocab_size, 1.1, args.seed + rank))
    loader = Prefetcher(batches, model, depth=2) if client else batches
    times, last = [], time.perf_counter()
    for batch in loader:
        _, loss = ddp(batch["input_ids"], batch["targets"])
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers:
            opt.step()
        loss.item()
        now = time.perf_counter()
        times.append(now - last)
        last = now
    if client:
        tables.flush()
        client.close()
    if rank == 0:
        Path(args.out).write_text(json.dumps({"step_s": times[WARMUP_STEPS:], "mean": float(np.mean(times))}))
    dist.destroy_process_group()


if __name__ == "__main__":
    _rank_main()
