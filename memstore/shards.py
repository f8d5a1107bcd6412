"""Every shard of a cluster at once: one `MemStoreClient` per target, in shard order.

`Shards.each` runs a call on every shard in parallel and returns the answers in shard order; an
error names the shard (index and target) that raised it, so "table not found" says where. The
admin CLI and `engram_client.ShardedClient` both stand on it.

A change to a whole table asks every shard first and touches none unless all agree, so a cluster
is never left half changed by a request that could be seen to fail: `create_table` refuses when
a shard holds the table with another spec (or at all, without `if_not_exists`), `restore` when a
shard lacks the checkpoint, `drop_table` when a shard does not answer. A shard that already lacks
a table being dropped counts as dropped there: a re-run finishes a drop that a shard failing in
the middle of it left half done.
"""
from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Self, TypeVar

from memstore.checkpoints import check_tag
from memstore.client import MemStoreClient, TableInfo
from memstore.cluster import resolve_targets, spec_or_env
from memstore.errors import AlreadyExists, FailedPrecondition, MemStoreError, NotFound
from memstore.spec import TableSpec, spec_differences, table_spec

T = TypeVar("T")
USAGE_FIELDS = ("rows_materialized", "bytes_used", "lookups", "updates", "bytes_reserved", "bytes_resident")


def shard_name(index: int, target: str) -> str:
    return f"shard {index} ({target})"


def on_shard(exc: BaseException, index: int, target: str) -> BaseException:
    """`exc`, its message prefixed with the shard it came from (a project error keeps its class,
    status code and retryability; anything else is returned as is)."""
    if not isinstance(exc, MemStoreError) or exc.message.startswith("shard "):
        return exc
    named = type(exc)(f"{shard_name(index, target)}: {exc.message.removeprefix(f'{target}: ')}")
    named.retryable = getattr(exc, "retryable", False)
    return named


def whole_table(spec: TableSpec) -> TableSpec:
    """The spec of the whole table, whichever shard described it."""
    return replace(spec, shard_index=0, shard_count=1)


def merge_infos(infos: Sequence[TableInfo | None], targets: Sequence[str] | None = None) -> TableInfo:
    """One view of a table from its shards' views, in shard order (None: a shard that lacks it;
    `targets` name the shards in errors). One shard: its own view, shard fields as it reports
    them. Several: the whole table's spec (shard 0 of 1), usage summed over the shards that have
    it, and the checkpoint tags all of them have. FAILED_PRECONDITION names the shards whose specs
    differ (a table that must be dropped and created again there)."""
    present = [(index, info) for index, info in enumerate(infos) if info is not None]
    if not present:
        raise ValueError("merge_infos: no shard describes the table")
    if len(infos) == 1:
        return present[0][1]
    names = [shard_name(i, targets[i]) if targets else f"shard {i}" for i in range(len(infos))]
    (first, reference), spec = present[0], whole_table(present[0][1].spec)
    clashes = [f"{names[index]} differs from {names[first]} in {'; '.join(differences)}"
               for index, info in present[1:]
               if (differences := spec_differences(spec, whole_table(info.spec),
                                                   labels=(f"shard {first}", f"shard {index}")))]
    if clashes:
        raise FailedPrecondition(f"table {spec.name!r} has different specs on its shards: {'. '.join(clashes)}. "
                                 "Rows would be routed to tables of different shapes: drop the wrong shards' "
                                 "table (drop-table --target naming them) and create it again there "
                                 "(create-table --if-not-exists on the whole cluster)")
    totals = [sum(getattr(info, f) for _, info in present) for f in USAGE_FIELDS]
    everywhere = tuple(t for t in reference.checkpoints if all(t in info.checkpoints for _, info in present))
    return TableInfo(spec, *totals, checkpoints=everywhere)


def _described(client: MemStoreClient, name: str) -> TableInfo | None:
    try:
        return client.describe_table(name)
    except NotFound:
        return None


class Shards:
    """The shards named by `spec` (any cluster-spec form, see `memstore.cluster`; None:
    `MEMSTORE_TARGET`); `client_kwargs` go to each `MemStoreClient` (token, tls, timeouts)."""

    def __init__(self, spec: str | Sequence[str] | None = None, **client_kwargs: Any):
        self.targets = resolve_targets(spec_or_env(spec))
        self.clients = [MemStoreClient(t, **client_kwargs) for t in self.targets]
        self.pool = ThreadPoolExecutor(max(2, len(self.clients)), thread_name_prefix="memstore-shards")

    def __len__(self) -> int:
        return len(self.clients)

    def names(self, indices: Collection[int]) -> str:
        """"shard 1 (host:port), shard 3 (...)": the shards at `indices`."""
        return ", ".join(shard_name(i, self.targets[i]) for i in sorted(indices))

    def each(self, call: Callable[[MemStoreClient], T], on: Collection[int] | None = None) -> list[T | None]:
        """`call(client)` on every shard (or the shards at indices `on`) at once; the answers in
        shard order (None for a shard not asked). Every shard finishes before an error is raised
        (the first in shard order, naming its shard)."""
        futures = [self.pool.submit(call, client) if on is None or index in on else None
                   for index, client in enumerate(self.clients)]
        errors = [f.exception() if f else None for f in futures]
        for index, error in enumerate(errors):
            if error is not None:
                raise on_shard(error, index, self.targets[index])
        return [f.result() if f else None for f in futures]

    def check_layout(self, layouts: Sequence[tuple[int, int] | None] | None = None) -> None:
        """Each target's (shard_index, shard_count), asked from the servers unless given (None:
        not known, skipped), must be (its place in the list, the number of targets): a misordered
        list must touch nothing."""
        if layouts is None:
            layouts = [(s.shard_index, s.shard_count or 1) for s in self.each(lambda c: c.stats())]
        for index, layout in enumerate(layouts):
            if layout is not None and layout != (index, len(self)):
                shard_index, shard_count = layout
                raise FailedPrecondition(
                    f"{self.targets[index]} is shard {shard_index} of {shard_count}, but this "
                    f"client lists it as shard {index} of {len(self)}: fix the target order or the servers' "
                    "--shard-index/--shard-count")

    def merge(self, infos: Sequence[TableInfo | None]) -> TableInfo:
        """One table's per-shard views (None: a shard without it) as one, after checking each
        shard that answered is where we think it is and that their specs agree."""
        self.check_layout([None if i is None else (i.spec.shard_index, i.spec.shard_count) for i in infos])
        return merge_infos(infos, self.targets)

    def describe_each(self, name: str) -> list[TableInfo | None]:
        """Each shard's view of table `name`, None where a shard lacks it (any other error, a
        shard that does not answer say, is raised naming the shard)."""
        return self.each(lambda client: _described(client, name))

    def missing(self, name: str, infos: Sequence[TableInfo | None]) -> NotFound:
        """The error for a table that some shards lack."""
        absent = [i for i, info in enumerate(infos) if info is None]
        return NotFound(f"table {name!r} is missing on {self.names(absent)} (it exists on "
                        f"{len(infos) - len(absent)} of {len(infos)} shards): create it there "
                        "(create-table --if-not-exists on the whole cluster) or drop it")

    # ---- changes to a whole table: every shard is asked before any is changed ------------------

    def create_table(self, name: str, num_rows: int, dim: int, *, if_not_exists: bool = False,
                     **spec_args: Any) -> TableInfo:
        """Create the table on every shard (`spec_args` as `MemStoreClient.create_table`). Nothing is
        created when the target list is misordered (FAILED_PRECONDITION), or when a shard holds a
        table of that name with another spec, or at all without `if_not_exists` (ALREADY_EXISTS);
        with it, a partial create is completed."""
        self.check_layout()
        requested = table_spec(name, num_rows, dim, **spec_args)  # bad arguments fail before any call
        existing = {i: info for i, info in enumerate(self.describe_each(name)) if info is not None}
        clashes = {i: spec_differences(whole_table(info.spec), requested) for i, info in existing.items()}
        if any(clashes.values()):
            raise AlreadyExists(f"table {name!r} exists with a different spec on " + "; ".join(
                f"{shard_name(i, self.targets[i])}: {', '.join(d)}" for i, d in clashes.items() if d)
                + ": nothing was created")
        if existing and not if_not_exists:
            raise AlreadyExists(f"table {name!r} exists on {self.names(existing)}: nothing was created "
                                "(if_not_exists / --if-not-exists creates it where it is missing)")
        return self.merge(self.each(lambda c: c.create_table(name, num_rows, dim, if_not_exists=if_not_exists,
                                                             **spec_args)))

    def check_checkpoint(self, name: str, tag: str) -> None:
        """NOT_FOUND, naming them, when some shards lack table `name` or its checkpoint `tag`."""
        check_tag(tag)
        infos = self.each(lambda client: client.describe_table(name))
        lacking = [i for i, info in enumerate(infos) if tag not in info.checkpoints]
        if lacking:
            where = self.targets[0] if len(self) == 1 else self.names(lacking)
            has = "; ".join(f"{'it' if len(self) == 1 else f'shard {i}'} has: {', '.join(infos[i].checkpoints) or 'none'}"
                            for i in lacking)
            raise NotFound(f"table {name!r} has no checkpoint {tag!r} on {where} ({has}): nothing was restored")

    def restore(self, name: str, tag: str, **restore_args: Any) -> list[str]:
        """Roll every shard's part of `name` back to checkpoint `tag` (the paths, in shard order),
        after checking every shard has it: NOT_FOUND naming the shards that lack it restores none."""
        self.check_checkpoint(name, tag)
        return self.each(lambda client: client.restore(name, tag, **restore_args))

    def drop_table(self, name: str) -> list[int]:
        """Drop the table on every shard; returns the shards that had no table to drop (a re-run
        after a partial drop). A shard that does not answer drops nothing anywhere; NOT_FOUND when
        no shard has the table."""
        self.check_layout()  # one shard of a cluster alone, or a misordered list: nothing is dropped
        present = {i for i, info in enumerate(self.describe_each(name)) if info is not None}
        if not present:
            raise NotFound(f"table {name!r} does not exist on " +
                           (f"any of the {len(self)} shards" if len(self) > 1 else self.targets[0]))
        self.each(lambda client: client.drop_table(name), on=present)
        return [i for i in range(len(self)) if i not in present]

    def close(self) -> None:
        for client in self.clients:
            client.close()
        self.pool.shutdown(wait=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
