"""Frame decoding for the model path: ``VideoReader.read_at`` sequential vs parallel (contiguous stretches of the
sorted targets decoded from separate containers in threads), on the 1-hour 448×252 H.264 benchmark video at the
frame counts of the e2e recipes (128 frames at 224×420, 768 at 448×252: qwen-vl-utils' uniform sampling).

    python benchmarks/decode.py [--video PATH] [--workers 1,2,4]

The frames are identical either way (tests/test_video.py); this measures the wall time."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, save, today, update_markdown, versions


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--video", default=str(Path(__file__).resolve().parent.parent / ".bench_data" / "hour_448x252.mp4"))
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--markdown-from", default="")
    args = ap.parse_args()
    if args.markdown_from:
        update_markdown(f"Frame decoding ({json.loads(Path(args.markdown_from).read_text())['device']})",
                        markdown(json.loads(Path(args.markdown_from).read_text())))
        return
    from e2e import ensure_video

    from vidsparse.pipeline import uniform_times
    from vidsparse.video.reader import VideoReader

    video = ensure_video(args.video)
    base = VideoReader(video)
    rows = []
    for n, size in ((128, (224, 420)), (768, (252, 448))):
        times = uniform_times(base.info, n)
        for w in [int(x) for x in args.workers.split(",")]:
            best = []
            for _ in range(3):
                r = VideoReader(video, _probed=(base.info, base.packets))
                t0 = time.perf_counter()
                r.read_at(times, size=size, workers=w)
                best.append((time.perf_counter() - t0) * 1e3)
            rows.append({"frames": n, "size": list(size), "workers": w, "ms": sorted(best)[1],
                         "pictures_decoded": r.frames_decoded})
            print(json.dumps(rows[-1]), flush=True)
    payload = {"device": device_name(), "cores": os.cpu_count(), "date": today(), "versions": versions("av", "numpy"),
               "video": Path(video).name, "rows": rows}
    save("decode", payload)
    update_markdown(f"Frame decoding ({payload['device']})", markdown(payload))
    print(markdown(payload))


def markdown(p: dict) -> str:
    lines = [f"{p['date']}, `python benchmarks/decode.py`, {p['cores']} cores; the 1-hour 448×252 4 fps H.264 video "
             "(2 s GOPs); median of 3. Identical frames in every column.", "",
             "| frames | size | workers | ms | vs 1 worker |", "|---|---|---|---|---|"]
    base = {r["frames"]: r["ms"] for r in p["rows"] if r["workers"] == 1}
    for r in p["rows"]:
        lines.append(f"| {r['frames']} | {r['size'][1]}×{r['size'][0]} | {r['workers']} | {r['ms']:.0f} | "
                     f"{base[r['frames']] / r['ms']:.2f}× |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
