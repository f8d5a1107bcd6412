"""`python -m demo` (`make demo`): a memstore daemon, a baseline GPT and an Engram GPT, a report.

    make demo                          # 5-8 min on 2 CPU cores
    make demo ARGS="--quick"           # < 2 min smoke run
    make demo ARGS="--memstore h1:50051,h2:50051"   # train against running shards
    python -m demo --help              # every knob
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path

import torch

from demo.cluster import MemstoreDaemon
from demo.corpus import load_corpus
from demo.memory import EngramMemory, EngramSettings
from demo.model import GPT, GPTConfig
from demo.report import console_table, write_outputs
from demo.settings import CACHE_DIR, DEFAULTS, QUICK
from demo.tokenizer import tokenize_corpus
from demo.train import TrainConfig, train_model, val_windows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny smoke run (< 2 min); explicit flags still win")
    p.add_argument("--out", default="runs", help="runs are written to OUT/<UTC timestamp>/")
    g = p.add_argument_group("corpus")
    g.add_argument("--corpus", default=None,
                   help="stdlib (default: this Python's stdlib *.py tree, tests left out), stdlib-top (its "
                        "top-level modules only) or a folder of text files")
    g.add_argument("--max-corpus-mb", type=float, default=None, help="cap the train text (MB; 0 = all)")
    g.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary (default 4096)")
    g.add_argument("--val-tokens", type=int, default=None, help="validation tokens evaluated at the end (0 = all)")
    g = p.add_argument_group("model and training")
    g.add_argument("--steps", type=int, default=None, help="training steps per model (default 300)")
    g.add_argument("--batch-size", type=int, default=None, help="sequences per step (default 16)")
    g.add_argument("--block-size", type=int, default=None, help="context length T (default 128)")
    g.add_argument("--n-layer", type=int, default=None, help="transformer blocks (default 4)")
    g.add_argument("--n-head", type=int, default=None, help="attention heads (default 4)")
    g.add_argument("--n-embd", type=int, default=None, help="hidden size C (default 256)")
    g.add_argument("--lr", type=float, default=None, help="backbone peak learning rate (default 2e-3)")
    g.add_argument("--eval-interval", type=int, default=None, help="steps between validation checks")
    g.add_argument("--eval-windows", type=int, default=None, help="windows in each validation check")
    g.add_argument("--seed", type=int, default=1337, help="model init and batch order (both models)")
    g.add_argument("--threads", type=int, default=None, help="torch threads (0 = torch's default; --quick: 1)")
    g = p.add_argument_group("Engram")
    g.add_argument("--engram-layer", type=int, default=1, help="0-based block index of the EngramBlock (1 = layer 2)")
    g.add_argument("--max-ngram", type=int, default=3, help="n-gram orders 2..N")
    g.add_argument("--heads-per-ngram", type=int, default=4, help="hash heads per order")
    g.add_argument("--embed-per-ngram", type=int, default=None, help="embedding width per order (default 128)")
    g.add_argument("--table-rows", type=int, default=None, help="target rows per hash head (default 100003)")
    g.add_argument("--table-lr-mult", type=float, default=5.0, help="table lr / backbone lr (the paper: 5)")
    g.add_argument("--table-lr-schedule", choices=("constant", "follow"), default=EngramSettings.table_lr_schedule,
                   help="table lr stays constant, or follows the backbone's warm-up + cosine (scaled)")
    g.add_argument("--row-dropout", type=float, default=EngramSettings.row_dropout,
                   help="training-time dropout of whole looked-up table rows")
    g.add_argument("--tables", choices=("memstore", "local"), default="memstore",
                   help="rows on memstore (server-side Adam) or an in-model parameter (RowwiseAdam)")
    g.add_argument("--mode", choices=("sync", "async"), default="sync", help="memstore consistency")
    g = p.add_argument_group("memstore")
    g.add_argument("--memstore", default=None, metavar="HOST:PORT,...",
                   help="use these running shards (in shard-index order; any cluster spec: a,b,c, "
                        "pattern-{i}:port*N, @cluster.toml) instead of starting a daemon")
    g.add_argument("--token", default=None,
                   help="bearer token of the --memstore shards (default: $MEMSTORE_TOKEN)")
    g.add_argument("--backend", choices=("ram", "lmdb"), default="ram",
                   help="backend of the started daemon (the trainer reads its rows itself: shared memory, or LMDB read-only)")
    g.add_argument("--lmdb-sync", choices=("true", "false"), default="false",
                   help="fsync every update commit (off by default: the demo's data dir is thrown away)")
    g.add_argument("--keep-data", action="store_true", help="keep the daemon's data dir in the run folder")
    g = p.add_argument_group("output")
    g.add_argument("--sample-tokens", type=int, default=None, help="tokens generated per model (default 120)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)

    preset = {**DEFAULTS, **(QUICK if args.quick else {})}
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # progress lines show up at once when piped (tee, CI)
    if args.threads:
        torch.set_num_threads(args.threads)
    # SIGTERM (docker stop, kill) takes the same clean path as Ctrl-C: stop the daemon, exit.
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.perf_counter()
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = Path(args.out) / stamp
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"run folder: {run_dir}")

    # The daemon object exists before its process does, so `finally` stops it whenever Ctrl-C lands.
    daemon = _daemon(args, run_dir)
    client = None
    try:
        client = _connect(args, daemon)
        metrics, results = run(args, client, daemon, stamp)
        metrics["run"]["wall_seconds"] = time.perf_counter() - started
        paths = write_outputs(run_dir, metrics, results)
        print("\n" + console_table(metrics))
        print(f"\nwall time {metrics['run']['wall_seconds']:.0f} s; wrote {paths['report']}, "
              f"{paths['metrics'].name}, {paths['plot'].name}")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: stopping", file=sys.stderr)
        return 130
    finally:
        if client is not None:
            if args.memstore and not args.keep_data:
                _drop_run_tables(client, f"demo_{stamp}_")
            client.close()
        if daemon is not None and daemon.proc is not None:
            code = daemon.stop()
            print(f"memstore daemon stopped (exit code {code})")
            if not args.keep_data:
                shutil.rmtree(daemon.data_dir, ignore_errors=True)


def _drop_run_tables(client, prefix: str) -> None:
    """Running shards outlive the demo: remove this run's tables (--keep-data keeps them)."""
    try:
        for info in client.list_tables():
            if info.spec.name.startswith(prefix):
                client.drop_table(info.spec.name)
                print(f"dropped table {info.spec.name} from {_targets(client)}")
    except Exception as exc:  # noqa: BLE001 - cleanup must not hide the run's own error
        print(f"could not drop this run's tables ({prefix}*): {exc}", file=sys.stderr)


def _targets(client) -> str:
    return ",".join(getattr(client, "targets", None) or [client.target])


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _daemon(args: argparse.Namespace, run_dir: Path) -> MemstoreDaemon | None:
    """The daemon to start, unless the tables are local or --memstore names running shards."""
    if args.tables == "local" or args.memstore:
        return None
    extra = ("--lmdb-sync", args.lmdb_sync) if args.backend == "lmdb" else ()
    return MemstoreDaemon(run_dir / "memstore-data", args.backend, extra)


def _connect(args: argparse.Namespace, daemon: MemstoreDaemon | None):
    """Start the daemon if there is one and open a client (None for local tables)."""
    if args.tables == "local":
        return None
    from engram_client.sharded import ShardedClient
    from memstore.client import MemStoreClient
    from memstore.cluster import resolve_targets

    if daemon is not None:
        daemon.start()
        targets = [daemon.target]
        print(f"memstore daemon: pid {daemon.proc.pid}, {daemon.target}, {args.backend} backend "
              f"in {daemon.data_dir} (log {daemon.log_path})")
    else:
        targets = resolve_targets(args.memstore)
    if len(targets) == 1:
        return MemStoreClient(targets[0], token=args.token)
    return ShardedClient(targets, token=args.token)


def run(args, client, daemon, stamp: str) -> tuple[dict, list]:
    """Data, models, training, evaluation, samples; returns (metrics, per-model results)."""
    corpus = load_corpus(args.corpus, max_train_bytes=int(args.max_corpus_mb * 1e6))
    print(f"corpus: {corpus.describe()}")
    t0 = time.perf_counter()
    tok = tokenize_corpus(corpus, args.vocab_size, CACHE_DIR)
    print(f"tokenizer: {tok.vocab_size} ids, {len(tok.train_ids):,} train / {len(tok.val_ids):,} validation tokens "
          f"({'cached' if tok.cached else f'trained in {time.perf_counter() - t0:.1f} s'}: {tok.cache_dir})")
    val_ids = tok.val_ids[: args.val_tokens + 1] if args.val_tokens else tok.val_ids
    val = val_windows(val_ids, args.block_size)  # (W, T) inputs and targets

    settings = EngramSettings(layer=args.engram_layer, max_ngram_size=args.max_ngram,
                              heads_per_ngram=args.heads_per_ngram, embed_per_ngram=args.embed_per_ngram,
                              table_rows=args.table_rows, tables=args.tables, mode=args.mode,
                              table_lr=args.lr * args.table_lr_mult, table_lr_schedule=args.table_lr_schedule,
                              row_dropout=args.row_dropout)
    memory = EngramMemory(settings, tok.tokenizer, tok.eos_id, CACHE_DIR, client=client,
                          table_prefix=f"demo_{stamp}")
    print(f"engram: token compression {tok.vocab_size} -> {memory.compressed_vocab} ids; layer {settings.layer} "
          f"(0-based), {memory.config.num_heads} heads, {memory.num_rows:,} rows x {memory.config.head_dim} "
          f"on {settings.tables}")

    model_cfg = GPTConfig(vocab_size=tok.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                          n_head=args.n_head, n_embd=args.n_embd)
    train_cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            eval_interval=args.eval_interval, eval_windows=args.eval_windows,
                            warmup_steps=min(30, max(1, args.steps // 10)))
    models = _build_models(model_cfg, memory, args.seed)
    show = not args.no_progress
    results = [train_model("baseline", models["baseline"], tok.train_ids, val, train_cfg, show_progress=show),
               train_model("engram", models["engram"], tok.train_ids, val, train_cfg, memory, show_progress=show)]

    metrics = {
        "run": {"timestamp": stamp, "command": "python -m demo " + shlex.join(sys.argv[1:]),
                "machine": _machine(), "torch_threads": torch.get_num_threads()},
        "corpus": {"root": str(corpus.root), "description": corpus.describe(), "digest": corpus.digest,
                   "train_names": _names(corpus.train_files, corpus.root),
                   "val_names": _names(corpus.val_files, corpus.root)},
        "tokenizer": {"vocab_size": tok.vocab_size, "compressed_vocab": memory.compressed_vocab,
                      "train_tokens": len(tok.train_ids), "val_tokens": val[1].numel(), "cache": str(tok.cache_dir)},
        "model_config": dataclasses.asdict(model_cfg),
        "train": dataclasses.asdict(train_cfg),
        "engram": {"config": dataclasses.asdict(memory.config), "tables": settings.tables, "mode": settings.mode,
                   "table_lr": settings.table_lr, "table_lr_schedule": settings.table_lr_schedule,
                   "row_dropout": settings.row_dropout,
                   "table_name": memory.table_name,
                   "server": _server_desc(args, daemon)},
        "models": {r.name: {"params": models[r.name].param_counts(), "flops": models[r.name].flops_per_token(),
                            "summary": r.summary(), "curves": dataclasses.asdict(r)} for r in results},
        "memstore": _memstore_stats(client, memory.table_name),
        "collisions": memory.collisions(val_ids, args.block_size),
        "samples": _samples(models, tok, args),
    }
    return metrics, results


def _names(files: list[Path], root: Path) -> list[str]:
    """Paths relative to the corpus root (the stdlib tree has many an `__init__.py`)."""
    return [str(p.relative_to(root)) for p in files]


def _build_models(model_cfg: GPTConfig, memory: EngramMemory, seed: int) -> dict[str, GPT]:
    """The baseline and the Engram model, with identical backbone weights (see GPT.__init__)."""
    models = {"baseline": GPT(model_cfg, seed=seed)}
    torch.manual_seed(seed)  # the Engram block's own init does not depend on what ran before
    engram_cfg = dataclasses.replace(model_cfg, engram_layer=memory.settings.layer)
    models["engram"] = GPT(engram_cfg, memory.make_block, seed=seed)
    for name, model in models.items():
        params, flops = model.param_counts(), model.flops_per_token()
        print(f"{name:>8}: {params['dense'] / 1e6:.2f} M dense + {params['table'] / 1e6:.2f} M table parameters, "
              f"{flops['train'] / 1e6:.1f} MFLOPs/token train ({flops['forward'] / 1e6:.1f} forward)")
    return models


def _samples(models: dict, tok, args) -> dict[str, str]:
    prompt = torch.tensor([tok.encode("def ")], dtype=torch.int64)  # (1, T0)
    out = {}
    for name, model in models.items():
        model.eval()
        generator = torch.Generator().manual_seed(args.seed)
        ids = model.generate(prompt, args.sample_tokens, generator=generator)[0]
        out[name] = tok.decode(ids.tolist())
        print(f"\n--- sample from {name} ---\n{out[name]}")
    return out


def _memstore_stats(client, table_name: str) -> dict | None:
    """The server-side view of the Engram table (summed over shards) and the servers' counters."""
    if client is None:
        return None
    info = client.describe_table(table_name)
    responses = client.stats()
    responses = responses if isinstance(responses, list) else [responses]  # ShardedClient: one per shard
    counters: dict[str, float] = {}
    for response in responses:
        for key, value in response.counters.items():
            counters[key] = counters.get(key, 0.0) + value
    table = {"name": table_name, "num_rows": info.spec.num_rows, "dim": info.spec.dim, "dtype": info.spec.dtype,
             "optimizer": f"{info.spec.optimizer.kind}(lr={info.spec.optimizer.lr:g})",
             "rows_materialized": info.rows_materialized, "bytes_used": info.bytes_used,
             "lookups": info.lookups, "updates": info.updates}
    return {"backend": responses[0].backend, "version": responses[0].version, "shards": len(responses),
            "tables": [table], "counters": counters,
            "rows_path": "shared memory" if table_name in client.shared_tables() else "gRPC"}


def _server_desc(args, daemon) -> str:
    if args.tables == "local":
        return "none (local tables)"
    if daemon is None:
        return f"running shards {args.memstore}"
    sync = f", lmdb_sync={args.lmdb_sync}" if args.backend == "lmdb" else ""
    return f"memstore serve subprocess on {daemon.target} ({args.backend}{sync})"


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} x {cpu}, {platform.system()} {platform.release()}, Python {platform.python_version()}, " \
           f"torch {torch.__version__}"


if __name__ == "__main__":
    sys.exit(main())
