"""Checkpoint and resume the remote tables of a model, and drive their learning rate.

A model checkpoint at step s must pair with the tables at step s on every shard.

    record = checkpoint_tables(model)          # every rank may call it; one copy per table
    torch.save({"model": model.state_dict(), "tables": record, ...}, path)
    ...
    state = torch.load(path)                   # after a crash, a preemption, a restart of the daemons
    model.load_state_dict(state["model"])
    restore_tables(model, state["tables"])     # every shard rolls back; `.step` continues from s

`checkpoint_tables` flushes (every pushed step is applied), then asks every shard for a named
checkpoint of each table (`Snapshot` with a tag: `<job or run id>.step<s>`), kept on the servers'
disks beside their data. In a data-parallel job each rank's flush returns only once the step is
applied on every shard, so all ranks see the same boundary, and the servers write each tagged
checkpoint once. `restore_tables` rolls every shard back to it (rows, optimizer state and the
exactly-once memory, so the steps after s are applied again when replayed) and sets the step.

`TableLR(model)` is a `torch.optim.Optimizer` whose parameter groups are the tables' learning
rates, so any `torch.optim.lr_scheduler` drives the tables as it drives the dense optimizer:
each step's update carries the lr in force when it is sent. Its `step()` does nothing (the
servers step the tables); call it anyway, as schedulers expect.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engram_client.remote import RemoteTables
from engram_client.sharded import ShardedClient
from memstore.errors import NotFound

RECORD_FORMAT = "engram-tables/1"


def remote_tables(model: nn.Module) -> list[RemoteTables]:
    """Every remote table source of the model, in module order."""
    return [m for m in model.modules() if isinstance(m, RemoteTables)]


def checkpoint_tables(model: nn.Module) -> dict[str, Any]:
    """Flush, checkpoint every remote table of `model` on every shard at the current step
    boundary, and return a small picklable record to save beside `model.state_dict()`."""
    sources = remote_tables(model)
    for source in sources:
        source.flush()  # raises StepFailed: never checkpoint past a lost step
    tables = {}
    for source in sources:
        if source.micro_batches_pending:
            raise RuntimeError(f"table {source.name!r} is in the middle of a step ({source.micro_batches_pending} of "
                               f"{source.grad_accumulation} micro-batches): checkpoint between steps")
        tag = f"{source.run_id}.step{source.step}"
        paths = source.store.snapshot(source.name, tag=tag)
        tables[source.name] = {"step": source.step, "tag": tag, "paths": paths}
    return {"format": RECORD_FORMAT, "tables": tables}


def restore_tables(model: nn.Module, record: dict[str, Any]) -> None:
    """Roll every shard of every remote table of `model` back to `record` (from
    `checkpoint_tables`) and continue numbering steps from there. Raises NOT_FOUND (a
    `memstore.errors.NotFound`) naming them if some shards lack a checkpoint: checked for every
    table first, so then nothing is rolled back."""
    if record.get("format") != RECORD_FORMAT:
        raise ValueError(f"not a table checkpoint record (format {record.get('format')!r}, expected {RECORD_FORMAT!r})")
    sources = remote_tables(model)
    missing = [s.name for s in sources if s.name not in record["tables"]]
    if missing:
        raise ValueError(f"the record has no checkpoint of table(s) {missing}; it holds {sorted(record['tables'])}")
    for source in sources:
        check_checkpoint(source.store, source.name, record["tables"][source.name]["tag"])
    for source in sources:
        entry = record["tables"][source.name]
        source.steps.drain()  # an update still travelling must not land after the restore
        source.store.restore(source.name, entry["tag"], job=source.job)
        source.reset_step(entry["step"])


def check_checkpoint(store, name: str, tag: str) -> None:
    """NOT_FOUND unless every shard of table `name` has checkpoint `tag` (naming the shards that
    lack it where the store is sharded)."""
    if isinstance(store, ShardedClient):
        store.check_checkpoint(name, tag)
        return
    have = store.describe_table(name).checkpoints
    if tag not in have:
        raise NotFound(f"table {name!r} has no checkpoint {tag!r} (it has: {', '.join(have) or 'none'}): "
                       "nothing was restored")


class TableLR(torch.optim.Optimizer):
    """The learning rates of a model's remote tables, as a torch optimizer for lr schedulers."""

    def __init__(self, model_or_tables: nn.Module | list[RemoteTables]):
        sources = (remote_tables(model_or_tables) if isinstance(model_or_tables, nn.Module)
                   else list(model_or_tables))
        if not sources:
            raise ValueError("no remote tables to schedule")
        groups = []
        for source in sources:
            group = source.param_group  # the same dict: what a scheduler writes, the table sends
            group["params"] = [torch.zeros(0, requires_grad=True)]  # torch wants a parameter per group
            groups.append(group)
        super().__init__(groups, defaults={})
        self.sources = sources

    def load_state_dict(self, state_dict: dict) -> None:
        """torch replaces the group dicts on load: hand the new ones to the tables again."""
        super().load_state_dict(state_dict)
        for source, group in zip(self.sources, self.param_groups, strict=True):
            source.param_group = group

    def step(self, closure=None) -> None:
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None
