"""`python -m bench` (`make bench`): memstore measured side by side with its limits and peers.

    python -m bench                       # full run, ~15 minutes on 2 cores (decode ~5 of them)
    python -m bench --quick               # ~1 minute, indicative only
    python -m bench --only lookup,update  # some sections (lookup update hashing e2e decode scaling cache)

Writes bench/results/<stamp>.md, .json and PNG plots, and prints a summary. Before anything else the
process re-executes itself with glibc's mmap/trim thresholds raised (LIMITS.md: large gRPC messages
otherwise pay ~6000 page faults per 8 MiB); server subprocesses inherit the same environment.
`--default-malloc` measures without it.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
import tempfile
import time
import traceback
from datetime import datetime
from pathlib import Path

from bench.config import SECTIONS, BenchConfig, quick_config
from bench.report import Goal, Section, print_summary, write_results

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1073741824", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
RESULTS_DIR = Path(__file__).parent / "results"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small tables, few sizes and rounds (~1 minute)")
    p.add_argument("--only", help=f"comma-separated sections out of: {','.join(SECTIONS)}")
    p.add_argument("--out", type=Path, default=RESULTS_DIR, help="results directory (default bench/results)")
    p.add_argument("--work-dir", type=Path, help="where data dirs go (default: a temporary directory)")
    p.add_argument("--rows", type=int, help="rows of the lookup tables")
    p.add_argument("--sizes", help="comma-separated lookup batch sizes (ids per call)")
    p.add_argument("--dtypes", help="comma-separated: float16,float32")
    p.add_argument("--rounds", type=int, help="interleaved rounds per setting (medians are over these)")
    p.add_argument("--e2e-steps", type=int, help="training steps per round and model in the end-to-end run")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--profile", action="store_true",
                   help="py-spy the servers and the client during the 64k lookups (files in --out)")
    p.add_argument("--default-malloc", action="store_true", help="keep glibc's default malloc thresholds")
    return p.parse_args(argv)


def build_config(args: argparse.Namespace) -> BenchConfig:
    cfg = quick_config() if args.quick else BenchConfig()
    changes: dict = {}
    if args.only:
        wanted = tuple(s.strip() for s in args.only.split(",") if s.strip())
        unknown = set(wanted) - set(SECTIONS)
        if unknown:
            raise SystemExit(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
        changes["sections"] = tuple(s for s in SECTIONS if s in wanted)
    if args.rows:
        changes.update(rows=args.rows, update_rows=min(cfg.update_rows, args.rows))
    if args.sizes:
        sizes = tuple(int(s) for s in args.sizes.split(","))
        changes.update(lookup_sizes=sizes, zipf_size=sizes[-1] if 65536 not in sizes else 65536,
                       update_size=min(cfg.update_size, max(sizes)), scaling_sizes=sizes[-1:])
    if args.dtypes:
        changes["dtypes"] = tuple(args.dtypes.split(","))
    if args.rounds:
        changes.update(rounds=args.rounds, decode_rounds=args.rounds)
    if args.e2e_steps:
        changes["e2e_steps"] = args.e2e_steps
    if args.no_plots:
        changes["plots"] = False
    return dataclasses.replace(cfg, **changes)


def reexec_with_malloc_env(argv: list[str]) -> None:
    """glibc reads MALLOC_* only at start-up: set them and start again (once)."""
    if all(os.environ.get(k) == v for k, v in MALLOC_ENV.items()):
        return
    os.execve(sys.executable, [sys.executable, "-m", "bench", *argv], {**os.environ, **MALLOC_ENV})


def run_section(name: str, cfg: BenchConfig, work: Path) -> Section:
    """Run `bench.<name>.run`; a section that fails is reported as failed, the others still run."""
    (work / name).mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    print(f"[bench] {name} ...", flush=True)
    try:
        section = importlib.import_module(f"bench.{name}").run(cfg, work / name)
    except Exception as exc:  # noqa: BLE001 - reported in the results, and the exit code says so
        traceback.print_exc()
        section = Section(name, name, failed=f"{type(exc).__name__}: {exc}")
    section.seconds = time.perf_counter() - started
    section.load = (load_before, os.getloadavg()[0])
    print(f"[bench] {name} {'FAILED' if section.failed else 'done'} in {section.seconds:.0f} s", flush=True)
    return section


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not args.default_malloc:
        reexec_with_malloc_env(argv)
    cfg = build_config(args)
    stamp = datetime.now().strftime("%Y-%m-%d_%H%M%S")
    if args.profile:
        args.out.mkdir(parents=True, exist_ok=True)
        cfg.profile_prefix = str(args.out / f"{stamp}-pyspy-")
    from bench.goals import evaluate_goals  # imported after the re-exec: they pull in torch, grpc
    from bench.plots import make_plots
    with tempfile.TemporaryDirectory(prefix="memstore-bench-", dir=args.work_dir) as tmp:
        sections = [run_section(name, cfg, Path(tmp)) for name in cfg.sections]
    goals: list[Goal] = evaluate_goals(sections)
    plots = make_plots(sections, args.out, stamp) if cfg.plots else []
    md, js = write_results(args.out, stamp, dataclasses.asdict(cfg), sections, goals, plots)
    print_summary(sections, goals)
    print(f"\nresults: {md} {js}" + "".join(f" {p}" for p in plots))
    return 1 if any(s.failed for s in sections) else 0


if __name__ == "__main__":
    raise SystemExit(main())
