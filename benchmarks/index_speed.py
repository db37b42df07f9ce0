"""Index speed on a 1-hour 720p H.264 video: probe + 1 fps thumbnails, every selector on the index, and
PySceneDetect's ``detect()`` on the same file.

    python benchmarks/index_speed.py [--minutes 60] [--video PATH]

Targets (issue 2, on the project's 2-core machine): index ≤ 3 minutes; any selector ≤ 1 s on 3,600 candidates.
The video is generated once (synthetic, 24 fps, x264 'veryfast', 2-second GOP) and reused."""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, save, today, update_markdown, versions  # noqa: E402


def make_video(path: str, minutes: float) -> None:
    from vidsparse.video.synthetic import plan, render_frames, write_video

    gt = plan(minutes * 60, 24.0, 1280, 720, seed=0, needles=8, distractors=12, objects=6)
    t = time.perf_counter()
    write_video(path, render_frames(gt), fps=24.0, gop=48, options={"preset": "veryfast", "crf": "28"})
    gt.save(path + ".json")
    print(f"generated {path} in {time.perf_counter() - t:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--video", default=None)
    ap.add_argument("--skip-scenedetect", action="store_true")
    args = ap.parse_args()
    from vidsparse import FRAMES, Budget
    from vidsparse.scoring import CandidateScores
    from vidsparse.video import build_index, probe
    from vidsparse.video.synthetic import GroundTruth

    video = args.video or str(Path(os.environ.get("VIDSPARSE_BENCH_DATA", "/tmp")) / f"bench_{int(args.minutes)}min_720p.mp4")
    if not os.path.isfile(video):
        make_video(video, args.minutes)
    gt = GroundTruth.load(video + ".json") if os.path.isfile(video + ".json") else None

    t = time.perf_counter()
    info, packets = probe(video)
    t_probe = time.perf_counter() - t
    t = time.perf_counter()
    index = build_index(video, fps=1.0, cache=False)
    t_index = time.perf_counter() - t
    t = time.perf_counter()
    _ = index.features
    t_feat = time.perf_counter() - t
    print(f"probe {t_probe:.2f} s ({len(packets)} packets); index {t_index:.1f} s ({len(index)} thumbnails); "
          f"descriptors {t_feat:.2f} s", flush=True)

    # Query scores for query-aware selectors: ground-truth relevance of the needle captions plus noise, so the
    # selectors' own cost is measured, not a scorer's.
    rng = np.random.default_rng(0)
    rel = rng.uniform(0, 0.1, len(index))
    if gt is not None:
        for e in gt.needle_events:
            rel[(index.times >= e.start) & (index.times < e.end)] = 0.95
    selectors = {}
    for name in FRAMES.names():
        sel = FRAMES.from_spec(name)
        needs = sel.capabilities.get("query") == "required"
        runs = []
        for _ in range(3):
            scores = CandidateScores.fixed(index, rel) if needs else None
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                t = time.perf_counter()
                sel.select(index, Budget(frames=64), scores)
                runs.append(time.perf_counter() - t)
        selectors[name] = {"median_s": float(np.median(runs)), "runs_s": runs}
        print(f"  {name:10s} {np.median(runs) * 1000:8.1f} ms", flush=True)

    sd = None
    if not args.skip_scenedetect:
        from scenedetect import ContentDetector, detect

        t = time.perf_counter()
        scenes = detect(video, ContentDetector())
        sd = {"seconds": time.perf_counter() - t, "scenes": len(scenes)}
        print(f"scenedetect detect(): {sd['seconds']:.1f} s, {len(scenes)} scenes", flush=True)
    ours_scenes = len(FRAMES.from_spec("scenes").scenes(index))

    payload = {
        "benchmark": "index_speed", "date": today(), "device": device_name(),
        "versions": versions("vidsparse", "av", "numpy", "scenedetect", "opencv-python"),
        "video": {"path": os.path.basename(video), "duration_s": info.duration_s, "width": info.width,
                  "height": info.height, "fps": info.avg_fps, "codec": info.codec, "packets": len(packets)},
        "probe_s": t_probe, "index_s": t_index, "descriptors_s": t_feat, "candidates": len(index),
        "selectors_budget64": selectors, "scenedetect": sd, "vidsparse_scenes": ours_scenes,
        "targets": {"index_s_max": 180.0, "selector_s_max": 1.0},
    }
    out = save("index_speed", payload)
    worst = max(selectors.items(), key=lambda kv: kv[1]["median_s"])
    rows = "\n".join(f"| `{k}` | {v['median_s'] * 1000:.1f} |" for k, v in sorted(selectors.items()))
    ratio = f"{sd['seconds'] / (t_index + t_feat):.1f}x" if sd else "not run"
    body = f"""Device: {payload['device']} — {payload['date']} — `python benchmarks/index_speed.py` ({out.relative_to(out.parents[2])})

Video: {info.duration_s / 60:.0f} min, {info.width}x{info.height} {info.codec}, {info.avg_fps:.0f} fps, {len(packets)} packets.

| step | seconds |
|---|---|
| probe (all packets, no decode) | {t_probe:.2f} |
| index: probe + 1 fps 64x64 thumbnails ({len(index)} candidates) | {t_index:.1f} (target ≤ 180) |
| descriptors of all thumbnails | {t_feat:.2f} |
| PySceneDetect `detect(ContentDetector())` on the same file | {sd['seconds']:.1f} ({sd['scenes']} scenes) | 
| ratio scenedetect / (index + descriptors) | {ratio} |

Selectors on the {len(index)}-candidate index, budget 64 frames (median of 3; query-aware ones get precomputed scores).
Slowest: `{worst[0]}` at {worst[1]['median_s'] * 1000:.0f} ms (target ≤ 1000).

| selector | ms |
|---|---|
{rows}
""" if sd else ""
    if body:
        update_markdown(f"Index speed ({payload['device']})", body)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
