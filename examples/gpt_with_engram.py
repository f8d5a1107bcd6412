"""A tiny character-level GPT with an Engram block in layer 2. Runs on a CPU in seconds.

    python examples/gpt_with_engram.py              # train with Engram, then sample
    python examples/gpt_with_engram.py --compare    # same run without Engram, for comparison
    python examples/gpt_with_engram.py --memstore   # the table on a memstore daemon this script starts
    python examples/gpt_with_engram.py --memstore HOST:PORT   # ... or on a running daemon

The Engram block sits before attention, as in DeepSeek's demo:
    x = x + engram(x, idx);  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
Its tables get sparse gradients and are trained by RowwiseAdam; everything else by AdamW. With
--memstore the table lives on a memstore daemon instead: its Adam runs on the server, and a
Prefetcher looks up the rows of batch k+1 while step k computes.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from memstore_daemon import local_daemon  # examples/memstore_daemon.py
from torch import nn

from engram_client import (
    EngramBlock,
    EngramConfig,
    MemStoreClient,
    MemStoreTables,
    NgramHasher,
    Prefetcher,
    RowwiseAdam,
)

TEXT = """\
The memory of a language model is spread over its weights, but some of what it knows is plain
lookup: names, fixed phrases, the next letters of a common word. Engram gives that lookup its own
place. Every few tokens hash into a large table, the rows found there are gated by the hidden state,
and the result is added back to the stream. The table can be far larger than the model, because a
step only reads the rows its n-grams hash to. A small model that no longer spends its layers on
spelling can spend them on everything else.
"""


@dataclass
class GPTConfig:
    vocab_size: int
    block_size: int = 64  # context length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    engram_layer: int | None = 2  # None = a plain GPT
    memstore: MemStoreClient | None = None  # where the Engram table lives; None = in the model


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head).unbind(dim=2)  # (B, T, nh, hs)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer_id: int, engram_cfg: EngramConfig | None) -> None:
        super().__init__()
        self.engram = None
        if engram_cfg is not None and layer_id in engram_cfg.layer_ids:  # hc_mult=1: hidden states are plain (B, T, C)
            tables = memstore_table(cfg, engram_cfg, layer_id)
            self.engram = EngramBlock(engram_cfg, layer_id, cfg.n_embd, tables=tables, vocab_size=cfg.vocab_size,
                                      zero_init_conv=True, sparse_grads=True)
        self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd), CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        if self.engram is not None:
            x = x + self.engram(x, idx)  # (B, T, C): the n-gram memory, gated by x
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def memstore_table(cfg: GPTConfig, engram_cfg: EngramConfig, layer_id: int) -> MemStoreTables | None:
    """The layer's table on memstore (created there on first use), or None for a table in the model."""
    if cfg.memstore is None:
        return None
    num_rows = NgramHasher(engram_cfg, vocab_size=cfg.vocab_size).total_rows(layer_id)
    tables = MemStoreTables(cfg.memstore, f"gpt_engram_l{layer_id}", num_rows, engram_cfg.head_dim,
                            optimizer="adam", lr=3e-3)
    say_if_trained(tables)
    return tables


def say_if_trained(tables: MemStoreTables) -> None:
    """A table that already exists on the daemon is attached as it is: say so."""
    info = tables.store.describe_table(tables.name)
    if info.updates:
        print(f"note: table {tables.name} exists with {info.updates} updates; training continues it "
              f"(`memstore drop-table {tables.name} --yes` for a fresh start)")


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        engram_cfg = None
        if cfg.engram_layer is not None:  # char n-grams are few: tables of ~1000 rows per head suffice
            engram_cfg = EngramConfig(engram_vocab_size=[1000, 1000], max_ngram_size=3, n_embed_per_ngram=32,
                                      n_head_per_ngram=4, layer_ids=[cfg.engram_layer], pad_id=0)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg, i, engram_cfg) for i in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))  # (B, T, C)
        for block in self.blocks:
            x = block(x, idx)  # every block sees the token ids; only the Engram layer uses them
        return self.lm_head(self.ln_f(x))  # (B, T, vocab)

    def optimizers(self, lr: float = 3e-3) -> list[torch.optim.Optimizer]:
        tables = [p for n, p in self.named_parameters() if ".tables." in n]
        dense = [p for n, p in self.named_parameters() if ".tables." not in n]
        opts: list[torch.optim.Optimizer] = [torch.optim.AdamW(dense, lr=lr, weight_decay=0.0)]
        if tables:  # sparse row gradients: only the rows this batch read are updated
            opts.append(RowwiseAdam(tables, lr=lr))
        return opts

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, steps: int) -> torch.Tensor:
        for _ in range(steps):  # full recompute per token, like nanoGPT (see docs for EngramState)
            logits = self(idx[:, -self.cfg.block_size :])[:, -1]
            idx = torch.cat([idx, torch.multinomial(F.softmax(logits, dim=-1), 1)], dim=1)
        return idx


def batches(data: torch.Tensor, T: int, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for _ in range(steps):
        starts = torch.randint(0, len(data) - T - 1, (16,))
        x = torch.stack([data[s : s + T] for s in starts])  # (B, T)
        y = torch.stack([data[s + 1 : s + T + 1] for s in starts])  # (B, T)
        yield x, y


def train(use_engram: bool, steps: int, seed: int = 0,
          memstore: MemStoreClient | None = None) -> tuple[GPT, float]:
    torch.manual_seed(seed)
    chars = ["<pad>"] + sorted(set(TEXT))  # id 0 pads the n-grams before the first token
    data = torch.tensor([chars.index(c) for c in TEXT])
    model = GPT(GPTConfig(vocab_size=len(chars), engram_layer=2 if use_engram else None, memstore=memstore))
    opts = model.optimizers()
    loader = batches(data, model.cfg.block_size, steps + 1)
    if memstore is not None:  # rows of the next batch are fetched while this one computes
        loader = Prefetcher(loader, model)
    for step, (x, y) in enumerate(loader):
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()
        if step % 50 == 0:
            print(f"  step {step:4d}  loss {loss.item():.3f}")
    model.chars = chars
    return model, loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--compare", action="store_true", help="also train the same GPT without Engram")
    parser.add_argument("--memstore", nargs="?", const="start", metavar="HOST:PORT",
                        help="the Engram table on memstore: a running daemon, or (no value) one started here")
    args = parser.parse_args()
    torch.set_num_threads(1)  # matrices this small run fastest on one thread

    with contextlib.ExitStack() as stack:
        client = None
        if args.memstore:
            target = stack.enter_context(local_daemon()) if args.memstore == "start" else args.memstore
            client = stack.enter_context(MemStoreClient(target))
        models = {}
        for use_engram in [True, False] if args.compare else [True]:
            where = f", its table on memstore at {client.target}" if client and use_engram else ""
            print(f"GPT {'with Engram in layer 2' if use_engram else 'without Engram'}{where}:")
            start = time.perf_counter()
            models[use_engram], loss = train(use_engram, args.steps, memstore=client)
            print(f"  final loss {loss:.3f} in {time.perf_counter() - start:.1f} s")
        model = models[True]
        prompt = torch.tensor([[model.chars.index(c) for c in "The "]])
        sample = model.eval().generate(prompt, 120)[0].tolist()
        print("sample:", repr("".join(model.chars[i] for i in sample)))


if __name__ == "__main__":
    main()
