"""The demo's outputs: the console summary table, report.md, metrics.json and the loss-curve plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from demo.train import RunResult


def _fmt_count(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def summary_rows(metrics: dict) -> list[tuple[str, str, str]]:
    """(metric, baseline, engram) rows shared by the console table and report.md."""
    base, eng = metrics["models"]["baseline"], metrics["models"]["engram"]
    b, e = base["summary"], eng["summary"]
    rows = [
        ("validation loss (nats/token)", f"{b['final_val_loss']:.4f}", f"{e['final_val_loss']:.4f}"),
        ("validation perplexity", f"{b['final_val_ppl']:.2f}", f"{e['final_val_ppl']:.2f}"),
        ("dense parameters", _fmt_count(base["params"]["dense"]), _fmt_count(eng["params"]["dense"])),
        ("Engram table parameters", "-", _fmt_count(eng["params"]["table"])),
        ("train FLOPs / token", _fmt_count(base["flops"]["train"]), _fmt_count(eng["flops"]["train"])),
        ("step time, median (ms)", f"{b['step_ms_median']:.0f}", f"{e['step_ms_median']:.0f}"),
        ("train tokens / s", f"{b['tokens_per_s']:,.0f}", f"{e['tokens_per_s']:,.0f}"),
        ("machine load while training (1-min avg)", f"{b['load_avg_mean']:.1f}", f"{e['load_avg_mean']:.1f}"),
        ("prefetch wait / step, mean (ms)", "-", f"{e['prefetch_wait_ms_mean']:.1f}"),
        ("unique table rows / step", "-", f"{e['rows_per_step_mean']:,.0f}"),
    ]
    return rows


def memstore_rows(metrics: dict) -> list[tuple[str, str]]:
    """(name, description) of the memstore table and of the hash collisions."""
    out = []
    memstore = metrics.get("memstore") or {}
    for t in memstore.get("tables", []):
        usage = (f"{t['num_rows']:,} rows x {t['dim']} {t['dtype']}, {t['optimizer']}; "
                 f"{t['rows_materialized']:,} rows materialised, {t['bytes_used'] / 2**20:.1f} MiB; "
                 f"rows read through {memstore.get('rows_path', 'gRPC')} ({t['lookups']:,} gRPC lookups), "
                 f"{t['updates']:,} updates")
        out.append((f"table {t['name']}", usage))
    for order, c in sorted(metrics.get("collisions", {}).get("by_order", {}).items()):
        seen = (f"{c['distinct_ngrams']:,} distinct n-grams; {100 * c['collision_rate_per_head']:.1f}% share "
                f"their row with another in a head (~{c['table_size_per_head']:,} rows/head); "
                f"{c['colliding_all_heads']:,} collide in every head")
        out.append((f"{order}-gram hash collisions (validation)", seen))
    return out


def console_table(metrics: dict) -> str:
    rows = summary_rows(metrics)
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len("baseline"), *(len(r[1]) for r in rows))
    w2 = max(len("engram"), *(len(r[2]) for r in rows))
    lines = [f"{'':{w0}}  {'baseline':>{w1}}  {'engram':>{w2}}", "-" * (w0 + w1 + w2 + 4)]
    lines += [f"{a:{w0}}  {b:>{w1}}  {c:>{w2}}" for a, b, c in rows]
    lines += [f"{name}: {value}" for name, value in memstore_rows(metrics)]
    return "\n".join(lines)


def markdown_table(metrics: dict) -> str:
    lines = ["| | baseline | engram |", "| --- | ---: | ---: |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(metrics)]
    return "\n".join(lines)


def plot_losses(results: list[RunResult], path: Path) -> None:
    """Train loss (smoothed) and validation loss of every model against step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    for result, color in zip(results, ("tab:blue", "tab:orange", "tab:green")):
        ax.plot(result.steps, ema(result.train_loss), color=color, alpha=0.6, lw=1,
                label=f"{result.name} train (EMA 0.9)")
        ax.plot(result.val_steps, result.val_loss, color=color, marker="o", ms=3, lw=1.5,
                label=f"{result.name} validation check (first windows only)")
        ax.plot(result.steps[-1], result.final_val_loss, color=color, marker="*", ms=11, ls="none",
                label=f"{result.name} final, all validation tokens: {result.final_val_loss:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("Baseline vs Engram: same seed, same token stream")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def ema(values: list[float], decay: float = 0.9) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else decay * acc + (1 - decay) * v
        out.append(acc)
    return out


def write_outputs(run_dir: Path, metrics: dict, results: list[RunResult]) -> dict[str, Path]:
    paths = {"metrics": run_dir / "metrics.json", "report": run_dir / "report.md",
             "plot": run_dir / "loss_curves.png"}
    paths["metrics"].write_text(json.dumps(_jsonable(metrics), indent=2) + "\n")
    plot_losses(results, paths["plot"])
    paths["report"].write_text(report_markdown(metrics))
    return paths


FLOPS_NOTE = ("FLOPs/token: 6 x matmul weights (every Linear incl. the tied lm_head, the depthwise conv) "
              "+ 12 x layers x T x C for attention (PaLM convention, full T); table lookups, norms and gates "
              "count 0.")


def report_markdown(metrics: dict) -> str:
    run, corpus, tok = metrics["run"], metrics["corpus"], metrics["tokenizer"]
    eng_cfg, b, e = metrics["engram"], metrics["models"]["baseline"], metrics["models"]["engram"]
    b_loss, e_loss = b["summary"]["final_val_loss"], e["summary"]["final_val_loss"]
    verdict = (f"At {metrics['train']['steps']} steps on the same token stream, the Engram model's validation "
               f"loss is **{abs(e_loss - b_loss):.4f} nats/token {'lower' if e_loss < b_loss else 'higher'}** "
               f"than the baseline's ({e_loss:.4f} vs {b_loss:.4f}).")
    val_names = ", ".join(corpus["val_names"][:20]) + (" ..." if len(corpus["val_names"]) > 20 else "")
    tokens = (f"byte-level BPE, {tok['vocab_size']} ids ({tok['compressed_vocab']} after Engram compression); "
              f"{tok['train_tokens']:,} train / {tok['val_tokens']:,} validation tokens")
    lines = [
        f"# Engram demo run {run['timestamp']}",
        "",
        f"Command: `{run['command']}`  ",
        f"Machine: {run['machine']}  ",
        f"Wall time: {run['wall_seconds']:.0f} s (torch threads: {run['torch_threads']})",
        "",
        "## Result",
        "",
        verdict,
        "",
        markdown_table(metrics),
        "",
        "![loss curves](loss_curves.png)",
        "",
        "## Memory",
        "",
        *[f"- {name}: {value}" for name, value in memstore_rows(metrics)],
        f"- tables: {eng_cfg['tables']}; server: {eng_cfg.get('server', '-')}",
        "",
        "## Setup",
        "",
        f"- corpus: {corpus['description']}; split by file, validation files: {val_names}",
        f"- tokenizer: {tokens}",
        f"- model (baseline; the Engram model adds engram_layer): `{metrics['model_config']}`",
        f"- training: `{metrics['train']}`",
        (f"- Engram: `{eng_cfg['config']}`, table lr {eng_cfg['table_lr']} ({eng_cfg.get('table_lr_schedule', 'constant')}), "
        f"row dropout {eng_cfg.get('row_dropout', 0.0)}, mode {eng_cfg['mode']}"),
        f"- {FLOPS_NOTE}",
        "",
        "## Samples (incremental decoding, temperature 0.8, top-k 50)",
        "",
    ]
    for name, text in metrics.get("samples", {}).items():
        lines += [f"**{name}**", "", "```python", text, "```", ""]
    return "\n".join(lines)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return None if not math.isfinite(float(obj)) else float(obj)
    return obj
