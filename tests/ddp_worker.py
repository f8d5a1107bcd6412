"""One rank of a data-parallel training job against memstore, for tests/test_ddp.py.

Run as `python -m tests.ddp_worker --out DIR ...` with RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT in the environment (what torchrun sets). The model is tests/test_remote_training's
TinyLM; the dense part is wrapped in DDP (gloo), the Engram table lives on memstore. Each step
takes this rank's slice of a global batch, so W ranks see exactly what 1 process sees with
the whole batch.

Writes (rank 0 unless noted) into --out:
    rows-<step>.pt      table rows and dense weights after `step` steps (--dump-at, and the end)
    ckpt-<rank>.pt      every rank: model, dense optimizer and table checkpoint record (--checkpoint-at)
    log-<rank>.pt       every rank, --record: rows each forward used and gradients each step sent
    error-<rank>.txt    every rank: the exception that ended it (exit code 3)
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from engram_client import ShardedClient, checkpoint_tables, restore_tables
from engram_client.remote import MemStoreTables
from tests.test_remote_training import INIT, LR, TinyLM

B, T, VOCAB = 4, 12, 50


def global_batch(step: int, world_size: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (B * world_size, T), generator=gen)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--targets", required=True)
    p.add_argument("--optimizer", default="sgd")
    p.add_argument("--mode", default="sync")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--job", default="ddp-test")
    p.add_argument("--global-world", type=int, default=0, help="batch as for this many ranks (1-process reference)")
    p.add_argument("--step-timeout", type=float, default=60.0)
    p.add_argument("--die-at", type=int, default=-1, help="rank 1 SIGKILLs itself after this step's forward")
    p.add_argument("--checkpoint-at", type=int, default=-1)
    p.add_argument("--dump-at", type=int, default=-1)
    p.add_argument("--resume", action="store_true", help="start from --out/ckpt-<rank>.pt")
    p.add_argument("--no-ddp", action="store_true", help="dense weights per rank: only memstore joins the ranks")
    p.add_argument("--record", action="store_true")
    p.add_argument("--out", required=True)
    return p.parse_args()


def build(args, rank: int, world_size: int):
    client = ShardedClient(args.targets, retry_timeout_s=5.0)
    job = args.job if world_size > 1 else None

    def tables(num_rows: int, dim: int) -> MemStoreTables:
        return MemStoreTables(client, "emb", num_rows, dim, optimizer=args.optimizer, lr=LR[args.optimizer],
                              init=INIT.kind, init_scale=INIT.scale, seed=INIT.seed, mode=args.mode, job=job,
                              rank=rank, world_size=world_size, step_timeout_s=args.step_timeout)
    model = TinyLM(tables)
    dense = [p for n, p in model.named_parameters() if not n.startswith("engram.tables")]
    wrapped = DistributedDataParallel(model) if world_size > 1 and not args.no_ddp else model
    return model, wrapped, torch.optim.SGD(dense, lr=0.1), client


def snapshot_rows(model, client) -> dict:
    source = model.engram.tables
    source.flush()
    rows = client.lookup("emb", np.arange(source.num_rows))
    return {"rows": torch.from_numpy(rows.copy()), "dense": {k: v.clone() for k, v in model.state_dict().items()}}


def record_traffic(source, log: dict) -> None:
    """Keep the rows each forward used (by step) and the gradients each step sent."""
    ready, update = source._ready_rows, source.store.update_async

    def ready_rows(pending):
        weights = ready(pending)
        log["reads"].append((source.step, torch.from_numpy(pending.unique.copy()), weights.detach().clone()))
        return weights

    def update_async(name, ids, grads, **kw):
        log["sent"].append((kw["step"], torch.from_numpy(np.array(ids)), torch.from_numpy(np.array(grads, np.float32))))
        return update(name, ids, grads, **kw)
    source._ready_rows, source.store.update_async = ready_rows, update_async


def main() -> None:
    args = parse()
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    out = Path(args.out)
    if world_size > 1 and not args.no_ddp:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    model, wrapped, dense_opt, client = build(args, rank, world_size)
    source, log, start = model.engram.tables, {"reads": [], "sent": []}, 0
    if args.record:
        record_traffic(source, log)
    if args.resume:
        state = torch.load(out / f"ckpt-{rank}.pt", weights_only=True)
        model.load_state_dict(state["model"])
        dense_opt.load_state_dict(state["dense_opt"])
        restore_tables(model, state["tables"])
        start = source.step
    try:
        for step in range(start, args.steps):
            if step == args.checkpoint_at:
                record = checkpoint_tables(model)
                torch.save({"model": model.state_dict(), "dense_opt": dense_opt.state_dict(), "tables": record},
                           out / f"ckpt-{rank}.pt")
            if step == args.dump_at and rank == 0:
                torch.save(snapshot_rows(model, client), out / f"rows-{step}.pt")
            ids = global_batch(step, args.global_world or world_size)[rank * B:(rank + 1) * B] if world_size > 1 \
                else global_batch(step, args.global_world or 1)
            loss = wrapped(ids)
            if step == args.die_at and rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            loss.backward()
            dense_opt.step()
            dense_opt.zero_grad()
        source.flush()
        if rank == 0:
            torch.save(snapshot_rows(model, client), out / f"rows-{args.steps}.pt")
    except BaseException as exc:  # noqa: BLE001 - the test reads what ended this rank
        (out / f"error-{rank}.txt").write_text(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        sys.exit(3)
    finally:
        if args.record:
            torch.save(log, out / f"log-{rank}.pt")
    client.close()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
