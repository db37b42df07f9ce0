"""``InLLMReducer``: drops or merges visual tokens between decoder layers during prefill.

Mechanics (official extension points only): forward pre-hooks (``with_kwargs=True``) on the decoder layers, removed in
``finally``, shorten the hidden states at the chosen layer and slice every per-position argument the later layers get
(rotary cos/sin, text position ids) to the surviving columns; the attention scores a method ranks by come from the
vidsparse attention function's observer call for that one layer (``last_query_attention``: the last query's softmax
row, never the whole model in eager mode). Layers before the cut keep their full KV cache, layers after it hold only
the survivors, as in FastV's own cached generation.

``plan(prompt, num_layers)`` returns a ``Cut`` that ``Pipeline`` installs around the prefill forward."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from torch import Tensor


class Cut:
    """State of one prefill: which columns survive after which layer. Subclasses fill ``keep`` (sorted int64 column
    indices into the *current* sequence) in ``on_prefill_attention`` or ``before_layer``."""

    def __init__(self, visual: tuple[int, int], seq_len: int):
        self.visual = visual
        self.seq_len = seq_len
        self.current = seq_len
        self.trace: list[tuple[int, int]] = []  # (layer, tokens entering it)
        self._pending: Tensor | None = None
        self._merge: tuple[Tensor, Tensor] | None = None  # (members, into) averaged before slicing
        self.columns: Tensor | None = None  # original-sequence column of each current token

    # --- called by subclasses ---
    def cut(self, keep: Tensor, members: Tensor | None = None, into: Tensor | None = None) -> None:
        """Schedule ``keep`` (sorted columns of the current sequence) for the next layer; optionally first average
        hidden states of ``members`` into ``into`` (current-sequence columns; each group includes its target)."""
        self._pending = keep
        self._merge = (members, into) if members is not None else None

    # --- hook plumbing ---
    def before_layer(self, layer_idx: int, hidden: Tensor) -> None:
        """Override to decide a cut from the hidden states entering ``layer_idx``."""

    def on_prefill_attention(self, layer_idx, q, k, v, out) -> None:
        """Override to decide a cut from a layer's attention."""

    def _pre_hook(self, layer_idx):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] != self.current:  # not the prefill this plan is for (e.g. a decode step)
                return None
            self.before_layer(layer_idx, hidden)
            if self._pending is not None:
                keep, self._pending = self._pending, None
                if self._merge is not None:
                    members, into = self._merge
                    self._merge = None
                    sums = hidden.float().index_add(1, into, hidden[:, members].float())
                    cnt = torch.ones(hidden.shape[1], device=hidden.device).index_add(
                        0, into, torch.ones(len(into), device=hidden.device))
                    hidden = (sums / cnt[None, :, None]).to(hidden.dtype)
                hidden = hidden[:, keep]
                base = self.columns if self.columns is not None else torch.arange(self.seq_len, device=keep.device)
                self.columns = base[keep]
                self.current = int(keep.numel())
                if args:
                    args = (hidden,) + tuple(args[1:])
                else:
                    kwargs["hidden_states"] = hidden
            if self.columns is not None:
                # Every per-position argument is still sized for the original sequence: slice it to the survivors.
                for key, val in list(kwargs.items()):
                    if key != "hidden_states":
                        kwargs[key] = _slice_positions(val, self.columns, self.seq_len)
            self.trace.append((layer_idx, self.current))
            return args, kwargs
        return hook

    @contextlib.contextmanager
    def installed(self, layers: torch.nn.ModuleList):
        handles = []
        try:
            for i, layer in enumerate(layers):
                handles.append(layer.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
            yield self
        finally:
            for h in handles:
                h.remove()

    def visual_columns(self) -> Tensor:
        """Current-sequence columns that are visual tokens (bool [current])."""
        s, e = self.visual
        cols = self.columns if self.columns is not None else torch.arange(self.seq_len)
        return (cols >= s) & (cols < e)


def _slice_positions(val, keep: Tensor, full: int):
    """Slice tensors with a sequence axis of length ``full`` (cos/sin [.., N, D]: axis −2; ids [.., N]: axis −1)."""
    if isinstance(val, tuple):
        return tuple(_slice_positions(v, keep, full) for v in val)
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return val
    if val.dim() >= 3 and val.shape[-2] == full and val.is_floating_point():
        return val.index_select(-2, keep)
    if val.shape[-1] == full and not val.is_floating_point():
        return val.index_select(-1, keep)
    return val


class InLLMReducer(ABC):
    """An in-LLM reducer method (registered in ``INLLM``)."""

    name: ClassVar[str]
    capabilities: ClassVar[dict]

    @abstractmethod
    def plan(self, visual: tuple[int, int], seq_len: int, num_layers: int, visual_grid: Tensor | None = None) -> Cut:
        """A fresh ``Cut`` for one prefill of ``seq_len`` tokens with visual tokens at ``visual`` = (start, end)."""
