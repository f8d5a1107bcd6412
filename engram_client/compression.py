"""Token compression: merge tokenizer ids whose text differs only by case, accents or spacing.

Engram hashes n-grams of *compressed* ids, so "Hello", " hello" and "HELLO" share memory rows.
For every id of a Hugging Face tokenizer (`tokenizers.Tokenizer` or a `transformers` tokenizer),
like DeepSeek's reference `CompressedTokenizer`:

1. decode the id alone (special tokens kept);
2. normalise: NFKC, NFD, strip accents, lowercase, collapse whitespace runs to one space, strip;
   a token that is exactly one space (after collapsing) stays " " (the lone-space sentinel rule);
3. the key is the normalised text, or the raw token string if the decode contains U+FFFD (a
   partial UTF-8 byte sequence), or the decoded text if it normalises to empty;
4. keys get new ids in first-seen order: `token_map[raw_id] = compressed_id`.

Building the map decodes every id (about a second for a 128k vocabulary), so it is cached on disk
under a hash of the tokenizer's content. `tokenizers` is an optional dependency, needed only here.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Bump when the rules above change: it is part of the cache key, so stale maps are never reused.
NORMALIZATION_VERSION = 1
_SENTINEL = "\uE000"  # private-use char that protects a lone space from Strip()
_REPLACEMENT_CHAR = "\ufffd"


def make_normalizer() -> Any:
    """The reference's normaliser as a `tokenizers.normalizers.Sequence`."""
    try:
        from tokenizers import Regex, normalizers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("token compression needs the `tokenizers` package: pip install tokenizers") from exc
    return normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.NFD(),
        normalizers.StripAccents(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
        normalizers.Replace(Regex(r"^ $"), _SENTINEL),
        normalizers.Strip(),
        normalizers.Replace(_SENTINEL, " "),
    ])


def default_cache_dir() -> Path:
    """$ENGRAM_CACHE_DIR, else ~/.cache/engram_client."""
    return Path(os.environ.get("ENGRAM_CACHE_DIR", Path.home() / ".cache" / "engram_client"))


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over everything that decides the token map: the tokenizer's content and our rules."""
    backend = _backend(tokenizer)
    if backend is not None:
        content = backend.to_str()  # vocab, merges, added tokens, decoder, ...
    else:  # a slow transformers tokenizer: its vocabulary and added tokens
        content = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    extra = [type(tokenizer).__name__, repr(getattr(tokenizer, "clean_up_tokenization_spaces", None)),
             f"normalization-v{NORMALIZATION_VERSION}"]
    return hashlib.sha256("\n".join([content, *extra]).encode()).hexdigest()


def build_token_map(tokenizer: Any, *, cache_dir: str | Path | None | bool = None) -> np.ndarray:
    """int64 [vocab]: raw id -> compressed id, new ids assigned in first-seen order.

    cache_dir: where maps are cached (None = `default_cache_dir()`, False = no cache).
    """
    cache_file = None
    if cache_dir is not False:
        cache_root = default_cache_dir() if cache_dir in (None, True) else Path(cache_dir)
        cache_file = cache_root / f"token_map-{tokenizer_fingerprint(tokenizer)[:24]}.npy"
        if cache_file.exists():
            return np.load(cache_file)

    token_map = _compute_token_map(tokenizer)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, token_map)
        os.replace(tmp, cache_file)  # atomic: concurrent builders never see half a file
    return token_map


def _compute_token_map(tokenizer: Any) -> np.ndarray:
    normalizer = make_normalizer()
    texts = _decode_each(tokenizer)
    new_id_of_key: dict[str, int] = {}
    token_map = np.empty(len(texts), dtype=np.int64)
    for raw_id, text in enumerate(texts):
        if _REPLACEMENT_CHAR in text:
            key = _raw_token(tokenizer, raw_id)  # a byte fragment: keep it apart by its raw form
        else:
            key = normalizer.normalize_str(text) or text
        token_map[raw_id] = new_id_of_key.setdefault(key, len(new_id_of_key))
    return token_map


class CompressedTokenizer:
    """Maps raw token ids to compressed ids (like the reference's `CompressedTokenizer`).

    `len()` is the compressed vocabulary (pass it, or `token_map`, to NgramHasher). Negative ids
    (e.g. ignore labels) pass through unchanged, as in the reference.
    """

    def __init__(self, tokenizer: Any, *, cache_dir: str | Path | None | bool = None) -> None:
        self.tokenizer = tokenizer
        self.token_map = build_token_map(tokenizer, cache_dir=cache_dir)
        self.num_compressed = int(self.token_map.max()) + 1 if len(self.token_map) else 0
        self._device_maps: dict[torch.device, torch.Tensor] = {}  # token_map copies per device

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, cache_dir: str | Path | None | bool = None,
                        **tokenizer_kwargs: Any) -> CompressedTokenizer:
        """From a `tokenizer.json` file (tokenizers) or a name/dir (needs transformers)."""
        if Path(name_or_path).is_file():
            from tokenizers import Tokenizer

            return cls(Tokenizer.from_file(str(name_or_path)), cache_dir=cache_dir)
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(name_or_path, **tokenizer_kwargs), cache_dir=cache_dir)

    def __len__(self) -> int:
        return self.num_compressed

    def __call__(self, input_ids: Any) -> np.ndarray | torch.Tensor:
        """Compress ids of any shape; numpy/lists -> numpy, tensors -> tensors on their device."""
        is_tensor = isinstance(input_ids, torch.Tensor)
        ids = input_ids.long() if is_tensor else np.asarray(input_ids, dtype=np.int64)
        if ids.numel() if is_tensor else ids.size:
            top = int(ids.max())
            if top >= len(self.token_map):
                raise ValueError(f"token id {top} is outside the tokenizer's [0, {len(self.token_map)})")
        table = self._device_map(ids.device) if is_tensor else self.token_map
        valid = ids >= 0
        safe = ids.clamp(min=0) if is_tensor else np.maximum(ids, 0)
        mapped = table[safe]
        return torch.where(valid, mapped, ids) if is_tensor else np.where(valid, mapped, ids)

    def _device_map(self, device: torch.device) -> torch.Tensor:
        if device not in self._device_maps:
            self._device_maps[device] = torch.as_tensor(self.token_map, device=device)
        return self._device_maps[device]


# ---- tokenizer adapters: `tokenizers.Tokenizer` or a transformers tokenizer ---------------------
def _is_tokenizers_tokenizer(tokenizer: Any) -> bool:
    return hasattr(tokenizer, "get_vocab_size") and hasattr(tokenizer, "id_to_token")


def _backend(tokenizer: Any) -> Any:
    """The underlying `tokenizers.Tokenizer`, if there is one."""
    if _is_tokenizers_tokenizer(tokenizer):
        return tokenizer
    return getattr(tokenizer, "backend_tokenizer", None)


def _decode_each(tokenizer: Any) -> list[str]:
    """Every id decoded on its own, special tokens included."""
    if _is_tokenizers_tokenizer(tokenizer):
        singles = [[i] for i in range(tokenizer.get_vocab_size(with_added_tokens=True))]
        return tokenizer.decode_batch(singles, skip_special_tokens=False)  # batched in Rust
    singles = [[i] for i in range(len(tokenizer))]
    return tokenizer.batch_decode(singles, skip_special_tokens=False)


def _raw_token(tokenizer: Any, raw_id: int) -> str:
    token = tokenizer.id_to_token(raw_id) if _is_tokenizers_tokenizer(tokenizer) else \
        tokenizer.convert_ids_to_tokens(raw_id)
    return "" if token is None else token
