"""The CLI through a subprocess, as a user runs it."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from vidsparse.video.synthetic import object_query_image


def run(*args, env=None, check=True):
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([sys.executable, "-m", "vidsparse.cli", *args], capture_output=True, text=True, env=e, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"exit {p.returncode}\n{p.stdout}\n{p.stderr}")
    return p


def test_select_json_schema(synth):
    p = run("select", synth[0], "--budget", "6", "--json")
    out = json.loads(p.stdout)
    assert set(out) >= {"video", "duration_s", "frames", "clips", "stats"}
    assert out["duration_s"] == pytest.approx(180.0)
    assert len(out["frames"]) == 6 and all(set(f) == {"t", "score", "tokens"} for f in out["frames"])
    assert [f["t"] for f in out["frames"]] == sorted(f["t"] for f in out["frames"])
    assert set(out["stats"]) >= {"frames_decoded", "frames_scored", "seconds"}
    assert out["method"]["frames"] == "ktv"  # no query: the query-agnostic default


def test_select_image_query_writes_outputs(tmp_path, synth):
    img = tmp_path / "q.png"
    Image.fromarray(object_query_image()).save(img)
    out = tmp_path / "out"
    p = run("select", synth[0], "-n", "4", "--query-image", str(img), "--out", str(out), "--json")
    res = json.loads(p.stdout)
    assert res["method"] == {"frames": "bolt", "scorer": "visual"}
    assert json.loads((out / "selection.json").read_text())["frames"] == res["frames"]
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[0] == 4 * 240
    gt = synth[1]
    hits = [f["t"] for f in res["frames"] if any(e.contains(f["t"]) for e in gt.object_events)]
    assert len(hits) >= 3


def test_select_subtitles_and_table(tmp_path, synth):
    srt = tmp_path / "s.srt"
    srt.write_text("1\n00:01:40,000 --> 00:01:44,000\nmeet me at gate 47\n\n2\n00:00:10,000 --> 00:00:12,000\nhello\n")
    p = run("select", synth[0], "-n", "3", "--query", "gate 47", "--subtitles", str(srt), "--scorer", "subtitles")
    assert "bolt" in p.stdout and "1:4" in p.stdout  # a table row at 1:40-1:44
    assert "candidates" in p.stdout


def test_demo_finds_every_caption_scoring_few_frames(tmp_path):
    """The issue's target: on the demo video, tstar + ocr scores <= 5% of candidates and finds every text event."""
    p = run("demo", "--out", str(tmp_path / "demo"), "--json")
    res = json.loads(p.stdout)
    gt = res["ground_truth"]
    assert gt["found"] == gt["total"] == 4
    assert res["stats"]["frames_scored"] <= 0.05 * res["stats"]["candidates"]
    assert res["method"] == {"frames": "tstar", "scorer": "ocr"}
    assert (tmp_path / "demo" / "contact_sheet.png").is_file()


def _bad_inputs(tmp_path, synth):
    txt = tmp_path / "notes.txt"
    txt.write_text("not a video\n" * 50)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(open(synth[0], "rb").read()[:3000])
    return [
        (["select", str(tmp_path / "missing.mp4")], "no such file"),
        (["select", str(tmp_path)], "is a directory"),
        (["select", str(txt)], "not a readable video"),
        (["select", str(cut)], "not a readable video|corrupt"),
        (["select", synth[0], "--budget", "0"], "positive integer"),
        (["select", synth[0], "--budget", "-5"], "positive integer"),
        (["select", synth[0], "--frames", "nosuch"], "unknown frame selection method"),
        (["select", synth[0], "--frames", "bolt:power"], "malformed parameter"),
        (["select", synth[0], "--frames", "bolt:pow=2", "--query", "x"], "no parameter"),
        (["select", synth[0], "--frames", "bolt"], "needs a query"),
        (["select", synth[0], "--query-image", str(txt)], "not a readable image"),
        (["select", synth[0], "--query", "x", "--subtitles", str(tmp_path / "no.srt")], "no such subtitle"),
        (["select", synth[0], "--scorer", "visual"], "needs a query"),
    ]


def test_bad_inputs_exit_2_with_one_line_and_keep_outputs(tmp_path, synth):
    out = tmp_path / "out"
    out.mkdir()
    keep = out / "selection.json"
    keep.write_text('{"precious": true}\n')
    for args, match in _bad_inputs(tmp_path, synth):
        p = run(*args, "--out", str(out), check=False)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        assert "Traceback" not in p.stderr and len(lines) == 1 and lines[0].startswith("error: "), (args, p.stderr)
        import re

        assert re.search(match, lines[0]), (args, lines[0])
        assert keep.read_text() == '{"precious": true}\n'
        assert sorted(os.listdir(out)) == ["selection.json"]


def test_budget_larger_than_video_clamps(synth):
    p = run("select", synth[0], "--budget", "1000", "--frames", "uniform", "--json")
    res = json.loads(p.stdout)
    assert len(res["frames"]) == 180 and any("exceeds" in n for n in res["notes"])
