"""The examples run as a user runs them (a subprocess each), with their memstore paths: a daemon
given by address, and one the example starts itself."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from engram_client import MemStoreClient
from tests.servers import in_process

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True,
                            timeout=240, check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_gpt_example_trains_its_table_on_a_running_memstore(tmp_path):
    with in_process(tmp_path / "data") as server:
        out = run_example("gpt_with_engram.py", "--steps", "60", "--memstore", server.target)
        with MemStoreClient(server.target) as client:
            table = client.describe_table("gpt_engram_l2")
        assert f"its table on memstore at {server.target}" in out, out
    losses = [float(x) for x in re.findall(r"step +\d+ +loss ([\d.]+)", out)]
    assert losses[-1] < losses[0] - 1.0, out
    assert table.updates == 61, table  # the server's Adam took every step (steps 0..60)


def test_hf_example_trains_and_generates_with_the_decoding_state():
    pytest.importorskip("transformers")
    out = run_example("hf_llama_engram.py", "--steps", "40")
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert last < first - 1.0, out
    assert "generate with the Engram state == full recompute: True" in out, out


def test_hf_example_with_the_trainer_on_a_memstore_daemon_it_starts(tmp_path):
    pytest.importorskip("transformers")
    out = run_example("hf_llama_engram.py", "--memstore", "--trainer", "--model", "qwen2", "--steps", "24",
                      "--output-dir", str(tmp_path / "run"))
    assert "tables on memstore at 127.0.0.1:" in out, out
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert last < first, out
    assert (tmp_path / "run" / "checkpoint-12" / "engram_tables.json").exists()
    assert "generate with the Engram state == full recompute: True" in out, out
