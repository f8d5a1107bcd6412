"""The client hot-row cache: correct rows, bounded memory, high hit rate on Zipfian traffic."""
import numpy as np
import torch

from engram_client.cache import RowCache
from engram_client.remote import MemStoreTables
from engram_client.sharded import ShardedClient
from tests.servers import in_process


def test_lookup_insert_invalidate():
    cache = RowCache(capacity_bytes=100 * (4 * 4 + 9), dim=4)
    ids = torch.tensor([3, 17, 4000])
    hit, _ = cache.lookup(ids)
    assert not hit.any()
    cache.insert(ids, torch.arange(12.0).view(3, 4))
    hit, rows = cache.lookup(ids)
    assert hit.all() and torch.equal(rows, torch.arange(12.0).view(3, 4))
    cache.invalidate(torch.tensor([17]))
    hit, _ = cache.lookup(ids)
    assert hit.tolist() == [True, False, True]
    assert cache.capacity_bytes <= 100 * (4 * 4 + 9)


def test_hot_rows_survive_a_stream_of_cold_ones():
    cache = RowCache(capacity_bytes=64 * 25, dim=4)  # 64 slots
    hot = torch.arange(10)
    cache.insert(hot, torch.ones(10, 4))
    for start in range(1000, 3000, 50):  # one-off rows compete for the same slots
        cache.lookup(hot)  # while the hot rows keep being read
        cold = torch.arange(start, start + 50)
        hit, _ = cache.lookup(cold)
        cache.insert(cold[~hit], torch.zeros(int((~hit).sum()), 4))
    hit, rows = cache.lookup(hot)
    assert hit.float().mean() > 0.8 and (rows[hit] == 1).all()


def test_zipfian_hit_rate_is_near_an_oracle_cache():
    """Unique ids per batch, Zipf s=1.1, a cache of 5% of the rows: the best any cache can do is to
    hold the 5% most frequent rows (here: the smallest ids); a direct-mapped cache gets a good part."""
    rng = np.random.default_rng(0)
    rows, dim = 200_000, 16
    top = rows // 20
    cache = RowCache(capacity_bytes=top * (dim * 4 + 9), dim=dim)
    oracle_hits = lookups = 0
    for _ in range(30):
        ids = torch.from_numpy(np.unique((rng.zipf(1.1, 20_000) - 1) % rows))
        hit, _ = cache.lookup(ids)
        cache.insert(ids[~hit], torch.zeros(int((~hit).sum()), dim))
        oracle_hits += int((ids < top).sum())
        lookups += len(ids)
    assert cache.hit_rate > 0.5 * oracle_hits / lookups, (cache.hit_rate, oracle_hits / lookups)


def test_inference_with_cache_equals_without_and_fetches_less(tmp_path):
    rng = np.random.default_rng(1)
    with in_process(tmp_path / "d") as server, ShardedClient([server.target]) as client:
        plain = MemStoreTables(client, "t", 5000, 8, optimizer="sgd").eval()
        cached = MemStoreTables(client, "t", 5000, 8, optimizer="sgd", cache=RowCache(1 << 16, 8)).eval()
        with torch.no_grad():
            for _ in range(30):
                ids = torch.from_numpy((rng.zipf(1.2, (2, 16, 4)) - 1) % 5000)
                torch.testing.assert_close(cached(ids), plain(ids), rtol=0, atol=0)
    assert cached.stats.rows_fetched < 0.7 * plain.stats.rows_fetched
