"""Sparse prefill attention on the GPU: dense SDPA (flash, cuDNN), FlexAttention on the identical layout, and the
vidsparse kernel; pattern estimation times; attention-mass recall on video-structured inputs.

    python benchmarks/attention.py [--sizes 16384,32768,65536,131072] [--quick]

Effective TFLOP/s counts computed blocks only: causal FLOPs = 2·N²·D per head × density (density = computed blocks
/ causal blocks). Every ratio is against baselines rerun in the same process on the same device."""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import GpuMonitor, device_name, interleaved, save, today, update_markdown, versions  # noqa: E402

from vidsparse import PATTERNS  # noqa: E402
from vidsparse.attention import BlockLayout, sparse_attention  # noqa: E402
from vidsparse.attention.layout import causal_block_mask  # noqa: E402
from vidsparse.attention.patterns import SeqMeta  # noqa: E402
from vidsparse.attention.patterns.base import keep_topk  # noqa: E402


ROUND_MS = 200  # repetitions per timing round of ``time_kernels`` (three rounds per callable)


def bench_ms(fn, rep_ms=400) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median"))


def random_layout(h, n, density, block=128, seed=0, device="cuda") -> BlockLayout:
    """Per head and query block, the diagonal plus random causal blocks up to ``density`` of the row's causal ones."""
    nb = -(-n // block)
    g = torch.Generator(device=device).manual_seed(seed)
    allowed = causal_block_mask(nb, nb, block, block, n, n, device)
    r = torch.rand(1, h, nb, nb, device=device, generator=g).masked_fill(~allowed, 0) + torch.eye(nb, device=device) * 2
    per_row = torch.clamp(torch.ceil(allowed.sum(-1).float() * density).long(), min=1)
    return BlockLayout.from_block_mask(keep_topk(r, per_row), block, block, n, n)


def flops(h, n, d, density=1.0) -> float:
    return 2.0 * n * n * d * h * density


def causal_sdpa(backend: str, q, k, v):
    """A callable running torch's causal SDPA on q/k/v with one backend ("flash" or "cudnn") forced."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]

    def run():
        with sdpa_kernel(be):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return run


def time_kernels(n, h, hk, d, densities, quick, monitor=None, rounds=3):
    """Dense baselines, then each layout through vidsparse and FlexAttention. The callables compared in one table row
    are timed in alternating rounds (``common.interleaved``), each round ``ROUND_MS`` of repetitions, so that a drift
    in clock or temperature falls on all of them alike; ``monitor`` records the SM clock each ran at."""
    from torch.nn.attention.flex_attention import flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    q = torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hk, n, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, hk, n, d, device="cuda", dtype=torch.bfloat16)
    ke, ve = k.repeat_interleave(h // hk, 1), v.repeat_interleave(h // hk, 1)
    row = {"n": n, "heads": h, "kv_heads": hk, "d": d, "rounds": rounds}
    timer = lambda fn: bench_ms(fn, rep_ms=ROUND_MS)  # noqa: E731

    def timed(fns, dens):
        res = interleaved(fns, timer, rounds, monitor)
        for r in res.values():
            r["tflops"] = flops(h, n, d, dens) / r["ms"] / 1e9
        return res

    dense_fns = {}
    for backend in ("flash", "cudnn"):
        name, run = f"sdpa_{backend}", causal_sdpa(backend, q, ke, ve)
        try:
            run()
            dense_fns[name] = run
        except RuntimeError as exc:
            row[name] = {"error": str(exc).splitlines()[0][:200]}
    dense = BlockLayout.dense(n, n, device="cuda")
    dense_fns["vidsparse_dense"] = lambda: sparse_attention(q, k, v, dense)
    row.update(timed(dense_fns, 1.0))
    row["sparse"] = []

    def versus_flex(entry, qq, kk, vv, lay, extra=None):
        fns = {"vidsparse": lambda: sparse_attention(qq, kk, vv, lay), **(extra or {})}
        if not quick and isinstance(lay, BlockLayout):
            try:
                bm = lay.to_flex_block_mask()
                out_f = flex(qq, kk, vv, block_mask=bm, enable_gqa=True)
                entry["max_abs_diff_vs_flex"] = float((fns["vidsparse"]().float() - out_f.float()).abs().max())
                fns["flex"] = lambda: flex(qq, kk, vv, block_mask=bm, enable_gqa=True)
            except Exception as exc:  # report, keep measuring the rest
                entry["flex"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
        entry.update(timed(fns, entry["density"]))
        # the same callables' GPU time alone (CUDA-graph replays, alternating rounds): where launching a call takes
        # longer than its kernels (short sequences), the times above are the host's
        graphs = {}
        for name, fn in fns.items():
            try:
                if (g := captured(fn)) is not None:
                    graphs[name] = g
            except Exception as exc:  # report, keep measuring the rest
                entry[name]["graph_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        for name, res in interleaved({x: g.replay for x, g in graphs.items()}, timer, rounds).items():
            entry[name]["graph_ms"] = res["ms"]
        del graphs

    for rho in densities:
        lay = random_layout(h, n, rho)
        entry = {"target_density": rho, "density": lay.density()}
        run, work, facts = same_rows_cudnn(q, ke, ve, entry["density"])
        versus_flex(entry, q, k, v, lay, {"cudnn_same_rows": run} if run else {})
        entry["cudnn_same_rows"] = {**entry.get("cudnn_same_rows", {}), **facts}
        if run:
            entry["cudnn_same_rows"]["tflops"] = work / entry["cudnn_same_rows"]["ms"] / 1e9
        row["sparse"].append(entry)
    if n % 256 == 0:  # layouts a pattern picks on video-structured q/k (neighbouring rows and heads overlap)
        qv, kv_, _, _ = video_qk(n // 256 - 1, 16, 16, h, hk, d)
        vv = torch.randn_like(kv_)
        row["pattern"] = []
        meta = SeqMeta(128, 128, True)
        for spec in [f"block_topk:density={rho}" for rho in densities] + ["pyramid", "pbs"]:
            pat = PATTERNS.from_spec(spec)
            lay = pat.estimate(qv, kv_, meta)
            entry = {"spec": spec, "density": lay.density(),
                     "estimate_ms": bench_ms(lambda: pat.estimate(qv, kv_, meta), rep_ms=200)}
            versus_flex(entry, qv, kv_, vv, lay)
            row["pattern"].append(entry)
        del qv, kv_, vv
    print_row(row)
    return row


def same_rows_cudnn(q, ke, ve, density):
    """Dense cuDNN on the same work per query row as a causal layout of ``density``: the N queries cut into causal
    sequences of L = density·N tokens (a multiple of 128), whose rows attend 1…L keys as the layout's rows attend
    about density × 1…N keys: the reference for what a kernel reaches on rows this short.
    Returns (callable, its FLOPs, facts) or (None, 0, facts with the error)."""
    _, h, n, d = q.shape
    seq = int(min(n, max(128, round(density * n / 128) * 128)))
    nseq = n // seq
    cut = lambda x: x[0, :, : nseq * seq].reshape(x.shape[1], nseq, seq, d).transpose(0, 1).contiguous()  # noqa: E731
    run = causal_sdpa("cudnn", cut(q), cut(ke), cut(ve))
    facts = {"seq": seq, "sequences": nseq}
    try:
        run()
    except RuntimeError as exc:
        return None, 0.0, {**facts, "error": str(exc).splitlines()[0][:200]}
    return run, nseq * flops(h, seq, d), facts


def print_row(row):
    def f(x):
        mhz = f" @{x['sm_mhz']:.0f} MHz" if "sm_mhz" in x else ""
        return f"{x['ms']:.2f} ms {x['tflops']:.0f} TF/s{mhz}" if "ms" in x else "err"

    print(f"N={row['n']} H={row['heads']}/{row['kv_heads']}: flash {f(row['sdpa_flash'])}; cudnn {f(row['sdpa_cudnn'])}; "
          f"vidsparse dense {f(row['vidsparse_dense'])}", flush=True)
    for e in row["sparse"]:
        print(f"   density {e['density']:.3f}: vidsparse {f(e['vidsparse'])}; flex {f(e.get('flex', {}))}; cuDNN on "
              f"rows as short {f(e.get('cudnn_same_rows', {}))}; GPU ms vidsparse / flex {graph_cell(e)}", flush=True)
    for e in row.get("pattern", []):
        print(f"   {e['spec']} (density {e['density']:.3f}, estimate {e['estimate_ms']:.2f} ms): vidsparse "
              f"{f(e['vidsparse'])}; flex {f(e.get('flex', {}))}; GPU ms {graph_cell(e)}", flush=True)


SPECS = {
    "sink_window": "sink_window:sink=1,window=8",
    "power": "power",
    "block_topk": "block_topk:density=0.1",
    "block_cdf": "block_cdf:tau=0.9",
    "xattention": "xattention:stride=16,tau=0.9",
    "vertical_slash": "vertical_slash",
    "token_sparse": "token_sparse",
    "pyramid": "pyramid",
    "pbs": "pbs",
}


def time_estimation(n, h, hk, d):
    q = torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hk, n, d, device="cuda", dtype=torch.bfloat16)
    meta = SeqMeta(128, 128, True)
    out = {}
    for name, spec in SPECS.items():
        p = PATTERNS.from_spec(spec)
        ms = bench_ms(lambda: p.estimate(q, k, meta), rep_ms=200)
        out[name] = {"ms": ms, "gpu_ms": graph_ms(lambda p=p: p.estimate(q, k, meta)),
                     "density": p.estimate(q, k, meta).density()}
    print(f"estimation N={n}: " + ", ".join(f"{k_} {v['ms']:.2f} ms (GPU {v['gpu_ms'] or float('nan'):.2f})"
                                             for k_, v in out.items()), flush=True)
    return out


def captured(fn):
    """``fn`` captured once in a CUDA graph (its replay is the GPU work alone: no launch overhead), or None when it
    cannot be captured (it synchronises with the host)."""
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a call that waits for the GPU cannot be captured: find out first
    try:
        fn()
    except RuntimeError:
        return None
    finally:
        torch.cuda.set_sync_debug_mode("default")
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def graph_ms(fn, rep_ms=200) -> float | None:
    """GPU time of ``fn`` alone: ``captured`` and replayed, so that the host's launch overhead (which ``bench_ms``
    includes whenever launching is slower than the kernels) drops out. None when ``fn`` cannot be captured."""
    g = captured(fn)
    if g is None:
        return None
    ms = bench_ms(g.replay, rep_ms=rep_ms)
    del g
    return ms


def time_subset(n, h, hk, d, fractions=(0.5, 0.94)):
    """ZipVL's execution: every query over a kept key subset plus its own key (``models.hf.subset_attention``): the
    kernel on gathered keys vs the masked-SDPA path, against dense cuDNN on all keys."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vidsparse.models.hf import subset_attention

    q = torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, hk, n, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        dense = bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                                  enable_gqa=True))
    out = {"n": n, "heads": h, "kv_heads": hk, "dense_cudnn_ms": dense, "rows": []}
    g = torch.Generator(device="cuda").manual_seed(0)
    for frac in fractions:
        keys = torch.sort(torch.randperm(n, device="cuda", generator=g)[: int(n * frac)]).values
        kern = bench_ms(lambda: subset_attention(q, k, v, keys, backend="kernel"))
        sdpa = bench_ms(lambda: subset_attention(q, k, v, keys, backend="reference"))
        a = subset_attention(q, k, v, keys, backend="kernel").float()
        r = subset_attention(q, k, v, keys, backend="reference").float()
        out["rows"].append({"fraction": frac, "kernel_ms": kern, "masked_sdpa_ms": sdpa,
                            "max_abs_diff": float((a - r).abs().max())})
        print(f"subset N={n} keep {frac}: kernel {kern:.2f} ms, masked SDPA {sdpa:.2f} ms, dense cuDNN {dense:.2f} ms",
              flush=True)
    return out


def mrope(x, t, hh, ww, sections=(16, 24, 24), base=1e6):
    """Qwen2.5-VL M-RoPE: head-dim pairs split into (t, h, w) sections rotated by each position component."""
    d = x.shape[-1]
    half = d // 2
    inv = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    pos = torch.cat([t[:, None].expand(-1, sections[0]), hh[:, None].expand(-1, sections[1]),
                     ww[:, None].expand(-1, sections[2])], 1).float()
    ang = pos * inv[None]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)


def video_qk(frames, gh, gw, h, hk, d, text=256, seed=0, sharp=1.1, device="cuda"):
    """q, k for ``frames`` × gh × gw visual tokens after a text prefix, shaped like a video LLM's: content repeats
    within scenes of 8 frames (a patch looks like itself in neighbouring frames, plus noise), q and k share each KV
    head's projection (so a token attends to tokens with similar content), and positions are M-RoPE (t, h, w) as
    Qwen2.5-VL builds them. ``sharp`` scales q and k: 1.1 puts most attention mass on same-patch tokens of the scene."""
    g = torch.Generator(device=device).manual_seed(seed)
    nv = frames * gh * gw
    scene = torch.randn(max(1, -(-frames // 8)), gh * gw, d, device=device, generator=g)
    content = scene.repeat_interleave(8, 0)[:frames] + 0.5 * torch.randn(frames, gh * gw, d, device=device, generator=g)
    xs = torch.cat([torch.randn(text, d, device=device, generator=g), content.reshape(nv, d)])
    xs = xs / xs.norm(dim=-1, keepdim=True) * math.sqrt(d)
    tt = torch.arange(frames, device=device).repeat_interleave(gh * gw)
    hh = torch.arange(gh, device=device).repeat_interleave(gw).repeat(frames)
    ww = torch.arange(gw, device=device).repeat(gh * frames)
    tpos = torch.arange(text, device=device)
    wk = torch.randn(hk, d, d, device=device, generator=g) / math.sqrt(d)
    wq = wk.repeat_interleave(h // hk, 0) + 0.3 * torch.randn(h, d, d, device=device, generator=g) / math.sqrt(d)
    q = torch.einsum("nd,hde->hne", xs, wq) * sharp
    k = torch.einsum("nd,hde->hne", xs, wk) * sharp
    t_all = torch.cat([tpos, tt + text])
    h_all = torch.cat([tpos, hh + text])
    w_all = torch.cat([tpos, ww + text])
    q = mrope(q.bfloat16(), t_all, h_all, w_all)[None]
    k = mrope(k.bfloat16(), t_all, h_all, w_all)[None]
    return q, k, text, gh * gw


def recall(q, k, lay, rows):
    """Mean attention mass (exact softmax over all causal keys) that the layout keeps, over sampled query rows."""
    b, h, n, d = q.shape
    g = h // k.shape[1]
    kk = k.repeat_interleave(g, 1).float()
    s = torch.einsum("bhqd,bhkd->bhqk", q[:, :, rows].float(), kk) / math.sqrt(d)
    s = s.masked_fill(torch.arange(n, device=q.device)[None, :] > rows[:, None], float("-inf"))
    p = torch.softmax(s, -1)
    return float((p * row_keep(lay, rows, b, h, n)).sum(-1).mean())


def row_keep(lay, rows, b, h, n):
    """bool [B, H, R, N]: the keys each sampled query row computes under ``lay`` (block, token or group layout)."""
    from vidsparse.attention.layout import GroupLayout, PermutedLayout, PyramidLayout, TokenLayout

    if isinstance(lay, PyramidLayout):  # exact or pooled: the mass of every block the layout attends at all
        lv = lay.level_map().expand(b, h, -1, -1) > 0
        keep = lv[:, :, rows // lay.exact.block_q].repeat_interleave(lay.exact.block_k, -1)[..., :n]
        return keep & (torch.arange(n, device=rows.device)[None, :] <= rows[:, None])
    if isinstance(lay, PermutedLayout):
        bm = lay.blocks.expand(b, h).block_mask()[:, :, rows // lay.blocks.block_q]
        permuted = bm.repeat_interleave(lay.blocks.block_k, -1)[..., :n]
        perm = lay.perm.repeat_interleave(h // lay.perm.shape[1], 1)[:, :, None, :].expand_as(permuted)
        keep = torch.zeros_like(permuted).scatter_(-1, perm, permuted)
        return keep & (torch.arange(n, device=rows.device)[None, :] <= rows[:, None])
    if isinstance(lay, TokenLayout):
        km = lay.kept_mask().expand(b, h, n)
        return km[:, :, None, :] & km[:, :, rows, None]
    if isinstance(lay, GroupLayout):
        s, e = lay.span
        grp = lay.group.expand(b, h, e - s)
        j = torch.arange(n, device=rows.device)
        in_span = (rows >= s) & (rows < e)
        full = torch.full((b, h, n), -1, dtype=torch.long, device=rows.device)
        full[..., s:e] = grp
        gr = full[:, :, rows]  # [B, H, R] (-1 outside the span)
        same = (full[:, :, None, :] == gr[..., None]) & (full[:, :, None, :] >= 0)
        keep = (j[None, None, None, :] < s) | same
        return torch.where(in_span[None, None, :, None], keep, torch.ones_like(keep))
    bm = lay.expand(b, h).block_mask()
    return bm[:, :, rows // lay.block_q].repeat_interleave(lay.block_k, -1)[..., :n]


SWEEPS = {
    "sink_window": [f"sink_window:window={w}" for w in (4, 8, 16, 32)],
    "power": ["power:local=1", "power:local=4", "power:local=16"],
    "dense": ["dense"],
    "block_topk": [f"block_topk:density={r}" for r in (0.05, 0.1, 0.2)],
    "block_cdf": [f"block_cdf:tau={t}" for t in (0.7, 0.8, 0.9, 0.95)],
    "xattention": [f"xattention:stride=16,tau={t}" for t in (0.7, 0.8, 0.9, 0.95)],
    "vertical_slash": [f"vertical_slash:vertical={v},slash={s}" for v, s in ((30, 100), (100, 300), (300, 1000))],
    "radial": ["radial:dense_frames=1", "radial:dense_frames=2", "radial:dense_frames=4"],
    "grid": ["grid:tau=0.3", "grid:tau=0.5", "grid:tau=0.7"],
    "token_sparse": [f"token_sparse:coverage={c}" for c in (0.9, 0.95, 0.99)],
    "pyramid": ["pyramid", "pyramid:exact=0.1,pool2=0.2,pool4=0.3,pool8=0.5",
                "pyramid:mode=energy,exact=0.5,pool2=0.7,pool4=0.8,pool8=0.9"],
    "pbs": [f"pbs:tau={t}" for t in (0.7, 0.8, 0.9, 0.95)],
}


def mass_recall(frames=128, gh=16, gw=16, h=28, hk=4, d=128):
    q, k, text, tpf = video_qk(frames, gh, gw, h, hk, d)
    n = q.shape[2]
    meta = SeqMeta(128, 128, True, visual=(text, n), tokens_per_frame=tpf, frame_hw=(gh, gw))
    rows = torch.linspace(n // 8, n - 1, 256, device="cuda").long()
    v = torch.randn_like(k)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)[:, :, rows]
    out = {}
    for name, specs in SWEEPS.items():
        out[name] = []
        for spec in specs:
            lay = PATTERNS.from_spec(spec).estimate(q, k, meta)
            o = sparse_attention(q, k, v, lay)[:, :, rows]
            err = float((o.float() - dense.float()).norm() / dense.float().norm())
            out[name].append({"spec": spec, "density": lay.density(), "recall": recall(q, k, lay, rows),
                              "output_rel_err": err})
        print(f"recall {name}: " + ", ".join(f"{e['density']:.3f}->{e['recall']:.3f} (err {e['output_rel_err']:.3f})"
                                             for e in out[name]), flush=True)
    return {"n": n, "frames": frames, "grid": [gh, gw], "heads": h, "kv_heads": hk, "results": out}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="16384,32768,65536,131072")
    ap.add_argument("--densities", default="0.05,0.1,0.2")
    ap.add_argument("--quick", action="store_true", help="no FlexAttention, one head config")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: kernels,estimation,subset,recall")
    ap.add_argument("--tag", default="", help="suffix of the results file (partial runs)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating timing rounds per callable in the kernels part "
                    "(launched and graph-replayed alike); on an H200 at 128K the rounds fell into a fast and a slow "
                    "state about 3%% apart, so rows near a ratio's threshold want more")
    ap.add_argument("--markdown-from", default="", help="only rewrite BENCHMARKS.md from a saved results JSON")
    ap.add_argument("--parts-from", default="", help="with --markdown-from: later partial runs that replace parts "
                    "of it, as PART=JSON[,PART=JSON] (parts: kernels, estimation, subset, recall)")
    ap.add_argument("--note", default="", help="with --parts-from: a sentence added to the section's note")
    args = ap.parse_args()
    if args.markdown_from:
        import json

        p = json.loads(Path(args.markdown_from).read_text())
        if args.parts_from:
            notes, full, own = [], p["command"], False
            for item in args.parts_from.split(","):
                part, path = item.split("=", 1)
                sub = json.loads(Path(path).read_text())
                own = own or bool(p.get(part))
                p[part] = sub[part]
                notes.append(f"{part}: `{sub['command']}` ({sub['date']})")
            replaced = ", whose own rows for those parts (in its JSON) measured earlier code" if own else ""
            p["note"] = (f"Merged runs — {'; '.join(notes)}; the rest: `{full}` ({p['date']}){replaced}. "
                         f"{args.note}").strip()
        write_markdown(p)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    dens = [float(x) for x in args.densities.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    payload = {"benchmark": "attention", "date": today(), "device": device_name(),
               "versions": versions("torch", "triton", "vidsparse"), "dtype": "bfloat16", "block": 128,
               "kernels": [], "estimation": {}, "recall": None}
    t0 = time.time()
    name = "attention" + (f"_{args.tag}" if args.tag else "")
    if "kernels" not in skip:
        monitor = GpuMonitor()
        try:
            for hk in ([4] if args.quick else [4, 28]):
                for n in sizes:
                    payload["kernels"].append(time_kernels(n, 28, hk, 128, dens, args.quick, monitor, args.rounds))
                    torch.cuda.empty_cache()
                    save(name, payload)  # partial results survive a time limit
        finally:
            monitor.close()
    if "estimation" not in skip:
        for n in sizes:
            payload["estimation"][str(n)] = time_estimation(n, 28, 4, 128)
        save(name, payload)
    if "subset" not in skip:
        payload["subset"] = [time_subset(16384, 28, 4, 128), time_subset(65536, 28, 4, 128)]
        save(name, payload)
    if "recall" not in skip:
        payload["recall"] = mass_recall()
    payload["seconds"] = time.time() - t0
    payload["tag"] = args.tag
    payload["command"] = "python benchmarks/attention.py" + "".join(
        f" {a}" for a in sys.argv[1:] if not a.startswith("--markdown-from"))
    out = save(name, payload)
    print(f"wrote {out}")
    write_markdown(payload)


def fmt(x: dict) -> str:
    """A timing cell: ms (TF/s), with the SM clock when it was sampled."""
    if "ms" not in x:
        return "error"
    return f"{x['ms']:.2f} ({x['tflops']:.0f}" + (f", {x['sm_mhz']:.0f} MHz)" if "sm_mhz" in x else ")")


def graph_cell(e: dict) -> str:
    """vidsparse's and Flex's GPU time alone (CUDA-graph replays) and their ratio; "-" where not measured."""
    v, f = e["vidsparse"].get("graph_ms"), e.get("flex", {}).get("graph_ms")
    if v is None:
        return "-"
    return f"{v:.3f} / {f:.3f} ({f / v:.2f}x)" if f is not None else f"{v:.3f} / -"


def same_rows_cell(x: dict) -> str:
    return f"{x['seq']}, {fmt(x)}" if "ms" in x else (f"{x['seq']}, error" if "seq" in x else "-")


def write_markdown(p):
    lines = [f"Device: {p['device']} — {p['date']} — `{p.get('command', 'python benchmarks/attention.py')}` — bf16, d = 128, batch 1, "
             "causal, 128×128 blocks. TF/s counts computed blocks only (2·N²·D per head × density).", ""]
    if p.get("note"):
        lines += [p["note"], ""]
    clocked = any("sm_mhz" in r.get("vidsparse_dense", {}) for r in p["kernels"])
    if clocked:
        rounds = p["kernels"][0].get("rounds", 3)
        lines += [f"The callables of a table row (dense: flash, cuDNN, all blocks; sparse: vidsparse, Flex) are timed in "
                  f"{rounds} alternating rounds and the median is shown, so clock drift falls on all of them alike. "
                  "Cells read ms (TF/s, SM MHz): the SM clock is the median NVML sampled (every 50 ms) while that "
                  "callable ran. Under sustained tensor-core load the card reaches its power cap and lowers the clock, "
                  "more the hotter it is; that, not the kernel, moves repeated 128K figures by several percent.", ""]
    short = any("cudnn_same_rows" in e for r in p["kernels"] for e in r["sparse"])
    if short:
        lines += ["Last column: dense cuDNN on the same work per query row as the layout: the N queries cut into causal "
                  "sequences of L ≈ density × N tokens, whose rows attend 1…L keys as the layout's rows attend about "
                  "density × 1…N. Short rows cost every kernel its per-tile setup and store; this is what the best "
                  "dense kernel reaches on them.", ""]
    graphs = any("graph_ms" in e["vidsparse"] for r in p["kernels"] for e in r["sparse"] + r.get("pattern", []))
    if graphs:
        lines += ["GPU ms: the same calls captured in CUDA graphs and replayed (alternating rounds again), the GPU's "
                  "work alone. The ms columns time each call as launched (`triton.testing.do_bench`): where launching "
                  "takes longer than the kernels run (short sequences) they measure the host. In a model's prefill the "
                  "launches queue behind the projections' and MLP's GPU work, so there the GPU time is what counts.",
                  ""]
    gcol, gsep = (" GPU ms: vidsparse / Flex (vs Flex) |", "---|") if graphs else ("", "")
    if p["kernels"]:
        lines += ["| N | heads/KV | SDPA flash ms (TF/s) | SDPA cuDNN ms (TF/s) | vidsparse all blocks ms (TF/s) | density | "
                  "vidsparse ms (TF/s) | Flex ms (TF/s) | vs Flex |" + gcol + " vs cuDNN dense |" +
                  (" cuDNN on rows as short: L, ms (TF/s) |" if short else ""), "|---|---|---|---|---|---|---|---|---|" +
                  gsep + "---|" + ("---|" if short else "")]
        for r in p["kernels"]:
            for e in r["sparse"]:
                vf = (f"{e['flex']['ms'] / e['vidsparse']['ms']:.2f}x" if "ms" in e.get("flex", {}) else "-")
                vc = (f"{r['sdpa_cudnn']['ms'] / e['vidsparse']['ms']:.1f}x" if "ms" in r["sdpa_cudnn"] else "-")
                lines.append(f"| {r['n']} | {r['heads']}/{r['kv_heads']} | {fmt(r['sdpa_flash'])} | {fmt(r['sdpa_cudnn'])} | "
                             f"{fmt(r['vidsparse_dense'])} | {e['density']:.3f} | {fmt(e['vidsparse'])} | "
                             f"{fmt(e['flex']) if 'flex' in e else '-'} | {vf} |" +
                             (f" {graph_cell(e)} |" if graphs else "") + f" {vc} |" +
                             (f" {same_rows_cell(e.get('cudnn_same_rows', {}))} |" if short else ""))
    pat = [(r, e) for r in p["kernels"] for e in r.get("pattern", [])]
    if pat:
        lines += ["", "Layouts a pattern picks (`block_topk` on video-structured q/k of the same N, M-RoPE, 16×16 tokens "
                  "per frame): estimation + kernel against cuDNN dense and FlexAttention on the identical layout:", "",
                  "| N | heads/KV | spec | density | estimate ms | vidsparse ms (TF/s) | Flex ms (TF/s) | vs Flex |" +
                  gcol + " estimate + kernel ms | vs cuDNN dense |", "|---|---|---|---|---|---|---|---|" + gsep +
                  "---|---|"]
        for r, e in pat:
            tot = e["estimate_ms"] + e["vidsparse"]["ms"]
            vf = f"{e['flex']['ms'] / e['vidsparse']['ms']:.2f}x" if "ms" in e.get("flex", {}) else "-"
            vc = f"{r['sdpa_cudnn']['ms'] / tot:.1f}x" if "ms" in r["sdpa_cudnn"] else "-"
            lines.append(f"| {r['n']} | {r['heads']}/{r['kv_heads']} | `{e['spec']}` | {e['density']:.3f} | "
                         f"{e['estimate_ms']:.2f} | {fmt(e['vidsparse'])} | {fmt(e['flex']) if 'flex' in e else '-'} | "
                         f"{vf} |" + (f" {graph_cell(e)} |" if graphs else "") + f" {tot:.2f} | {vc} |")
    if p["estimation"]:
        names = list(next(iter(p["estimation"].values())))
        gpu = any(e.get("gpu_ms") for est in p["estimation"].values() for e in est.values())
        lines += ["", "Pattern estimation (28 heads / 4 KV heads), ms per call" +
                  (" / GPU ms (the call captured in a CUDA graph and replayed: no launch overhead; - where it cannot "
                   "be captured)" if gpu else "") + " and the density it chose on random inputs:", "",
                  "| N | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        cell = lambda e: f"{e['ms']:.2f}" + (f" / {e['gpu_ms']:.2f}" if e.get("gpu_ms") else " / -" if gpu else "") + \
            f" ({e['density']:.2f})"
        for n, est in p["estimation"].items():
            lines.append(f"| {n} | " + " | ".join(cell(est[x]) for x in names) + " |")
    if p.get("subset"):
        lines += ["", "Key-subset attention (ZipVL's execution: every query over the kept keys plus its own; random "
                  "kept keys), 28/4 heads:", "", "| N | kept | kernel ms | masked SDPA ms | dense cuDNN ms (all keys) |",
                  "|---|---|---|---|---|"]
        for sub in p["subset"]:
            for e in sub["rows"]:
                lines.append(f"| {sub['n']} | {e['fraction']:.2f} | {e['kernel_ms']:.2f} | {e['masked_sdpa_ms']:.2f} | "
                             f"{sub['dense_cudnn_ms']:.2f} |")
    if p["recall"]:
        r = p["recall"]
        lines += ["", f"Attention-mass recall on video-structured q/k (M-RoPE over {r['frames']} frames × "
                  f"{r['grid'][0]}×{r['grid'][1]} tokens + 256 text tokens, N = {r['n']}, 256 sampled query rows):", "",
                  "| pattern | density → recall (output relative error vs dense) |", "|---|---|"]
        for name, es in r["results"].items():
            lines.append(f"| `{name}` | " + ", ".join(
                f"{e['density']:.3f} → {e['recall']:.3f}" + (f" ({e['output_rel_err']:.3f})" if "output_rel_err" in e else "")
                for e in es) + " |")
        lines += ["", "Recall counts the exact softmax mass of every key a layout attends at all; `pyramid` attends "
                  "part of it through pooled keys, so its output error is the fairer measure."]
    update_markdown(f"Sparse attention ({p['device']})" + (f" — {p.get('tag')}" if p.get("tag") else ""), "\n".join(lines))


if __name__ == "__main__":
    main()
