import os

import numpy as np
import pytest

from conftest import frame_id, indexed_frames
from vidsparse.errors import InputError
from vidsparse.video import VideoReader, build_index, probe
from vidsparse.video.synthetic import write_video

N = 60


@pytest.fixture(scope="module", params=[
    ("mp4", "libx264", None, (48, 64)),
    ("avi", "mpeg4", None, (48, 64)),
    ("webm", "libvpx-vp9", None, (48, 64)),
    ("mkv", "mjpeg", "yuvj444p", (49, 65)),  # odd sizes
])
def coded(request, tmp_path_factory):
    ext, codec, pix, (h, w) = request.param
    path = str(tmp_path_factory.mktemp(codec) / f"v.{ext}")
    write_video(path, indexed_frames(N, h, w), fps=10, codec=codec, pix_fmt=pix, gop=12)
    return path, (h, w)


def test_probe_counts_and_duration(coded):
    path, (h, w) = coded
    info, packets = probe(path)
    assert info.n_frames == N and len(packets) == N
    assert info.duration_s == pytest.approx(N / 10, abs=1e-6)
    assert info.avg_fps == pytest.approx(10, rel=1e-6)
    assert (info.height, info.width) == (h, w)
    assert not info.is_vfr
    assert packets.is_key[0]
    assert np.all(np.diff(packets.pts_s) > 0)


def test_read_at_returns_frame_shown_at_time(coded):
    path, _ = coded
    r = VideoReader(path)
    rng = np.random.default_rng(0)
    times = rng.uniform(0, N / 10 - 1e-3, 25)
    got = r.read_at(times)
    expect = np.floor(times * 10 + 1e-9).astype(int)  # last frame with pts <= t
    ids = [frame_id(f, N) for f in got.data]
    assert ids == expect.tolist()
    assert np.allclose(got.pts_s, expect / 10)


def test_parallel_read_equals_sequential(coded):
    path, _ = coded
    rng = np.random.default_rng(1)
    times = np.concatenate([rng.uniform(0, N / 10 - 1e-3, 40), [0.0, 0.0, N / 10 - 0.05]])  # unsorted, repeats
    seq = VideoReader(path).read_at(times, workers=1)
    for workers in (2, 3, 8):
        r = VideoReader(path)
        par = r.read_at(times, workers=workers)
        assert np.array_equal(par.data, seq.data) and np.array_equal(par.pts_s, seq.pts_s)
        assert r.frames_decoded >= len(np.unique(np.floor(times * 10)))


def test_probe_consistent_with_decode(coded):
    import av

    path, _ = coded
    _, packets = probe(path)
    with av.open(path) as c:
        s = c.streams.video[0]
        pts = np.array([float(f.pts * s.time_base) for f in c.decode(s)])
    assert np.allclose(np.sort(pts), packets.pts_s)


def test_thumbnails_match_read_at(coded):
    path, _ = coded
    r = VideoReader(path)
    th = r.thumbnails(fps=2.0, size=(16, 16))
    assert th.data.shape == (12, 16, 16, 3)
    assert np.allclose(th.pts_s, np.arange(12) / 2)
    again = VideoReader(path).read_at(th.pts_s[::-1], size=(16, 16))
    assert np.array_equal(again.data[::-1], th.data)


def test_variable_frame_rate(tmp_path):
    rng = np.random.default_rng(1)
    gaps = rng.choice([0.02, 0.05, 0.2], size=N)
    pts = np.round(np.concatenate([[0.0], np.cumsum(gaps)[:-1]]), 3)
    path = str(tmp_path / "vfr.mkv")
    write_video(path, indexed_frames(N), pts_s=pts, codec="libx264")
    info, packets = probe(path)
    assert info.is_vfr
    assert np.allclose(packets.pts_s, pts, atol=1e-3)
    r = VideoReader(path)
    times = rng.uniform(0, pts[-1], 30)
    got = r.read_at(times)
    expect = np.searchsorted(pts, times + 1e-9, side="right") - 1
    assert [frame_id(f, N) for f in got.data] == expect.tolist()


def test_index_cache_decodes_nothing_the_second_time(tmp_path, synth):
    path = str(tmp_path / "copy.mp4")
    with open(synth[0], "rb") as a, open(path, "wb") as b:
        b.write(a.read())
    cache = str(tmp_path / "cache")
    first = build_index(path, cache=cache)
    assert first.frames_decoded == len(first) == 180
    second = build_index(path, cache=cache)
    assert second.frames_decoded == 0
    assert np.array_equal(first.thumbs, second.thumbs) and np.array_equal(first.times, second.times)
    other = build_index(path, fps=0.5, cache=cache)  # parameters are part of the key
    assert other.frames_decoded == len(other) == 90
    os.utime(path, ns=(1, 1))  # a changed file is indexed again
    assert build_index(path, cache=cache).frames_decoded == 180


def test_read_at_empty_and_bad_times(synth):
    r = VideoReader(synth[0])
    assert len(r.read_at([])) == 0
    with pytest.raises(InputError):
        r.read_at([float("nan")])


def _audio_only(path):
    import av

    with av.open(path, "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.mark.parametrize("kind,match", [
    ("missing", "no such file"),
    ("directory", "is a directory"),
    ("empty", "empty"),
    ("text", "not a readable video"),
    ("truncated", "not a readable video|corrupt|no frame"),
    ("audio", "no video stream"),
])
def test_bad_inputs(tmp_path, synth, kind, match):
    path = str(tmp_path / f"{kind}.mp4")
    if kind == "directory":
        os.mkdir(path)
    elif kind == "empty":
        open(path, "wb").close()
    elif kind == "text":
        with open(path, "w") as fh:
            fh.write("this is not a video\n" * 100)
    elif kind == "truncated":
        data = open(synth[0], "rb").read()
        with open(path, "wb") as fh:
            fh.write(data[:2000])
    elif kind == "audio":
        path = str(tmp_path / "a.wav")
        _audio_only(path)
    with pytest.raises(InputError, match=match):
        build_index(path, cache=False)


def test_truncated_tail_still_indexes(tmp_path):
    """A Matroska file cut mid-stream keeps what is readable."""
    path = str(tmp_path / "cut.mkv")
    write_video(path, indexed_frames(N), fps=10, codec="libx264")
    full = open(path, "rb").read()
    with open(path, "wb") as fh:
        fh.write(full[: int(len(full) * 0.6)])
    info, packets = probe(path)
    assert 0 < len(packets) < N
    idx = build_index(path, cache=False)
    assert len(idx) >= 1 and idx.thumbs.shape[0] == len(idx)
