"""Engram in a Hugging Face Llama (or Qwen2): train it, then generate with the decoding state.

    python examples/hf_llama_engram.py                       # local tables, a plain training loop
    python examples/hf_llama_engram.py --tables host         # tables in host RAM (memstore optimizer)
    python examples/hf_llama_engram.py --memstore            # tables on a memstore daemon it starts
    python examples/hf_llama_engram.py --memstore HOST:PORT  # ... or on a running one
    python examples/hf_llama_engram.py --memstore --trainer  # transformers.Trainer, table checkpoints
    python examples/hf_llama_engram.py --model qwen2

The model is a tiny byte-level LlamaForCausalLM built from a config with random weights (nothing
is downloaded); `add_engram` puts an Engram block before decoder layer 1. Needs the `hf` extra
(`pip install -e ".[hf]"`). Runs in well under a minute on a CPU.
"""
from __future__ import annotations

import argparse
import contextlib
import tempfile
import time

import torch
import transformers
from gpt_with_engram import TEXT  # the same few lines of text as the small GPT example
from memstore_daemon import local_daemon  # examples/memstore_daemon.py

from engram_client import EngramConfig, MemStoreClient
from engram_client.hf import EngramAdapter, add_engram
from engram_client.hf_trainer import EngramTrainer

PAD, BOS, EOS = 0, 1, 2  # bytes are ids 3..258
BLOCK, BATCH = 64, 16


def encode(text: str) -> torch.Tensor:
    return torch.tensor([b + 3 for b in text.encode()])


def decode(ids: list[int]) -> str:
    return bytes(i - 3 for i in ids if i >= 3).decode(errors="replace")


def tiny_model(family: str) -> transformers.PreTrainedModel:
    sizes = {"vocab_size": 259, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
             "pad_token_id": PAD, "bos_token_id": BOS, "eos_token_id": EOS}
    if family == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**sizes))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**sizes))


def batches(steps: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """`steps` batches of random windows of TEXT (labels = inputs: the model shifts them)."""
    data, gen = encode(TEXT), torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - BLOCK, (BATCH,), generator=gen)
        ids = torch.stack([data[s: s + BLOCK] for s in starts])
        out.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    return out


def train_plain(model, engram: EngramAdapter, steps: int) -> list[float]:
    """A plain loop: AdamW for the dense weights (and local tables); remote tables are stepped by
    their store; the prefetcher fetches the rows of batch k+1 while step k computes."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step, batch in enumerate(engram.prefetch(batches(steps))):
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % 25 == 0:
            print(f"  step {step:4d}  loss {loss.item():.3f}")
    engram.flush()
    return losses


def train_with_trainer(model, engram: EngramAdapter, steps: int, output_dir: str) -> list[float]:
    rows = [{k: v[i] for k, v in batch.items()} for batch in batches(steps) for i in range(BATCH)]
    args = transformers.TrainingArguments(
        output_dir=output_dir, per_device_train_batch_size=BATCH, max_steps=steps, learning_rate=3e-3,
        lr_scheduler_type="constant", logging_steps=max(1, steps // 8), save_steps=max(1, steps // 2),
        report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = EngramTrainer(model=model, args=args, train_dataset=rows, engram=engram)
    trainer.train()
    print(f"  Trainer checkpoints in {output_dir}")
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def generate(model, prompt: str, tokens: int) -> None:
    ids = encode(prompt)[None]
    model.eval()
    with torch.no_grad():
        cached = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=PAD)
        recomputed = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=PAD, use_cache=False)
    print("sample:", repr(decode(cached[0].tolist())))
    print("generate with the Engram state == full recompute:", torch.equal(cached, recomputed))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["llama", "qwen2"], default="llama")
    parser.add_argument("--tables", choices=["local", "host"], default="local")
    parser.add_argument("--memstore", nargs="?", const="start", metavar="HOST:PORT",
                        help="tables on memstore: a running daemon, or (no value) one this script starts")
    parser.add_argument("--trainer", action="store_true", help="train with transformers.Trainer")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--output-dir", help="Trainer checkpoints (default: a temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # matrices this small run fastest on one thread
    torch.manual_seed(0)

    with contextlib.ExitStack() as stack:
        tables = args.tables
        if args.memstore:
            target = stack.enter_context(local_daemon()) if args.memstore == "start" else args.memstore
            tables = stack.enter_context(MemStoreClient(target))
            print(f"tables on memstore at {target}")
        model = tiny_model(args.model)
        engram_config = EngramConfig(engram_vocab_size=[2003, 2003], max_ngram_size=3, n_embed_per_ngram=32,
                                     n_head_per_ngram=4, layer_ids=[1], pad_id=PAD)
        table_args = {} if tables == "local" else {"optimizer": "adam", "lr": 1e-2}
        engram = add_engram(model, engram_config, tables=tables, table_args=table_args)
        for source in engram.remote_tables() if args.memstore else ():
            if (updates := source.store.describe_table(source.name).updates):
                print(f"note: table {source.name} exists with {updates} updates; training continues it "
                      f"(`memstore drop-table {source.name} --yes` for a fresh start)")
        where = "memstore" if args.memstore else args.tables
        rows = sum(block.tables.num_rows for block in engram.blocks.values())
        print(f"{type(model).__name__} with Engram in decoder layer 1 ({where} tables, {rows} rows)")
        started = time.perf_counter()
        if args.trainer:
            output_dir = args.output_dir or stack.enter_context(tempfile.TemporaryDirectory())
            losses = train_with_trainer(model, engram, args.steps, output_dir)
        else:
            losses = train_plain(model, engram, args.steps)
        print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in {time.perf_counter() - started:.1f} s")
        generate(model, "The memory ", 48)


if __name__ == "__main__":
    main()
