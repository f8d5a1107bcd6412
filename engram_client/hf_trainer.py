"""Engram with `transformers.Trainer`: prefetch through the data loader, table checkpoints beside
the Trainer's checkpoints, resume from them.

    engram = add_engram(model, engram_config, tables=client)
    trainer = EngramTrainer(model=model, args=TrainingArguments(...), train_dataset=..., engram=engram)
    trainer.train()                                   # or trainer.train(resume_from_checkpoint=True)

`EngramTrainer` is a `Trainer` whose training batches run through a `Prefetcher` (the remote
tables' rows for batch k+1 travel while step k computes) and that carries an `EngramCallback`.
The callback alone works with any Trainer (no prefetch then):
- `on_save`: `checkpoint_tables(model)` at the step the Trainer just saved, written as
  `<output_dir>/checkpoint-<step>/engram_tables.json` (a small record: the tables' data stay on the
  memstore servers' disks, or in the host store's data dir);
- `on_train_begin` of a resumed run: the tables roll back to the record of the checkpoint the
  Trainer resumed from, so dense weights and tables continue from the same step;
- `on_train_end`: every table step is applied before `train()` returns; with
  `load_best_model_at_end`, the tables roll back to the best checkpoint's record, as the dense
  weights do.
Local tables are ordinary parameters: the Trainer saves and restores them itself.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from engram_client.checkpoint import checkpoint_tables, restore_tables
from engram_client.hf import EngramAdapter
from engram_client.prefetch import Prefetcher

TABLES_FILE = "engram_tables.json"


class EngramCallback(TrainerCallback):
    """Saves and restores the remote tables of `engram` with the Trainer's checkpoints."""

    def __init__(self, engram: EngramAdapter) -> None:
        self.engram = engram

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        for source in self.engram.remote_tables():
            if source.grad_accumulation != args.gradient_accumulation_steps:
                raise ValueError(f"table {source.name!r} makes one step per {source.grad_accumulation} backward "
                                 f"passes, the Trainer per {args.gradient_accumulation_steps}: pass "
                                 f"table_args={{'grad_accumulation': {args.gradient_accumulation_steps}}}")
        if state.global_step > 0 and self.engram.remote_tables():
            path = checkpoint_dir(args, state.global_step) / TABLES_FILE
            if not path.exists():
                raise FileNotFoundError(f"resuming at step {state.global_step}, but {path} does not exist: the "
                                        "tables would not match the dense weights")
            restore_tables(self.engram.model, json.loads(path.read_text()))

    def on_save(self, args, state, control, **kwargs) -> None:
        if not self.engram.remote_tables():
            return
        record = checkpoint_tables(self.engram.model)  # flushes: the record is at this step's boundary
        directory = checkpoint_dir(args, state.global_step)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TABLES_FILE).write_text(json.dumps(record, indent=1))

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.engram.flush()
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best and self.engram.remote_tables():
            # the Trainer has just loaded the best checkpoint's dense weights: the tables follow
            restore_tables(self.engram.model, json.loads((Path(best) / TABLES_FILE).read_text()))


def checkpoint_dir(args, step: int) -> Path:
    """Where the Trainer keeps the checkpoint of `step`."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"


class EngramTrainer(Trainer):
    """A `Trainer` with Engram: training batches come through a `Prefetcher`, and an `EngramCallback`
    saves and restores the tables with the checkpoints."""

    def __init__(self, *args: Any, engram: EngramAdapter, prefetch_depth: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.engram, self.prefetch_depth = engram, prefetch_depth
        self.add_callback(EngramCallback(engram))
        self._epoch_iterator: Iterator | None = None  # the Trainer's iterator of the current epoch ...
        self._prefetching: Iterator | None = None     # ... and the prefetching iterator over it
        self.prefetcher: Prefetcher | None = None     # the current epoch's, for its wait summary

    def get_batch_samples(self, epoch_iterator: Iterator, num_batches: int, device: Any) -> tuple[list, Any]:
        """The Trainer takes every training batch here. Prefetching at this point, not by wrapping
        the data loader, keeps the loader the Trainer's own (resuming mid-epoch skips batches
        through accelerate, which rebuilds only loaders it knows)."""
        if self.engram.remote_tables():
            if epoch_iterator is not self._epoch_iterator:  # a new epoch (or a resumed one)
                self.prefetcher = self.engram.prefetch(epoch_iterator, depth=self.prefetch_depth)
                self._epoch_iterator, self._prefetching = epoch_iterator, iter(self.prefetcher)
            epoch_iterator = self._prefetching
        return super().get_batch_samples(epoch_iterator, num_batches, device)
