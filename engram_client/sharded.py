"""A client for a table split across several memstore shards.

Routing (documented, deterministic, shared with the servers): global row r lives on shard
`r % S` (S = number of targets, in list order). Row ids are hashed n-gram indices, so the modulo
spreads them evenly; each shard stores its rows densely at local index `r // S`.

Per batch: ids are de-duplicated (a Zipfian batch moves each row once), split by shard, sent as
one request per shard in parallel, and the answers are put back in request order. An error
names the shard (index and target) it came from.
"""
from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import Self

import numpy as np

from memstore.client import Job, TableInfo
from memstore.protocol import as_row_grads, as_row_ids, sum_duplicates
from memstore.shards import Shards, on_shard


def shard_of(ids: np.ndarray, num_shards: int) -> np.ndarray:
    """The shard holding each global row id."""
    return ids % num_shards


def split_by_shard(ids: np.ndarray, num_shards: int) -> tuple[np.ndarray, list[slice]]:
    """A permutation grouping `ids` by shard, and each shard's slice of the permuted ids."""
    shards = shard_of(ids, num_shards)
    order = np.argsort(shards, kind="stable")
    bounds = np.searchsorted(shards[order], np.arange(num_shards + 1))
    return order, [slice(bounds[s], bounds[s + 1]) for s in range(num_shards)]


class ShardedClient:
    """Same API as `MemStoreClient`, over shards given in shard order: a list of targets or any
    cluster spec (`engram_client.cluster`); None reads `MEMSTORE_TARGET`. `client_kwargs` go to
    each shard's `MemStoreClient` (token, default `MEMSTORE_TOKEN`; tls; timeouts)."""

    def __init__(self, targets: Sequence[str] | str | None = None, **client_kwargs):
        self._cluster = Shards(targets, **client_kwargs)
        self.targets = self._cluster.targets
        self.shards = self._cluster.clients
        self._pool = self._cluster.pool

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    # ---- tables -------------------------------------------------------------------------------

    def create_table(self, name: str, num_rows: int, dim: int, **kwargs) -> TableInfo:
        """Checks every shard first: a wrong target list, or a shard holding the table with another
        spec (or at all, without `if_not_exists`), creates nothing (`memstore.shards.Shards`)."""
        return self._cluster.create_table(name, num_rows, dim, **kwargs)

    def describe_table(self, name: str) -> TableInfo:
        """The whole table; NOT_FOUND names a shard that lacks it, FAILED_PRECONDITION shards
        whose specs differ."""
        return self._cluster.merge(self._cluster.each(lambda c: c.describe_table(name)))

    def list_tables(self) -> list[TableInfo]:
        """Every table, each as `describe_table` shows it; NOT_FOUND names the table and the shards
        that lack it when one is not on every shard (`memstore ls` lists it with a warning)."""
        per_shard = self._cluster.each(lambda c: {t.spec.name: t for t in c.list_tables()})
        by_name = {n: [tables.get(n) for tables in per_shard] for n in sorted(set().union(*per_shard))}
        for name, infos in by_name.items():
            if None in infos:
                raise self._cluster.missing(name, infos)
        return [self._cluster.merge(infos) for infos in by_name.values()]

    def drop_table(self, name: str) -> None:
        """Drop the table everywhere; a shard that does not answer drops nothing anywhere, a shard
        that has already lost the table (a partial drop, re-run) is skipped."""
        self._cluster.drop_table(name)

    def snapshot(self, name: str = "", *, tag: str = "") -> list[str]:
        return [p for paths in self._cluster.each(lambda c: c.snapshot(name, tag=tag)) for p in paths]

    def check_checkpoint(self, name: str, tag: str) -> None:
        """NOT_FOUND naming the shards that lack table `name` or its checkpoint `tag`."""
        self._cluster.check_checkpoint(name, tag)

    def restore(self, name: str, tag: str, *, job: Job | None = None) -> list[str]:
        """Roll every shard's part of `name` back to checkpoint `tag`; NOT_FOUND naming the shards
        that lack it, checked first, restores none."""
        return self._cluster.restore(name, tag, job=job)

    # ---- data path ----------------------------------------------------------------------------

    def lookup(self, name: str, ids: np.ndarray) -> np.ndarray:
        return self.lookup_async(name, ids).result()

    def lookup_async(self, name: str, ids: np.ndarray) -> Future:
        """Rows shaped ids.shape + (dim,), as `MemStoreClient.lookup`."""
        ids = as_row_ids(ids)
        if self.num_shards == 1 or ids.size == 0:
            return self._named(0, self.shards[0].lookup_async(name, ids))
        unique, inverse = np.unique(ids.reshape(-1), return_inverse=True)
        order, parts = split_by_shard(unique, self.num_shards)
        futures = [(part, self._named(index, shard.lookup_async(name, unique[order[part]])))
                   for index, (shard, part) in enumerate(zip(self.shards, parts)) if part.stop > part.start]
        return self._pool.submit(_gather, futures, order, inverse.reshape(ids.shape), len(unique))

    def update(self, name: str, ids: np.ndarray, grads: np.ndarray, *, step: int | None = None,
               job: Job | None = None, lr: float | None = None) -> bool:
        """`MemStoreClient.update` over the shards. With `step`, each shard applies its part at most
        once, so after a partial failure (some shards applied, one was down) the caller re-sends
        the whole step: the shards that applied it acknowledge, the others apply it."""
        return self.update_async(name, ids, grads, step=step, job=job, lr=lr).result()

    def update_async(self, name: str, ids: np.ndarray, grads: np.ndarray, *, step: int | None = None,
                     job: Job | None = None, lr: float | None = None) -> Future:
        """One update per shard that owns some of the rows; each shard applies its part exactly once.
        A data-parallel step goes to every shard, empty where this rank has no rows of it: each
        shard waits for every rank's share."""
        ids = as_row_ids(ids)
        ids, grads = sum_duplicates(ids.reshape(-1), as_row_grads(grads, ids))
        kwargs = {"step": step, "job": job, "lr": lr}
        if self.num_shards == 1:
            return self._named(0, self.shards[0].update_async(name, ids, grads, **kwargs))
        order, parts = split_by_shard(ids, self.num_shards)
        every_shard = job is not None
        futures = [self._named(index, shard.update_async(name, ids[order[part]], grads[order[part]], **kwargs))
                   for index, (shard, part) in enumerate(zip(self.shards, parts))
                   if every_shard or part.stop > part.start]
        return self._pool.submit(_all_applied, futures)

    def _named(self, index: int, future: Future) -> Future:
        """`future`, whose error (if any) names shard `index`."""
        named: Future = Future()

        def settle(done: Future) -> None:
            error = done.exception()
            if error is None:
                named.set_result(done.result())
            else:
                named.set_exception(on_shard(error, index, self.targets[index]))
        future.add_done_callback(settle)
        return named

    def shared_tables(self) -> list[str]:
        """Tables every shard of which this client reads through shared memory."""
        return sorted(set.intersection(*(set(c.shared_tables()) for c in self.shards)))

    def stats(self) -> list:
        return [c.stats() for c in self.shards]

    def close(self) -> None:
        self._cluster.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _all_applied(futures: list[Future]) -> bool:
    """Wait for every shard (a failure is raised only after all have answered, so a re-send never
    races a shard still applying the first attempt)."""
    results, error = [], None
    for future in futures:
        try:
            results.append(future.result())
        except Exception as exc:  # noqa: BLE001 - re-raised below, once every shard is done
            error = error or exc
    if error is not None:
        raise error
    return all(results)


def _gather(futures: list[tuple[slice, Future]], order: np.ndarray, inverse: np.ndarray, n_unique: int) -> np.ndarray:
    """Put each shard's rows back at their unique-id positions, then expand to request order
    (`inverse` has the request's shape, so the rows do too)."""
    unique_rows = None
    for part, future in futures:
        rows = future.result()
        if unique_rows is None:
            unique_rows = np.empty((n_unique, rows.shape[1]), dtype=rows.dtype)
        unique_rows[order[part]] = rows
    return unique_rows[inverse]
