"""PNG plots of a run: lookup rows/s vs batch size per system, step times, scaling, cache."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from bench.report import Section


def make_plots(sections: list[Section], out_dir: Path, stamp: str) -> list[str]:
    """Write every plot this run has data for; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    out_dir.mkdir(parents=True, exist_ok=True)
    by_name = {s.name: s for s in sections if not (s.skipped or s.failed)}
    plotters = {"lookup": _lookup, "e2e": _e2e, "decode": _decode, "scaling": _scaling, "cache": _cache}
    paths = []
    for name, plot in plotters.items():
        if name in by_name and by_name[name].records:
            path = out_dir / f"{stamp}-{name}.png"
            plot(by_name[name], path)
            paths.append(str(path))
    return paths


def _lookup(section: Section, path: Path) -> None:
    import matplotlib.pyplot as plt
    dtypes = sorted({r["dtype"] for r in section.records})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 4.8), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        lines = defaultdict(list)
        for r in section.records:
            if r["dtype"] == dtype and r["dist"] == "uniform":
                lines[r["system"]].append((r["size"], r["rate"], r["rate_min"], r["rate_max"]))
        for system, points in lines.items():
            points.sort()
            sizes, rates, lo, hi = zip(*points)
            below = [r - a for r, a in zip(rates, lo)]
            above = [b - r for r, b in zip(rates, hi)]
            ax.errorbar(sizes, rates, yerr=[below, above], marker="o", capsize=3, label=system)
        ax.set(xscale="log", yscale="log", xlabel="ids per lookup", ylabel="rows/s (median, bars: spread)",
               title=f"lookup, dim {section.records[0].get('dim', 64)}, {dtype}, uniform ids")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _e2e(section: Section, path: Path) -> None:
    import matplotlib.pyplot as plt
    records = section.records
    fig, ax = plt.subplots(figsize=(6.5, 4))
    names = [r["variant"] for r in records]
    means = [r["step_ms_mean"] for r in records]
    baselines = {"local (in-process)", "2 ranks: DDP, local tables"}  # what the ratios are relative to
    bars = ax.barh(names, means, color=["tab:gray" if n in baselines else "tab:blue" for n in names])
    for bar, r in zip(bars, records):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f"  x{r['ratio_mean']:.3f}", va="center")
    ax.axvline(means[0] * 1.03, color="tab:red", linestyle="--", label="goal: local x 1.03")
    ax.set(xlabel="mean training step time, ms", title="end to end: demo GPT with an Engram layer")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _decode(section: Section, path: Path) -> None:
    import matplotlib.pyplot as plt
    records = section.records
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(records) + 1.5))
    names = [r["variant"] for r in records]
    rates = [r["tokens_per_s"] for r in records]
    colors = ["tab:gray" if r["variant"] == r["baseline"] else "tab:blue" for r in records]
    bars = ax.barh(names, rates, color=colors)
    for bar, r in zip(bars, records):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f"  x{r['ratio']:.3f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="generated tokens/s (prefills included)", title="generation: Engram tables local vs memstore")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scaling(section: Section, path: Path) -> None:
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for size in sorted({r["size"] for r in section.records}):
        points = sorted((r["shards"], r["rate"]) for r in section.records if r["size"] == size)
        ax.plot(*zip(*points), marker="o", label=f"{size:,} ids")
    ax.set(xlabel="shards (memstore serve processes on loopback)", ylabel="rows/s", title="lookup scaling")
    ax.set_xticks(sorted({r["shards"] for r in section.records}))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cache(section: Section, path: Path) -> None:
    import matplotlib.pyplot as plt
    records = sorted((r for r in section.records if r["capacity_fraction"] > 0),
                     key=lambda r: r["capacity_fraction"])
    base = next((r["rate"] for r in section.records if r["capacity_fraction"] == 0), None)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    x = [100 * r["capacity_fraction"] for r in records]
    ax.plot(x, [100 * r["hit_rate"] for r in records], marker="o", color="tab:green", label="hit rate, %")
    ax.set(xscale="log", xlabel="cache size, % of table", ylabel="hit rate (unique ids), %",
           title="client hot-row cache, Zipfian ids")
    twin = ax.twinx()
    twin.plot(x, [r["rate"] for r in records], marker="s", color="tab:blue", label="ids/s with cache")
    if base:
        twin.axhline(base, color="tab:blue", linestyle="--", label="ids/s without cache")
    twin.set_ylabel("ids/s")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=8, loc="center left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
