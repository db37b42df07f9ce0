"""``benchmarks/lazy_steps.py``: the count of steps in which the Gluon kernel's lazy rule still rescales, against
hand-computed cases and a plain per-row loop."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import lazy_steps  # noqa: E402
from attention import random_layout  # noqa: E402

from vidsparse.attention import BlockLayout  # noqa: E402


@pytest.mark.parametrize("c,lazy,moved", [(5.0, 2, 2), (2.0, 0, 2), (0.5, 0, 0)])
def test_two_blocks_by_hand(c, lazy, moved):
    """256 tokens, all-ones queries; keys of block 1 are c × those of block 0. Query block 1 (two warpgroups) takes
    one step after its first block, whose logits are 4·scale·log2 e = 2.885 against 2.885·c on the diagonal block:
    at c = 5 the max moves by 11.5 (> 8: both warpgroups rescale lazily), at c = 2 by 2.9, at c = ½ not at all.
    Query block 0 has one block and takes no step."""
    q = torch.ones(1, 1, 256, 4)
    k = torch.ones(1, 1, 256, 4)
    k[:, :, 128:] *= c
    lay = BlockLayout.dense(256, 256, device="cpu")
    assert lazy_steps.rescale_steps(q, k, lay) == {"steps": 2, "lazy": lazy, "moved": moved}


def test_small_rises_add_up():
    """The lazy max moves only on a pass of more than 2^8, so two rises of 5 (log2 units) make the second block
    rescale: three blocks of logits 2.885, 7.885, 12.885. Query block 1 takes one step per warpgroup (+5: no
    rescale); query block 2 two (+5, then +10 over the lazy max, though only +5 over the true one): 6 steps, 2 lazy
    rescales, a rise in each."""
    base = 4 * 0.5 * math.log2(math.e)  # all-ones q and k of width 4: q·k × 4^-½ × log2 e
    q = torch.ones(1, 1, 384, 4)
    k = torch.ones(1, 1, 384, 4)
    for b, rise in ((1, 5.0), (2, 10.0)):
        k[:, :, b * 128:(b + 1) * 128] *= (base + rise) / base
    lay = BlockLayout.dense(384, 384, device="cpu")
    assert lazy_steps.rescale_steps(q, k, lay) == {"steps": 6, "lazy": 2, "moved": 6}


def _loop(q, k, lay):
    """The count one row block, one key block and one warpgroup at a time."""
    _, h, n, d = q.shape
    scale = d ** -0.5 * math.log2(math.e)
    steps = lazy = moved = 0
    for hh in range(h):
        idx = lay.kv_index[0, hh if lay.kv_index.shape[1] > 1 else 0]
        cnt = lay.kv_count[0, hh if lay.kv_count.shape[1] > 1 else 0]
        for m in range(idx.shape[0]):
            rows = q[0, hh, m * 128:(m + 1) * 128].float()
            pos = torch.arange(m * 128, m * 128 + rows.shape[0])
            run = lazy_max = None
            for j in range(int(cnt[m])):
                b = int(idx[m, j])
                keys = k[0, hh * k.shape[1] // h, b * 128:(b + 1) * 128].float()
                s = (rows @ keys.T * scale).masked_fill(torch.arange(b * 128, b * 128 + keys.shape[0])[None] >
                                                        pos[:, None], float("-inf"))
                bm = s.amax(1)
                if run is not None:
                    grow = [bool(x - y > 8) for x, y in zip(bm.tolist(), lazy_max.tolist())]  # per row, in turn
                    for g in (0, 64):  # both warpgroups, also one whose rows all lie past the sequence
                        steps += 1
                        lazy += any(grow[g:g + 64])
                        moved += bool((bm[g:g + 64] - run[g:g + 64] > 0).any())
                    lazy_max = torch.tensor([x if gr else y for x, y, gr in zip(bm.tolist(), lazy_max.tolist(), grow)])
                run = bm if run is None else torch.maximum(run, bm)
                lazy_max = bm if lazy_max is None else lazy_max
    return {"steps": steps, "lazy": lazy, "moved": moved}


@pytest.mark.parametrize("n,hk", [(1024, 2), (900, 1)])
def test_matches_a_plain_loop(n, hk):
    """Random layouts (per head), GQA, a length that is not a block multiple (at 900 the last tile's second
    warpgroup lies wholly past it: it takes its steps and never moves), and keys whose scale grows along the
    sequence, so that some maxima pass 2^8 and some do not."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, n, 64, generator=g)
    k = torch.randn(1, hk, n, 64, generator=g) * torch.linspace(0.3, 6.0, n)[:, None]
    lay = random_layout(4, n, 0.6, device="cpu")
    got = lazy_steps.rescale_steps(q, k, lay)
    assert got == _loop(q, k, lay)
    assert 0 < got["lazy"] < got["moved"] <= got["steps"]
    assert got["moved"] < got["steps"] or n % 128 == 0  # the warpgroup past the sequence never moves
