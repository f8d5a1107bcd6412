"""Engram experiments: the ablation table, the longer runs and the table-size sweep of docs/demo.md.

    .venv/bin/python -m demo.ablations                          # the 300-step ablation table
    .venv/bin/python -m demo.ablations lr_x10 layer0 --steps 100
    .venv/bin/python -m demo.ablations baseline constant follow dropout --steps 600 --max-corpus-mb 2
    .venv/bin/python -m demo.ablations rows_10k rows_1m --tables memstore   # table size, tables on memstore

Each variant trains the demo's default model (the Engram variants with one setting changed, on the
same seed and token stream as the baseline). `--tables local` (default) keeps the rows in-process,
trained by `RowwiseAdam` (the server's update rule), so no daemon is needed; `--tables memstore`
starts one RAM daemon for the whole run (each variant's table is dropped when it is done). Every
variant appends one JSON line to `--out` as soon as it finishes: its validation curve, the smoothed
train loss, the final loss on every validation token, the table's size and the hash collisions
among the validation n-grams. `python -m demo.curves` plots such a file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from demo.cluster import MemstoreDaemon
from demo.corpus import load_corpus
from demo.memory import EngramMemory, EngramSettings
from demo.model import GPT, GPTConfig
from demo.report import ema
from demo.settings import CACHE_DIR, DEFAULTS
from demo.tokenizer import TokenizedCorpus, tokenize_corpus
from demo.train import TrainConfig, train_model, val_windows

BASE_LR = DEFAULTS["lr"]
# name -> EngramSettings overrides on top of the demo's defaults (None = the baseline, no Engram block)
VARIANTS: dict[str, dict | None] = {
    "baseline": None,
    "default": {},
    # table learning rate and its schedule
    "lr_x1": {"table_lr": 1 * BASE_LR},
    "lr_x10": {"table_lr": 10 * BASE_LR},
    "lr_x20": {"table_lr": 20 * BASE_LR},
    "constant": {"table_lr_schedule": "constant", "row_dropout": 0.0},
    "follow": {"table_lr_schedule": "follow", "row_dropout": 0.0},
    "follow_lr_x10": {"table_lr_schedule": "follow", "table_lr": 10 * BASE_LR, "row_dropout": 0.0},
    # regularisation of the rows
    "dropout": {"table_lr_schedule": "constant", "row_dropout": 0.2},
    "follow_dropout": {"table_lr_schedule": "follow", "row_dropout": 0.2},
    # shape and placement
    "ngram2": {"max_ngram_size": 2},
    "ngram2_lr_x10": {"max_ngram_size": 2, "table_lr": 10 * BASE_LR},
    "layer0": {"layer": 0},
    # table size: target rows per hash head (each head takes the next unused prime)
    "rows_10k": {"table_rows": 10_007},
    "rows_30k": {"table_rows": 30_011},
    "rows_100k": {"table_rows": 100_003},
    "rows_300k": {"table_rows": 300_007},
    "rows_1m": {"table_rows": 1_000_003},
}


def run_variant(name: str, args: argparse.Namespace, tok: TokenizedCorpus, val, client=None) -> dict:
    """Train one variant; returns its JSON record."""
    overrides = VARIANTS[name]
    model_cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=DEFAULTS["block_size"], n_layer=DEFAULTS["n_layer"],
                          n_head=DEFAULTS["n_head"], n_embd=DEFAULTS["n_embd"])
    train_cfg = TrainConfig(steps=args.steps, batch_size=DEFAULTS["batch_size"], lr=BASE_LR,
                            eval_interval=args.eval_interval, eval_windows=args.eval_windows,
                            warmup_steps=min(30, max(1, args.steps // 10)))
    memory, record = None, {"name": name, "steps": args.steps, "overrides": overrides, "tables": args.tables}
    started = time.perf_counter()
    if overrides is None:
        model = GPT(model_cfg, seed=train_cfg.seed)
    else:
        settings = EngramSettings(**{"tables": args.tables, **overrides})
        memory = EngramMemory(settings, tok.tokenizer, tok.eos_id, CACHE_DIR, client=client,
                              table_prefix=f"ablation_{name}_{os.getpid()}")
        torch.manual_seed(train_cfg.seed)  # row dropout draws from the global generator
        model = GPT(dataclasses.replace(model_cfg, engram_layer=settings.layer), memory.make_block,
                    seed=train_cfg.seed)
        record["settings"] = dataclasses.asdict(settings)
    try:
        result = train_model(name, model, tok.train_ids, val, train_cfg, memory, show_progress=False)
    finally:
        if memory is not None and client is not None:
            client.drop_table(memory.table_name)  # a 1M-rows/head table holds GBs of RAM
    train_ema = ema(result.train_loss)
    record.update({
        "final_val_loss": result.final_val_loss, "val_steps": result.val_steps, "val_checks": result.val_loss,
        "train_ema_steps": result.steps[::10] + result.steps[-1:], "train_ema": train_ema[::10] + train_ema[-1:],
        "params": model.param_counts(), "wall_seconds": time.perf_counter() - started,
        **{k: result.summary()[k] for k in ("step_ms_median", "train_seconds", "eval_seconds", "load_avg_mean")},
    })
    if memory is not None:
        record["table_rows"] = memory.num_rows
        record["collisions"] = memory.collisions(tok.val_ids, DEFAULTS["block_size"])["by_order"]
    return record


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m demo.ablations", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # no `choices=`: argparse checks an empty list against them and refuses the bare command
    parser.add_argument("variants", nargs="*", metavar="VARIANT",
                        help=f"any of {', '.join(VARIANTS)} (default: the 300-step ablation table)")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--corpus", default=None, help="stdlib (default), stdlib-top or a folder, as for `python -m demo`")
    parser.add_argument("--max-corpus-mb", type=float, default=0.0,
                        help="keep only this much train text (MB; 0 = all): more epochs in fewer steps")
    parser.add_argument("--tables", choices=("local", "memstore"), default="local",
                        help="local: RowwiseAdam in-process; memstore: a RAM daemon started for this run")
    parser.add_argument("--eval-interval", type=int, default=DEFAULTS["eval_interval"])
    parser.add_argument("--eval-windows", type=int, default=DEFAULTS["eval_windows"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--out", type=Path, default=Path("runs/ablations.jsonl"))
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    args.variants = args.variants or ["baseline", "default", "lr_x1", "lr_x10", "lr_x20", "rows_30k", "ngram2",
                                      "ngram2_lr_x10", "layer0"]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    corpus = load_corpus(args.corpus, max_train_bytes=int(args.max_corpus_mb * 1e6))
    tok = tokenize_corpus(corpus, DEFAULTS["vocab_size"], CACHE_DIR)
    print(f"corpus: {corpus.describe()}; {len(tok.train_ids):,} train / {len(tok.val_ids):,} validation tokens",
          flush=True)
    val = val_windows(tok.val_ids, DEFAULTS["block_size"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ablations-") as tmp:
        daemon = MemstoreDaemon(Path(tmp) / "data", "ram") if args.tables == "memstore" else None
        client = None
        try:
            if daemon is not None:
                from memstore.client import MemStoreClient

                client = MemStoreClient(daemon.start().target)
            rows = [_run_and_append(name, args, tok, val, client, corpus.describe()) for name in args.variants]
        finally:
            if client is not None:
                client.close()
            if daemon is not None:
                daemon.stop()
    print("\n| variant | overrides | validation loss |\n| --- | --- | ---: |")
    for row in rows:
        print(f"| {row['name']} | {row['overrides']} | {row['final_val_loss']:.4f} |")


def _run_and_append(name: str, args, tok, val, client, corpus: str) -> dict:
    row = {**run_variant(name, args, tok, val, client), "corpus": corpus, "train_tokens": len(tok.train_ids)}
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{name}: validation loss {row['final_val_loss']:.4f} ({row['wall_seconds']:.0f} s)", flush=True)
    return row


if __name__ == "__main__":
    main()
