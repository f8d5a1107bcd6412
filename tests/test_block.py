"""EngramBlock: reference numerics, causality, incremental decoding, gradients, state; RowwiseAdam."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engram_client import EngramBlock, EngramConfig, LocalTables, NgramHasher, RowwiseAdam

VOCAB = 50


def make_block(hc_mult=1, hidden=16, n=3, sep=None, seed=0, **kwargs) -> EngramBlock:
    torch.manual_seed(seed)
    cfg = EngramConfig(engram_vocab_size=[97, 101, 103][: n - 1], max_ngram_size=n, n_embed_per_ngram=8,
                       n_head_per_ngram=2, layer_ids=[1, 2], pad_id=0, kernel_size=3, doc_sep_id=sep)
    return EngramBlock(cfg, 2, hidden, hc_mult=hc_mult, vocab_size=VOCAB, **kwargs)


def random_inputs(block: EngramBlock, B=2, T=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (B, T), generator=g)
    hidden = torch.randn(B, T, block.hc_mult, block.hidden_size, generator=g)
    return hidden, ids


# ---- the demo's Engram.forward, written out with a loop per branch ------------------------------
def reference_forward(block: EngramBlock, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    cfg, G, C = block.config, block.hc_mult, block.hidden_size
    per_head = torch.from_numpy(block.hasher.hash(ids.numpy())[block.layer_id])
    sizes = block.hasher.head_sizes(block.layer_id)
    offsets = torch.tensor([sum(sizes[:j]) for j in range(len(sizes))])
    emb = block.tables.weight[per_head + offsets].flatten(-2)  # (B, T, E)
    key_w = block.key_proj.weight.view(G, C, -1)
    key_b = block.key_proj.bias.view(G, C)
    gates = []
    for h in range(G):
        key = F.rms_norm(emb @ key_w[h].T + key_b[h], (C,), block.key_norm.weight[h])
        query = F.rms_norm(hidden[:, :, h, :], (C,), block.query_norm.weight[h])
        gate = (key * query).sum(dim=-1) / math.sqrt(C)
        gate = gate.abs().clamp_min(1e-6).sqrt() * gate.sign()
        gates.append(gate.sigmoid().unsqueeze(-1))
    value = torch.stack(gates, dim=2) * block.value_proj(emb).unsqueeze(2)  # (B, T, G, C)
    # ShortConv: per-branch RMSNorm, symmetric padding then truncation to T, SiLU
    B, T = ids.shape
    normed = torch.cat([F.rms_norm(value[:, :, h], (C,), block.short_conv.norm.weight[h], eps=1e-5)
                        for h in range(G)], dim=-1)
    dilation = cfg.max_ngram_size
    conv = F.conv1d(normed.transpose(1, 2), block.short_conv.conv.weight, padding=(cfg.kernel_size - 1) * dilation,
                    dilation=dilation, groups=G * C)[..., :T]
    return value + F.silu(conv).transpose(1, 2).reshape(B, T, G, C)


@pytest.mark.parametrize("hc_mult", [1, 4])
def test_matches_reference_forward(hc_mult):
    block = make_block(hc_mult=hc_mult)
    with torch.no_grad():
        block.key_norm.weight.uniform_(0.5, 1.5)  # non-trivial norm weights
        block.short_conv.norm.weight.uniform_(0.5, 1.5)
    hidden, ids = random_inputs(block)
    out = block(hidden, ids)
    assert out.shape == hidden.shape
    torch.testing.assert_close(out, reference_forward(block, hidden, ids))


def test_plain_transformer_hidden_shape():
    block = make_block(hc_mult=1)
    hidden, ids = random_inputs(block)
    out3 = block(hidden[:, :, 0], ids)
    assert out3.shape == hidden[:, :, 0].shape
    torch.testing.assert_close(out3, block(hidden, ids)[:, :, 0])


def test_zero_init_conv_makes_block_the_gated_value():
    block = make_block(hc_mult=2, zero_init_conv=True)
    hidden, ids = random_inputs(block)
    assert not block.short_conv.conv.weight.any()
    out = block(hidden, ids)
    value = reference_forward(block, hidden, ids)  # conv(0) = 0 and SiLU(0) = 0
    torch.testing.assert_close(out, value)


def test_precomputed_row_ids_skip_hashing():
    block = make_block()
    hidden, ids = random_inputs(block)
    rows = block.row_ids(ids)
    torch.testing.assert_close(block(hidden, ids, row_ids=rows), block(hidden, ids))
    other = torch.zeros_like(rows)  # the given rows, not the hash, are what gets read
    assert not torch.allclose(block(hidden, ids, row_ids=other), block(hidden, ids))


# ---- causality and incremental decoding -------------------------------------------------------
@pytest.mark.parametrize("hc_mult", [1, 2])
def test_causal(hc_mult):
    block = make_block(hc_mult=hc_mult)
    hidden, ids = random_inputs(block, T=16)
    out = block(hidden, ids)
    for t in (0, 5, 14):
        ids2, hidden2 = ids.clone(), hidden.clone()
        ids2[:, t + 1 :] = (ids2[:, t + 1 :] + 7) % VOCAB
        hidden2[:, t + 1 :] += 1.0
        out2 = block(hidden2, ids2)
        torch.testing.assert_close(out2[:, : t + 1], out[:, : t + 1], rtol=0, atol=1e-6)
        assert not torch.allclose(out2[:, t + 1 :], out[:, t + 1 :])


@pytest.mark.parametrize("hc_mult,n,sep", [(1, 3, None), (2, 2, None), (1, 4, 7), (3, 3, 7)])
def test_incremental_decoding_equals_full_forward(hc_mult, n, sep):
    block = make_block(hc_mult=hc_mult, n=n, sep=sep)
    hidden, ids = random_inputs(block, T=20)
    if sep is not None:
        ids[:, [4, 5, 12]] = sep
    with torch.no_grad():
        full = block(hidden, ids)
        state = block.init_state(batch_size=2)
        chunks = [(0, 6)] + [(t, t + 1) for t in range(6, 15)] + [(15, 20)]  # prefill, steps, chunk
        parts = [block(hidden[:, s:e], ids[:, s:e], state=state) for s, e in chunks]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)
    assert state.tokens.tolist() == ids[:, -(n - 1) :].tolist()


def test_state_with_precomputed_rows():
    block = make_block()
    hidden, ids = random_inputs(block, T=8)
    with torch.no_grad():
        full = block(hidden, ids)
        state = block.init_state(2)
        steps = []
        for t in range(8):
            rows = block.row_ids(ids[:, t : t + 1], state)  # what a prefetcher would do
            steps.append(block(hidden[:, t : t + 1], ids[:, t : t + 1], row_ids=rows, state=state))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_left_padding_with_padding_mask_equals_the_unpadded_sequence():
    block = make_block(hc_mult=2)
    hidden, ids = random_inputs(block, B=1, T=9)
    pads = 5  # the padding's ids are hashed as pad_id; its hidden states are anything
    padded_ids = torch.cat([torch.zeros(1, pads, dtype=ids.dtype), ids], dim=1)
    padded_hidden = torch.cat([torch.randn(1, pads, 2, block.hidden_size), hidden], dim=1)
    mask = torch.cat([torch.zeros(1, pads), torch.ones(1, 9)], dim=1)
    with torch.no_grad():
        alone = block(hidden, ids)
        padded = block(padded_hidden, padded_ids, padding_mask=mask)
        unmasked = block(padded_hidden, padded_ids)
    torch.testing.assert_close(padded[:, pads:], alone, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(unmasked[:, pads:], alone)  # without the mask the conv sees the padding
    assert torch.equal(padded[:, :pads], torch.zeros_like(padded[:, :pads]))


# ---- gradients and state_dict ------------------------------------------------------------------
@pytest.mark.parametrize("sparse", [False, True])
def test_gradients_reach_only_looked_up_rows(sparse):
    block = make_block(hc_mult=2, sparse_grads=sparse)
    hidden, ids = random_inputs(block)
    block(hidden, ids).square().sum().backward()
    looked_up = set(block.row_ids(ids).flatten().tolist())
    grad = block.tables.weight.grad
    if sparse:
        assert grad.is_sparse
        grad = grad.to_dense()
    touched = set(grad.abs().sum(dim=1).nonzero().flatten().tolist())
    assert touched == looked_up
    for p in (block.key_proj.weight, block.value_proj.weight, block.short_conv.conv.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_row_dropout_drops_whole_rows_in_training_only():
    block = make_block(row_dropout=0.5, sparse_grads=True)
    hidden, ids = random_inputs(block, B=4, T=32)
    torch.manual_seed(0)
    block(hidden, ids).square().sum().backward()
    grad = block.tables.weight.grad.to_dense()
    touched = set(grad.abs().sum(dim=1).nonzero().flatten().tolist())
    looked_up = set(block.row_ids(ids).flatten().tolist())
    assert touched < looked_up and len(touched) > len(looked_up) / 4  # about half the reads dropped

    block.eval()  # evaluation reads every row, unscaled: the same output as a block without dropout
    plain = make_block()
    with torch.no_grad():
        torch.testing.assert_close(block(hidden, ids), plain(hidden, ids))
    with pytest.raises(ValueError, match="row_dropout"):
        make_block(row_dropout=1.0)


def test_state_dict_round_trip():
    block = make_block(hc_mult=2, seed=0)
    hidden, ids = random_inputs(block)
    buffer = io.BytesIO()
    torch.save(block.state_dict(), buffer)
    buffer.seek(0)
    other = make_block(hc_mult=2, seed=123)
    assert not torch.allclose(other(hidden, ids), block(hidden, ids))
    other.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(other(hidden, ids), block(hidden, ids), rtol=0, atol=0)
    assert "tables.weight" in block.state_dict()


# ---- dtypes, devices, errors -------------------------------------------------------------------
def test_bf16_autocast_and_bf16_weights():
    block = make_block(hc_mult=2)
    hidden, ids = random_inputs(block)
    ref = block(hidden, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(hidden, ids)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)
    block_bf16 = block.to(torch.bfloat16)
    out16 = block_bf16(hidden.bfloat16(), ids)
    assert out16.dtype == torch.bfloat16
    torch.testing.assert_close(out16.float(), ref, rtol=0.1, atol=0.1)
    state = block_bf16.init_state(2)
    assert state.conv.dtype == torch.bfloat16
    block_bf16(hidden[:, :3].bfloat16(), ids[:, :3], state=state)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_hashing_and_forward():
    block = make_block(hc_mult=2)
    hidden, ids = random_inputs(block)
    ref = block(hidden, ids)
    cuda_block = block.cuda()
    rows = cuda_block.row_ids(ids.cuda())
    assert rows.device.type == "cuda"
    torch.testing.assert_close(rows.cpu(), block.hasher.row_ids(ids, 2))
    torch.testing.assert_close(cuda_block(hidden.cuda(), ids.cuda()).cpu(), ref, rtol=1e-4, atol=1e-4)


def test_bad_construction_and_inputs():
    cfg = EngramConfig(engram_vocab_size=[97, 101], n_embed_per_ngram=8, n_head_per_ngram=2)
    with pytest.raises(ValueError, match="not an Engram layer"):
        EngramBlock(cfg, 3, 16, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="tables are"):
        EngramBlock(cfg, 1, 16, vocab_size=VOCAB, tables=LocalTables(10, 4))
    with pytest.raises(ValueError, match="different EngramConfig"):
        EngramBlock(cfg, 1, 16, hasher=NgramHasher(EngramConfig(), vocab_size=VOCAB))
    block = EngramBlock(cfg, 1, 16, hc_mult=2, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="hc_mult == 1"):
        block(torch.zeros(1, 4, 16), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the token space"):
        block(torch.zeros(1, 4, 2, 16), torch.full((1, 4), VOCAB))


# ---- RowwiseAdam -------------------------------------------------------------------------------
def rowwise_adam_reference(table, grads_per_step, lr, betas, eps):
    """Per-row python loop of the documented update; grads_per_step: list of {row: grad}."""
    table = table.clone().double()
    m, v = torch.zeros_like(table), torch.zeros_like(table)
    steps = [0] * table.shape[0]
    for grads in grads_per_step:
        for r, g in grads.items():
            g = g.double()
            m[r] = betas[0] * m[r] + (1 - betas[0]) * g
            v[r] = betas[1] * v[r] + (1 - betas[1]) * g * g
            steps[r] += 1
            m_hat = m[r] / (1 - betas[0] ** steps[r])
            v_hat = v[r] / (1 - betas[1] ** steps[r])
            table[r] -= lr * m_hat / (v_hat.sqrt() + eps)
    return table.float(), steps


def test_rowwise_adam_matches_per_row_loop_with_sparse_grads():
    torch.manual_seed(0)
    table = LocalTables(40, 6, sparse=True, init_std=1.0)
    start = table.weight.detach().clone()
    opt = RowwiseAdam(table.parameters(), lr=0.05, betas=(0.8, 0.95), eps=1e-6)
    g = torch.Generator().manual_seed(1)
    grads_per_step = []
    for step in range(6):
        rows = torch.randint(0, 20 if step % 2 else 40, (3, 7), generator=g)  # duplicates included
        target = torch.randn(3, 7, 6, generator=g)
        opt.zero_grad()
        out = table(rows)
        ((out - target) ** 2).sum().backward()
        dense = table.weight.grad.to_dense()
        grads_per_step.append({r: dense[r].clone() for r in set(rows.flatten().tolist())})
        opt.step()
    expected, steps = rowwise_adam_reference(start, grads_per_step, 0.05, (0.8, 0.95), 1e-6)
    torch.testing.assert_close(table.weight.detach(), expected, rtol=1e-5, atol=1e-6)
    assert opt.state[table.weight]["step"].tolist() == steps
    never = [r for r in range(40) if steps[r] == 0]
    assert never and torch.equal(table.weight.detach()[never], start[never])  # untouched rows
    assert not opt.state[table.weight]["exp_avg"][never].any()


def test_rowwise_adam_equals_adam_when_every_row_is_updated():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(5, 3))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a, opt_b = RowwiseAdam([a], lr=0.01), torch.optim.Adam([b], lr=0.01)
    for _ in range(5):
        target = torch.randn(5, 3)
        for p, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            ((p - target) ** 2).sum().backward()
            opt.step()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rowwise_adam_trains_an_engram_block():
    block = make_block(hc_mult=1, sparse_grads=True, zero_init_conv=True)
    hidden, ids = random_inputs(block, B=4, T=12)
    target = torch.randn(4, 12, 1, block.hidden_size)
    dense_params = [p for name, p in block.named_parameters() if not name.startswith("tables.")]
    opts = [RowwiseAdam(block.tables.parameters(), lr=0.05), torch.optim.Adam(dense_params, lr=0.01)]
    losses = []
    for _ in range(30):
        for opt in opts:
            opt.zero_grad()
        loss = F.mse_loss(block(hidden, ids), target)
        loss.backward()
        for opt in opts:
            opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert np.isfinite(losses).all()
