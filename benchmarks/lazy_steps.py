"""How often the Gluon kernel's lazy rescale still has to rescale, by layout width: an exact count in torch (no GPU
needed), explaining the ``tune_attention.py --lazy --widths`` sweeps.

    python benchmarks/lazy_steps.py [--n 8192] [--heads 4] [--widths 10,13,20,26] [--device cpu]
        [--markdown-from FILE [--note TEXT]]

The kernel walks a row's key blocks in ascending order; each of its two consumer warpgroups owns 64 of a tile's 128
query rows. After a row's first block, a step (one warpgroup, one key block) must rescale the accumulator under the
lazy rule when some row's block max passes that row's lazy max by more than 8 in log2 units (``RESCALE_LOG2``:
logits × scale × log2 e; the lazy max is the first block's and moves only on such a pass, so small rises add up),
and the eager rule rescales on every step. So the lazy rule saves the share of steps it skips and pays one
cross-warp reduction on all of them. Counted here on ``block_topk``'s layouts of video-structured q/k
(``attention.video_qk``) and on random q/k with random layouts, at each width (blocks in the longest row). Saves
``lazy_steps.json`` under the device's results and writes a BENCHMARKS.md section."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import random_layout, video_qk  # noqa: E402
from common import markdown_args, new_payload, rewrite_markdown, save, update_markdown  # noqa: E402

from vidsparse import PATTERNS  # noqa: E402
from vidsparse.attention import BlockLayout  # noqa: E402
from vidsparse.attention.kernels import block_sparse_hopper  # noqa: E402
from vidsparse.attention.patterns import SeqMeta  # noqa: E402

RESCALE_LOG2 = float(block_sparse_hopper.RESCALE_LOG2.value)  # the kernel's threshold (a Gluon constexpr): 8
BLOCK, GROUP = 128, 64  # key/query block; rows per consumer warpgroup


def rescale_steps(q, k, lay: BlockLayout) -> dict:
    """For a causal layout over q [1, H, N, D], k [1, Hkv, N, D] (as many keys as queries): the steps after each
    row's first block (one 64-row warpgroup, one key block); those in which the lazy rule rescales, as
    ``_softmax_lazy`` decides it (some row's block max passes that row's lazy max — set by its first block, moved
    only by such a pass — by more than ``RESCALE_LOG2``); and those in which some row's true running max rises at
    all. -> {"steps", "lazy", "moved"} (counts)."""
    _, h, n, d = q.shape
    g = h // k.shape[1]
    nb = -(-n // BLOCK)
    scale = d ** -0.5 * math.log2(math.e)
    pos = torch.arange(n, device=q.device)
    steps = lazy = moved = 0
    for hh in range(h):
        head = lambda t: t[0, hh if t.shape[1] > 1 else 0].long()  # noqa: E731  (layouts may broadcast over heads)
        idx, cnt = head(lay.kv_index), head(lay.kv_count)
        qh, kh = q[0, hh].float(), k[0, hh // g].float()
        kb = torch.nn.functional.pad(kh, (0, 0, 0, nb * BLOCK - n)).view(nb, BLOCK, d)
        qb = torch.nn.functional.pad(qh, (0, 0, 0, nb * BLOCK - n)).view(nb, BLOCK, d)
        s = torch.einsum("mrd,mwkd->mrwk", qb, kb[idx]) * scale  # [NQ, 128 rows, W blocks, 128 keys]
        kpos = idx[:, :, None] * BLOCK + torch.arange(BLOCK, device=q.device)  # [NQ, W, 128]
        qpos = torch.nn.functional.pad(pos, (0, nb * BLOCK - n), value=-1).view(nb, BLOCK)
        visible = (kpos[:, None] <= qpos[:, :, None, None]) & (kpos[:, None] < n)
        listed = torch.arange(idx.shape[1], device=q.device)[None, :] < cnt[:, None]  # [NQ, W]
        bmax = s.masked_fill(~visible, float("-inf")).amax(-1)  # [NQ, 128, W]
        bmax = bmax.masked_fill(~listed[:, None], float("-inf"))
        run = bmax.cummax(-1).values
        delta = bmax[..., 1:] - run[..., :-1]  # each block's max over the true running max before it
        delta = torch.nan_to_num(delta, nan=float("-inf"))  # -inf - -inf: a row with nothing visible yet
        # the lazy rule's own max: set by the first block, moved only by a block passing it by more than 2^8
        m, grows = bmax[..., 0], []
        for j in range(1, bmax.shape[-1]):
            cand = torch.maximum(m, bmax[..., j])
            grow = (cand - m) > RESCALE_LOG2  # -inf to finite: +inf, grows; -inf to -inf: NaN, stays
            m = torch.where(grow, cand, m)
            grows.append(grow)
        grow = torch.stack(grows, -1) if grows else torch.zeros_like(delta, dtype=torch.bool)  # [NQ, 128, W-1]
        # [NQ, 2, W-1]: both warpgroups take every step of their tile (rows past the sequence see nothing, never move)
        step = listed[:, None, 1:].expand(nb, BLOCK // GROUP, -1)
        steps += int(step.sum())
        lazy += int((grow.view(nb, BLOCK // GROUP, GROUP, -1).any(2) & step).sum())
        moved += int(((delta.view(nb, BLOCK // GROUP, GROUP, -1) > 0).any(2) & step).sum())
    return {"steps": steps, "lazy": lazy, "moved": moved}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8192, help="tokens (a multiple of 256: video_qk's frames)")
    ap.add_argument("--heads", type=int, default=4, help="query heads, each with its own K/V head")
    ap.add_argument("--widths", default="10,13,20,26")
    ap.add_argument("--device", default="cpu")
    markdown_args(ap, "lazy_steps")
    args = ap.parse_args()
    if rewrite_markdown(args, write_markdown):
        return
    res = new_payload("lazy_steps", "python benchmarks/lazy_steps.py" + "".join(" " + a for a in sys.argv[1:]),
                      n=args.n, heads=args.heads, device_used=args.device)
    n, h, d = args.n, args.heads, 128
    torch.manual_seed(0)
    video = video_qk(n // 256 - 1, 16, 16, h, h, d, device=args.device)[:2]
    rand = tuple(torch.randn(1, h, n, d, device=args.device).bfloat16() for _ in range(2))
    nb = -(-n // BLOCK)
    for w in map(int, args.widths.split(",")):
        rho = (w - 0.5) / nb  # the widest row's ceil(rho × its blocks) is exactly w (as tune_attention's sweep)
        for kind, (q, k) in (("pattern", video), ("random", rand)):
            lay = PATTERNS.from_spec(f"block_topk:density={rho}").estimate(q, k, SeqMeta()) if kind == "pattern" \
                else random_layout(h, n, rho, device=args.device)
            c = rescale_steps(q, k, lay)
            row = {"layout": kind, "width": lay.kv_index.shape[-1], "density": lay.density(), **c,
                   "lazy_share": c["lazy"] / max(c["steps"], 1), "moved_share": c["moved"] / max(c["steps"], 1)}
            res["rows"].append(row)
            print(row, flush=True)
    save("lazy_steps", res)
    write_markdown(res)


def write_markdown(res):
    lines = [f"{res['date']}, `{res['command']}`: {res['n']} tokens, {res['heads']} heads, d = 128, causal, counted "
             "in torch. A step is one consumer warpgroup (64 query rows) on one key block after its row's first; the "
             "eager rule rescales on every step, the lazy one only where some row's block max passes that row's lazy "
             "max (its first block's, moved only by such a pass) by more than 2^8, and pays a cross-warp reduction on "
             "every step. `pattern`: `block_topk`'s layouts of "
             "video-structured q/k (`attention.video_qk`); `random`: random q/k and random layouts." +
             (f" {res['note']}" if res.get("note") else ""), "",
             "| layout | width | density | steps | lazy rescales | share | some row's true max rose |",
             "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['layout']} | {r['width']} | {r['density']:.3f} | {r['steps']} | {r['lazy']} | "
                     f"{r['lazy_share']:.1%} | {r['moved_share']:.1%} |")
    update_markdown(f"Lazy rescale: steps that still rescale ({res['device']})", "\n".join(lines))


if __name__ == "__main__":
    main()
