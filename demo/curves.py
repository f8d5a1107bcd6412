"""Plots and tables of `python -m demo.ablations` results (one JSON line per variant).

    .venv/bin/python -m demo.curves runs/longer.jsonl --out docs/demo_longer_runs.png
    .venv/bin/python -m demo.curves runs/sweep.jsonl --sweep --out docs/demo_table_sweep.png

Default: every variant's validation curve (solid) and smoothed train loss (faint) against step,
with a line where the first epoch ends. `--sweep`: final validation loss against table parameters,
with the per-head hash-collision rate of each size. Both print the numbers as a Markdown table.
When a variant appears several times in the file, its last record counts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BATCH_WINDOWS = 16  # sequences per step in the ablation runs (DEFAULTS["batch_size"])


def load(path: Path) -> list[dict]:
    """The last record of every variant, in order of first appearance."""
    records: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["name"]] = record
    return list(records.values())


def epoch_steps(record: dict, block_size: int = 128) -> float:
    """Steps in one epoch: the stream holds train_tokens // (T + 1) windows, B per step."""
    return record["train_tokens"] / (block_size + 1) / BATCH_WINDOWS


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def plot_curves(records: list[dict], path: Path, title: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for record, color in zip(records, colors * 3):
        label = f"{record['name']} (final {record['final_val_loss']:.3f})"
        ax.plot(record["val_steps"], record["val_checks"], color=color, marker="o", ms=3, lw=1.5, label=label)
        ax.plot(record["train_ema_steps"], record["train_ema"], color=color, alpha=0.35, lw=1)
    # the first checks (loss ~8 at step 0) would squash the part that matters
    later = [v for r in records for step, v in zip(r["val_steps"], r["val_checks"]) if step >= 100]
    if later:
        ax.set_ylim(top=max(later) + 0.4)
    epoch = epoch_steps(records[0])
    for k in range(1, int(max(r["steps"] for r in records) / epoch) + 1):
        ax.axvline(k * epoch, color="grey", ls="--", lw=1)
        ax.text(k * epoch, ax.get_ylim()[1], f" epoch {k} ends", va="top", fontsize=8, color="grey")
    ax.set_xlabel("step (2,048 tokens each)")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title + "\nsolid: validation checks (first 48 windows); faint: train loss (EMA 0.9)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sweep(records: list[dict], path: Path, title: str) -> None:
    plt = _pyplot()
    baseline = [r for r in records if r["overrides"] is None]
    records = sorted((r for r in records if r["overrides"] is not None), key=lambda r: r["params"]["table"])
    params = [r["params"]["table"] for r in records]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot(params, [r["final_val_loss"] for r in records], marker="o", color="tab:orange", label="validation loss")
    for r, x in zip(records, params):
        ax.annotate(f"~{r['settings']['table_rows']:,} rows/head", (x, r["final_val_loss"]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    for r in baseline:  # the same backbone without Engram, same steps and stream
        ax.axhline(r["final_val_loss"], color="tab:blue", ls="-.", label=f"baseline (no Engram) {r['final_val_loss']:.3f}")
    ax.set_xscale("log")
    ax.set_xlabel("Engram table parameters")
    ax.set_ylabel("validation loss (nats / token)")
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    for order, style in (("2", ":"), ("3", "--")):
        rates = [100 * r["collisions"][order]["collision_rate_per_head"] for r in records]
        twin.plot(params, rates, ls=style, color="grey", marker=".", label=f"{order}-gram collision rate per head")
    twin.set_ylabel("validation n-grams sharing their row (%)")
    lines = ax.get_legend_handles_labels()
    more = twin.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="upper center")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def curves_table(records: list[dict], every: int) -> str:
    """Validation checks every `every` steps, one column per variant."""
    steps = sorted({s for r in records for s in r["val_steps"] if s % every == 0 or s == r["steps"] - 1})
    lines = ["| step | " + " | ".join(r["name"] for r in records) + " |",
             "| ---: |" + " ---: |" * len(records)]
    for step in steps:
        cells = [f"{dict(zip(r['val_steps'], r['val_checks'])).get(step, float('nan')):.3f}" for r in records]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    lines.append("| final, all validation tokens | " + " | ".join(f"**{r['final_val_loss']:.4f}**" for r in records) + " |")
    lines.append("| train loss (EMA) at the end | " + " | ".join(f"{r['train_ema'][-1]:.2f}" for r in records) + " |")
    lines.append("| wall time (min) | " + " | ".join(f"{r['wall_seconds'] / 60:.1f}" for r in records) + " |")
    return "\n".join(lines)


def sweep_table(records: list[dict]) -> str:
    header = ("| rows / head (target) | table rows | table parameters | validation loss | 2-gram collisions / head | "
              "3-gram collisions / head | 3-grams colliding in all heads | wall time (min) |")
    lines = [header,
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted((r for r in records if r["overrides"] is not None), key=lambda r: r["params"]["table"]):
        c2, c3 = r["collisions"]["2"], r["collisions"]["3"]
        lines.append(f"| {r['settings']['table_rows']:,} | {r['table_rows']:,} | {r['params']['table'] / 1e6:.1f} M | "
                     f"{r['final_val_loss']:.4f} | {100 * c2['collision_rate_per_head']:.1f} % | "
                     f"{100 * c3['collision_rate_per_head']:.1f} % | {c3['colliding_all_heads']:,} of "
                     f"{c3['distinct_ngrams']:,} | {r['wall_seconds'] / 60:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m demo.curves", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a JSON-lines file written by python -m demo.ablations")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    parser.add_argument("--sweep", action="store_true", help="loss against table size instead of curves")
    parser.add_argument("--title", default=None)
    parser.add_argument("--every", type=int, default=100, help="table rows: a validation check every N steps")
    args = parser.parse_args(argv)
    records = load(args.results)
    if args.sweep:
        plot_sweep(records, args.out, args.title or "Validation loss against Engram table size")
        print(sweep_table(records))
    else:
        plot_curves(records, args.out, args.title or "Engram variants, same seed and token stream")
        print(curves_table(records, args.every))


if __name__ == "__main__":
    main()
