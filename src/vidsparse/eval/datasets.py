"""Loaders for the published annotation formats, reading the user's local copy (nothing is downloaded).

Each loader returns ``Dataset(samples, missing)``: samples whose video was found under the data root, and the ids
of those whose video was not (reported, never silently counted). Annotations may be JSON, JSON lines or Parquet
(Parquet needs pyarrow). Videos are found by file stem anywhere under the data root (.mp4, .mkv, .webm, .avi, .mov)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from .metrics import LETTERS

VIDEO_EXT = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v")


@dataclass
class Sample:
    id: str
    video: str  # resolved path
    question: str
    options: list[str] = field(default_factory=list)  # "A. text" strings
    answer: str | None = None  # letter
    gt_times: list[float] = field(default_factory=list)  # LV-Haystack
    subtitles: str | None = None
    fields: dict = field(default_factory=dict)  # breakdown keys (duration, domain, task_type, ...)


@dataclass
class Dataset:
    name: str
    samples: list[Sample]
    missing: list[str]
    breakdown: tuple[str, ...] = ()


def read_records(path: Path) -> list[dict]:
    """Rows of a JSON (list or {"data": [...]}) / JSON-lines / Parquet annotation file."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise InputError(f"{path} is Parquet: pip install pyarrow (or convert it to JSON)") from None
        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is neither JSON nor JSON lines ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict):
        data = data.get("data") or data.get("samples") or list(data.values())
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a list of records")
    return data


class VideoFinder:
    """Maps a video name (stem or relative path) to a file under ``root``; one directory walk."""

    def __init__(self, root: Path):
        self.root = root
        self.by_stem: dict[str, str] = {}
        for d, _, files in os.walk(root):
            for f in files:
                if f.lower().endswith(VIDEO_EXT):
                    self.by_stem.setdefault(Path(f).stem, os.path.join(d, f))

    def find(self, name: str) -> str | None:
        if not name:
            return None
        direct = self.root / name
        if direct.is_file():
            return str(direct)
        return self.by_stem.get(Path(str(name)).stem)


def _find_annotations(root: Path, patterns: tuple[str, ...], bench: str) -> list[Path]:
    if root.is_file():
        return [root]
    for pat in patterns:
        hits = sorted(root.glob(pat))
        if hits:
            return hits
    raise InputError(f"no {bench} annotations under {root} (looked for {', '.join(patterns)}); "
                     "point --data at the dataset folder or the annotation file")


def _letter(value, options: list[str]) -> str | None:
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return LETTERS[int(value)]
    s = str(value).strip()
    m = re.match(r"^\(?([A-J])\)?(?:[.:)]|\s|$)", s)
    if m:
        return m.group(1)
    if s.isdigit():
        return LETTERS[int(s)]
    for i, o in enumerate(options):
        if re.sub(r"^\s*\(?[A-J]\)?[.:)]\s*", "", o).strip().lower() == s.lower():
            return LETTERS[i]
    return None


def _lettered(options: list[str]) -> list[str]:
    return [o if re.match(r"^\s*\(?[A-J]\)?[.:)]", str(o)) else f"{LETTERS[i]}. {o}" for i, o in enumerate(options)]


def _inline_options(question: str) -> tuple[str, list[str]]:
    """Split "Q?\\n(A) x\\n(B) y" into the question and lettered options."""
    parts = re.split(r"\n?\s*\(?([A-J])[.)]\s+", question)
    if len(parts) < 3:
        return question.strip(), []
    q = parts[0].strip()
    opts = [f"{parts[i]}. {parts[i + 1].strip()}" for i in range(1, len(parts) - 1, 2)]
    return q, opts


def _build(name, rows, root, make, breakdown) -> Dataset:
    finder = VideoFinder(root if root.is_dir() else root.parent)
    samples, missing = [], []
    for i, r in enumerate(rows):
        s = make(r, i, finder)
        if s is None:
            continue
        if s.video is None:
            missing.append(s.id)
        else:
            samples.append(s)
    return Dataset(name, samples, missing, breakdown)


def _pending(sid, q, opts, ans, video, **kw):
    return Sample(id=str(sid), video=video, question=q, options=opts, answer=ans, **kw)


def load_videomme(root: Path, subtitles: bool = False) -> Dataset:
    rows = [r for p in _find_annotations(root, ("**/test-*.parquet", "**/videomme*.json", "**/*.parquet", "**/*.json"),
                                         "Video-MME") for r in read_records(p)]

    def make(r, i, finder):
        opts = _lettered(list(r["options"]))
        vid = r.get("videoID") or r.get("video_id")
        sub = finder.root / "subtitle" / f"{vid}.srt"
        return _pending(r.get("question_id", i), r["question"], opts, _letter(r.get("answer"), opts), finder.find(vid),
                        subtitles=str(sub) if subtitles and sub.is_file() else None,
                        fields={k: r.get(k) for k in ("duration", "domain", "sub_category", "task_type")})

    return _build("videomme" + ("_sub" if subtitles else ""), rows, root, make, ("duration", "domain", "task_type"))


def load_mlvu(root: Path) -> Dataset:
    rows = []
    for p in _find_annotations(root, ("**/json/*.json", "**/*.json"), "MLVU"):
        for r in read_records(p):
            r.setdefault("task_type", r.get("question_type") or p.stem)
            rows.append(r)

    def make(r, i, finder):
        q = r["question"]
        opts = _lettered(list(r["candidates"])) if r.get("candidates") else None
        if opts is None:
            q, opts = _inline_options(q)
        vid = r.get("video_name") or r.get("video")
        return _pending(r.get("id", f"{vid}#{i}"), q, opts, _letter(r.get("answer"), opts), finder.find(vid),
                        fields={"task_type": r.get("task_type")})

    return _build("mlvu", rows, root, make, ("task_type",))


def load_longvideobench(root: Path) -> Dataset:
    rows = [r for p in _find_annotations(root, ("**/lvb_val.json", "**/*.json"), "LongVideoBench") for r in read_records(p)]

    def make(r, i, finder):
        opts = _lettered(list(r["candidates"]))
        sub = r.get("subtitle_path")
        subp = (finder.root / "subtitles" / sub) if sub else None
        return _pending(r.get("id", i), r["question"], opts, _letter(r.get("correct_choice"), opts),
                        finder.find(r.get("video_path")), subtitles=str(subp) if subp and subp.is_file() else None,
                        fields={"duration_group": r.get("duration_group"), "question_category": r.get("question_category")})

    return _build("longvideobench", rows, root, make, ("duration_group", "question_category"))


def load_egoschema(root: Path) -> Dataset:
    paths = _find_annotations(root, ("**/questions.json", "**/*.json"), "EgoSchema")
    answers = {}
    for p in (root.rglob("subset_answers.json") if root.is_dir() else []):
        answers.update(json.loads(p.read_text()))
    rows = [r for p in paths if p.name != "subset_answers.json" for r in read_records(p)]

    def make(r, i, finder):
        opts = r.get("option") or [r[f"option {j}"] for j in range(5) if f"option {j}" in r]
        opts = _lettered(list(opts))
        vid = r.get("video_idx") or r.get("q_uid")
        ans = r.get("answer", answers.get(r.get("q_uid", vid)))
        if ans is None:
            return None  # the subset publishes answers for 500 questions only
        return _pending(r.get("q_uid", vid), r["question"], opts, _letter(ans, opts), finder.find(vid))

    return _build("egoschema", rows, root, make, ())


def load_lvhaystack(root: Path) -> Dataset:
    rows = [r for p in _find_annotations(root, ("**/*.parquet", "**/*.json", "**/*.jsonl"), "LV-Haystack")
            for r in read_records(p)]

    def make(r, i, finder):
        meta = r.get("video_metadata") or {}
        if isinstance(meta, str):
            meta = json.loads(meta)
        fps = float(meta.get("frame_rate") or r.get("video_metadata.frame_rate") or 0)
        if fps <= 0:
            raise InputError(f"LV-Haystack sample {r.get('video_id')}: video_metadata.frame_rate is missing")
        opts = list(r.get("options") or [])
        if isinstance(r.get("options"), dict):
            opts = [f"{k}. {v}" for k, v in sorted(r["options"].items())]
        opts = _lettered(opts) if opts else []
        return _pending(f"{r['video_id']}#{i}", r["question"], opts, _letter(r.get("answer"), opts) if opts else None,
                        finder.find(r["video_id"]),
                        gt_times=[float(f) / fps for f in r.get("frame_indexes_video") or []],
                        fields={k: r[k] for k in ("needle_depth", "haystack_frames") if k in r})

    return _build("lvhaystack", rows, root, make, ())


LOADERS = {
    "videomme": lambda root: load_videomme(root, False),
    "videomme_sub": lambda root: load_videomme(root, True),
    "mlvu": load_mlvu,
    "longvideobench": load_longvideobench,
    "egoschema": load_egoschema,
    "lvhaystack": load_lvhaystack,
}


def load(bench: str, data: str) -> Dataset:
    if bench not in LOADERS:
        raise InputError(f"unknown benchmark {bench!r}; known: {', '.join(sorted(LOADERS))}")
    root = Path(data)
    if not root.exists():
        raise InputError(f"{data}: no such data directory or annotation file")
    try:
        return LOADERS[bench](root)
    except KeyError as exc:
        raise InputError(f"{bench} annotations lack the field {exc.args[0]!r}; is this the published format?") from None
