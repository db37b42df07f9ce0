"""``BlockLayout``: which key blocks each query block computes — the contract between patterns and kernels.

Per (batch, head, query block): ``kv_count`` and the first ``kv_count`` entries of ``kv_index`` (sorted ascending,
padding after them is never read), plus ``kv_full`` marking blocks that need no element mask (entirely inside the
causal triangle and the sequence). Batch and head dimensions may be 1 to broadcast one layout over all of them."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor


def shape_cache(maxsize: int = 32):
    """``functools.lru_cache`` for tensors that depend only on shapes and a device (every prefill layer asks for the
    same ones), built outside inference mode so one cached tensor serves callers in and out of it. The result is
    shared: never modify it in place."""

    def deco(fn):
        @functools.lru_cache(maxsize=maxsize)
        @functools.wraps(fn)
        def cached(*args, **kwargs):
            with torch.inference_mode(False):
                return fn(*args, **kwargs)

        return cached

    return deco


@shape_cache()
def cached_arange(start: int, end: int, device=None, dtype=torch.int64) -> Tensor:
    """``torch.arange(start, end)``, cached per range, dtype and device (``shape_cache``: shared, never modify it):
    the probe rows' positions and the like, which every layer's estimate asks for, without a launch each time."""
    return torch.arange(start, end, device=device, dtype=dtype)


@shape_cache()
def causal_block_mask(nq: int, nk: int, block_q: int, block_k: int, q_len: int, k_len: int, device=None) -> Tensor:
    """bool [NQ, NK]: blocks holding at least one (q, k) pair with k ≤ q + (k_len − q_len) (bottom-right aligned).
    Cached per shape and device (``shape_cache``)."""
    off = k_len - q_len
    m = torch.arange(nq, device=device)[:, None]
    n = torch.arange(nk, device=device)[None, :]
    last_q = torch.clamp((m + 1) * block_q - 1, max=q_len - 1)
    return n * block_k <= last_q + off


@functools.lru_cache(maxsize=64)
def causal_row_counts(nq: int, nk: int, block_q: int, block_k: int, q_len: int, k_len: int) -> tuple[int, ...]:
    """``causal_block_mask(...).sum(-1)`` computed on the host from the shapes alone (no device work, no sync)."""
    off = k_len - q_len
    lasts = (min((m + 1) * block_q - 1, q_len - 1) + off for m in range(nq))
    return tuple(min(last // block_k + 1, nk) if last >= 0 else 0 for last in lasts)


def causal_block_count(nq: int, nk: int, block_q: int, block_k: int, q_len: int, k_len: int) -> int:
    """``causal_block_mask(...).sum()`` on the host (``causal_row_counts``)."""
    return sum(causal_row_counts(nq, nk, block_q, block_k, q_len, k_len))


@shape_cache()
def full_block_mask(nq: int, nk: int, block_q: int, block_k: int, q_len: int, k_len: int, causal: bool,
                    device=None) -> Tensor:
    """bool [NQ, NK]: blocks whose every element is valid (inside both lengths and, if causal, the triangle).
    Cached per shape and device (``shape_cache``)."""
    m = torch.arange(nq, device=device)[:, None]
    n = torch.arange(nk, device=device)[None, :]
    inside = ((m + 1) * block_q <= q_len) & ((n + 1) * block_k <= k_len)
    if causal:
        inside &= (n + 1) * block_k - 1 <= m * block_q + (k_len - q_len)
    return inside


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """kv_index int32 [B, H, NQ, K]; kv_count int32 [B, H, NQ]; kv_full bool [B, H, NQ, K]."""

    kv_index: Tensor
    kv_count: Tensor
    kv_full: Tensor
    block_q: int
    block_k: int
    q_len: int
    k_len: int
    causal: bool = True

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.block_q)

    @property
    def num_k_blocks(self) -> int:
        return -(-self.k_len // self.block_k)

    @classmethod
    def from_block_mask(cls, mask: Tensor, block_q: int, block_k: int, q_len: int, k_len: int,
                        causal: bool = True, width: int | None = None) -> "BlockLayout":
        """From a bool block mask [B, H, NQ, NK] (or [NQ, NK]). Blocks outside the causal triangle are dropped.
        ``width``: the index's width, a host-side bound of every row's count (the patterns pass one: then no host
        sync); by default the widest row, which reads the counts back from the device."""
        if mask.dim() == 2:
            mask = mask[None, None]
        b, h, nq, nk = mask.shape
        if nq != -(-q_len // block_q) or nk != -(-k_len // block_k):
            raise ValueError(f"block mask {tuple(mask.shape)} does not match lengths {q_len}/{k_len} "
                             f"with blocks {block_q}x{block_k}")
        if k_len == 0 and q_len > 0:
            raise ValueError(f"a layout of {q_len} queries needs at least one key")
        mask = mask.bool()
        if causal:
            mask = mask & causal_block_mask(nq, nk, block_q, block_k, q_len, k_len, mask.device)
        count = mask.sum(-1, dtype=torch.int32)
        if width is None:
            width = max(1, int(count.max().item())) if mask.numel() else 1
        width = max(1, min(int(width), nk))
        # compact each row's kept block numbers to its front (ascending): a cumsum and a scatter, no sort
        slot = torch.where(mask, mask.cumsum(-1, dtype=torch.int32) - 1, width).long()
        index = torch.zeros(b, h, nq, width + 1, dtype=torch.int32, device=mask.device)
        index.scatter_(-1, slot, torch.arange(nk, device=mask.device, dtype=torch.int32).expand(b, h, nq, nk))
        index = index[..., :width].contiguous()  # the last column collected every unkept block; past count: 0
        full_all = full_block_mask(nq, nk, block_q, block_k, q_len, k_len, causal, mask.device)
        full = torch.gather(full_all.expand(b, h, nq, nk), -1, index.long())
        full &= torch.arange(width, device=mask.device) < count[..., None]
        return cls(index, count.contiguous(), full.contiguous(), block_q, block_k, q_len, k_len, causal)

    @classmethod
    def from_index(cls, index: Tensor, count: Tensor, block_q: int, block_k: int, q_len: int, k_len: int,
                   causal: bool = True) -> "BlockLayout":
        """From sorted block indices [B, H, NQ, K] (entries past ``count`` [B, H, NQ] are ignored) that already
        respect causality: no mask, no host sync."""
        nq, nk = -(-q_len // block_q), -(-k_len // block_k)
        full_all = full_block_mask(nq, nk, block_q, block_k, q_len, k_len, causal, index.device)
        idx = index.long()
        full = torch.gather(full_all.expand(*idx.shape[:2], nq, nk), -1, idx)
        full &= torch.arange(idx.shape[-1], device=idx.device) < count[..., None]
        return cls(index.to(torch.int32).contiguous(), count.to(torch.int32).contiguous(), full.contiguous(),
                   block_q, block_k, q_len, k_len, causal)

    @classmethod
    def dense(cls, q_len: int, k_len: int, block_q: int = 128, block_k: int = 128, causal: bool = True,
              device=None) -> "BlockLayout":
        """Every block (causally: every block up to each row's diagonal, bottom-right aligned, so the last row holds
        all NK and the index is NK wide: no host sync)."""
        nq, nk = -(-q_len // block_q), -(-k_len // block_k)
        return cls.from_block_mask(torch.ones(nq, nk, dtype=torch.bool, device=device), block_q, block_k,
                                   q_len, k_len, causal, width=nk)

    def block_mask(self) -> Tensor:
        """bool [B, H, NQ, NK] of computed blocks."""
        b, h, nq, width = self.kv_index.shape
        valid = torch.arange(width, device=self.kv_index.device) < self.kv_count[..., None]
        out = torch.zeros(b, h, nq, self.num_k_blocks + 1, dtype=torch.bool, device=self.kv_index.device)
        idx = torch.where(valid, self.kv_index.long(), torch.full_like(self.kv_index.long(), self.num_k_blocks))
        out.scatter_(-1, idx, True)
        return out[..., : self.num_k_blocks]

    def dense_mask(self) -> Tensor:
        """bool [B, H, q_len, k_len]: the element mask the layout computes (blocks ∧ causal)."""
        m = self.block_mask()
        m = m.repeat_interleave(self.block_q, dim=2)[:, :, : self.q_len]
        m = m.repeat_interleave(self.block_k, dim=3)[:, :, :, : self.k_len]
        if self.causal:
            qi = torch.arange(self.q_len, device=m.device)[:, None] + (self.k_len - self.q_len)
            kj = torch.arange(self.k_len, device=m.device)[None, :]
            m = m & (kj <= qi)
        return m

    def density(self, causal: bool | None = None) -> float:
        """Computed blocks / blocks of the causal (or full) pattern, averaged over batch and heads. ``causal``
        overrides the layout's flag for the denominator (a permuted layout is stored without causal pruning)."""
        return float(self.density_tensor(causal))

    def density_tensor(self, causal: bool | None = None) -> Tensor:
        """``density()`` as a 0-d tensor on the layout's device, without a host sync."""
        causal = self.causal if causal is None else causal
        total = causal_block_count(self.num_q_blocks, self.num_k_blocks, self.block_q, self.block_k, self.q_len,
                                   self.k_len) if causal else self.num_q_blocks * self.num_k_blocks
        return self.kv_count.float().sum(-1).mean() / max(total, 1)

    def expand(self, batch: int, heads: int) -> "BlockLayout":
        b, h = self.kv_index.shape[:2]
        if (b, h) == (batch, heads):
            return self
        if b not in (1, batch) or h not in (1, heads):
            raise ValueError(f"layout of batch {b}, heads {h} cannot serve batch {batch}, heads {heads}")
        ex = lambda t: t.expand(batch, heads, *t.shape[2:])
        return BlockLayout(ex(self.kv_index), ex(self.kv_count), ex(self.kv_full), self.block_q, self.block_k,
                           self.q_len, self.k_len, self.causal)

    def to_flex_block_mask(self, heads: int | None = None):
        """FlexAttention ``BlockMask`` with the same computed blocks (partial ones carry the causal mask_mod).

        Flex needs equal query and key block sizes as its BLOCK_SIZE tuple and lengths padded to them."""
        from torch.nn.attention.flex_attention import BlockMask

        full = self.kv_full
        valid = torch.arange(self.kv_index.shape[-1], device=self.kv_index.device) < self.kv_count[..., None]
        partial = valid & ~full
        nk = self.num_k_blocks

        def pack(sel):
            cnt = sel.sum(-1, dtype=torch.int32)
            key = torch.where(sel, self.kv_index, torch.full_like(self.kv_index, nk))
            idx = torch.sort(key, -1).values
            pad = torch.zeros(*idx.shape[:-1], max(0, nk - idx.shape[-1]), dtype=idx.dtype, device=idx.device)
            idx = torch.cat([idx, pad], -1)[..., :nk]
            return cnt.contiguous(), torch.where(idx >= nk, 0, idx).to(torch.int32).contiguous()

        kv_num, kv_idx = pack(partial)
        full_num, full_idx = pack(full & valid)
        off = self.k_len - self.q_len
        causal = self.causal

        def mask_mod(b, h, q_idx, kv_idx_):
            return (kv_idx_ <= q_idx + off) if causal else (kv_idx_ >= 0)

        return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx,
                                        BLOCK_SIZE=(self.block_q, self.block_k), mask_mod=mask_mod,
                                        seq_lengths=(self.q_len, self.k_len))


class _Density:
    """``density()`` is the host value of ``density_tensor()`` (a 0-d device tensor a model's prefill can sum per
    layer without a sync)."""

    def density(self) -> float:
        return float(self.density_tensor())


@dataclass(frozen=True, eq=False)
class TokenLayout(_Density):
    """Token-level sparsity (Token Sparse Attention): per batch and head, the sorted tokens that take part at all.

    index int64 [B, H, L] (sorted; padded with -1 past ``count``); count int64 [B, H]. Kept tokens attend causally to
    kept tokens (sorted, so causal order in the gathered sequence is causal order in the original); a dropped token's
    attention output is 0 (the residual stream carries it). Executed by gathering Q/K/V, running the dense block
    kernel with per-(batch, head) lengths and scattering back."""

    index: Tensor
    count: Tensor
    q_len: int
    k_len: int
    causal: bool = True

    def density_tensor(self) -> Tensor:
        """Attention work kept: mean over heads of (kept / N)², the fraction of the causal triangle computed."""
        return ((self.count.float() / max(self.q_len, 1)) ** 2).mean()

    def kept_mask(self) -> Tensor:
        """bool [B, H, N]: which tokens take part."""
        b, h, _ = self.index.shape
        m = torch.zeros(b, h, self.q_len + 1, dtype=torch.bool, device=self.index.device)
        m.scatter_(2, torch.where(self.index < 0, self.q_len, self.index), True)
        return m[..., : self.q_len]

    def dense_mask(self) -> Tensor:
        """bool [B, H, N, N] for the reference."""
        kept = self.kept_mask()
        m = kept[..., :, None] & kept[..., None, :]
        if self.causal:
            i = torch.arange(self.q_len, device=m.device)
            m &= i[None, :] <= i[:, None]
        return m


@dataclass(frozen=True, eq=False)
class GroupLayout(_Density):
    """Grouped attention for permutation patterns (``grid``): rows of the visual span [s, e) attend only to the
    tokens of their group — every token before the span plus the span tokens of the same group (causally, or all of
    them) — and every other row attends to everything (causally: everything before it).

    group int64 [B, H, N_span] (the group of each span token, in [0, N_span); one group = dense); span = (s, e).
    Executed by gathering each group (its members as queries; the span prefix plus its members as keys, in original
    order, so that causal order in the gathered sequence is causal order in the original), running the dense block
    kernel over the groups as one batch with per-group lengths for each number of groups a head has (heads with as
    many groups share a batch, so no group is padded to another head's longest), writing the members' rows back, and
    computing the rows outside the span densely."""

    group: Tensor
    span: tuple[int, int]
    q_len: int
    k_len: int
    causal: bool = True

    @property
    def num_groups(self) -> Tensor:
        return self.group.amax(-1) + 1

    def group_sizes(self) -> Tensor:
        """int32 [B, H, N_span] (the group tensor's leading shape): the members of each group id, over every possible
        id (at most one group per member), counted on the device without reading the id count back."""
        return torch.zeros(self.group.shape, dtype=torch.int32, device=self.group.device).scatter_add_(
            -1, self.group, torch.ones(self.group.shape, dtype=torch.int32, device=self.group.device))

    def density_tensor(self) -> Tensor:
        """The attention kept, over the full (causal) attention, mean over heads: the dense mask's share exactly.
        Causal, in squared lengths (a row seeing j keys counts 2j − 1, so rows seeing 1 … N keys sum to N²): a group
        of L members after a prefix of s tokens keeps L² + 2Ls, the text before the span s², the rows after it
        N² − e². Not causal: L² + Ls per group and N per row outside the span, over N²."""
        s, e = self.span
        n = self.q_len
        counts = self.group_sizes().float()  # an id without members adds nothing
        if self.causal:
            work = (counts ** 2 + 2 * s * counts).sum(-1) + s ** 2 + (n ** 2 - e ** 2)
        else:
            work = (counts ** 2 + s * counts).sum(-1) + (n - e + s) * n
        return (work / n ** 2).mean()

    def dense_mask(self) -> Tensor:
        """bool [B, H, N, N] for the reference."""
        s, e = self.span
        n = self.q_len
        i = torch.arange(n, device=self.group.device)
        m = (i[None, :] <= i[:, None]) if self.causal else torch.ones(n, n, dtype=torch.bool, device=i.device)
        m = m.expand(*self.group.shape[:2], n, n).clone()
        gq = self.group[..., :, None]
        gk = self.group[..., None, :]
        m[..., s:e, s:e] &= gq == gk
        m[..., s:e, e:] = False  # (causally so already)
        return m


POOL_LEVELS = (2, 4, 8)


def pool_levels(x: Tensor, full_blocks: int, block_k: int) -> list[Tensor]:
    """x [B, Hkv, N, D] mean-pooled over its first ``full_blocks`` key blocks at each of ``POOL_LEVELS``: per level p
    [B, Hkv, full_blocks · block_k / p, D], averaged in fp32 and returned in x's dtype (what the pyramid's kernel and
    torch path attend)."""
    b, hk, _, d = x.shape
    body = x[:, :, : full_blocks * block_k].float()
    return [body.reshape(b, hk, -1, p, d).mean(3).to(x.dtype) for p in POOL_LEVELS]


@dataclass(frozen=True, eq=False)
class PyramidLayout(_Density):
    """Pyramid Sparse Attention: blocks computed on the exact keys plus blocks attended through mean-pooled K/V.

    ``exact``: a ``BlockLayout`` of the blocks computed exactly (every block that the causal diagonal or a sequence
    end cuts must be here). ``pooled``: one ``BlockLayout`` per level of ``POOL_LEVELS`` (2, 4, 8) listing the blocks
    whose keys are replaced by means over ``p`` consecutive keys (values likewise), each pooled logit biased by ln p so
    a pooled key weighs as the p keys it stands for. A block sits in at most one of the four; pooled blocks are whole
    blocks entirely visible to their query block."""

    exact: BlockLayout
    pooled: tuple

    @property
    def q_len(self) -> int:
        return self.exact.q_len

    @property
    def k_len(self) -> int:
        return self.exact.k_len

    @property
    def causal(self) -> bool:
        return self.exact.causal

    def expand(self, batch: int, heads: int) -> "PyramidLayout":
        return PyramidLayout(self.exact.expand(batch, heads), tuple(p.expand(batch, heads) for p in self.pooled))

    def level_map(self) -> Tensor:
        """int [B, H, NQ, NK]: 1 for exact blocks, p for blocks pooled at level p, 0 for skipped ones."""
        b = max(t.kv_count.shape[0] for t in (self.exact, *self.pooled))
        h = max(t.kv_count.shape[1] for t in (self.exact, *self.pooled))
        lay = self.expand(b, h)
        out = lay.exact.block_mask().long()
        for p, pl in zip(POOL_LEVELS, lay.pooled):
            out = out + pl.block_mask().long() * p
        return out

    def density_tensor(self) -> Tensor:
        """Cost-weighted: (exact blocks + Σ pooled blocks / p) over the causal (or full) block count."""
        cost = self.exact.density_tensor()
        for p, pl in zip(POOL_LEVELS, self.pooled):
            cost = cost + pl.density_tensor() / p
        return cost


def gather_rows(x: Tensor, index: Tensor, heads: Tensor | None = None, planes: Tensor | None = None) -> Tensor:
    """Rows of ``x`` [B, Hx, N, D] at ``index`` int64 [B or 1, H, M] (each in [0, N)): out[b, h, m] = x[b, heads[h],
    index[b, h, m]] -> contiguous [B, H, M, D]; ``heads`` int64 [H] (each in [0, Hx)) defaults to h, with H = Hx.
    ``planes`` int64 [H] (each in [0, B·Hx)) in place of ``heads``: output head h reads x's (batch, head) plane
    divmod(planes[h], Hx), with a batch-1 index, -> [1, H, M, D] (x's planes flattened without copying x).
    On a GPU that runs the Triton kernels, ``kernels.gather`` copies each row whole, 3× faster than
    ``torch.gather`` on an H200 (``benchmarks/pbs_steps.py``); elsewhere ``gather_rows_torch``. Either way the
    rows are x's own values."""
    from .kernels.fit import kernel_device

    if kernel_device(x):
        from .kernels.gather import gather_rows as kernel

        return kernel(x, index, heads, planes)
    return gather_rows_torch(x, index, heads, planes)


def gather_rows_torch(x: Tensor, index: Tensor, heads: Tensor | None = None, planes: Tensor | None = None) -> Tensor:
    """``gather_rows`` in torch: ``torch.gather`` over ``x[:, heads]`` (``x[planes // Hx, planes % Hx]``) with the
    index expanded over D."""
    if planes is not None:
        src = x[planes // x.shape[1], planes % x.shape[1]][None]
    else:
        src = x if heads is None else x[:, heads]
    idx = index.expand(src.shape[0], -1, -1)[..., None].expand(-1, -1, -1, x.shape[-1])
    return torch.gather(src, 2, idx)


def scatter_rows(out: Tensor, index: Tensor, src: Tensor, planes: Tensor | None = None) -> Tensor:
    """``gather_rows``' inverse, in place: out[b, h, index[b, h, m]] = src[b, h, m] for out [B, Hx, N, D], index
    [B or 1, Hx, M], src [B, Hx, M, D]; with ``planes`` int64 [P] (each in [0, B·Hx)), out[divmod(planes[p], Hx),
    index[0, p, m]] = src[0, p, m] for index [1, P, M] and src [1, P, M, D]. Positions outside [0, N) (padding)
    write nothing. ``kernels.gather.scatter_rows`` on a GPU that runs the Triton kernels, else ``index_put_``.
    Returns out."""
    from .kernels.fit import kernel_device

    if kernel_device(out):
        from .kernels.gather import scatter_rows as kernel

        return kernel(out, index, src, planes)
    return scatter_rows_torch(out, index, src, planes)


def scatter_rows_torch(out: Tensor, index: Tensor, src: Tensor, planes: Tensor | None = None) -> Tensor:
    """``scatter_rows`` in torch: ``index_put_`` of the rows whose position lies in [0, N)."""
    b, hx, n, _ = out.shape
    if planes is None:
        planes = torch.arange(b * hx, device=out.device).view(b, hx, 1)
        index = index.expand(b, hx, -1)
    else:
        planes = planes.view(1, -1, 1)
    planes = planes.expand_as(index)
    inside = (index >= 0) & (index < n)
    out[planes[inside] // hx, planes[inside] % hx, index[inside]] = src[inside]
    return out


@dataclass(frozen=True, eq=False)
class PermutedLayout(_Density):
    """Keys permuted per K/V head (PBS): ``perm`` int64 [B, Hkv, Nk] lists the original position of each key in
    permuted order; ``blocks`` is a ``BlockLayout`` over (original queries × permuted key blocks), built without
    causal pruning because a permuted block can hold keys from anywhere in its segment. With ``causal``, key j is
    visible to query i iff perm[j] ≤ i + (Nk − Nq); the kernel masks by these positions, not by index."""

    perm: Tensor
    blocks: BlockLayout
    causal: bool = True

    @property
    def q_len(self) -> int:
        return self.blocks.q_len

    @property
    def k_len(self) -> int:
        return self.blocks.k_len

    def density_tensor(self) -> Tensor:
        """Computed blocks over the blocks of the (unpermuted) causal pattern."""
        return self.blocks.density_tensor(causal=self.causal)

    def dense_mask(self, heads: int) -> Tensor:
        """bool [B, H, Nq, Nk] in original key order, for the reference."""
        b, hk, nk = self.perm.shape
        perm = self.perm.repeat_interleave(heads // hk, 1)
        m = self.blocks.expand(b, heads).dense_mask()  # permuted key order, no causal cut
        if self.causal:
            qi = torch.arange(self.q_len, device=m.device) + (self.k_len - self.q_len)
            m = m & (perm[:, :, None, :] <= qi[:, None])
        out = torch.zeros_like(m)
        return out.scatter_(-1, perm[:, :, None, :].expand_as(m), m)
