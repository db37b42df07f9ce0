"""A model's kept-key subsets (``models.hf.subset_attention``, the execution path of ZipVL-style key pruning): the
own-key fold-in step, its torch version against the one-pass kernel (``attention.kernels.own_key``), alone and
inside the whole ``key_subset_attention`` call; the call's block layout computed straight from the kept positions
(``ops.subset_blocks``) against the general route it replaced; with dense cuDNN on the same inputs as the reference
point.

    python benchmarks/key_subset.py [--sizes 16384,32768,65536,131072] [--fractions 0.5,0.94]
        [--markdown-from FILE [--note TEXT]]

The torch fold is the expression the kernel replaced (fp32 einsum for each query's own-key logit, a sigmoid against
the row's log-sum-exp, a lerp in the output's dtype); for the whole call it is swapped in for the kernel in the same
process, and the callables run in alternating rounds. The general layout route is ``BlockLayout.from_index`` plus
``full_prefix`` over every head, as the call ran it before ``subset_blocks``; host ms is the call's wall time when
it starts on an idle GPU and returns before its kernels finish (median of 20), the time a model spends launching it.
Random q/k/v (28 heads / 4 K/V heads, d = 128, bf16), a random sorted fraction of the keys kept. Saves
``key_subset.json`` under the device's results and writes a BENCHMARKS.md section."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import bench_ms, causal_sdpa, graph_ms  # noqa: E402
from common import (  # noqa: E402
    gpu_cell, interleaved, kernel_times, markdown_args, ms_cell, new_payload, rewrite_markdown, run_rows, swapped,
    update_markdown,
)

from vidsparse.attention import ops  # noqa: E402
from vidsparse.attention.kernels import own_key  # noqa: E402
from vidsparse.attention.kernels.block_sparse import full_prefix  # noqa: E402
from vidsparse.attention.layout import BlockLayout  # noqa: E402
from vidsparse.attention.ops import key_subset_attention  # noqa: E402

ROUND_MS = 200
H, HK, D = 28, 4, 128


def torch_fold(q, k, v, out, lse, kept, scale):
    """The fold-in ``key_subset_attention`` ran before ``kernels.own_key`` (its code, unchanged)."""
    b, h, n, d = q.shape
    hk = k.shape[1]
    g = h // hk
    s_self = torch.einsum("bkgnd,bknd->bkgn", q.float().view(b, hk, g, n, d), k.float()) * scale
    w = (torch.sigmoid(s_self - lse.view(b, hk, g, n)) * ~kept)[..., None]
    return torch.lerp(out.view(b, hk, g, n, d), v[:, :, None], w.to(out.dtype)).view(b, h, n, d)


def general_blocks(keys, n, block):
    """The layout route ``key_subset_attention`` took before ``ops.subset_blocks`` (its code, unchanged): the rows'
    block counts, ``BlockLayout.from_index`` (which also builds the mask-free flags the kernel never reads), and
    ``full_prefix`` on the kept positions of every K/V head, repeated over the query heads."""
    m = keys.numel()
    nqb, nkb = -(-n // block), -(-m // block)
    last_q = torch.clamp((torch.arange(nqb, device=keys.device) + 1) * block, max=n) - 1
    count = (keys[::block][None, :] <= last_q[:, None]).sum(-1)
    index = torch.arange(nkb, device=keys.device).expand(1, 1, nqb, nkb)
    lay = BlockLayout.from_index(index, count.view(1, 1, nqb), block, block, n, m, causal=False)
    full = lambda x: torch.full((1,), x, dtype=torch.int32, device=keys.device)  # noqa: E731
    nfull = full_prefix(lay.kv_index, lay.kv_count, block, block, True, full(n), full(m),
                        keys.to(torch.int32).expand(1, HK, m), H // HK, 0)
    return lay.kv_index, lay.kv_count, nfull


def host_ms(fn, calls: int = 20) -> float:
    """Median wall time of ``fn`` started on an idle GPU (its kernels may still run when it returns)."""
    import statistics
    import time

    t = []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(t)


def run_case(n: int, frac: float, monitor) -> dict:
    g = torch.Generator(device="cuda").manual_seed(n)
    q = torch.randn(1, H, n, D, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(1, HK, n, D, device="cuda", generator=g).bfloat16() for _ in range(2))
    keys = torch.sort(torch.randperm(n, device="cuda", generator=g)[: int(n * frac)]).values
    kept = torch.zeros(n, dtype=torch.bool, device="cuda")
    kept[keys] = True
    scale = 1.0 / math.sqrt(D)
    out = torch.randn(1, H, n, D, device="cuda", generator=g).bfloat16()
    lse = torch.randn(1, H, n, device="cuda", generator=g) * 2 + 8
    # the step alone: the torch fold writes a new tensor; the kernel folds in place (the same rows every time)
    want = torch_fold(q, k, v, out, lse, kept, scale)
    got = own_key.fold_own_key(q, k, v, out.clone(), lse, kept, scale)
    step_diff = float((got.float() - want.float()).abs().max())
    buf = out.clone()
    step = interleaved({"torch": lambda: torch_fold(q, k, v, out, lse, kept, scale),
                        "kernel": lambda: own_key.fold_own_key(q, k, v, buf, lse, kept, scale)},
                       lambda fn: bench_ms(fn, rep_ms=ROUND_MS), 3, monitor)
    # bytes the kernel must move: q, o (read and written) for the folded rows of every head, k and v for those rows
    # of every K/V head, the rows' log-sum-exp, and the kept flags
    folded = n - keys.numel()
    need = folded * (3 * H * D * 2 + 2 * HK * D * 2 + H * 4) + n
    step["kernel"]["gb_s"] = need / step["kernel"]["ms"] / 1e6
    whole_k = lambda: key_subset_attention(q, k, v, keys, scale)  # noqa: E731
    whole_t = swapped(own_key, "fold_own_key", torch_fold, whole_k)
    whole_g = swapped(ops, "subset_blocks", general_blocks, whole_k)
    got = whole_k()
    whole_diff = float((got.float() - whole_t().float()).abs().max())
    layout_same = bool(torch.equal(got, whole_g()))  # the same layout: the same output, bit for bit
    cudnn = causal_sdpa("cudnn", q, k.repeat_interleave(H // HK, 1), v.repeat_interleave(H // HK, 1))
    whole = interleaved({"torch_fold": whole_t, "general_layout": whole_g, "kernel_fold": whole_k, "cudnn": cudnn},
                        lambda fn: bench_ms(fn, rep_ms=ROUND_MS), 3, monitor)
    for name, fn in (("torch_fold", whole_t), ("general_layout", whole_g), ("kernel_fold", whole_k)):
        whole[name]["graph_ms"] = graph_ms(fn)  # GPU time alone (None if the call cannot be captured)
    for _ in range(3):  # alternating, as the rounds above
        for name, fn in (("general_layout", whole_g), ("kernel_fold", whole_k)):
            whole[name].setdefault("host_rounds", []).append(host_ms(fn))
    for name in ("general_layout", "kernel_fold"):
        whole[name]["host_ms"] = sorted(whole[name]["host_rounds"])[1]
    breakdown = kernel_times(whole_k)[:8]
    res = {"n": n, "fraction": frac, "kept": keys.numel(), "step": step, "step_max_abs_diff": step_diff,
           "kernels": breakdown,
           "whole": whole, "whole_max_abs_diff": whole_diff, "layout_same_output": layout_same,
           "step_speedup": step["torch"]["ms"] / step["kernel"]["ms"],
           "whole_speedup": whole["torch_fold"]["ms"] / whole["kernel_fold"]["ms"],
           "layout_speedup": whole["general_layout"]["ms"] / whole["kernel_fold"]["ms"],
           "vs_cudnn": whole["cudnn"]["ms"] / whole["kernel_fold"]["ms"]}
    print(n, frac, {x: round(step[x]["ms"], 3) for x in step}, {x: round(whole[x]["ms"], 3) for x in whole},
          f"step {res['step_speedup']:.1f}x whole {res['whole_speedup']:.2f}x",
          f"layout {res['layout_speedup']:.2f}x (same output: {layout_same})",
          "graph", [whole[x]["graph_ms"] for x in ("torch_fold", "general_layout", "kernel_fold")],
          "host", [round(whole[x]["host_ms"], 3) for x in ("general_layout", "kernel_fold")], flush=True)
    for r in breakdown:
        print(f"  {r['ms_per_call']:8.3f} ms x{r['count_per_call']:<4g} {r['kernel'][:100]}", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="16384,32768,65536,131072")
    ap.add_argument("--fractions", default="0.5,0.94")
    markdown_args(ap, "key_subset")
    args = ap.parse_args()
    if rewrite_markdown(args, write_markdown):
        return
    payload = new_payload("key_subset", f"python benchmarks/key_subset.py --sizes {args.sizes} "
                          f"--fractions {args.fractions}", heads=H, kv_heads=HK, d=D)
    cases = [(int(n), float(f)) for n in args.sizes.split(",") for f in args.fractions.split(",")]
    run_rows("key_subset", payload, cases, lambda c, monitor: run_case(*c, monitor), write_markdown)


def write_markdown(p: dict) -> None:
    lines = [f"Device: {p['device']} — {p['date']} — `{p['command']}` — bf16, {p['heads']} heads / {p['kv_heads']} "
             f"K/V heads, d = {p['d']}, batch 1, random q/k/v, a random sorted fraction of the keys kept.", "",
             "`key_subset_attention` runs the block kernel over the kept keys, then folds each query's own key in "
             "where it was not kept, through the row's log-sum-exp. The fold step alone: the torch expression it "
             "used (fp32 einsum, sigmoid, lerp) against the one-pass kernel `attention.kernels.own_key` (GB/s: the "
             "bytes it must move, q and o read and o written for the folded rows of every head, k and v for those "
             "rows, over its time). The whole call with each fold swapped in, and dense cuDNN on the same inputs. "
             "Callables of a row run in 3 alternating rounds in one process; cells read ms (SM MHz). Max abs diff: "
             "between the two folds' outputs (bf16). GPU ms: the whole call (kernel fold) captured in a CUDA graph and "
             "replayed, the GPU's time alone; - where the call cannot be captured (it waits for the GPU).", "",
             *([p["note"], ""] if p.get("note") else []),
             "| N | kept | fold: torch ms | fold: kernel ms (GB/s) | fold speed-up | whole call, torch fold ms | "
             "whole call, kernel fold ms | whole speed-up | whole call GPU ms | dense cuDNN ms | vs cuDNN | "
             "max abs diff (step / whole) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in p["rows"]:
        s, w = r["step"], r["whole"]
        lines.append(f"| {r['n']} | {r['fraction']:.0%} | {ms_cell(s['torch'])} | {s['kernel']['ms']:.3f} "
                     f"({s['kernel']['gb_s']:.0f}) | {r['step_speedup']:.1f}x | {ms_cell(w['torch_fold'])} | "
                     f"{ms_cell(w['kernel_fold'])} | {r['whole_speedup']:.2f}x | {gpu_cell(w['kernel_fold'])} | "
                     f"{ms_cell(w['cudnn'])} | {r['vs_cudnn']:.2f}x | "
                     f"{r['step_max_abs_diff']:.1e} / {r['whole_max_abs_diff']:.1e} |")
    layout = [r for r in p["rows"] if "general_layout" in r["whole"]]
    if layout:
        lines += ["", "The call's block layout: computed straight from the kept positions (`ops.subset_blocks`, a few "
                  "ops) against the general route it replaced (`BlockLayout.from_index`, then `full_prefix` over "
                  "every head); both with the kernel fold, alternating rounds in the same process. Host ms: the "
                  "call's wall time started on an idle GPU, returning before its kernels finish (median of 20 calls; "
                  "the middle of 3 alternating rounds). Same output: the two calls' outputs equal bit for bit.", "",
                  "| N | kept | general route ms | subset_blocks ms | speed-up | GPU ms (general / subset_blocks) | "
                  "host ms (general / subset_blocks) | same output |", "|---|---|---|---|---|---|---|---|"]
        for r in layout:
            w = r["whole"]
            g, d = w["general_layout"], w["kernel_fold"]
            lines.append(f"| {r['n']} | {r['fraction']:.0%} | {ms_cell(g)} | {ms_cell(d)} | "
                         f"{r['layout_speedup']:.2f}x | "
                         f"{gpu_cell(g)} / {gpu_cell(d)} | {g['host_ms']:.3f} / {d['host_ms']:.3f} | "
                         f"{'yes' if r['layout_same_output'] else 'no'} |")
    update_markdown(f"Key subsets: the own-key fold-in ({p['device']})", "\n".join(lines))


if __name__ == "__main__":
    main()
