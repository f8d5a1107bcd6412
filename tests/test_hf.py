"""Engram in Hugging Face causal LMs (engram_client.hf): tiny Llama and Qwen2 models built from
configs with random weights (nothing is downloaded), causality, generate() with the decoding
state against full recomputation, training with local tables, with memstore tables and prefetch,
and with the Trainer (table checkpoints saved and resumed). Memstore cases use a real server."""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from engram_client import EngramConfig, MemStoreClient
from engram_client.hf import add_engram
from engram_client.hf_trainer import TABLES_FILE, EngramTrainer
from tests.servers import in_process

VOCAB, PAD = 61, 0
ENGRAM = EngramConfig(engram_vocab_size=[101, 103], max_ngram_size=3, n_embed_per_ngram=16, n_head_per_ngram=2,
                      layer_ids=[1, 2], pad_id=PAD)
SIZES = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
         "pad_token_id": PAD, "bos_token_id": 1, "eos_token_id": 2}
# the KV cache keyword: `cache` since transformers 5, `past_key_values` before
CACHE = "cache" if "cache" in inspect.signature(transformers.LlamaModel.forward).parameters else "past_key_values"
FAMILIES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}


def tiny_model(family: str = "llama", seed: int = 0) -> torch.nn.Module:
    config_cls, model_cls = (getattr(transformers, name) for name in FAMILIES[family])
    torch.manual_seed(seed)
    return model_cls(config_cls(**SIZES))


def engram_model(family: str = "llama", seed: int = 0, **kwargs):
    """A tiny model with Engram in layers 1 and 2, its blocks randomised so that they matter
    (zero-initialised convolutions would hide a wrong decoding state)."""
    model = tiny_model(family, seed)
    engram = add_engram(model, ENGRAM, zero_init_conv=False, **kwargs)
    with torch.no_grad():
        for block in engram.blocks.values():
            for name, param in block.named_parameters():
                if "tables" not in name:
                    param.normal_(0, 0.3)
    return model.eval(), engram


def greedy(model, ids, **kwargs):
    out = model.generate(ids, max_new_tokens=6, do_sample=False, output_scores=True, return_dict_in_generate=True,
                         pad_token_id=PAD, **kwargs)
    return out.sequences, torch.stack(out.scores, 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_engram_changes_the_model_and_stays_causal(family):
    model, engram = engram_model(family)
    ids = torch.randint(3, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
        changed = ids.clone()
        changed[:, 7] = (changed[:, 7] + 1 - 3) % (VOCAB - 3) + 3
        after = model(changed).logits
        assert torch.equal(logits[:, :7], after[:, :7])  # the past never sees the future
        assert not torch.allclose(logits[:, 7:], after[:, 7:])
        engram.remove()
        assert not torch.allclose(model(ids).logits, logits)  # the blocks did something
    assert not any("engram" in name for name, _ in model.named_parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_the_state_equals_recomputing_the_full_sequence(family):
    model, _ = engram_model(family)
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(2))
    cached, cached_scores = greedy(model, ids)  # one prefill, then one token per step with the state
    full, full_scores = greedy(model, ids, use_cache=False)  # every step recomputes the whole sequence
    assert torch.equal(cached, full)
    torch.testing.assert_close(cached_scores, full_scores, atol=1e-5, rtol=1e-5)


def test_generate_starts_every_layers_lookup_at_model_entry():
    """Each forward of generate() with host tables: every block's rows were requested before
    the forward reached it (EntryPrefetch's path), and the tokens equal recomputation."""
    model, engram = engram_model(tables="host")
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    cached, cached_scores = greedy(model, ids)
    sources = engram.remote_tables()
    assert len(sources) == 2 and all(t.stats.requested_ahead == t.stats.lookups == 6 for t in sources)
    full, full_scores = greedy(model, ids, use_cache=False)
    assert torch.equal(cached, full)
    torch.testing.assert_close(cached_scores, full_scores, atol=1e-5, rtol=1e-5)


def test_generate_under_inference_mode_equals_no_grad():
    model, _ = engram_model(tables="host")
    ids = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    expected, _ = greedy(model, ids)
    with torch.inference_mode():  # inference tensors keep no version counter
        tokens, _ = greedy(model, ids)
    assert torch.equal(tokens, expected)


def test_threads_sharing_a_model_each_get_their_own_forward():
    import threading
    model, _ = engram_model()
    inputs = [torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(k)) for k in range(2)]
    with torch.no_grad():
        expected = [model(ids).logits for ids in inputs]
    wrong = []

    def run(k: int) -> None:
        with torch.no_grad():
            for _ in range(20):
                if not torch.allclose(model(inputs[k]).logits, expected[k], atol=1e-6):
                    wrong.append(k)
    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_left_padded_batch_generates_as_each_prompt_alone():
    model, _ = engram_model()
    prompts = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 5)]
    batch = torch.full((2, 9), PAD)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, 9 - len(prompt):], mask[row, 9 - len(prompt):] = prompt, 1
    padded, padded_scores = greedy(model, batch, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone, alone_scores = greedy(model, prompt[None])
        assert torch.equal(padded[row, 9:], alone[0, len(prompt):])
        torch.testing.assert_close(padded_scores[row], alone_scores[0], atol=1e-5, rtol=1e-5)


def test_beam_search_reorders_the_state_with_the_cache():
    model, _ = engram_model()
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(3))
    beams = {"max_new_tokens": 6, "num_beams": 3, "do_sample": False, "pad_token_id": PAD}
    assert torch.equal(model.generate(ids, **beams), model.generate(ids, use_cache=False, **beams))


def test_a_cache_engram_did_not_fill_or_that_was_cropped_is_refused():
    model, engram = engram_model()
    ids = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = getattr(out, CACHE)
        step = model(ids[:, :1], **{CACHE: cache}, use_cache=True).logits  # continuing is fine
        assert step.shape == (1, 1, VOCAB)
        cache.crop(-4)  # drop the last 4 tokens
        with pytest.raises(ValueError, match="cropped or rolled back"):
            model(ids[:, :1], **{CACHE: cache}, use_cache=True)
        engram.remove()
        plain = model(ids, use_cache=True)
        plain_cache = getattr(plain, CACHE)
    model, _ = engram_model()
    with pytest.raises(ValueError, match="Engram did not see"):
        model(ids[:, :1], **{CACHE: plain_cache}, use_cache=True)
    with pytest.raises(ValueError, match="input_ids, not inputs_embeds"):
        model(inputs_embeds=torch.zeros(1, 3, SIZES["hidden_size"]))


def test_bad_layers_are_refused():
    with pytest.raises(ValueError, match="not in EngramConfig.layer_ids"):
        add_engram(tiny_model(), ENGRAM, layers=[0])
    with pytest.raises(ValueError, match="the model has 2 decoder layers"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SIZES, "num_hidden_layers": 2}))
        add_engram(model, ENGRAM)
    model = tiny_model()
    add_engram(model, ENGRAM)
    with pytest.raises(ValueError, match="already has an Engram block"):
        add_engram(model, ENGRAM)
    with pytest.raises(ValueError, match="tables must be"):
        add_engram(tiny_model(), ENGRAM, tables="gpu")


def batches(count: int, seed: int = 0, batch_size: int = 8, length: int = 16) -> list[dict]:
    """A learnable toy language: each sequence repeats a short random pattern."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        patterns = torch.randint(3, 20, (batch_size, 4), generator=gen)
        ids = patterns.repeat(1, length // 4)
        out.append({"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)})
    return out


def train_plain(model, data, engram=None) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for batch in engram.prefetch(data) if engram else data:
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def enable_checkpointing(model) -> None:
    """transformers 5 renamed gradient checkpointing to activation checkpointing."""
    (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()


def checkpointing_supported(model) -> bool:
    """transformers 5 checkpoints layers' forward (hooks outside); 4.x their __call__ (refused)."""
    layer = model.model.layers[1]
    return type(layer).__call__ is torch.nn.Module.__call__


@pytest.mark.parametrize("tables", ["local", "host"])
def test_gradient_checkpointing_trains_exactly_like_without_it(tables):
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    results = []
    for checkpointing in (False, True):
        model, engram = engram_model(tables=tables, table_args={} if tables == "local" else {"lr": 1.0})
        model.train()
        if checkpointing:
            enable_checkpointing(model)
            if not checkpointing_supported(model):
                with pytest.raises(ValueError, match="use transformers >= 5"):
                    model(ids, labels=ids)
                return
        model(ids, labels=ids).loss.backward()
        engram.flush()
        rows = [s.store.lookup(s.name, np.arange(s.num_rows)) for s in engram.remote_tables()]
        results.append(([p.grad.clone() for p in engram.blocks[1].parameters()], rows))
    (plain_grads, plain_rows), (checkpointed_grads, checkpointed_rows) = results
    for plain, recomputed in zip(plain_grads, checkpointed_grads, strict=True):
        torch.testing.assert_close(recomputed, plain)
    for plain, recomputed in zip(plain_rows, checkpointed_rows, strict=True):  # one table step each, same rows
        np.testing.assert_array_equal(recomputed, plain)


def test_the_base_model_can_be_called_alone():
    model, _ = engram_model()
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(model.lm_head(model.model(input_ids=ids).last_hidden_state), model(ids).logits)


def test_plain_training_with_local_tables_lowers_the_loss():
    model = tiny_model()
    add_engram(model, ENGRAM)
    losses = train_plain(model, batches(30))
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses


def test_training_with_memstore_tables_and_prefetch_lowers_the_loss(tmp_path):
    with in_process(tmp_path / "data") as server, MemStoreClient(server.target) as client:
        model = tiny_model()
        engram = add_engram(model, ENGRAM, tables=client, table_args={"optimizer": "adam", "lr": 1e-2})
        before = client.lookup("engram_l1", np.arange(50))
        losses = train_plain(model, batches(30), engram)
        engram.flush()
        assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
        assert sorted(t.spec.name for t in client.list_tables()) == ["engram_l1", "engram_l2"]
        assert not np.array_equal(client.lookup("engram_l1", np.arange(50)), before)  # trained on the server
        assert [s.step for s in engram.remote_tables()] == [30, 30]
        assert all(s.stats.rows_refetched < s.stats.rows_fetched for s in engram.remote_tables())


def trainer(model, engram, out_dir, steps: int):
    args = transformers.TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=8, max_steps=steps, save_steps=3, logging_steps=2,
        learning_rate=3e-3, report_to=[], use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0)
    rows = [{k: v[i] for k, v in batch.items()} for batch in batches(4) for i in range(8)]
    return EngramTrainer(model=model, args=args, train_dataset=rows, engram=engram)


def test_trainer_checkpoints_the_memstore_tables_and_resumes_them(tmp_path):
    with in_process(tmp_path / "data") as server, MemStoreClient(server.target) as client:
        def run(resume: str | None = None):
            model = tiny_model(seed=0)
            engram = add_engram(model, ENGRAM, tables=client, table_args={"optimizer": "adam", "lr": 1e-2})
            run = trainer(model, engram, tmp_path / "out", 8)
            run.train(resume_from_checkpoint=resume)
            return run, engram

        straight, _ = run()
        losses = [h["loss"] for h in straight.state.log_history if "loss" in h]
        assert losses[-1] < losses[0] - 0.3, losses
        assert straight.prefetcher.summary()["steps"] > 0  # the batches came through the prefetcher
        record = json.loads((tmp_path / "out" / "checkpoint-6" / TABLES_FILE).read_text())
        steps = {name: entry["step"] for name, entry in record["tables"].items()}
        assert steps == {"engram_l1": 6, "engram_l2": 6}
        rows_after_8 = client.lookup("engram_l1", np.arange(400))

        # a new model resumes from step 6 (mid-epoch: 4 batches per epoch): the tables roll back to
        # step 6 and train steps 7 and 8 again
        _, resumed = run(resume=str(tmp_path / "out" / "checkpoint-6"))
        assert [s.step for s in resumed.remote_tables()] == [8, 8]
        np.testing.assert_allclose(client.lookup("engram_l1", np.arange(400)), rows_after_8, atol=1e-6)


def test_load_best_model_at_end_rolls_the_tables_back_with_the_dense_weights(tmp_path):
    model = tiny_model(seed=0)
    engram = add_engram(model, ENGRAM, tables="host", table_args={"optimizer": "sgd", "lr": 0.5})
    rows = [{k: v[i] for k, v in batch.items()} for batch in batches(4) for i in range(8)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=4, save_steps=2, eval_strategy="steps",
        eval_steps=2, load_best_model_at_end=True, metric_for_best_model="eval_loss",
        greater_is_better=True,  # the step-2 checkpoint is "best" (the loss falls)
        report_to=[], use_cpu=True, disable_tqdm=True, learning_rate=1e-2, seed=0)
    trainer = EngramTrainer(model=model, args=args, train_dataset=rows, eval_dataset=rows[:8], engram=engram)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best.endswith("checkpoint-2")
    record = json.loads((Path(best) / TABLES_FILE).read_text())["tables"]
    assert all(s.step == record[s.name]["step"] == 2 for s in engram.remote_tables())


def test_add_engram_passes_row_dropout_to_every_block():
    _, engram = engram_model(row_dropout=0.2)
    assert [b.row_dropout for b in engram.blocks.values()] == [0.2, 0.2]
