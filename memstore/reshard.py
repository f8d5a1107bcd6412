"""`memstore reshard`: turn N shards' snapshots into M shards' data directories, offline.

    memstore reshard --from data0 data1 data2 --to resharded --shards 2 [--table NAME ...]
                     [--before 2025-06-01T12:00:00Z] [--backend ram|lmdb]

For each table: read one snapshot per input data dir (`<dir>/snapshots/<table>/<stamp>/`, the
newest, or the newest taken at or before `--before`), verify its checksums and that the inputs
are shards 0..N-1 of one table spec, route every row to its new shard (global row g lives on
shard g % M; snapshots store global ids, so a row moves without changing) and write
`<out>/shard-<j>/snapshots/<table>/<stamp>/` in the portable snapshot format, its spec saying
shard j of M. A RAM-backed `memstore serve --data-dir <out>/shard-<j> --shard-index j
--shard-count M` restores from it as it is, and so does an LMDB-backed one (it builds
`tables/<table>/` from the snapshot at its first start); `--backend lmdb` builds those LMDB tables
here already (`<out>/shard-<j>/tables/<table>/`), so that first start is quick.

Verification: a table checksum (blake2b over ids, rows and optimizer state in ascending global
id order, so it does not depend on the shard layout) is computed from the inputs and again from
the outputs as read back from disk; a mismatch is an error. `<out>/reshard-report.json` records
the rows per shard in and out and both checksums.

Memory: one table at a time; the ids of its materialized rows and a sort order (about 32 bytes
per row) are held in RAM, rows and state stream through in chunks from memory-mapped snapshots.

Dedup memory (client_id → last applied seq): every output shard gets, for each client, the
largest seq any input shard recorded. A (client, seq) applied anywhere before the reshard is
then refused everywhere after it, so no retry can apply twice; and a client whose seqs never go
backwards (the rule without a reshard too) is never wrongly refused. See docs/scaling.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from memstore.backends.common import MAX_CLIENTS, SNAPSHOTS_DIR, DataDirLock
from memstore.backends.lmdb_table import LOADED_FROM_KEY, read_meta
from memstore.errors import FailedPrecondition, MemStoreError
from memstore.snapshot import Snapshot, SnapshotWriter, list_snapshots, new_snapshot_path, read_snapshot
from memstore.spec import TableSpec, check_table_name

REPORT_FILE = "reshard-report.json"
CHUNK_ROWS = 1 << 16      # rows gathered, hashed and written per step
PROGRESS_EVERY_S = 2.0    # seconds between progress lines

Log = Callable[[str], None]


class ReshardError(FailedPrecondition):
    """Inputs that do not form one complete shard layout, or an unusable output directory."""


@dataclass(frozen=True)
class ReshardConfig:
    """One reshard run; the fields are the CLI flags."""
    sources: tuple[Path, ...]       # data dirs of the N input shards, any order (snapshots say which)
    out_dir: Path                   # receives shard-0 .. shard-(M-1); must be absent or empty
    shards: int                     # M, the new shard count
    tables: tuple[str, ...] = ()    # tables to reshard; () = every table found
    before: datetime | None = None  # use the newest snapshot taken at or before this time (None: newest)
    backend: str = "ram"            # "ram": snapshots only; "lmdb": also build LMDB tables
    chunk_rows: int = CHUNK_ROWS
    allow_stale: bool = False       # go on when an LMDB table changed after its snapshot (losing those updates)


@dataclass
class TableReport:
    name: str
    rows_in: list[int]      # materialized rows per input shard
    rows_out: list[int]     # per output shard
    checksum_in: str        # table checksum of the inputs ...
    checksum_out: str       # ... and of the outputs read back: always equal in a report
    clients: int            # dedup entries carried into every output shard
    sources: list[str]      # snapshot directories read, by input shard index
    outputs: list[str]      # snapshot directories written, by output shard index


# ---- the run -----------------------------------------------------------------------------------


def reshard(config: ReshardConfig, log: Log | None = None) -> list[TableReport]:
    """Reshard every selected table; writes the outputs and `<out>/reshard-report.json`."""
    log = log or _stderr
    _check_config(config)
    locks = _lock_sources(config.sources)
    try:
        names = list(config.tables) or _table_names(config.sources)
        for name in names:  # every table's inputs are checked before anything is written
            _open_inputs(config, name, verify=False, log=log)
        config.out_dir.mkdir(parents=True, exist_ok=True)
        reports = [reshard_table(config, name, log) for name in names]
    finally:
        for lock in locks:
            lock.release()
    _write_report(config, reports)
    return reports


def reshard_table(config: ReshardConfig, name: str, log: Log) -> TableReport:
    inputs = _open_inputs(config, name, verify=True, log=lambda _: None)  # warnings came in the check pass
    source = RowSource(inputs)
    log(f"{name}: {len(source):,} rows from {len(inputs)} shards → {config.shards} shards")
    checksum_in = table_checksum(source, config.chunk_rows,
                                 Progress(log, f"{name}: checksum of inputs", len(source)))
    dedup = merge_dedup([snap.dedup for snap in inputs])
    outputs = write_shards(config, source, dedup, log)
    written = RowSource([read_snapshot(path) for path in outputs])  # read back, file checksums verified
    checksum_out = table_checksum(written, config.chunk_rows,
                                  Progress(log, f"{name}: checksum of outputs", len(written)))
    if checksum_out != checksum_in:
        raise ReshardError(f"table {name!r}: outputs do not hold the input rows (checksum {checksum_out}, "
                           f"expected {checksum_in}); outputs left in {config.out_dir} for inspection")
    if config.backend == "lmdb":
        for j in range(config.shards):
            log(f"{name}: building the LMDB table of shard {j}")
            build_lmdb_table(config.out_dir / f"shard-{j}", name)
    return TableReport(name, rows_in=[len(s.ids) for s in inputs], rows_out=[len(s.ids) for s in written.snaps],
                       checksum_in=checksum_in, checksum_out=checksum_out, clients=len(dedup),
                       sources=[str(s.path) for s in inputs], outputs=[str(p) for p in outputs])


def write_shards(config: ReshardConfig, source: RowSource, dedup: dict[str, int], log: Log) -> list[Path]:
    """One snapshot per output shard j: the rows with global id g % M == j, ascending."""
    new_shard = (source.ids % config.shards)[source.order]  # (R,) in ascending global id order
    spec, outputs = source.spec, []
    for j in range(config.shards):
        positions = source.order[new_shard == j]  # (R_j,) this shard's rows, ascending global id
        out_spec = dataclasses.replace(spec, shard_index=j, shard_count=config.shards)
        path = new_snapshot_path(config.out_dir / f"shard-{j}" / SNAPSHOTS_DIR / spec.name)
        progress = Progress(log, f"{spec.name}: writing shard {j}", len(positions))
        with SnapshotWriter(path, out_spec, len(positions), dedup) as writer:
            for ids, rows, state in source.chunks(positions, config.chunk_rows):
                writer.append(ids, rows, state)
                progress.advance(len(ids))
        outputs.append(path)
    return outputs


# ---- rows of several shards as one table --------------------------------------------------------


class RowSource:
    """The snapshots of one table's shards seen as one set of rows. A row is addressed by its
    position in the concatenation of the snapshots' arrays; `order` lists the positions by
    ascending global id. Only ids live in memory; rows are read from the (mapped) snapshots."""

    def __init__(self, snaps: list[Snapshot]):
        self.snaps = snaps
        self.spec = dataclasses.replace(snaps[0].spec, shard_index=0, shard_count=1)
        self.offsets = np.cumsum([0] + [len(s.ids) for s in snaps])  # (k+1,) start of each snapshot
        self.ids = np.concatenate([np.asarray(s.ids) for s in snaps])  # (R,) global ids
        self.order = np.argsort(self.ids, kind="stable")              # (R,) positions, ascending id

    def __len__(self) -> int:
        return len(self.ids)

    def gather(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids [n], rows [n, dim], state [n, width]) of the rows at `positions`, in that order."""
        first = self.snaps[0]
        rows = np.empty((len(positions), *first.rows.shape[1:]), first.rows.dtype)     # (n, dim)
        state = np.empty((len(positions), *first.state.shape[1:]), first.state.dtype)  # (n, width)
        owner = np.searchsorted(self.offsets, positions, side="right") - 1           # (n,) snapshot of each
        for i, snap in enumerate(self.snaps):
            mine = owner == i
            if mine.any():
                local = positions[mine] - self.offsets[i]  # ascending within one snapshot: sequential reads
                rows[mine] = snap.rows[local]
                state[mine] = snap.state[local]
        return self.ids[positions], rows, state

    def chunks(self, positions: np.ndarray, chunk_rows: int) -> Iterator[tuple[np.ndarray, ...]]:
        """`gather` over `positions`, `chunk_rows` at a time."""
        for start in range(0, len(positions), chunk_rows):
            yield self.gather(positions[start:start + chunk_rows])


def table_checksum(source: RowSource, chunk_rows: int = CHUNK_ROWS, progress: Progress | None = None) -> str:
    """blake2b of (ids, rows, state) in ascending global id order: the same for any shard layout
    of the same rows (ids are unique, so this order is canonical) and for any chunking."""
    hashes = [hashlib.blake2b(digest_size=32) for _ in range(3)]  # ids, rows, state
    for arrays in source.chunks(source.order, chunk_rows):
        for h, array in zip(hashes, arrays):
            h.update(np.ascontiguousarray(array).data)
        if progress:
            progress.advance(len(arrays[0]))
    combined = hashlib.blake2b(b"".join(h.digest() for h in hashes), digest_size=32)
    return "blake2b:" + combined.hexdigest()


def merge_dedup(memories: list[dict[str, int]], max_clients: int = MAX_CLIENTS) -> dict[str, int]:
    """client_id → the largest seq any shard recorded, oldest first, at most `max_clients` (the
    most recent kept). Recency across shards is a client's relative position in its shard's
    memory (0 oldest, 1 newest), the best order the shards' separate memories allow."""
    merged: dict[str, tuple[float, int]] = {}  # client → (recency, max seq)
    for memory in memories:
        for rank, (client, seq) in enumerate(memory.items(), start=1):
            recency, last = merged.get(client, (0.0, 0))
            merged[client] = (max(recency, rank / len(memory)), max(last, seq))
    kept = sorted(merged.items(), key=lambda item: item[1][0])[-max_clients:]
    return {client: seq for client, (_, seq) in kept}


# ---- inputs ------------------------------------------------------------------------------------


def _table_names(sources: tuple[Path, ...]) -> list[str]:
    names = sorted({p.name for src in sources for p in (src / SNAPSHOTS_DIR).glob("*") if p.is_dir()})
    if not names:
        raise ReshardError(f"no snapshots under {', '.join(str(s / SNAPSHOTS_DIR) for s in sources)}: "
                           "snapshot every table first (`memstore snapshot` against each shard)")
    return names


def _open_inputs(config: ReshardConfig, name: str, verify: bool, log: Log) -> list[Snapshot]:
    """One snapshot per source, ordered by shard index, checked to be shards 0..N-1 of one spec."""
    snaps = [read_snapshot(_pick_snapshot(src, name, config.before), verify=verify) for src in config.sources]
    count = len(snaps)
    where = {s.path: (s.spec.shard_index, s.spec.shard_count) for s in snaps}
    if {s.spec.shard_count for s in snaps} != {count}:
        raise ReshardError(f"table {name!r}: {count} data dirs given, but the snapshots are {_fmt(where)}: "
                           "pass the data dirs of all shards of one layout")
    snaps.sort(key=lambda s: s.spec.shard_index)
    if [s.spec.shard_index for s in snaps] != list(range(count)):
        raise ReshardError(f"table {name!r}: the snapshots are not shards 0..{count - 1} once each: "
                           f"{_fmt(where)}")
    for snap in snaps[1:]:
        diff = _spec_diff(snaps[0].spec, snap.spec)
        if diff:
            raise ReshardError(f"table {name!r}: {snap.path} and {snaps[0].path} are shards of different "
                               f"tables ({diff})")
    for src, snap in zip(config.sources, snaps):
        _check_fresh(config, src, snap, log)
    return snaps


def _pick_snapshot(source: Path, name: str, before: datetime | None) -> Path:
    table_dir = source / SNAPSHOTS_DIR / name
    candidates = list_snapshots(table_dir)
    if before is not None:
        candidates = [p for p in candidates if _created(p) <= before]
    if not candidates:
        when = f" taken at or before {before.isoformat()}" if before else ""
        raise ReshardError(f"table {name!r}: no snapshot{when} in {table_dir} (a table exists on every "
                           "shard; snapshot it there with `memstore snapshot`, or leave out this data dir)")
    return candidates[-1]


def _created(path: Path) -> datetime:
    return datetime.fromisoformat(read_snapshot(path, verify=False).created)


def _check_fresh(config: ReshardConfig, source: Path, snap: Snapshot, log: Log) -> None:
    """An LMDB table written after its snapshot holds updates the reshard would not carry: refused
    unless --allow-stale (or --before, which asks for an older snapshot on purpose). Best effort:
    a write that races the snapshot itself can carry an earlier mtime."""
    data_file = source / "tables" / snap.spec.name / "data.mdb"
    if not data_file.exists() or data_file.stat().st_mtime <= datetime.fromisoformat(snap.created).timestamp():
        return
    if _built_from(data_file.parent) == snap.path.name:  # loaded from this very snapshot, never updated since
        return
    message = (f"{data_file} changed after snapshot {snap.path}: updates since that snapshot would not be in "
               "the output")
    if config.allow_stale or config.before is not None:
        log(f"warning: {message}")
        return
    raise ReshardError(f"{message}. Stop training, `memstore snapshot` every shard again, then reshard "
                       "(or pass --allow-stale to accept losing them)")


def _built_from(table_dir: Path) -> str | None:
    """The snapshot an LMDB table was built from, if it has not been updated since."""
    value = read_meta(table_dir, LOADED_FROM_KEY)
    return None if value is None else value.decode()


def _spec_diff(a: TableSpec, b: TableSpec) -> str:
    a_dict, b_dict = a.to_dict(), b.to_dict()
    return ", ".join(f"{k}: {a_dict[k]!r} vs {b_dict[k]!r}" for k in a_dict
                     if k != "shard_index" and a_dict[k] != b_dict[k])


def _fmt(where: dict[Path, tuple[int, int]]) -> str:
    return "; ".join(f"{path}: shard {index} of {count}" for path, (index, count) in where.items())


def _check_config(config: ReshardConfig) -> None:
    if config.shards < 1:
        raise ReshardError(f"--shards must be >= 1, got {config.shards}")
    if config.backend not in ("ram", "lmdb"):
        raise ReshardError(f"--backend must be ram or lmdb, got {config.backend!r}")
    for name in config.tables:
        check_table_name(name)
    resolved = [src.resolve() for src in config.sources]
    if not resolved or len(set(resolved)) != len(resolved):
        raise ReshardError(f"--from needs each input data dir once, got {[str(s) for s in config.sources]}")
    for src in config.sources:
        if not src.is_dir():
            raise ReshardError(f"input data dir {src} does not exist")
    if config.out_dir.exists() and any(config.out_dir.iterdir()):
        raise ReshardError(f"output dir {config.out_dir} is not empty; reshard writes into a new directory")


def _lock_sources(sources: tuple[Path, ...]) -> list[DataDirLock]:
    """Refuse to read the data dir of a running daemon: a RAM shard still has updates to snapshot."""
    locks: list[DataDirLock] = []
    try:
        for src in sources:
            if (src / ".lock").exists():
                try:
                    locks.append(DataDirLock(src))
                except OSError:  # read-only (a backup copy): cannot be the data dir of a running daemon
                    pass
    except MemStoreError as exc:
        for lock in locks:
            lock.release()
        raise ReshardError(f"{exc.message}; stop every shard before resharding") from None
    return locks


# ---- LMDB output --------------------------------------------------------------------------------


def build_lmdb_table(data_dir: Path, name: str) -> None:
    """Build `<data_dir>/tables/<name>/` from its snapshot in `<data_dir>/snapshots/<name>/`.

    Opening an LmdbBackend does exactly that for every table that has snapshots but no LMDB
    files (a restore, loaded into a temp dir and renamed into place when complete): this is
    what `memstore serve --backend lmdb` would do at its first start, done here and checked."""
    from memstore.backends.lmdbstore import LmdbBackend  # lmdb only for --backend lmdb
    backend = LmdbBackend(data_dir)
    try:
        backend.get(name)
    except MemStoreError as exc:
        raise ReshardError(f"table {name!r}: no LMDB table built in {data_dir} ({exc.message}); "
                           "see the log for the snapshot that failed") from None
    finally:
        backend.close()


# ---- progress and the report --------------------------------------------------------------------


class Progress:
    """`label: done/total rows` at most every PROGRESS_EVERY_S seconds, and once when done."""

    def __init__(self, log: Log, label: str, total: int):
        self.log, self.label, self.total, self.done = log, label, total, 0
        self.started = self.last = time.monotonic()

    def advance(self, rows: int) -> None:
        self.done += rows
        now = time.monotonic()
        if self.done >= self.total or now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            self.log(f"{self.label}: {self.done:,}/{self.total:,} rows ({rate:,.0f} rows/s)")


def _write_report(config: ReshardConfig, reports: list[TableReport]) -> Path:
    path = config.out_dir / REPORT_FILE
    report = {"created": datetime.now(UTC).isoformat(), "sources": [str(s) for s in config.sources],
              "out_dir": str(config.out_dir), "shards_in": len(config.sources), "shards_out": config.shards,
              "backend": config.backend, "tables": [dataclasses.asdict(r) for r in reports]}
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path


def format_report(reports: list[TableReport]) -> str:
    """Rows per shard in and out, and each table's checksum, as a text table."""
    lines = [f"{'TABLE':24} {'SHARD':>5} {'ROWS IN':>14} {'ROWS OUT':>14}"]
    for r in reports:
        for shard in range(max(len(r.rows_in), len(r.rows_out))):
            rows_in = f"{r.rows_in[shard]:,}" if shard < len(r.rows_in) else "-"
            rows_out = f"{r.rows_out[shard]:,}" if shard < len(r.rows_out) else "-"
            lines.append(f"{r.name:24} {shard:>5} {rows_in:>14} {rows_out:>14}")
        same = "in == out" if r.checksum_in == r.checksum_out else "MISMATCH"
        lines.append(f"{r.name:24} {'total':>5} {sum(r.rows_in):>14,} {sum(r.rows_out):>14,}  "
                     f"{r.checksum_in[:24]}… {same}")
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="sources", nargs="+", type=Path, required=True, metavar="DIR",
                        help="data dirs of all N input shards (any order; stop the shards first)")
    parser.add_argument("--to", dest="out_dir", type=Path, required=True, metavar="OUT_DIR",
                        help="new directory; receives shard-0 .. shard-(M-1) and reshard-report.json")
    parser.add_argument("--shards", type=int, required=True, metavar="M", help="the new shard count")
    parser.add_argument("--table", dest="tables", action="append", default=[], metavar="NAME",
                        help="reshard only this table (repeatable; default: every table)")
    parser.add_argument("--before", type=_parse_time, metavar="TIME",
                        help="use each table's newest snapshot taken at or before TIME "
                             "(ISO 8601, UTC unless it says otherwise, e.g. 2025-06-01T12:00:00Z)")
    parser.add_argument("--allow-stale", action="store_true",
                        help="reshard even when an LMDB table changed after its snapshot (those updates are lost)")
    parser.add_argument("--backend", choices=["ram", "lmdb"], default="ram",
                        help="lmdb: also build each output shard's LMDB tables now; without it an LMDB "
                             "shard builds them from the snapshots at its first start (default: ram)")


def main(args: argparse.Namespace) -> int:
    config = ReshardConfig(tuple(args.sources), args.out_dir, args.shards, tuple(args.tables),
                           args.before, args.backend, allow_stale=args.allow_stale)
    reports = reshard(config)
    print(format_report(reports))
    print(f"report: {config.out_dir / REPORT_FILE}")
    return 0


def _parse_time(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _stderr(message: str) -> None:
    print(f"reshard: {message}", file=sys.stderr, flush=True)
