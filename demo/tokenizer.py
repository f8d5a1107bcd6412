"""Byte-level BPE trained on the corpus (Hugging Face `tokenizers`), and the tokenized corpus.

Everything here is cached under `.cache/demo/<key>/`, the key hashing the corpus contents, the
vocabulary size and the `tokenizers` version, so a second run skips straight to training:

    tokenizer.json   the trained tokenizer (loadable with `tokenizers.Tokenizer.from_file`)
    train.npy        uint16 token ids of the train files, one EOS after each file
    val.npy          the same for the validation files
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from demo.corpus import Corpus

EOS = "<|endoftext|>"  # separates files in the token stream


@dataclass
class TokenizedCorpus:
    tokenizer: Tokenizer
    train_ids: np.ndarray  # (N_train,) uint16
    val_ids: np.ndarray  # (N_val,) uint16
    eos_id: int
    cache_dir: Path
    cached: bool  # True when everything came from the cache

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """GPT-2 style byte-level BPE: every byte is a base token, so any text encodes losslessly."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_files(tok: Tokenizer, texts: list[str], eos_id: int) -> np.ndarray:
    """One flat uint16 stream: file, EOS, file, EOS, ..."""
    if tok.get_vocab_size() > np.iinfo(np.uint16).max:
        raise ValueError(f"vocab_size {tok.get_vocab_size()} does not fit uint16 token ids")
    encoded = tok.encode_batch(texts)  # parallel in Rust
    pieces = []
    for enc in encoded:
        pieces.append(np.asarray(enc.ids, dtype=np.uint16))
        pieces.append(np.array([eos_id], dtype=np.uint16))
    return np.concatenate(pieces)


def tokenize_corpus(corpus: Corpus, vocab_size: int, cache_root: Path) -> TokenizedCorpus:
    """Train (or load) the tokenizer and token streams for `corpus`."""
    key = hashlib.sha256(f"{corpus.digest}|{vocab_size}|{tokenizers.__version__}".encode()).hexdigest()[:16]
    cache_dir = cache_root / f"tok-{key}"
    files = {name: cache_dir / name for name in ("tokenizer.json", "train.npy", "val.npy")}
    if all(p.exists() for p in files.values()):
        tok = Tokenizer.from_file(str(files["tokenizer.json"]))
        return TokenizedCorpus(tok, np.load(files["train.npy"]), np.load(files["val.npy"]),
                               tok.token_to_id(EOS), cache_dir, cached=True)

    train_texts = corpus.train_texts()
    tok = train_tokenizer(train_texts, vocab_size)  # validation text is never seen by the BPE either
    eos_id = tok.token_to_id(EOS)
    train_ids = encode_files(tok, train_texts, eos_id)
    val_ids = encode_files(tok, corpus.val_texts(), eos_id)

    cache_dir.mkdir(parents=True, exist_ok=True)
    _atomic(files["tokenizer.json"], lambda p: tok.save(str(p)))
    _atomic(files["train.npy"], lambda p: np.save(p, train_ids))
    _atomic(files["val.npy"], lambda p: np.save(p, val_ids))
    return TokenizedCorpus(tok, train_ids, val_ids, eos_id, cache_dir, cached=False)


def _atomic(path: Path, write) -> None:
    """Write to a temp name and rename: an interrupted run never leaves a half cache entry."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}" + path.suffix)
    write(tmp)
    os.replace(tmp, path)
