"""Results: what each section returns, the printed summary, `results/<stamp>.md` + `.json`, plots."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

MALLOC_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


@dataclass
class Section:
    """One benchmark section's outcome.

    records: every measurement, flat and JSON-able (medians, spreads, raw per-round seconds).
    table:   the human summary, one dict per line (column -> already formatted text).
    """
    name: str
    title: str
    records: list[dict] = field(default_factory=list)
    table: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: str | None = None        # why the whole section did not run (something missing)
    failed: str | None = None         # the error that stopped it
    seconds: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before, after


@dataclass
class Goal:
    what: str
    target: str
    measured: float | None
    passed: bool | None               # None: not measured in this run

    @property
    def verdict(self) -> str:
        return "n/a" if self.passed is None else ("met" if self.passed else "MISSED")


def rate(x: float) -> str:
    """Rows per second, compact: 1.23 M/s, 456 k/s."""
    if x >= 1e6:
        return f"{x / 1e6:.2f} M/s"
    return f"{x / 1e3:.0f} k/s" if x >= 1e3 else f"{x:.0f} /s"


def spread(record: dict) -> str:
    return f"{record['rate_min'] / 1e6:.2f}-{record['rate_max'] / 1e6:.2f} M"


def markdown_table(lines: list[dict[str, str]]) -> str:
    if not lines:
        return ""
    headers = list(lines[0])
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(line.get(h, "")) for h in headers) + " |" for line in lines]
    return "\n".join(out)


def text_table(lines: list[dict[str, str]]) -> str:
    if not lines:
        return ""
    headers = list(lines[0])
    widths = [max(len(h), *(len(str(line.get(h, ""))) for line in lines)) for h in headers]
    row = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    return "\n".join([row(headers), row("-" * w for w in widths)] +
                     [row(line.get(h, "") for h in headers) for line in lines])


def machine_info() -> dict:
    """What the numbers were measured on: they mean little without it."""
    import grpc
    import lmdb
    import numpy
    import torch
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "mem_gib": round(mem_gib, 1),
            "python": platform.python_version(), "numpy": numpy.__version__, "torch": torch.__version__,
            "grpcio": grpc.__version__, "lmdb": lmdb.__version__, "git": _git_head(),
            "malloc_env": {k: os.environ.get(k) for k in MALLOC_VARS}}


def _git_head() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def render_markdown(stamp: str, info: dict, config: dict, sections: list[Section], goals: list[Goal],
                    plots: list[str]) -> str:
    out = [f"# memstore benchmark {stamp}", "",
           (f"Machine: {info['cpu']}, {info['cores']} cores, {info['mem_gib']} GiB; Python {info['python']}, "
            f"numpy {info['numpy']}, torch {info['torch']}, grpcio {info['grpcio']}, py-lmdb {info['lmdb']}; "
            f"git {info['git']}."),
           f"malloc env (server and client): {info['malloc_env']}.",
           (f"Command: `{' '.join(sys.argv)}`. All rates: medians over interleaved rounds, spread = "
            "slowest-fastest round. See bench/README.md for how to read them."), "", "## Goals", "",
           markdown_table([{"goal": g.what, "target": g.target,
                            "measured": "-" if g.measured is None else f"{g.measured:.3g}",
                            "verdict": g.verdict} for g in goals]), ""]
    for s in sections:
        out += [f"## {s.title}", ""]
        if s.skipped or s.failed:
            out += [f"Skipped: {s.skipped}" if s.skipped else f"FAILED: {s.failed}", ""]
            continue
        out += [markdown_table(s.table), ""]
        out += [f"- {n}" for n in s.notes]
        out += [f"- {s.seconds:.0f} s; load average {s.load[0]:.2f} before, {s.load[1]:.2f} after.", ""]
    out += [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    out += ["", "Config: `" + json.dumps(config) + "`", ""]
    return "\n".join(out)


def write_results(out_dir: Path, stamp: str, config: dict, sections: list[Section], goals: list[Goal],
                  plots: list[str]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    md = out_dir / f"{stamp}.md"
    js = out_dir / f"{stamp}.json"
    md.write_text(render_markdown(stamp, info, config, sections, goals, plots))
    js.write_text(json.dumps({"stamp": stamp, "machine": info, "config": config,
                              "goals": [asdict(g) for g in goals],
                              "sections": [asdict(s) for s in sections], "plots": plots}, indent=1))
    return md, js


def print_summary(sections: list[Section], goals: list[Goal]) -> None:
    for s in sections:
        print(f"\n== {s.title} ==")
        if s.skipped or s.failed:
            print(f"skipped: {s.skipped}" if s.skipped else f"FAILED: {s.failed}")
            continue
        print(text_table(s.table))
        for note in s.notes:
            print(f"  * {note}")
    print("\n== Goals ==")
    print(text_table([{"goal": g.what, "target": g.target,
                       "measured": "-" if g.measured is None else f"{g.measured:.3g}", "verdict": g.verdict}
                      for g in goals]))
