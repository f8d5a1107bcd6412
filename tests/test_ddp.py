"""Data-parallel training jobs against memstore, with real processes: each rank is a
`tests.ddp_worker` process (torch.distributed gloo, DDP for the dense part), the table lives on a
2-shard memstore. Two ranks must train exactly like one process on the global batch; a rank that
dies must not hang the others nor leave half a step applied; a job resumes from its checkpoint.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engram_client import ShardedClient
from memstore import optimizers
from memstore.protocol import sum_duplicates
from memstore.spec import OptimizerSpec
from tests.servers import in_process
from tests.test_remote_training import LR

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]
ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def shards(tmp_path):
    servers = [in_process(tmp_path / f"shard{i}", "ram", shard_index=str(i), shard_count=2) for i in range(2)]
    for server in servers:
        server.start()
    yield ",".join(s.target for s in servers)
    for server in servers:
        server.stop()


def run_job(targets: str, out: Path, world_size: int, *args: str, timeout_s: float = 240) -> list[int]:
    """Start `world_size` ranks and wait for all; returns their exit codes."""
    out.mkdir(parents=True, exist_ok=True)
    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tests.ddp_worker", "--targets", targets, "--out", str(out), *args],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(out / f"stderr-{rank}.txt", "wb")))  # noqa: SIM115
    deadline = time.monotonic() + timeout_s
    for proc in procs:
        proc.wait(max(1.0, deadline - time.monotonic()))
    return [p.returncode for p in procs]


def errors(out: Path) -> str:
    return "\n".join(p.read_text() for p in sorted(out.glob("error-*.txt")) + sorted(out.glob("stderr-*.txt")))


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "adam"])
def test_two_ranks_train_like_one_process_on_the_global_batch(tmp_path, shards, kind):
    common = ("--optimizer", kind, "--steps", "10")
    assert run_job(shards, tmp_path / "ddp", 2, *common, "--job", f"ddp-{kind}") == [0, 0], errors(tmp_path / "ddp")
    ddp = torch.load(tmp_path / "ddp" / "rows-10.pt")
    # The reference trains a fresh table of the same name on fresh shards: drop the job's first.
    with ShardedClient(shards) as client:
        client.drop_table("emb")
    assert run_job(shards, tmp_path / "one", 1, *common, "--global-world", "2") == [0], errors(tmp_path / "one")
    one = torch.load(tmp_path / "one" / "rows-10.pt")
    assert not torch.equal(ddp["rows"], torch.zeros_like(ddp["rows"]))
    torch.testing.assert_close(ddp["rows"], one["rows"], rtol=1e-4, atol=1e-5)
    for name, value in one["dense"].items():
        torch.testing.assert_close(ddp["dense"][name], value, rtol=1e-4, atol=1e-5, msg=name)


def _as_numpy(log: dict) -> dict:
    return {key: [(step, a.numpy(), b.numpy()) for step, a, b in entries] for key, entries in log.items()}


def replay_table_states(logs: list[dict], num_rows: int, initial: np.ndarray, lr: float) -> list[np.ndarray]:
    """S[k] = the table after k steps, recomputed from what the ranks sent, as the server does
    it (rank-ordered contributions, the mean over ranks, then sgd)."""
    steps = max(step for log in logs for step, _, _ in log["sent"]) + 1
    states, rows = [initial.copy()], initial.copy()
    for step in range(steps):
        parts = [next((i, g) for s, i, g in log["sent"] if s == step) for log in logs]
        ids = np.concatenate([p[0] for p in parts])
        grads = np.concatenate([p[1] for p in parts]).astype(np.float32) * np.float32(1 / len(logs))
        ids, grads = sum_duplicates(ids, grads)
        touched = rows[ids]
        optimizers.step(OptimizerSpec("sgd", lr), touched, np.zeros((len(ids), 0), np.float32), grads)
        rows[ids] = touched
        states.append(rows.copy())
    return states


def test_async_lookups_miss_at_most_the_previous_step(tmp_path, shards):
    out = tmp_path / "async"
    assert run_job(shards, out, 2, "--mode", "async", "--steps", "8", "--record", "--dump-at", "0") == [0, 0], \
        errors(out)
    logs = [_as_numpy(torch.load(out / f"log-{rank}.pt", weights_only=True)) for rank in range(2)]
    initial = torch.load(out / "rows-0.pt")["rows"].numpy()
    states = replay_table_states(logs, len(initial), initial, LR["sgd"])
    np.testing.assert_allclose(states[-1], torch.load(out / "rows-8.pt")["rows"].numpy(), rtol=0, atol=1e-6)
    reads = [read for log in logs for read in log["reads"]]
    assert len(reads) == 16
    for step, ids, rows in reads:
        fresh = np.isclose(rows, states[step][ids], rtol=0, atol=1e-6).all(axis=1)       # all steps < step
        one_behind = np.isclose(rows, states[max(0, step - 1)][ids], rtol=0, atol=1e-6).all(axis=1)
        assert (fresh | one_behind).all(), f"step {step}: rows older than the previous step"


def test_killed_rank_fails_the_others_cleanly_and_the_job_resumes(tmp_path, shards):
    # No DDP here: a dead peer would fail gloo's all-reduce first; this test is about memstore's answer.
    job = ("--job", "resumable", "--steps", "8", "--step-timeout", "3", "--optimizer", "adam", "--no-ddp")
    # Reference: uninterrupted, rows dumped after 5 steps and at the end. Each run trains the
    # table from scratch, so the reference goes first and its table is dropped afterwards.
    ref = tmp_path / "ref"
    assert run_job(shards, ref, 2, *job, "--dump-at", "5") == [0, 0], errors(ref)
    with ShardedClient(shards) as client:
        client.drop_table("emb")

    run = tmp_path / "run"
    started = time.monotonic()
    codes = run_job(shards, run, 2, *job, "--checkpoint-at", "3", "--die-at", "5")
    assert codes[1] == -9 and codes[0] == 3, errors(run)
    assert time.monotonic() - started < 60
    error = (run / "error-0.txt").read_text()
    assert "StepFailed" in error and "ABORTED" in error and "rank(s) [1]" in error and "step 5" in error, error
    with ShardedClient(shards) as client:  # nothing of step 5 on any shard: the table is as after step 4
        rows = client.lookup("emb", np.arange(len(torch.load(ref / "rows-5.pt")["rows"])))
    np.testing.assert_array_equal(rows, torch.load(ref / "rows-5.pt")["rows"].numpy())

    (run / "error-0.txt").unlink()
    assert run_job(shards, run, 2, *job, "--resume") == [0, 0], errors(run)
    resumed, uninterrupted = torch.load(run / "rows-8.pt"), torch.load(ref / "rows-8.pt")
    np.testing.assert_array_equal(resumed["rows"].numpy(), uninterrupted["rows"].numpy())


def test_the_ddp_example_runs_and_resumes_under_torchrun(tmp_path, shards):
    def torchrun(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
             str(free_port()), str(ROOT / "examples" / "ddp_train.py"), "--targets", shards,
             "--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "5", *args],
            check=False, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout
    assert "done: 12 steps" in torchrun("--steps", "12")
    resumed = torchrun("--steps", "14", "--resume")
    assert "resumed at step 10" in resumed and "done: 14 steps" in resumed, resumed
