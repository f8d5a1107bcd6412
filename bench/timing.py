"""Side-by-side timing and id distributions.

Absolute numbers on a shared machine drift with the load of its neighbours, so systems are never
timed one after the other in long blocks: every round times each system once (in a rotating
order), and a system's result is the median over rounds. Load that comes and goes then hits all
systems alike, and their ratios stay meaningful even when the absolute numbers move.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class Measurement:
    """Seconds per call of one system in one setting, one value per round."""
    system: str
    seconds: list[float]
    items: int          # rows (or tokens) one call handles
    item_bytes: int     # payload bytes per item (0 when bytes mean nothing here)

    @property
    def median_s(self) -> float:
        return float(np.median(self.seconds))

    @property
    def rate(self) -> float:
        """Items per second at the median call time."""
        return self.items / self.median_s

    @property
    def rate_range(self) -> tuple[float, float]:
        """(slowest, fastest) items per second over the rounds: the spread."""
        return self.items / max(self.seconds), self.items / min(self.seconds)

    @property
    def gbps(self) -> float:
        return self.rate * self.item_bytes / 1e9

    def record(self, **setting) -> dict:
        """A flat JSON-able record: the setting, the median, the spread."""
        slow, fast = self.rate_range
        return {**setting, "system": self.system, "items": self.items, "rounds": len(self.seconds),
                "median_ms": 1e3 * self.median_s, "rate": self.rate, "rate_min": slow, "rate_max": fast,
                "gb_per_s": self.gbps, "seconds": self.seconds}


Call = Callable[[int], object]  # call(i): run once on input number i (inputs rotate so caches stay cold)


def side_by_side(calls: dict[str, Call], rounds: int, min_sample_s: float) -> dict[str, list[float]]:
    """Seconds per call of every system, `rounds` values each, measured interleaved.

    Each system is first called once (warm-up: connections, allocations, page faults) and that
    time decides how many calls make one sample (enough to last `min_sample_s`: short calls are
    averaged over several, so timer resolution and scheduling jitter do not dominate).
    """
    repeats, counter = {}, 0
    for name, call in calls.items():
        started = time.perf_counter()
        call(counter)
        counter += 1
        first = time.perf_counter() - started
        repeats[name] = max(1, min(1000, math.ceil(min_sample_s / max(first, 1e-6))))
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate: no fixed first/last
            call, n = calls[name], repeats[name]
            started = time.perf_counter()
            for _ in range(n):
                call(counter)
                counter += 1
            seconds[name].append((time.perf_counter() - started) / n)
    return seconds


class ZipfIds:
    """Row ids with P(rank k) ~ 1 / k^s over `num_rows` rows; hot rows are scattered at random
    positions of the table (n-gram hashes put frequent n-grams anywhere)."""

    def __init__(self, num_rows: int, s: float, seed: int = 0):
        rng = np.random.default_rng(seed)
        weights = np.arange(1, num_rows + 1, dtype=np.float64) ** -s   # (N,)
        self.cdf = np.cumsum(weights)
        self.cdf /= self.cdf[-1]
        self.row_of_rank = rng.permutation(num_rows).astype(np.int64)  # (N,)
        self.rng = rng

    def sample(self, size: int) -> np.ndarray:
        ranks = np.searchsorted(self.cdf, self.rng.random(size), side="right")
        return self.row_of_rank[np.minimum(ranks, len(self.cdf) - 1)]


def uniform_ids(num_rows: int, size: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, num_rows, size=size, dtype=np.int64)


def id_batches(num_rows: int, size: int, count: int, dist: str, seed: int,
               zipf_s: float = 1.1) -> list[np.ndarray]:
    """`count` different batches of `size` ids ("uniform" or "zipf"): each call reads fresh ids."""
    if dist == "uniform":
        rng = np.random.default_rng(seed)
        return [uniform_ids(num_rows, size, rng) for _ in range(count)]
    if dist == "zipf":
        zipf = ZipfIds(num_rows, zipf_s, seed)
        return [zipf.sample(size) for _ in range(count)]
    raise ValueError(f"unknown id distribution {dist!r}")
