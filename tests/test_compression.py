"""Token compression against a transcription of the reference `_build_lookup_table`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engram_client import CompressedTokenizer, EngramConfig, NgramHasher, build_token_map, compression

tokenizers = pytest.importorskip("tokenizers")  # an optional dependency (the `demo` extra)
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

WORDS = ["[UNK]", "Hello", "hello", " hello", "HÉLLO", "héllo", " ", "  ", "\t\n", "Ａ", "a", "ﬁ", "fi",
         "\u0301", "x  y", " x\ty ", "Straße", "STRASSE", "<|sep|>"]


def word_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.add_special_tokens(["<|sep|>"])
    return tok


def byte_bpe_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<s>", "</s>"], show_progress=False)
    text = ["Hello hello HELLO world World", "café Café CAFE naïve", "日本語のテキスト 😀", "tabs\tand\nnewlines  "]
    tok.train_from_iterator(text * 20, trainer)
    return tok


def reference_lookup_table(tok: Tokenizer) -> tuple[np.ndarray, int]:
    """The reference loop: decode one id at a time, normalise, first-seen new ids."""
    sentinel = "\uE000"
    normalizer = normalizers.Sequence([
        normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "), normalizers.Replace(Regex(r"^ $"), sentinel),
        normalizers.Strip(), normalizers.Replace(sentinel, " "),
    ])
    key2new: dict[str, int] = {}
    lookup = []
    for tid in range(tok.get_vocab_size(with_added_tokens=True)):
        text = tok.decode([tid], skip_special_tokens=False)
        if "\ufffd" in text:
            key = tok.id_to_token(tid)
        else:
            norm = normalizer.normalize_str(text)
            key = norm if norm else text
        if key not in key2new:
            key2new[key] = len(key2new)
        lookup.append(key2new[key])
    return np.array(lookup, dtype=np.int64), len(key2new)


class TransformersLike:
    """The few methods of a transformers tokenizer that compression uses (transformers is not installed)."""

    def __init__(self, tok: Tokenizer):
        self.backend_tokenizer = tok

    def __len__(self):
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def batch_decode(self, sequences, skip_special_tokens=False):
        return [self.backend_tokenizer.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def convert_ids_to_tokens(self, tid):
        return self.backend_tokenizer.id_to_token(tid)


@pytest.mark.parametrize("make", [word_tokenizer, byte_bpe_tokenizer])
def test_matches_reference_loop(make):
    tok = make()
    expected, num_new = reference_lookup_table(tok)
    token_map = build_token_map(tok, cache_dir=False)
    np.testing.assert_array_equal(token_map, expected)
    assert len(CompressedTokenizer(tok, cache_dir=False)) == num_new
    np.testing.assert_array_equal(build_token_map(TransformersLike(tok), cache_dir=False), expected)


def test_byte_fragments_fall_back_to_raw_tokens():
    tok = byte_bpe_tokenizer()
    token_map = build_token_map(tok, cache_dir=False)
    fragments = [i for i in range(tok.get_vocab_size()) if "\ufffd" in tok.decode([i])]
    assert len(fragments) > 50  # all lone bytes >= 0x80
    assert len(set(token_map[fragments].tolist())) == len(fragments)  # raw tokens are distinct keys


def test_normalisation_rules():
    tok = word_tokenizer()
    m = dict(zip(WORDS, build_token_map(tok, cache_dir=False).tolist()))
    assert m["Hello"] == m["hello"] == m[" hello"] == m["HÉLLO"] == m["héllo"]  # case, accents, strip
    assert m[" "] == m["  "] == m["\t\n"]  # whitespace collapses to the lone-space token
    assert m[" "] != m["[UNK]"]
    assert m["Ａ"] == m["a"] and m["ﬁ"] == m["fi"]  # NFKC
    assert m["x  y"] == m[" x\ty "]
    assert m["\u0301"] not in (m[w] for w in WORDS if w != "\u0301")  # normalises to "": keeps its text
    assert m["Straße"] != m["STRASSE"]  # lowercase, not case folding
    assert sorted(set(m.values())) == list(range(len(set(m.values()))))  # dense, first-seen order
    assert m["[UNK]"] == 0 and m["Hello"] == 1


def test_cache_by_content_hash(tmp_path, monkeypatch):
    tok = word_tokenizer()
    first = build_token_map(tok, cache_dir=tmp_path)
    files = list(tmp_path.glob("token_map-*.npy"))
    assert len(files) == 1

    def fail(_):
        raise AssertionError("should have been read from the cache")

    monkeypatch.setattr(compression, "_compute_token_map", fail)
    np.testing.assert_array_equal(build_token_map(tok, cache_dir=tmp_path), first)
    monkeypatch.undo()

    changed = word_tokenizer()
    changed.add_tokens(["brand-new"])
    assert compression.tokenizer_fingerprint(changed) != compression.tokenizer_fingerprint(tok)
    assert len(build_token_map(changed, cache_dir=tmp_path)) == len(first) + 1
    assert len(list(tmp_path.glob("token_map-*.npy"))) == 2
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path / "env"))
    build_token_map(tok)
    assert len(list((tmp_path / "env").glob("token_map-*.npy"))) == 1


def test_compressed_tokenizer_call_and_from_file(tmp_path):
    tok = word_tokenizer()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    ct = CompressedTokenizer.from_pretrained(str(path), cache_dir=False)
    ids = np.array([[1, 2, -100, 6], [7, 8, 9, 10]])
    out = ct(ids)
    assert out[0, 2] == -100  # negative ids (ignore labels) pass through
    np.testing.assert_array_equal(out[ids >= 0], ct.token_map[ids[ids >= 0]])
    np.testing.assert_array_equal(ct(torch.from_numpy(ids)).numpy(), out)
    with pytest.raises(ValueError, match=str(len(WORDS))):
        ct([[len(WORDS)]])


def test_hasher_with_token_map_equals_hashing_compressed_ids():
    ct = CompressedTokenizer(byte_bpe_tokenizer(), cache_dir=False)
    cfg = EngramConfig(engram_vocab_size=[1000, 1100], n_head_per_ngram=4, pad_id=1)
    ids = np.random.default_rng(0).integers(0, len(ct.token_map), size=(2, 30))
    with_map = NgramHasher(cfg, token_map=ct.token_map)
    precompressed = NgramHasher(EngramConfig(**{**cfg.__dict__, "pad_id": int(ct.token_map[1])}), vocab_size=len(ct))
    assert with_map.vocab_size == len(ct)
    for layer_id in cfg.layer_ids:
        np.testing.assert_array_equal(with_map.row_ids(ids, layer_id), precompressed.row_ids(ct(ids), layer_id))
