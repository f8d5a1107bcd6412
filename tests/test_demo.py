"""The demo: its parts (model, decoding, FLOPs, corpus split, collision counts) and a real quick run."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from demo.corpus import EXCLUDED_STDLIB_DIRS, load_corpus, stdlib_dir, stdlib_files
from demo.memory import count_collisions
from demo.model import GPT, GPTConfig
from demo.train import TrainConfig, batch_stream, lr_at
from engram_client.block import EngramBlock
from engram_client.config import EngramConfig
from engram_client.hashing import NgramHasher

REPO = Path(__file__).resolve().parents[1]
TINY = GPTConfig(vocab_size=97, block_size=32, n_layer=3, n_head=2, n_embd=32)
ENGRAM = EngramConfig(engram_vocab_size=[101, 103], max_ngram_size=3, n_embed_per_ngram=16,
                      n_head_per_ngram=2, layer_ids=[1], pad_id=0, kernel_size=3)


def tiny_engram_gpt(seed: int = 0) -> GPT:
    cfg = GPTConfig(**{**TINY.__dict__, "engram_layer": 1})
    return GPT(cfg, lambda layer, hidden: EngramBlock(ENGRAM, layer, hidden, vocab_size=cfg.vocab_size), seed=seed)


# ---- model --------------------------------------------------------------------------------------

def test_same_seed_gives_the_same_backbone_with_or_without_engram():
    base, eng = GPT(TINY, seed=3), tiny_engram_gpt(seed=3)
    eng_backbone = {n: p for n, p in eng.named_parameters() if ".engram." not in n}
    assert set(eng_backbone) == {n for n, _ in base.named_parameters()}
    for name, p in base.named_parameters():
        assert torch.equal(p, eng_backbone[name]), name


@pytest.mark.parametrize("make", [lambda: GPT(TINY, seed=1), lambda: tiny_engram_gpt(seed=1)], ids=["baseline", "engram"])
def test_incremental_decoding_matches_the_full_forward(make):
    model = make().eval()
    idx = torch.randint(0, TINY.vocab_size, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full, _ = model(idx)  # (B, T, V)
        state = model.init_state(2)
        prefill, _ = model(idx[:, :7], state=state)
        steps = [model(idx[:, t:t + 1], state=state)[0] for t in range(7, 20)]
    incremental = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(incremental, full, atol=1e-5, rtol=1e-4)


def test_generate_respects_block_size_and_is_reproducible():
    model = tiny_engram_gpt().eval()
    prompt = torch.tensor([[1, 2, 3]])
    a = model.generate(prompt, 100, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, 100, generator=torch.Generator().manual_seed(0))
    assert a.shape == (1, TINY.block_size) and torch.equal(a, b) and torch.equal(a[:, :3], prompt)


def test_flops_and_parameter_counts_by_hand():
    C, L, V, T = TINY.n_embd, TINY.n_layer, TINY.vocab_size, TINY.block_size
    base = GPT(TINY)
    linear = L * (3 * C * C + C * C + 8 * C * C) + V * C  # attn qkv + proj, mlp, lm_head
    assert base.flops_per_token()["forward"] == 2 * linear + 4 * L * T * C
    assert base.flops_per_token()["train"] == 3 * base.flops_per_token()["forward"]
    dense = V * C + T * C + L * (12 * C * C + 4 * C) + 2 * C  # wte (tied), wpe, blocks, ln_f
    assert base.param_counts() == {"dense": dense, "table": 0, "total": dense}

    eng = tiny_engram_gpt()
    E = ENGRAM.engram_dim
    extra_linear = 2 * E * C  # key and value projections
    extra_conv = C * ENGRAM.kernel_size  # depthwise
    assert eng.flops_per_token()["forward"] == base.flops_per_token()["forward"] + 2 * (extra_linear + extra_conv)
    assert eng.param_counts()["table"] == sum([101, 103, 107, 109]) * ENGRAM.head_dim


# ---- data ---------------------------------------------------------------------------------------

def test_stdlib_corpus_is_split_by_file_deterministically():
    a, b = load_corpus(), load_corpus()
    assert a.train_files == b.train_files and a.val_files == b.val_files and a.digest == b.digest
    assert not set(a.train_files) & set(a.val_files)
    assert set(a.train_files) | set(a.val_files) == set(stdlib_files())
    assert 0.05 < len(a.val_files) / len(stdlib_files()) < 0.2


def test_stdlib_tree_leaves_out_tests_packages_and_generated_code():
    root = stdlib_dir()
    tree = {str(p.relative_to(root)) for p in stdlib_files()}
    top = {str(p.relative_to(root)) for p in stdlib_files(top_level_only=True)}
    assert top < tree and "argparse.py" in top and "json/decoder.py" in tree
    assert not any(part in EXCLUDED_STDLIB_DIRS for path in tree for part in Path(path).parts[:-1])
    # only importable package folders: nothing install- or platform-specific (config-3.x-<triplet>/)
    assert all(part.isidentifier() for path in tree for part in Path(path).parts[:-1])
    assert not any("site-packages" in path or path.startswith("config-") for path in tree)
    assert "this.py" not in tree and not any(p.startswith("_sysconfigdata") for p in top)
    assert load_corpus("stdlib-top").train_files == [p for p in load_corpus("stdlib").train_files
                                                     if str(p.relative_to(root)) in top]


def test_user_folder_corpus_skips_binary_files(tmp_path):
    for i in range(12):
        (tmp_path / f"f{i}.txt").write_text(f"text file {i}\n")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01binary")
    corpus = load_corpus(tmp_path)
    names = {p.name for p in corpus.train_files + corpus.val_files}
    assert "blob.bin" not in names and len(names) == 12 and corpus.val_files


def test_batch_stream_is_a_function_of_the_seed():
    ids = np.arange(1000, dtype=np.uint16)
    first = [b["input_ids"] for b in batch_stream(ids, 4, 16, 3, seed=5)]
    again = [b["input_ids"] for b in batch_stream(ids, 4, 16, 3, seed=5)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    batch = next(batch_stream(ids, 4, 16, 1, seed=5))
    assert torch.equal(batch["targets"][:, :-1], batch["input_ids"][:, 1:])
    # 1000 tokens hold 58 windows of 17: the first 14 batches (56 windows) never repeat a token
    first_epoch = torch.cat([b["input_ids"].flatten() for b in batch_stream(ids, 4, 16, 14, seed=5)])
    assert len(set(first_epoch.tolist())) == first_epoch.numel()
    assert len(list(batch_stream(ids, 4, 16, 40, seed=5))) == 40  # later epochs reshuffle


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(99, cfg) == pytest.approx(0.1, abs=1e-3)


def test_collision_counts_match_brute_force():
    cfg = EngramConfig(engram_vocab_size=[11, 13], max_ngram_size=3, n_embed_per_ngram=4,
                       n_head_per_ngram=2, layer_ids=[0], pad_id=0)
    hasher = NgramHasher(cfg, vocab_size=50)
    ids = np.random.default_rng(0).integers(0, 50, size=(4, 40))
    stats = count_collisions(hasher, ids, 0)
    heads = hasher.hash_layer(ids, 0)  # (B, T, H)
    padded = np.concatenate([np.zeros((4, 2), dtype=np.int64), ids], axis=1)
    for order in (2, 3):
        for k in range(2):
            j = (order - 2) * 2 + k
            row_of = {}
            for b in range(4):
                for t in range(40):
                    row_of[tuple(padded[b, t + 3 - order:t + 3])] = heads[b, t, j]
            rows = list(row_of.values())
            colliding = sum(rows.count(r) > 1 for r in rows)
            head = next(h for h in stats["per_head"] if h["head"] == j)
            assert (head["distinct_ngrams"], head["colliding_ngrams"]) == (len(row_of), colliding)


# ---- the real thing -------------------------------------------------------------------------------

def run_demo(out: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "demo", "--quick", "--no-progress", "--out", str(out), *args],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.subprocess
def test_quick_demo_end_to_end(tmp_path):
    started = time.monotonic()
    proc = run_demo(tmp_path)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    assert time.monotonic() - started < 120, "the quick demo must finish in under 2 minutes"
    (run_dir,) = tmp_path.iterdir()
    for name in ("report.md", "metrics.json", "loss_curves.png"):
        assert (run_dir / name).stat().st_size > 0, name
    assert (run_dir / "loss_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run_dir / "memstore-data").exists()  # the daemon's data dir is cleaned up
    assert "memstore daemon stopped (exit code 0)" in output

    m = json.loads((run_dir / "metrics.json").read_text())
    uniform = math.log(m["tokenizer"]["vocab_size"])
    for name in ("baseline", "engram"):
        s = m["models"][name]["summary"]
        assert 0 < s["final_val_loss"] < uniform, (name, s)  # learned something
        assert s["final_val_ppl"] == pytest.approx(math.exp(s["final_val_loss"]))
        assert m["models"][name]["curves"]["train_loss"][-1] < m["models"][name]["curves"]["train_loss"][0]
        assert m["samples"][name].startswith("def ")
    eng = m["models"]["engram"]
    assert eng["params"]["table"] > 0 and eng["summary"]["rows_per_step_mean"] > 0
    table = m["memstore"]["tables"][0]
    assert table["rows_materialized"] > 0 and table["updates"] >= m["train"]["steps"]
    assert m["memstore"]["backend"] == "ram"
    for order in ("2", "3"):
        c = m["collisions"]["by_order"][order]
        assert c["distinct_ngrams"] > 0 and 0 <= c["collision_rate_per_head"] < 1
    assert "validation loss" in (run_dir / "report.md").read_text()


@pytest.mark.subprocess
@pytest.mark.parametrize("interrupt_at", ["memstore daemon: pid", "  engram step"], ids=["at-start", "mid-engram"])
def test_ctrl_c_stops_the_daemon(tmp_path, interrupt_at):
    proc = run_demo(tmp_path)
    daemon_pid = None
    while line := proc.stdout.readline():
        if line.startswith("memstore daemon: pid"):
            daemon_pid = int(line.split()[3].rstrip(","))
        if line.startswith(interrupt_at):
            break
    assert daemon_pid is not None
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=60)
    output = proc.stdout.read()  # the buffered rest (communicate() with a timeout would skip the buffer)
    assert proc.returncode == 130, output[-2000:]
    assert "memstore daemon stopped" in output
    with pytest.raises(ProcessLookupError):
        os.kill(daemon_pid, 0)


@pytest.mark.subprocess
def test_quick_demo_against_running_shards(tmp_path):
    """--memstore: no daemon of its own; the run's table lives on the given shards and is dropped after."""
    from engram_client.sharded import ShardedClient
    from tests.servers import ServeProcess

    shards = [ServeProcess(tmp_path / f"shard{i}", "ram", "--shard-index", str(i), "--shard-count", "2")
              for i in range(2)]
    for shard in shards:
        shard.start()
    try:
        targets = ",".join(s.target for s in shards)
        proc = run_demo(tmp_path / "runs", "--memstore", targets, "--steps", "20")
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, output[-3000:]
        assert "memstore daemon" not in output  # nothing was started
        (run_dir,) = (tmp_path / "runs").iterdir()
        m = json.loads((run_dir / "metrics.json").read_text())
        assert m["memstore"]["shards"] == 2 and m["memstore"]["tables"][0]["rows_materialized"] > 0
        with ShardedClient(targets) as client:
            assert client.list_tables() == []  # dropped at the end
    finally:
        for shard in shards:
            shard.stop()


# ---- experiment plots ------------------------------------------------------------------------------

def test_curves_plots_and_tabulates_ablation_records(tmp_path):
    from demo.curves import curves_table, load, main, sweep_table

    def record(name, rows, loss, overrides):
        return {"name": name, "steps": 3, "overrides": overrides, "final_val_loss": loss, "val_steps": [0, 2],
                "val_checks": [8.0, loss], "train_ema_steps": [0, 2], "train_ema": [8.0, loss - 1],
                "params": {"table": rows * 32}, "wall_seconds": 60.0, "train_tokens": 10_000,
                "settings": {"table_rows": rows // 8}, "table_rows": rows,
                "collisions": {o: {"collision_rate_per_head": 0.5, "colliding_all_heads": 1, "distinct_ngrams": 9}
                               for o in ("2", "3")}}

    results = tmp_path / "runs.jsonl"
    rows = [record("rows_10k", 80_000, 5.0, {"table_rows": 10_007}), record("baseline", 0, 5.2, None),
            record("rows_10k", 80_000, 4.9, {"table_rows": 10_007})]  # a rerun: the last record counts
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["final_val_loss"] for r in load(results)] == [4.9, 5.2]
    assert "| 2 | 4.900 | 5.200 |" in curves_table(load(results), every=1)
    assert "4.9000" in sweep_table(load(results)) and "5.2000" not in sweep_table(load(results))
    for extra in ([], ["--sweep"]):
        main([str(results), "--out", str(tmp_path / "plot.png"), *extra])
        assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


def test_ablations_runs_bare_and_names_unknown_variants(capsys):
    from demo.ablations import VARIANTS, parse_args
    assert set(parse_args([]).variants) <= set(VARIANTS)
    with pytest.raises(SystemExit):
        parse_args(["no_such_variant"])
    assert "unknown variant(s) no_such_variant" in capsys.readouterr().err
