"""The benchmark suite (`make bench`): its timing helpers, and a tiny end-to-end run of every section."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import procs
from bench.timing import ZipfIds, side_by_side

REPO = Path(__file__).resolve().parents[1]


def test_zipf_ids_follow_the_power_law():
    zipf = ZipfIds(1000, s=1.1, seed=0)
    ids = zipf.sample(400_000)
    assert ids.min() >= 0 and ids.max() < 1000
    counts = np.bincount(ids, minlength=1000)[zipf.row_of_rank]           # by rank
    assert counts[0] / counts[1] == pytest.approx(2 ** 1.1, rel=0.05)     # P(k) ~ 1 / k^s
    assert counts[0] / counts[9] == pytest.approx(10 ** 1.1, rel=0.1)
    assert zipf.row_of_rank[0] != 0 or zipf.row_of_rank[1] != 1           # hot rows are scattered


def test_side_by_side_times_every_system_in_rotating_order():
    order = []
    calls = {name: (lambda i, n=name: order.append(n)) for name in "abc"}
    seconds = side_by_side(calls, rounds=3, min_sample_s=0.0)
    assert {name: len(s) for name, s in seconds.items()} == {"a": 3, "b": 3, "c": 3}
    timed = order[3:]                                                      # after one warm-up call each
    assert timed == list("abc" "bca" "cab")


def test_missing_redis_is_explained(monkeypatch):
    monkeypatch.setattr(procs.shutil, "which", lambda name: None)
    monkeypatch.setattr(procs.os, "access", lambda path, mode: False)
    path, why = procs.find_redis()
    assert path is None and "apt-get install redis-server" in why


@pytest.mark.subprocess
def test_quick_bench_runs_every_section(tmp_path):
    """A tiny `python -m bench --quick`: every section runs against real servers and writes results."""
    cmd = [sys.executable, "-m", "bench", "--quick", "--rows", "60000", "--sizes", "1024,4096",
           "--rounds", "2", "--e2e-steps", "2", "--out", str(tmp_path / "results"),
           "--work-dir", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    [js] = (tmp_path / "results").glob("*.json")
    result = json.loads(js.read_text())
    sections = {s["name"]: s for s in result["sections"]}
    assert list(sections) == ["lookup", "update", "hashing", "e2e", "decode", "scaling", "cache"]
    assert all(s["records"] for s in sections.values() if not s["skipped"])
    systems = {r["system"] for r in sections["lookup"]["records"]}
    assert {"numpy gather", "memstore ram", "memstore ram same-host", "memstore lmdb", "memstore lmdb same-host",
            "lmdb get loop"} <= systems
    redis_found = procs.find_redis()[0] is not None
    assert ("redis MGET" in systems) == redis_found
    assert [g["target"] for g in result["goals"]] == [">= 0.25", ">= 10", ">= 1.5", "<= 1.03", ">= 0.5", ">= 30",
                                                         ">= 0.97", ">= 0.97"]
    assert js.with_suffix(".md").exists()
    assert len(list((tmp_path / "results").glob("*.png"))) == 5
    assert result["machine"]["malloc_env"]["MALLOC_MMAP_THRESHOLD_"] == "1073741824"  # re-executed with it
