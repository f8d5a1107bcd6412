"""Decoding with lookups started at model entry (engram_client.decode): same tokens and logits as
without, for every table source, 1 and 2 Engram layers, sequences joining and leaving the batch;
the EngramState lookahead invariant; generation served by a read-only replica."""
from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest
import torch

from bench.decode_model import Batch, DecoderConfig, DecoderGPT, Request, serve
from engram_client import (
    EngramBlock,
    EngramConfig,
    EntryPrefetch,
    HostTables,
    LocalTables,
    MemStoreClient,
    MemStoreTables,
    NgramHasher,
    RowCache,
    cat_states,
    select_states,
)
from memstore.errors import PermissionDenied
from tests.servers import ServeProcess, in_process

VOCAB = 61
ENGRAM = EngramConfig(engram_vocab_size=[211, 223], max_ngram_size=3, n_embed_per_ngram=16, n_head_per_ngram=2,
                      layer_ids=[1, 2], pad_id=0, kernel_size=3)
HASHER = NgramHasher(ENGRAM, vocab_size=VOCAB)
SOURCES = ["local", "host", "memstore", "memstore-same-host", "memstore-cached"]


def make_model(tables_for, engram_layers=(1, 2)) -> DecoderGPT:
    """tables_for(layer) -> a TableSource (or None for local tables)."""
    config = DecoderConfig(vocab_size=VOCAB, block_size=64, n_layer=4, n_head=2, n_embd=16,
                           engram_layers=tuple(engram_layers))
    factory = lambda layer, hidden: EngramBlock(ENGRAM, layer, hidden, tables=tables_for(layer), hasher=HASHER)
    return DecoderGPT(config, factory, seed=0).eval()


def requests(n=6, seed=0) -> list[Request]:
    """Prompts of 3..20 tokens, 2..12 new tokens each: with batch_size 3 sequences join and leave."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 21, (n,), generator=g).tolist()
    new = torch.randint(2, 13, (n,), generator=g).tolist()
    return [Request(torch.randint(1, VOCAB, (t,), generator=g), m) for t, m in zip(lengths, new)]


@contextlib.contextmanager
def table_source(kind: str, tmp_path):
    """A factory layer -> TableSource of `kind`, with whatever servers it needs."""
    rows = lambda layer: HASHER.total_rows(layer)
    if kind == "local":
        yield lambda layer: LocalTables(rows(layer), ENGRAM.head_dim)
        return
    if kind == "host":
        yield lambda layer: HostTables(rows(layer), ENGRAM.head_dim, name=f"l{layer}")
        return
    shared = "on" if kind == "memstore-same-host" else "off"
    with in_process(tmp_path / "data", "ram") as server, MemStoreClient(server.target, shared_memory=shared) as client:
        cache = (lambda: RowCache(64 * 40, ENGRAM.head_dim)) if kind == "memstore-cached" else (lambda: None)
        yield lambda layer: MemStoreTables(client, f"l{layer}", rows(layer), ENGRAM.head_dim, cache=cache())


@pytest.mark.parametrize("kind", SOURCES)
@pytest.mark.parametrize("engram_layers", [(1,), (1, 2)], ids=["1-layer", "2-layers"])
def test_entry_prefetch_generates_the_same_tokens_and_logits(kind, engram_layers, tmp_path):
    with table_source(kind, tmp_path) as tables_for:
        model = make_model(tables_for, engram_layers)
        reqs = requests()
        with_prefetch = serve(model, reqs, batch_size=3, prefetch=True, keep_logits=True)
        remote = [b.tables for b in model.entry.blocks if hasattr(b.tables, "stats")]
        assert all(t.stats.requested_ahead == t.stats.lookups > 0 for t in remote)  # every forward prefetched
        without = serve(model, reqs, batch_size=3, prefetch=False, keep_logits=True)
        assert all(t.stats.requested_ahead < t.stats.lookups for t in remote)
    assert max(with_prefetch.batch_sizes) == 3 and len(set(with_prefetch.batch_sizes)) > 1  # joined and left
    assert with_prefetch.tokens == without.tokens
    for a, b in zip(with_prefetch.logits, without.logits):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("engram_layers", [(1,), (1, 2)], ids=["1-layer", "2-layers"])
def test_batched_decoding_equals_recomputing_each_sequence(engram_layers):
    """Continuous batching (padding, joins, leaves, per-sequence Engram states) changes nothing:
    each token's logits equal one full forward over that sequence alone."""
    model = make_model(lambda layer: None, engram_layers)
    reqs = requests(seed=1)
    out = serve(model, reqs, batch_size=3, keep_logits=True)
    for req, tokens, logits in zip(reqs, out.tokens, out.logits):
        sequence = torch.cat([req.prompt, torch.tensor(tokens[:-1])]).view(1, -1)
        full = model(sequence, model.new_batch(1), prefetch=False)[0, len(req.prompt) - 1:]  # (n, V)
        torch.testing.assert_close(torch.stack(logits), full, rtol=1e-4, atol=1e-5)
        assert tokens == full.argmax(-1).tolist()


def test_teacher_forced_generation_feeds_the_given_tokens():
    model = make_model(lambda layer: None)
    req = requests(1)[0]
    req.forced = torch.arange(1, req.max_new_tokens + 1)
    assert serve(model, [req], batch_size=2).tokens == [req.forced.tolist()]


# ---- the EngramState lookahead invariant (engram_client.block.EngramState) ---------------------------
def block_and_inputs(tables=None):
    torch.manual_seed(0)
    block = EngramBlock(ENGRAM, 1, 16, tables=tables, hasher=HASHER).eval()
    ids = torch.randint(1, VOCAB, (3, 5))
    hidden = torch.randn(3, 5, 16)
    return block, hidden, ids


def test_a_lookahead_for_other_tokens_is_discarded_not_used():
    block, hidden, ids = block_and_inputs()
    expected_state = block.init_state(3)
    expected = block(hidden, ids, state=expected_state)
    state = block.init_state(3)
    block.prefetch((ids + 1) % VOCAB, state)  # rows of tokens that are then not forwarded
    assert torch.equal(block(hidden, ids, state=state), expected)
    assert state.lookahead is None and torch.equal(state.tokens, expected_state.tokens)


def test_forward_consumes_the_lookahead_once():
    block, hidden, ids = block_and_inputs()
    state = block.init_state(3)
    block.prefetch(ids[:, :2], state)
    first = block(hidden[:, :2], ids[:, :2], state=state)
    assert state.lookahead is None  # the next chunk hashes from the advanced history
    rest = block(hidden[:, 2:], ids[:, 2:], state=state)
    torch.testing.assert_close(torch.cat([first, rest], 1), block(hidden, ids))


def test_rebatching_drops_the_lookahead_and_keeps_each_sequence():
    block, hidden, ids = block_and_inputs()
    state = block.init_state(3)
    block(hidden[:, :3], ids[:, :3], state=state)
    block.prefetch(ids[:, 3:4], state)
    picked = select_states([state], [2, 0])[0]
    merged = cat_states([[picked], [state.select([1])]])[0]
    assert picked.lookahead is None and merged.lookahead is None and merged.batch_size == 3
    out = block(hidden[[2, 0, 1], 3:], ids[[2, 0, 1], 3:], state=merged)
    torch.testing.assert_close(out, block(hidden[[2, 0, 1]], ids[[2, 0, 1]])[:, 3:])


def test_entry_prefetch_needs_one_state_per_block():
    model = make_model(lambda layer: None)
    entry = EntryPrefetch(model)
    assert len(entry.blocks) == 2
    with pytest.raises(ValueError, match="1 states for 2 Engram blocks"):
        entry.start(torch.ones(1, 1, dtype=torch.int64), entry.init_states(1)[:1])


def test_batch_select_trims_padding_no_sequence_uses():
    model = make_model(lambda layer: None)
    long, short = model.new_batch(1), model.new_batch(1)
    model(torch.ones(1, 9, dtype=torch.int64), long)
    model(torch.ones(1, 4, dtype=torch.int64), short)
    both = Batch.cat([long, short])
    assert both.filled == 9 and both.select([1]).filled == 4 and both.select([1]).k[0].shape[2] == 4


# ---- serving replicas -------------------------------------------------------------------------------
def test_a_read_only_replica_serves_generation_and_refuses_updates(tmp_path):
    """Train rows on a RAM daemon, stop it (SIGTERM snapshots), serve the data dir --read-only:
    generation reads the trained rows (same-host and over gRPC) and updates are refused."""
    data = tmp_path / "data"
    layers = (1, 2)
    with ServeProcess(data, "ram") as primary, MemStoreClient(primary.target) as client:
        for layer in layers:
            MemStoreTables(client, f"l{layer}", HASHER.total_rows(layer), ENGRAM.head_dim, optimizer="sgd", lr=1.0)
            ids = np.arange(0, HASHER.total_rows(layer), 3)
            client.update(f"l{layer}", ids, np.full((len(ids), ENGRAM.head_dim), -0.5, np.float32))
        trained = {layer: client.lookup(f"l{layer}", np.arange(HASHER.total_rows(layer))) for layer in layers}
        primary.stop()
    reqs = requests(4, seed=2)
    generations = []
    with ServeProcess(data, "ram", "--read-only") as replica:
        for shared in ("on", "off"):
            with MemStoreClient(replica.target, shared_memory=shared) as client:
                model = make_model(lambda layer: MemStoreTables(client, f"l{layer}", HASHER.total_rows(layer),
                                                                ENGRAM.head_dim, optimizer="sgd", lr=1.0), layers)
                generations.append(serve(model, reqs, batch_size=2).tokens)
                for layer in layers:
                    np.testing.assert_array_equal(client.lookup(f"l{layer}", np.arange(HASHER.total_rows(layer))),
                                                  trained[layer])
                with pytest.raises(PermissionDenied, match="read-only"):
                    client.update("l1", np.array([0]), np.ones((1, ENGRAM.head_dim), np.float32))
    local = make_model(lambda layer: LocalTables(HASHER.total_rows(layer), ENGRAM.head_dim), layers)
    for layer, block in zip(layers, local.entry.blocks):
        block.tables.weight.data = torch.from_numpy(trained[layer])
    assert generations[0] == generations[1] == serve(local, reqs, batch_size=2).tokens


# ---- the lookahead invariants, continued; table sources ------------------------------------------
def test_only_the_block_that_requested_rows_uses_them():
    torch.manual_seed(0)
    first = EngramBlock(ENGRAM, 1, 16, hasher=HASHER).eval()
    second = EngramBlock(ENGRAM, 2, 16, hasher=HASHER).eval()
    ids, hidden = torch.randint(1, VOCAB, (2, 4)), torch.randn(2, 4, 16)
    state = second.init_state(2)
    first.prefetch(ids, state)  # states handed to the wrong blocks: first's rows must not reach second
    assert torch.equal(second(hidden, ids, state=state), second(hidden, ids))
    assert state.lookahead is None


def test_tokens_changed_in_place_after_prefetch_are_looked_up_again():
    block, hidden, ids = block_and_inputs()
    state = block.init_state(3)
    block.prefetch(ids, state)
    ids[0, 0] = (ids[0, 0] + 1) % VOCAB
    assert torch.equal(block(hidden, ids, state=state), block(hidden, ids))


def test_a_copied_state_starts_without_the_lookahead():
    import copy
    model = make_model(lambda layer: HostTables(HASHER.total_rows(layer), ENGRAM.head_dim, name=f"l{layer}"))
    states = model.entry.init_states(2)
    model.entry.start(torch.ones(2, 3, dtype=torch.int64), states)
    copied = copy.deepcopy(states)
    assert all(s.lookahead is None for s in copied) and all(s.lookahead is not None for s in states)


def test_select_takes_a_bool_mask_and_refuses_floats():
    block, hidden, ids = block_and_inputs()
    state = block.init_state(3)
    block(hidden, ids, state=state)
    assert torch.equal(state.select(torch.tensor([True, False, True])).tokens, state.tokens[[0, 2]])
    with pytest.raises(ValueError, match="bool mask"):
        state.select(torch.tensor([True, False]))
    with pytest.raises(TypeError, match="positions or a bool mask"):
        state.select(torch.tensor([0.0, 1.0]))


def test_start_checks_every_state_before_sending_anything():
    model = make_model(lambda layer: None)
    states = model.entry.init_states(2)
    with pytest.raises(ValueError, match=r"states\[1\] must be an EngramState of batch size 2 .* got batch size 3"):
        model.entry.start(torch.ones(2, 1, dtype=torch.int64), [states[0], model.entry.blocks[1].init_state(3)])
    with pytest.raises(ValueError, match=r"states\[0\] must be an EngramState .* got NoneType"):
        model.entry.start(torch.ones(2, 1, dtype=torch.int64), [None, states[1]])
    assert all(s.lookahead is None for s in states)


def test_a_source_with_only_forward_row_ids_still_works():
    class PlainTables(LocalTables):
        def forward(self, row_ids):  # the contract before prefetch existed
            return super().forward(row_ids)

    model = make_model(lambda layer: PlainTables(HASHER.total_rows(layer), ENGRAM.head_dim))
    reqs = requests(3)
    assert serve(model, reqs, 2).tokens == serve(model, reqs, 2, prefetch=False).tokens


def test_rows_requested_before_a_restore_are_not_used_after_it():
    """A forward interrupted after `start`, a restore, then the same states: the rows are fetched
    again (and never cached) instead of the pre-restore ones."""
    rows = HASHER.total_rows(1)
    tables = HostTables(rows, ENGRAM.head_dim, optimizer="sgd", lr=1.0, cache=RowCache(1 << 16, ENGRAM.head_dim))
    row_ids = torch.arange(0, 40).view(1, 5, 8)
    early = tables.prefetch(row_ids)
    tables.store.update(tables.name, np.arange(40), np.ones((40, ENGRAM.head_dim), np.float32))  # the restored rows
    tables.reset_step(0)
    current = torch.from_numpy(tables.store.lookup(tables.name, np.arange(40))).view(1, 5, 8, -1)
    assert torch.equal(tables(row_ids, prefetched=early), current)
    assert torch.equal(tables(row_ids), current)  # and the row cache did not keep the old rows


def test_a_closed_host_store_says_so_for_any_lookup_size():
    tables = HostTables(HASHER.total_rows(1), ENGRAM.head_dim)
    tables.store.close()
    for n in (3, 20_000):
        with pytest.raises(RuntimeError, match="closed"):
            tables.store.lookup_async(tables.name, np.arange(n)).result()


def test_small_same_host_lookups_are_done_at_once_and_never_block_on_a_dead_daemon(tmp_path):
    with ServeProcess(tmp_path / "data", "ram") as server:
        client = MemStoreClient(server.target, shared_memory="on", retry_timeout_s=3)
        client.create_table("t", 1000, 4)
        client.lookup("t", np.arange(3))  # maps the table
        assert client.lookup_async("t", np.arange(10)).done()
        server.kill()
        started = time.monotonic()
        future = client.lookup_async("t", np.arange(10))  # stale mapping: the retries run in the background
        assert time.monotonic() - started < 1.0
        with pytest.raises(Exception):  # noqa: B017 - Unavailable after the retries, or a stale mapping
            future.result(timeout=30)
        client.close()


def test_entry_prefetch_under_inference_mode():
    model = make_model(lambda layer: HostTables(HASHER.total_rows(layer), ENGRAM.head_dim, name=f"l{layer}"))
    reqs = requests(3)
    expected = serve(model, reqs, 2).tokens
    with torch.inference_mode():  # inference tensors keep no version counter: compared by value
        assert serve(model, reqs, 2).tokens == expected


def test_cat_states_refuses_groups_that_do_not_line_up():
    model = make_model(lambda layer: None)
    two = model.entry.init_states(2)
    with pytest.raises(ValueError, match="one state per Engram block"):
        cat_states([two, two[:1]])
    with pytest.raises(ValueError, match="different orders"):
        odd = EngramBlock(ENGRAM, 2, 8, hasher=HASHER).init_state(1)  # another block's shape
        cat_states([two, [two[0], odd]])


def test_engram_config_needs_a_pad_token_id():
    with pytest.raises(ValueError, match="pad_id must be a token id"):
        EngramConfig(engram_vocab_size=[211, 223], layer_ids=[1], pad_id=None)
