"""Reproduce the Engram ablation table of docs/demo.md (about 4-5 min per variant on 2 cores).

    .venv/bin/python -m demo.ablations                      # every variant, 300 steps
    .venv/bin/python -m demo.ablations lr_x10 layer0 --steps 100

Each variant trains the demo's default Engram model with one setting changed, on the same seed and
token stream as the baseline, with local tables (`RowwiseAdam`, the server's update rule) so no
daemon is needed. Results are appended to `runs/ablations.jsonl` and printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from demo.corpus import load_corpus
from demo.memory import EngramMemory, EngramSettings
from demo.model import GPT, GPTConfig
from demo.settings import CACHE_DIR, DEFAULTS
from demo.tokenizer import tokenize_corpus
from demo.train import TrainConfig, train_model, val_windows

BASE_LR = DEFAULTS["lr"]
# name -> EngramSettings overrides (None = the baseline, no Engram block)
VARIANTS: dict[str, dict | None] = {
    "baseline": None,
    "default": {},
    "lr_x1": {"table_lr": 1 * BASE_LR},
    "lr_x10": {"table_lr": 10 * BASE_LR},
    "lr_x20": {"table_lr": 20 * BASE_LR},
    "rows_30k": {"table_rows": 30_011},
    "ngram2": {"max_ngram_size": 2},
    "ngram2_lr_x10": {"max_ngram_size": 2, "table_lr": 10 * BASE_LR},
    "layer0": {"layer": 0},
}


def run_variant(name: str, steps: int, tok, val) -> dict:
    overrides = VARIANTS[name]
    model_cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=DEFAULTS["block_size"], n_layer=DEFAULTS["n_layer"],
                          n_head=DEFAULTS["n_head"], n_embd=DEFAULTS["n_embd"])
    train_cfg = TrainConfig(steps=steps, batch_size=DEFAULTS["batch_size"], lr=BASE_LR,
                            warmup_steps=min(30, max(1, steps // 10)))
    memory = None
    if overrides is None:
        model = GPT(model_cfg, seed=train_cfg.seed)
    else:
        settings = EngramSettings(**{"tables": "local", "table_lr": 5 * BASE_LR, **overrides})
        memory = EngramMemory(settings, tok.tokenizer, tok.eos_id, CACHE_DIR)
        model = GPT(dataclasses.replace(model_cfg, engram_layer=settings.layer), memory.make_block,
                    seed=train_cfg.seed)
    result = train_model(name, model, tok.train_ids, val, train_cfg, memory, show_progress=False)
    return {"name": name, "steps": steps, "overrides": overrides, "final_val_loss": result.final_val_loss,
            "val_checks": result.val_loss, **{k: result.summary()[k] for k in ("step_ms_median", "train_seconds")}}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m demo.ablations", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                        help=f"any of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    parser.add_argument("--out", type=Path, default=Path("runs/ablations.jsonl"))
    args = parser.parse_args()

    tok = tokenize_corpus(load_corpus(), DEFAULTS["vocab_size"], CACHE_DIR)
    val = val_windows(tok.val_ids, DEFAULTS["block_size"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.variants:
        row = run_variant(name, args.steps, tok, val)
        rows.append(row)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{name}: validation loss {row['final_val_loss']:.4f}", flush=True)
    print("\n| variant | overrides | validation loss |\n| --- | --- | ---: |")
    for row in rows:
        print(f"| {row['name']} | {row['overrides']} | {row['final_val_loss']:.4f} |")


if __name__ == "__main__":
    main()
