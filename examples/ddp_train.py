"""Data-parallel training of an Engram table on memstore, checkpointed and resumable.

    memstore serve --port 50051 &                      # or a sharded cluster: --targets a,b,...
    torchrun --nproc_per_node 2 examples/ddp_train.py --targets 127.0.0.1:50051 --steps 20
    torchrun --nproc_per_node 2 examples/ddp_train.py --targets 127.0.0.1:50051 --steps 40 --resume

Every rank builds the same model; DDP averages the dense gradients (gloo on CPU, NCCL on GPUs)
and memstore does the same for the table: each shard applies ONE optimizer step per training
step with the mean of the ranks' row gradients, once every rank has sent its share. The tables
follow the dense optimizer's lr schedule (`TableLR`). Every `--checkpoint-every` steps each
rank saves its model and dense optimizer beside a table checkpoint record; `--resume` restores
both, rolling every shard back to the checkpoint's step.
"""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel

from engram_client import (
    EngramBlock,
    EngramConfig,
    MemStoreTables,
    NgramHasher,
    ShardedClient,
    TableLR,
    checkpoint_tables,
    restore_tables,
)

VOCAB, HIDDEN, BATCH, SEQ = 256, 64, 8, 64
CONFIG = EngramConfig(engram_vocab_size=[10007, 10007], max_ngram_size=3, n_embed_per_ngram=32,
                      n_head_per_ngram=4, layer_ids=[1], pad_id=0, seed=0, kernel_size=4)


class TinyEngramLM(nn.Module):
    def __init__(self, tables: MemStoreTables, hasher: NgramHasher):
        super().__init__()
        torch.manual_seed(0)  # the same dense weights on every rank (DDP also broadcasts rank 0's)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.engram = EngramBlock(CONFIG, 1, HIDDEN, hasher=hasher, tables=tables)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)                                                       # (B, T, C)
        h = h + self.engram(h, ids)
        logits = self.head(h)                                                     # (B, T, V)
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def batch(step: int, rank: int) -> torch.Tensor:
    """This rank's share of step `step`'s global batch: a synthetic corpus with repeated n-grams."""
    gen = torch.Generator().manual_seed(step * 1000 + rank)
    base = torch.randint(1, VOCAB, (BATCH, SEQ // 4), generator=gen)
    return base.repeat_interleave(2, dim=1).repeat(1, 2)                          # (B, T)


def lr_factor(step: int, warmup: int = 5, total: int = 200) -> float:
    """Linear warm-up, then cosine decay: the dense optimizer and the tables share it."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--targets", default=os.environ.get("MEMSTORE_TARGETS", "127.0.0.1:50051"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--mode", default="sync", choices=["sync", "async"])
    p.add_argument("--job", default="ddp-example", help="the same on every rank; names checkpoints")
    p.add_argument("--checkpoint-dir", default="ddp-checkpoints")
    p.add_argument("--checkpoint-every", type=int, default=10)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world_size = dist.get_rank(), dist.get_world_size()
    hasher = NgramHasher(CONFIG, vocab_size=VOCAB)
    client = ShardedClient(args.targets)
    tables = MemStoreTables(client, f"{args.job}-l1", hasher.total_rows(1), CONFIG.head_dim,
                            optimizer="adam", lr=5e-3, mode=args.mode,
                            job=args.job, rank=rank, world_size=world_size)
    model = TinyEngramLM(tables, hasher)
    ddp = DistributedDataParallel(model)
    dense = torch.optim.AdamW([p for p in model.parameters()], lr=1e-3)
    table_lr = TableLR(model)
    schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, lr_factor) for opt in (dense, table_lr)]

    ckpt_dir = Path(args.checkpoint_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if args.resume and (ckpt_dir / f"rank{rank}.pt").exists():
        state = torch.load(ckpt_dir / f"rank{rank}.pt", weights_only=True)
        model.load_state_dict(state["model"])
        dense.load_state_dict(state["dense"])
        table_lr.load_state_dict(state["table_lr"])  # the tables' lr at the checkpoint's step
        for scheduler, saved in zip(schedulers, state["schedulers"]):
            scheduler.load_state_dict(saved)
        restore_tables(model, state["tables"])      # every shard back to that step
        print(f"rank {rank}: resumed at step {tables.step}", flush=True)

    for step in range(tables.step, args.steps):
        loss = ddp(batch(step, rank))
        loss.backward()                             # dense grads all-reduced; row grads to memstore
        dense.step()
        table_lr.step()
        dense.zero_grad()
        for scheduler in schedulers:
            scheduler.step()
        if rank == 0 and step % 5 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {tables.lr:.2e}", flush=True)
        if (step + 1) % args.checkpoint_every == 0:
            record = checkpoint_tables(model)       # every rank calls it; one copy per table
            torch.save({"model": model.state_dict(), "dense": dense.state_dict(), "tables": record,
                        "table_lr": table_lr.state_dict(), "schedulers": [s.state_dict() for s in schedulers]},
                       ckpt_dir / f"rank{rank}.pt")
    tables.flush()
    if rank == 0:
        print(f"done: {tables.step} steps", flush=True)
    client.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
