"""Engram for Hugging Face causal LMs: `add_engram(model, config)` puts EngramBlocks into chosen
decoder layers of a `transformers` model (Llama, Qwen2, Mistral, ... anything whose base model
keeps its decoder layers in `.layers`), with tables local, in host RAM or on memstore.

    model = LlamaForCausalLM(LlamaConfig(...))
    engram = add_engram(model, EngramConfig(layer_ids=[1], ...), tables=MemStoreClient("host:50051"))
    model(input_ids, labels=labels).loss.backward()        # training: the blocks are ordinary modules
    model.generate(prompt, max_new_tokens=32)              # decoding: Engram state rides on the KV cache

How it hooks in (nothing of transformers is patched; the model's own weights keep their names):
- each chosen decoder layer gets the block as a submodule `engram` and a forward pre-hook that does
  `hidden = engram(hidden, input_ids) + hidden` before the layer, as in DeepSeek's reference;
- a pre-hook on the base model catches the call's `input_ids` and `attention_mask` (padding
  positions are hashed as `config.pad_id` and add nothing to later positions, so a left-padded
  prompt gives the same outputs as the unpadded one) and decides the decoding state: a forward
  whose KV cache is empty starts fresh `EngramState`s, one per block; a forward that continues a
  cache continues the states that a post-hook bound to that cache object. Beam search reorders
  them with the cache; a cache cut back (assisted decoding) is refused, not silently misread.
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engram_client.block import EngramBlock, EngramState
from engram_client.config import EngramConfig
from engram_client.decode import EntryPrefetch
from engram_client.hashing import NgramHasher
from engram_client.host import InProcessStore
from engram_client.prefetch import Prefetcher, default_input_ids
from engram_client.remote import MemStoreTables, RemoteTables
from engram_client.tables import LocalTables, TableSource

# (layer_id, num_rows, dim) -> the table source of that layer
TableFactory = Callable[[int, int, int], TableSource]
CACHE_KEYS = ("cache", "past_key_values")  # transformers 5 calls the KV cache `cache`, 4.x `past_key_values`
RECORD_ATTR = "engram_decoding"           # where a KV cache object carries its Engram states


@dataclass
class DecodingRecord:
    """The Engram states that continue one KV cache."""
    states: dict[int, EngramState]  # layer id -> state of that layer's block
    length: int                     # tokens the states have consumed; must equal the cache's length


@dataclass
class _Call:
    """What the decoder layers of the forward in progress need."""
    input_ids: torch.Tensor                # (B, T), padding positions replaced by pad_id
    padding_mask: torch.Tensor | None      # (B, T) 1 = token, 0 = padding; None: no padding
    record: DecodingRecord | None          # None: no state (a forward that nothing continues)


def engram_input_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ids Engram hashes for (B, T) input_ids and a 2-D attention mask over the whole sequence
    so far (B, past + T): padding positions become `pad_id`. Returns (ids, padding mask or None)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return input_ids, None  # 4-D custom masks carry no padding information we can read
    mask = attention_mask[:, attention_mask.shape[1] - input_ids.shape[1]:].to(input_ids.device)
    if bool(mask.all()):
        return input_ids, None
    return torch.where(mask.bool(), input_ids, torch.full_like(input_ids, pad_id)), mask


class EngramAdapter:
    """The handle `add_engram` returns: the blocks (`blocks[layer_id]`), the hooks, and helpers
    for training (`prefetch`, `remote_tables`) and for the Trainer (`engram_client.hf_trainer`)."""

    def __init__(self, model: nn.Module, config: EngramConfig, blocks: dict[int, EngramBlock],
                 layers: nn.ModuleList) -> None:
        self.model, self.config, self.blocks = model, config, blocks
        self._entry = EntryPrefetch(list(blocks.values()))  # same order as self.blocks
        self._local = threading.local()  # the forward in progress, per thread: threads may share a model
        base = getattr(model, "base_model", model)
        self._handles = [base.register_forward_pre_hook(self._begin, with_kwargs=True),
                         base.register_forward_hook(self._end, with_kwargs=True)]
        self._handles += [layers[layer_id].register_forward_pre_hook(self._before_layer, with_kwargs=True)
                          for layer_id in blocks]
        self._layers = layers

    @property
    def _call(self) -> _Call | None:
        return getattr(self._local, "call", None)

    @_call.setter
    def _call(self, call: _Call | None) -> None:
        self._local.call = call

    # ---- training helpers -------------------------------------------------------------------

    def remote_tables(self) -> list[RemoteTables]:
        """The blocks' tables that live outside the model (host RAM, memstore)."""
        return [b.tables for b in self.blocks.values() if isinstance(b.tables, RemoteTables)]

    def batch_input_ids(self, batch: Any) -> torch.Tensor:
        """The ids a forward of `batch` (a dict with input_ids and maybe attention_mask, or
        anything `Prefetcher` reads) hashes: what the prefetcher must hash too."""
        input_ids = default_input_ids(batch)
        mask = batch.get("attention_mask") if isinstance(batch, dict) else None
        return engram_input_ids(input_ids, mask, self.config.pad_id)[0]

    def prefetch(self, batches: Iterable, depth: int = 2) -> Prefetcher:
        """Iterate `batches` with the remote tables' lookups one step ahead (see Prefetcher)."""
        return Prefetcher(batches, self.model, depth=depth, input_ids=self.batch_input_ids)

    def flush(self) -> None:
        """Wait until every table step sent so far is applied (raises StepFailed for a lost one)."""
        for source in self.remote_tables():
            source.flush()

    def remove(self) -> None:
        """Take the blocks and hooks out again; the model is as it was before `add_engram`."""
        for handle in self._handles:
            handle.remove()
        for layer_id in self.blocks:
            del self._layers[layer_id].engram
        self._handles = []

    # ---- hooks --------------------------------------------------------------------------------

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("Engram hashes token ids: call the model with input_ids, not inputs_embeds")
        if module.training and torch.is_grad_enabled():
            self._check_checkpointing()
        ids, padding = engram_input_ids(input_ids, kwargs.get("attention_mask"), self.config.pad_id)
        cache = next((kwargs[k] for k in CACHE_KEYS if kwargs.get(k) is not None), None)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(getattr(module, "config", None), "use_cache", False)
        # a training forward keeps no state: nothing continues it, and gradient checkpointing
        # re-runs the layers, which must then see the same (empty) history again
        keep_state = cache is not None or (bool(use_cache) and not (module.training and torch.is_grad_enabled()))
        record = self._record_for(cache, keep_state, ids)
        if record is not None:  # decoding: every block's rows travel while the layers below run
            self._entry.start(ids, [record.states[layer_id] for layer_id in self.blocks])
        self._call = _Call(ids, padding, record)

    def _check_checkpointing(self) -> None:
        """transformers 5 checkpoints a layer's `forward`, so the Engram hook runs once, outside the
        checkpoint; transformers 4.x checkpoints its `__call__`, hooks included, and would replay the
        hook in backward, after this forward's ids are gone (and look the rows up twice)."""
        for layer_id in self.blocks:
            layer = self._layers[layer_id]
            if getattr(layer, "gradient_checkpointing", False) and type(layer).__call__ is not nn.Module.__call__:
                raise ValueError("this transformers version re-runs module hooks when gradient checkpointing "
                                 "recomputes a layer, which Engram's hook cannot follow: disable gradient "
                                 "checkpointing, or use transformers >= 5")

    def _record_for(self, cache: Any, keep_state: bool, ids: torch.Tensor) -> DecodingRecord | None:
        """Fresh states for a new sequence, or the states that continue `cache`."""
        past = cache.get_seq_length() if cache is not None else 0
        if past == 0:
            if not keep_state:
                return None
            return DecodingRecord({i: b.init_state(len(ids)) for i, b in self.blocks.items()}, 0)
        record = getattr(cache, RECORD_ATTR, None)
        if record is None:
            raise ValueError(f"the KV cache holds {past} tokens that Engram did not see (it was not filled by "
                             "a forward of this model with Engram), so the n-gram state cannot continue it")
        if record.length != past:
            raise ValueError(f"the KV cache holds {past} tokens but the Engram state has consumed {record.length}: "
                             "caches that are cropped or rolled back (e.g. assisted decoding) are not supported")
        batch = next(iter(record.states.values())).tokens.shape[0]
        if batch != len(ids):
            raise ValueError(f"the Engram state is for {batch} sequences, this step has {len(ids)}")
        return record

    def _before_layer(self, layer: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        call = self._call
        if call is None:
            raise RuntimeError("an Engram decoder layer was called outside its model's forward: Engram needs "
                               "the model's input_ids, call the model (or its base model) instead")
        block = layer.engram
        hidden = args[0] if args else kwargs["hidden_states"]
        state = call.record.states[block.layer_id] if call.record else None
        hidden = hidden + block(hidden, call.input_ids, state=state, padding_mask=call.padding_mask)
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def _end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        call, self._call = self._call, None
        if call is None or call.record is None:
            return
        call.record.length += call.input_ids.shape[1]
        caches = (getattr(output, key, None) for key in CACHE_KEYS)
        cache = next((c for c in caches if c is not None), None)
        if cache is not None and not isinstance(cache, tuple):  # legacy tuple caches cannot carry the state
            _bind(cache, call.record)


def _bind(cache: Any, record: DecodingRecord) -> None:
    """Attach the states to the cache object; beam search's reorder moves them with the cache."""
    first_binding = not hasattr(cache, RECORD_ATTR)
    setattr(cache, RECORD_ATTR, record)
    if not first_binding or not hasattr(cache, "reorder_cache"):
        return
    reorder_kv = cache.reorder_cache

    def reorder_cache(beam_idx: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = reorder_kv(beam_idx, *args, **kwargs)
        for state in getattr(cache, RECORD_ATTR).states.values():
            state.tokens = state.tokens.index_select(0, beam_idx.to(state.tokens.device))
            state.conv = state.conv.index_select(0, beam_idx.to(state.conv.device))
        return result

    cache.reorder_cache = reorder_cache


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (or of its base model)."""
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"add_engram supports decoder-only models whose base model keeps its decoder layers in "
                        f"`.layers` (Llama, Qwen2, Mistral, ...); {type(model).__name__} does not")
    return layers


def add_engram(model: nn.Module, config: EngramConfig, *, layers: list[int] | None = None,
               tables: str | Any | TableFactory = "local", table_args: dict[str, Any] | None = None,
               table_prefix: str = "engram", zero_init_conv: bool = True,
               row_dropout: float = 0.0) -> EngramAdapter:
    """Add an EngramBlock before each chosen decoder layer of `model` (in place).

    Args:
        config: the Engram hyper-parameters; the token space hashed is `model.config.vocab_size`.
        layers: decoder layers (0-based) that get a block; default `config.layer_ids` (each must be in it:
            a layer's hash multipliers come from its id).
        tables: where each layer's table lives:
            "local": an ordinary parameter (`LocalTables`), trained by the model's optimizer;
            "host": host RAM in this process (one `InProcessStore` for all layers), trained by a
                memstore row-wise optimizer (`table_args`: optimizer, lr, mode, ...);
            a row store (`MemStoreClient`, `ShardedClient`, `InProcessStore`): tables
                `<table_prefix>_l<layer>` on it (created if missing), trained by the servers;
            a callable (layer_id, num_rows, dim) -> TableSource: anything else.
        table_args: keyword arguments of LocalTables / MemStoreTables (e.g. optimizer="adam", lr=1e-2).
        zero_init_conv: start each ShortConv at zero (the paper's choice).
        row_dropout: drop whole looked-up rows in training (see `EngramBlock`; the demo uses 0.2
            against tables memorising text seen more than once).
    """
    model_config = model.config
    layer_list = decoder_layers(model)
    layer_ids = list(config.layer_ids if layers is None else layers)
    for layer_id in layer_ids:
        if layer_id not in config.layer_ids:
            raise ValueError(f"layer {layer_id} is not in EngramConfig.layer_ids {config.layer_ids}")
        if not 0 <= layer_id < len(layer_list):
            raise ValueError(f"layer {layer_id} does not exist: the model has {len(layer_list)} decoder layers")
        if hasattr(layer_list[layer_id], "engram"):
            raise ValueError(f"decoder layer {layer_id} already has an Engram block")
    hasher = NgramHasher(config, vocab_size=model_config.vocab_size)
    make_tables = _table_factory(tables, dict(table_args or {}), table_prefix)
    blocks = {}
    for layer_id in layer_ids:
        source = make_tables(layer_id, hasher.total_rows(layer_id), config.head_dim)
        block = EngramBlock(config, layer_id, model_config.hidden_size, tables=source, hasher=hasher,
                            zero_init_conv=zero_init_conv, row_dropout=row_dropout)
        # the block lives with its decoder layer (a model split over devices keeps each block local)
        reference = next(layer_list[layer_id].parameters(), None)
        reference = next(model.parameters()) if reference is None else reference
        layer_list[layer_id].add_module("engram", block.to(reference.device, reference.dtype))
        blocks[layer_id] = block
    return EngramAdapter(model, config, blocks, layer_list)


def _table_factory(tables: Any, table_args: dict[str, Any], prefix: str) -> TableFactory:
    if isinstance(tables, str):
        if tables == "local":
            return lambda layer_id, rows, dim: LocalTables(rows, dim, **table_args)
        if tables == "host":
            tables = InProcessStore()
        else:
            raise ValueError(f"tables must be 'local', 'host', a row store or a factory, got {tables!r}")
    if hasattr(tables, "lookup_async"):  # a row store: MemStoreClient, ShardedClient, InProcessStore
        store = tables
        return lambda layer_id, rows, dim: MemStoreTables(store, f"{prefix}_l{layer_id}", rows, dim, **table_args)
    if callable(tables):
        return tables
    raise TypeError(f"tables must be 'local', 'host', a row store or a factory, got {type(tables).__name__}")
