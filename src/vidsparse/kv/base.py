"""``KVMethod`` and ``CompressingCache``: a transformers ``DynamicCache`` whose layers are shrunk by a policy.

The cache is what the model's attention modules call ``update`` on, so it works with any transformers model class. A
policy sees each layer right after its keys/values are stored: in prefill (a chunk of more than one token) and at each
decode step. It may replace the layer's stored tensors with fewer entries; the attention call in progress still gets
the full tensors it was returned. Rotary phases are already in the keys, so dropping entries never shifts positions —
but the cache length then no longer equals the position of the next token, which is why ``Pipeline`` passes positions
explicitly. ``get_seq_length`` reports the tokens *seen*, not the entries kept — transformers' own convention for its
sliding-window layers — so ``model.generate(..., past_key_values=cache)`` still places new tokens correctly, while
mask sizes come from the entries actually stored (``get_mask_sizes`` of each layer).

Policies that need queries (SnapKV) also observe the prefill attention through ``models.hf.attention_scope``
(``on_prefill_attention``), which runs after the layer's ``update``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import Tensor


class KVMethod(ABC):
    """A KV-cache method: ``make_cache()`` returns a fresh ``Cache`` for one request."""

    name: ClassVar[str]
    capabilities: ClassVar[dict]

    def make_cache(self):
        return CompressingCache(self)

    def after_prefill(self, cache: CompressingCache, layer_idx: int) -> None:
        """Called after a multi-token chunk was stored in ``layer_idx``."""

    def after_decode(self, cache: CompressingCache, layer_idx: int) -> None:
        """Called after a decode step's entry was stored in ``layer_idx``."""

    def on_prefill_attention(self, cache: CompressingCache, layer_idx: int, q: Tensor, k: Tensor, v: Tensor,
                             out: Tensor) -> None:
        """Called with the layer's post-RoPE queries after its prefill attention (needs vidsparse attention)."""

    @property
    @abstractmethod
    def needs_queries(self) -> bool:
        """Whether the policy needs ``on_prefill_attention`` (i.e. the vidsparse attention function)."""


def _dynamic_cache():
    from transformers import DynamicCache

    return DynamicCache


class CompressingCache(_dynamic_cache()):
    """``DynamicCache`` + a ``KVMethod`` policy. ``stats``: entries kept/seen per layer after prefill."""

    def __init__(self, method: KVMethod):
        super().__init__()
        self.method = method
        self.stats: dict = {"prefill_entries": {}, "kept_entries": {}}
        self.queries_seen: set[int] = set()
        self.seen: dict[int, int] = {}

    def get_seq_length(self, layer_idx: int = 0, *args, **kwargs) -> int:
        """Tokens seen by ``layer_idx`` (positions advance by this), not the entries kept."""
        return self.seen.get(layer_idx, 0)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        self.seen[layer_idx] = self.seen.get(layer_idx, 0) + int(key_states.shape[-2])
        k, v = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if key_states.shape[-2] > 1:
            self.stats["prefill_entries"][layer_idx] = int(k.shape[-2])
            self.method.after_prefill(self, layer_idx)
            self.stats["kept_entries"][layer_idx] = int(self.layers[layer_idx].keys.shape[-2])
        else:
            if self.method.needs_queries and layer_idx not in self.queries_seen:
                from ..errors import UnsupportedError

                raise UnsupportedError(f"KV method {self.method.name!r} needs the prefill queries: run the model "
                                       "through vidsparse's attention (Pipeline, or models.hf.attention_scope with "
                                       "the cache among its observers)")
            self.method.after_decode(self, layer_idx)
        return k, v

    def on_prefill_attention(self, layer_idx, q, k, v, out) -> None:
        self.queries_seen.add(layer_idx)
        self.method.on_prefill_attention(self, layer_idx, q, k, v, out)
        self.stats["kept_entries"][layer_idx] = int(self.layers[layer_idx].keys.shape[-2])

    def keep(self, layer_idx: int, index: Tensor) -> None:
        """Keep only ``index`` of the layer's entries: int64 [L] (all heads) or [B, Hkv, L] (per head)."""
        layer = self.layers[layer_idx]
        if index.dim() == 1:
            layer.keys = layer.keys.index_select(-2, index)
            layer.values = layer.values.index_select(-2, index)
        else:  # each kept row copied whole (``attention.layout.gather_rows``: a Triton kernel on the GPU)
            from ..attention.layout import gather_rows

            layer.keys, layer.values = gather_rows(layer.keys, index), gather_rows(layer.values, index)

    def entries(self, layer_idx: int = 0) -> int:
        return int(self.layers[layer_idx].keys.shape[-2]) if layer_idx < len(self.layers) else 0

    def nbytes(self) -> int:
        return _kv_bytes(self)


def _kv_bytes(cache) -> int:
    """Bytes of a cache's layers' keys and values tensors."""
    return int(sum(t.numel() * t.element_size() for layer in getattr(cache, "layers", [])
                   for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None))


def cache_nbytes(cache) -> int:
    """Bytes a transformers cache stores: its own ``nbytes()`` where it has one (``CompressingCache``, ``KIVICache``),
    else its layers' keys and values."""
    return int(cache.nbytes()) if hasattr(cache, "nbytes") else _kv_bytes(cache)
