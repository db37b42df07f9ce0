"""Evaluation: metrics against hand-computed cases, loaders on fixtures in each published format, resumable runs."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vidsparse.errors import InputError
from vidsparse.eval import accuracy, extract_letter, load, temporal_prf, temporal_summary
from vidsparse.eval.metrics import ssim, ssim_f1, ssim_prf
from vidsparse.eval.runs import Run

OPTS = ["A. a red car", "B. a blue boat", "C. a green tree", "D. nothing"]


@pytest.mark.parametrize("reply,letter", [
    ("B", "B"), ("B.", "B"), ("(C) a green tree", "C"), ("The answer is D.", "D"), ("answer: a", "A"),
    ("I think it shows a blue boat.", "B"), ("Option C", "C"), ("", None), ("no idea", None), ("E", None),
])
def test_extract_letter(reply, letter):
    assert extract_letter(reply, OPTS) == letter


def test_accuracy_breakdown():
    rows = [{"pred": "A", "answer": "A", "duration": "short"}, {"pred": "B", "answer": "A", "duration": "short"},
            {"pred": "C", "answer": "C", "duration": "long"}]
    acc = accuracy(rows, by=["duration"])
    assert acc["accuracy"] == pytest.approx(2 / 3) and acc["n"] == 3
    assert acc["by"]["duration"] == {"long": {"accuracy": 1.0, "n": 1}, "short": {"accuracy": 0.5, "n": 2}}


def test_temporal_prf_hand_computed():
    # Predictions 10, 50, 100; truth 12, 95, 200 -> 10~12 and 100~95 match (|Δ| <= 5); 50 does not; 200 unmatched.
    p, r, f = temporal_prf([10, 50, 100], [12, 95, 200])
    assert (p, r) == (pytest.approx(2 / 3), pytest.approx(2 / 3)) and f == pytest.approx(2 / 3)
    assert temporal_prf([], [1.0]) == (0.0, 0.0, 0.0)
    assert temporal_prf([5.0], [0.0]) == (1.0, 1.0, 1.0)  # exactly 5 s counts
    s = temporal_summary([{"pred_times": [0], "gt_times": [0]}, {"pred_times": [0], "gt_times": [100]}])
    assert s["f1"] == 0.5 and s["n"] == 2


def test_ssim_properties_and_f1():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (32, 32)).astype(float)
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, 255 - a) < 0 < ssim(a, np.clip(a + rng.normal(0, 10, a.shape), 0, 255)) < 1
    frames = rng.integers(0, 255, (2, 24, 24, 3)).astype(np.uint8)
    p, r = ssim_prf(frames[:1], frames)
    assert p == pytest.approx(1.0) and r == pytest.approx((1.0 + ssim(*[f @ [0.299, 0.587, 0.114] for f in frames[[1, 0]]])) / 2)
    f = ssim_f1([(1.0, 0.5), (0.5, 0.5)])
    assert f["precision"] == 0.75 and f["recall"] == 0.5 and f["f1"] == pytest.approx(0.6)


def _write(path, rows, fmt="json"):
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))


@pytest.fixture()
def data_root(tmp_path, synth):
    """A dataset folder with the synthetic video under two names; a third name has no video."""
    root = tmp_path / "data"
    (root / "videos").mkdir(parents=True)
    for name in ("vid1", "vid2"):
        os.link(synth[0], root / "videos" / f"{name}.mp4")
    return root


def test_videomme_loader(data_root):
    rows = [{"video_id": "001", "duration": "short", "domain": "Sports", "sub_category": "x", "videoID": v,
             "question_id": f"{v}-1", "task_type": "Counting", "question": "How many?", "options": OPTS, "answer": "C"}
            for v in ("vid1", "vid2", "gone")]
    _write(data_root / "videomme" / "test-00000-of-00001.json", rows)
    (data_root / "subtitle").mkdir()
    (data_root / "subtitle" / "vid1.srt").write_text("1\n00:00:01,000 --> 00:00:02,000\nhi\n")
    ds = load("videomme_sub", str(data_root))
    assert [s.id for s in ds.samples] == ["vid1-1", "vid2-1"] and ds.missing == ["gone-1"]
    assert ds.samples[0].answer == "C" and ds.samples[0].subtitles.endswith("vid1.srt") and ds.samples[1].subtitles is None
    assert ds.samples[0].fields["duration"] == "short"


def test_videomme_parquet(data_root):
    rows = [{"video_id": "001", "duration": "long", "domain": "d", "sub_category": "s", "videoID": "vid1",
             "question_id": "q1", "task_type": "t", "question": "Q?", "options": OPTS, "answer": "B"}]
    _write(data_root / "test-00000-of-00001.parquet", rows, "parquet")
    ds = load("videomme", str(data_root))
    assert ds.samples[0].answer == "B" and ds.samples[0].options == OPTS


def test_mlvu_inline_options(data_root):
    rows = [{"video_name": "vid2.mp4", "question": "What is shown?\n(A) cat\n(B) dog\n(C) fish", "answer": "(B) dog",
             "question_type": "plotQA"}]
    _write(data_root / "json" / "1_plotQA.json", rows)
    s = load("mlvu", str(data_root)).samples[0]
    assert s.question == "What is shown?" and s.options == ["A. cat", "B. dog", "C. fish"] and s.answer == "B"
    assert s.fields["task_type"] == "plotQA"


def test_longvideobench_loader(data_root):
    rows = [{"id": "x1", "video_path": "vid1.mp4", "subtitle_path": "vid1_en.json", "question": "Q?",
             "candidates": ["cat", "dog"], "correct_choice": 1, "duration_group": 600, "question_category": "TOS"}]
    _write(data_root / "lvb_val.json", rows)
    s = load("longvideobench", str(data_root)).samples[0]
    assert s.options == ["A. cat", "B. dog"] and s.answer == "B" and s.fields["duration_group"] == 600


def test_egoschema_subset(data_root):
    rows = [{"q_uid": "vid1", "question": "Q?", "option 0": "a", "option 1": "b", "option 2": "c", "option 3": "d",
             "option 4": "e"}, {"q_uid": "vid2", "question": "Q2?", "option 0": "a", "option 1": "b", "option 2": "c",
                                "option 3": "d", "option 4": "e"}]
    _write(data_root / "questions.json", rows)
    (data_root / "subset_answers.json").write_text(json.dumps({"vid1": 3}))
    ds = load("egoschema", str(data_root))
    assert [(s.id, s.answer) for s in ds.samples] == [("vid1", "D")]  # only the subset has answers


def _haystack(data_root, synth, n=2, fmt="jsonl"):
    gt = synth[1]
    rows = []
    for i, e in enumerate(gt.needle_events[:n]):
        frame = int(round((e.start + e.end) / 2 * gt.fps))
        rows.append({"video_id": "vid1" if i % 2 == 0 else "vid2", "question": gt.needle_text, "options": OPTS,
                     "answer": "A", "frame_indexes_video": [frame], "video_metadata": {"frame_rate": gt.fps}})
    rows.append({"video_id": "nowhere", "question": "x", "options": OPTS, "answer": "A",
                 "frame_indexes_video": [1], "video_metadata": {"frame_rate": 8.0}})
    _write(data_root / f"haystack.{fmt}", rows, fmt)
    return rows


def test_lvhaystack_loader(data_root, synth):
    _haystack(data_root, synth)
    ds = load("lvhaystack", str(data_root))
    assert len(ds.samples) == 2 and len(ds.missing) == 1
    e = synth[1].needle_events[0]
    assert ds.samples[0].gt_times == [pytest.approx(round((e.start + e.end) / 2 * 8) / 8)]


def test_bad_bench_and_data(tmp_path):
    with pytest.raises(InputError, match="unknown benchmark"):
        load("nope", str(tmp_path))
    with pytest.raises(InputError, match="no such data"):
        load("mlvu", str(tmp_path / "missing"))
    with pytest.raises(InputError, match="no MLVU annotations"):
        load("mlvu", str(tmp_path))


def test_torn_prediction_line_is_dropped(tmp_path):
    run = Run(tmp_path / "r", {"x": 1})
    run.append({"id": "a", "v": 1})
    with open(run.pred_path, "ab") as fh:
        fh.write(b'{"id": "b", "v"')  # killed mid-write
    assert list(run.done()) == ["a"]
    run.append({"id": "b", "v": 2})
    assert [json.loads(l)["id"] for l in run.pred_path.read_text().splitlines()] == ["a", "b"]


def _eval_cli(*args, check=True):
    p = subprocess.run([sys.executable, "-m", "vidsparse.cli", "eval", *args], capture_output=True, text=True,
                       env=dict(os.environ), timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(p.stdout + p.stderr)
    return p


def test_frame_search_eval_resumes_to_identical_metrics(tmp_path, data_root, synth):
    _haystack(data_root, synth, n=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("frames: tstar\nscorer: ocr\nbudget: {frames: 4}\n")
    clean = json.loads(_eval_cli("--bench", "lvhaystack", "--data", str(data_root), "--recipe", str(recipe),
                                 "--out", str(tmp_path / "clean"), "--json").stdout)[0]
    assert clean["n"] == 2 and clean["missing_videos"] == ["nowhere#2"]
    assert clean["temporal"]["recall"] == 1.0  # the caption is found in both
    # Kill after the first prediction, then rerun: the first is kept, only the second runs.
    code = ("from vidsparse.eval.harness import evaluate; from vidsparse.recipe import Recipe; "
            f"evaluate('lvhaystack', {str(data_root)!r}, 'none', Recipe.load({str(recipe)!r}), "
            f"{str(tmp_path / 'killed')!r}, crash_after=1)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert p.returncode == 3
    [rundir] = list((tmp_path / "killed").iterdir())
    assert len((rundir / "predictions.jsonl").read_text().splitlines()) == 1 and not (rundir / "metrics.json").exists()
    resumed = json.loads(_eval_cli("--bench", "lvhaystack", "--data", str(data_root), "--recipe", str(recipe),
                                   "--out", str(tmp_path / "killed"), "--json").stdout)[0]
    assert resumed == clean
    assert len((rundir / "predictions.jsonl").read_text().splitlines()) == 2
    # A finished run is skipped: the file is untouched.
    before = (rundir / "predictions.jsonl").stat().st_mtime_ns
    _eval_cli("--bench", "lvhaystack", "--data", str(data_root), "--recipe", str(recipe), "--out", str(tmp_path / "killed"))
    assert (rundir / "predictions.jsonl").stat().st_mtime_ns == before
    assert rundir.name == "lvhaystack__none__tstar+ocr__4"


def test_sweep_and_report(tmp_path, data_root, synth):
    _haystack(data_root, synth, n=1)
    sweep = tmp_path / "s.yaml"
    sweep.write_text("frames: [uniform, bolt]\nscorer: [visual]\nbudget: [2, 4]\n")
    # The visual scorer needs an image: a text question fails clearly, exit 2.
    p = _eval_cli("--bench", "lvhaystack", "--data", str(data_root), "--sweep", str(sweep), "--out", str(tmp_path / "o"),
                  check=False)
    assert p.returncode == 2 and "query" in p.stderr
    sweep.write_text("frames: [uniform, tstar]\nscorer: [ocr]\nbudget: [2, 4]\n")
    out = json.loads(_eval_cli("--bench", "lvhaystack", "--data", str(data_root), "--sweep", str(sweep),
                               "--out", str(tmp_path / "o"), "--json").stdout)
    assert len(out) == 4 and len(list((tmp_path / "o").iterdir())) == 4
    rep = subprocess.run([sys.executable, "-m", "vidsparse.cli", "report", str(tmp_path / "o")], capture_output=True,
                         text=True, timeout=120)
    assert rep.returncode == 0 and rep.stdout.count("| lvhaystack__") == 4
    assert (tmp_path / "o" / "report.md").is_file() and (tmp_path / "o" / "f1_vs_frames_scored.png").stat().st_size > 1000


def test_eval_with_a_model_errors_are_clear(tmp_path, data_root, synth):
    _videomme(data_root)
    # a hub id that is not in the local cache is never downloaded
    p = _eval_cli("--bench", "videomme", "--data", str(data_root), "--model", "nobody/not-downloaded",
                  "--out", str(tmp_path / "o"), check=False)
    assert p.returncode == 2 and "cannot load a model config" in p.stderr and "Traceback" not in p.stderr


def _videomme(root):
    rows = [{"video_id": f"00{i}", "duration": d, "domain": "Sports", "sub_category": "x", "videoID": v,
             "question_id": f"{v}-{i}", "task_type": "Counting", "question": "What is on screen?", "options": OPTS,
             "answer": "ABCD"[i % 4]}
            for i, (v, d) in enumerate([("vid1", "short"), ("vid1", "short"), ("vid2", "long"), ("gone", "long")])]
    _write(root / "videomme" / "test-00000-of-00001.json", rows)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    pytest.importorskip("transformers")
    from vidsparse.models.random import build_random_qwen2_5_vl

    return build_random_qwen2_5_vl(tmp_path_factory.mktemp("qwen") / "tiny")


def test_qa_eval_with_a_model_resumes_to_identical_metrics(tmp_path, data_root, tiny_qwen):
    _videomme(data_root)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("tokens: evs\nbudget: {frames: 4, tokens: 24}\n")
    args = ["--bench", "videomme", "--data", str(data_root), "--model", tiny_qwen, "--recipe", str(recipe)]
    clean = json.loads(_eval_cli(*args, "--out", str(tmp_path / "clean"), "--json").stdout)[0]
    assert clean["task"] == "qa" and clean["n"] == 3 and clean["missing_videos"] == ["gone-3"]
    [rundir] = list((tmp_path / "clean").iterdir())
    rows = [json.loads(x) for x in (rundir / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["vid1-0", "vid1-1", "vid2-2"]
    assert all(r["visual_tokens"] == 24 and r["frames"] == 4 and r["ttft_ms"] > 0 for r in rows)
    assert clean["accuracy"]["accuracy"] == pytest.approx(sum(r["pred"] == r["answer"] for r in rows) / 3)
    assert set(clean["accuracy"]["by"]["duration"]) == {"short", "long"}
    assert clean["visual_tokens_mean"] == 24
    code = ("from vidsparse.eval.harness import evaluate; from vidsparse.recipe import Recipe; "
            f"evaluate('videomme', {str(data_root)!r}, {tiny_qwen!r}, Recipe.load({str(recipe)!r}), "
            f"{str(tmp_path / 'killed')!r}, crash_after=2)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert p.returncode == 3
    resumed = json.loads(_eval_cli(*args, "--out", str(tmp_path / "killed"), "--json").stdout)[0]
    strip = ("ttft_ms_mean", "ttft_ms_median", "peak_memory_mb_max")
    assert {k: v for k, v in resumed.items() if k not in strip} == {k: v for k, v in clean.items() if k not in strip}
    [killed] = list((tmp_path / "killed").iterdir())
    assert len((killed / "predictions.jsonl").read_text().splitlines()) == 3
    assert killed.name == "videomme__tiny__uniform+evs+dense+fullkv+t24__4"
    rep = subprocess.run([sys.executable, "-m", "vidsparse.cli", "report", str(tmp_path / "clean")],
                         capture_output=True, text=True, timeout=300)
    assert rep.returncode == 0 and "accuracy" in rep.stdout
    assert (tmp_path / "clean" / "accuracy_vs_visual_tokens.png").is_file()
    assert (tmp_path / "clean" / "ttft_vs_visual_tokens.png").is_file()


def test_needle_haystacks_eval_and_heatmap(tmp_path, synth):
    from vidsparse.eval.needle import Needle, build_haystacks

    rows = build_haystacks([synth[0]], str(tmp_path / "hay"), lengths=[24, 48], depths=[0.0, 0.5, 1.0],
                           needle=Needle(text="ZEBRA 9", frames=3), fps=1.0, size=(108, 192))
    assert len(rows) == 6 and rows[-1]["frame_indexes_video"] == [45, 46, 47] and rows[1]["frame_indexes_video"] == [10, 11, 12]
    ds = load("lvhaystack", str(tmp_path / "hay"))
    assert len(ds.samples) == 6 and ds.samples[0].fields == {"needle_depth": 0.0, "haystack_frames": 24}
    recipe = tmp_path / "r.yaml"
    recipe.write_text("frames: tstar\nscorer: ocr\nbudget: {frames: 3}\n")
    res = json.loads(_eval_cli("--bench", "lvhaystack", "--data", str(tmp_path / "hay"), "--recipe", str(recipe),
                               "--out", str(tmp_path / "runs"), "--json").stdout)[0]
    assert res["temporal"]["recall"] == 1.0  # every planted caption is found
    rep = subprocess.run([sys.executable, "-m", "vidsparse.cli", "report", str(tmp_path / "runs")], capture_output=True,
                         text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    assert list((tmp_path / "runs").glob("*_heatmap.png"))
    from vidsparse.errors import InputError as IE

    with pytest.raises(IE, match="exactly one needle"):
        Needle(text="a", image="b")
