"""The benchmark helpers that decide which figures a table shows: alternating timing rounds and the attribution of
sampled GPU clocks to the callable that ran (benchmarks/common.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402


class _Samples:
    """What ``interleaved`` reads of a ``GpuMonitor``: ``ok`` and its ``samples`` list."""

    ok = True

    def __init__(self):
        self.samples = []


def test_interleaved_alternates_and_takes_the_median():
    calls, ms = [], {"a": iter([5.0, 1.0, 3.0]), "b": iter([2.0, 9.0, 4.0])}
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}

    def timer(fn):
        fn()
        return next(ms[calls[-1]])

    out = common.interleaved(fns, timer, rounds=3)
    assert calls == ["a", "b"] + ["a", "b", "a", "b", "a", "b"]  # one warm-up call each, then the rounds
    assert out["a"] == {"ms": 3.0, "rounds": [5.0, 1.0, 3.0]}
    assert out["b"] == {"ms": 4.0, "rounds": [2.0, 9.0, 4.0]}


def test_interleaved_gives_each_callable_the_clock_sampled_while_it_ran():
    mon = _Samples()
    clock = {"fast": 1980, "slow": 1400}
    power = {"fast": 300.0, "slow": 700.0}

    def timer(fn):
        name = fn()
        for _ in range(2):  # what the sampling thread records during this callable's round
            time.sleep(0.002)
            mon.samples.append((time.monotonic(), clock[name], power[name], 60, 0x4 if name == "slow" else 0))
        time.sleep(0.002)
        return 1.0

    out = common.interleaved({"fast": lambda: "fast", "slow": lambda: "slow"}, timer, rounds=2, monitor=mon)
    assert out["fast"]["sm_mhz"] == 1980 and out["fast"]["power_w"] == 300.0 and out["fast"]["samples"] == 4
    assert out["fast"]["throttle"] == []
    assert out["slow"]["sm_mhz"] == 1400 and out["slow"]["power_w"] == 700.0 and out["slow"]["samples"] == 4
    assert out["slow"]["throttle"] == ["sw_power_cap"]


def test_first_call_work_falls_outside_the_sampled_spans():
    """A callable whose first call compiles (the GPU idles at full clock and low power meanwhile): those samples must
    not be attributed to its timed rounds, which ran at the power cap."""
    mon = _Samples()
    compiled = []

    def kernel():
        if not compiled:  # the JIT compile: what the sampling thread records while the GPU idles
            for _ in range(20):
                time.sleep(0.001)
                mon.samples.append((time.monotonic(), 1980, 120.0, 40, 0))
            compiled.append(True)

    def timer(fn):
        fn()
        for _ in range(2):  # the timed repetitions, at the power cap
            time.sleep(0.002)
            mon.samples.append((time.monotonic(), 1500, 690.0, 60, 0x4))
        time.sleep(0.002)
        return 1.0

    out = common.interleaved({"kernel": kernel}, timer, rounds=3, monitor=mon)
    assert out["kernel"]["sm_mhz"] == 1500 and out["kernel"]["power_w"] == 690.0 and out["kernel"]["samples"] == 6


def test_summary_of_samples():
    s = [(0.0, 1500, 650.0, 55, 0x4), (0.1, 1700, 600.0, 58, 0x20), (0.2, 1600, 690.0, 57, 0)]
    assert common.summarize_samples(s, common.GpuMonitor.THROTTLE) == {
        "sm_mhz": 1600, "power_w": 650.0, "temp_c": 58, "throttle": ["sw_power_cap", "sw_thermal"], "samples": 3}
    assert common.summarize_samples([], common.GpuMonitor.THROTTLE) == {}


def test_monitor_samples_with_a_driver_and_reports_nothing_without():
    mon = common.GpuMonitor()
    try:
        time.sleep(0.2)
        if mon.ok:  # a machine with an NVIDIA driver: it samples
            assert mon.samples and common.summarize_samples(mon.samples, mon.THROTTLE)["sm_mhz"] > 0
        else:
            assert mon.samples == []
    finally:
        mon.close()


def test_host_overhead_table_divides_host_by_gpu_time(tmp_path, monkeypatch):
    """benchmarks/host_overhead.py's section: host µs over GPU µs per call ("-" where the call could not be captured)
    and each A/B as the time with the change over the time without it."""
    import host_overhead

    monkeypatch.setattr(common, "BENCHMARKS_MD", tmp_path / "BENCHMARKS.md")
    host_overhead.write_markdown({
        "device": "Test GPU", "date": "2026-11-28", "command": "python benchmarks/host_overhead.py", "heads": 28,
        "kv_heads": 4, "d": 128, "calls": 50, "batches": 7, "rounds": 5, "note": "A note.",
        "rows": [{"n": 16384, "rows": [{"call": "sparse_attention", "host_us": 300.0, "gpu_us": 250.0},
                                       {"call": "estimate x", "host_us": 120.0, "gpu_us": None}],
                  "ab": [{"call": "sparse_attention", "change": "c", "with_us": 240.0, "without_us": 300.0}]}]})
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Host time of the launch path (Test GPU)" in text and "A note." in text
    assert "| 16384 | `sparse_attention` | 300 | 250 | 1.20 |" in text
    assert "| 16384 | `estimate x` | 120 | - | - |" in text
    assert "| 16384 | `sparse_attention` | c | 240 | 300 | 0.80 |" in text
    assert "(`fit.capability`: the device's compute capability asked once per device" in text  # runs before ab_text


def test_host_overhead_names_its_changes_and_profiles_a_call(tmp_path, monkeypatch):
    """The A/B sentence is the run's own (``ab_text``, with ``--against-hopper`` its copy's path); ``host_profile``
    ranks a call's functions by own time, per call."""
    import host_overhead

    monkeypatch.setattr(common, "BENCHMARKS_MD", tmp_path / "BENCHMARKS.md")
    host_overhead.write_markdown({
        "device": "Test GPU", "date": "2026-11-29", "command": "c", "heads": 28, "kv_heads": 4, "d": 128,
        "calls": 50, "batches": 7, "rounds": 5, "ab_text": "the wrapper against `old.py`", "rows": []})
    assert "swapping the earlier step back in (the wrapper against `old.py`), 5 alternating" in \
        (tmp_path / "BENCHMARKS.md").read_text()

    def slow():
        return sorted(range(20000), key=lambda x: -x)
    rows = host_overhead.host_profile(slow, calls=5)
    assert rows == sorted(rows, key=lambda r: -r["own_us"])
    by_name = {r["function"]: r for r in rows}
    assert by_name["<built-in method builtins.sorted>"]["calls"] == 1
    assert any(f.startswith("test_bench_common.py:") and r["calls"] == 20000 for f, r in by_name.items())  # the key


def test_load_copy_loads_another_copy_inside_the_package(tmp_path):
    """``common.load_copy``: a copy of a vidsparse module file, loaded under a name in the package, resolves its
    relative imports and stays a module apart from the original."""
    from vidsparse.attention.kernels import pool

    copy = tmp_path / "pool_copy.py"  # pool.py imports ..layout at module level
    copy.write_text(Path(pool.__file__).read_text() + "\nMARK = 1\n")
    mod = common.load_copy(str(copy), "vidsparse.attention.kernels._pool_copy")
    assert mod.MARK == 1 and mod is not pool and not hasattr(pool, "MARK")
    assert mod.POOL_LEVELS == (2, 4, 8) and mod.pool_levels_stacked is not pool.pool_levels_stacked


def test_markdown_rewrite_keeps_the_note_it_was_given(tmp_path, monkeypatch):
    """``--markdown-from`` with ``--note`` saves the note into the results file: a later rewrite without ``--note``
    writes the same section."""
    import argparse
    import json

    saved = tmp_path / "r.json"
    saved.write_text(json.dumps({"value": 3}))
    written = []
    ap = argparse.ArgumentParser()
    common.markdown_args(ap, "r")
    assert common.rewrite_markdown(ap.parse_args(["--markdown-from", str(saved), "--note", "Run on abc."]),
                                   written.append)
    assert common.rewrite_markdown(ap.parse_args(["--markdown-from", str(saved)]), written.append)
    assert written == [{"value": 3, "note": "Run on abc."}] * 2
    assert not common.rewrite_markdown(ap.parse_args([]), written.append) and len(written) == 2


def test_tune_attention_lazy_section_names_the_widths(tmp_path, monkeypatch):
    """``tune_attention.py --lazy``: its own section per head configuration, each row's layout with its width (the
    launch's default decides by it), the alternating rounds and clocks."""
    import tune_attention

    monkeypatch.setattr(common, "BENCHMARKS_MD", tmp_path / "BENCHMARKS.md")
    row = {"n": 65536, "layout": "random", "density": 0.0518, "width": 26, "ms": 2.5, "rounds": [2.5, 2.6],
           "sm_mhz": 1620, "tflops": 500.0, "graph_ms": 2.49, "host_us": 150.0, "max_diff": 0.0}
    for hk in (4, 28):
        tune_attention.write_markdown({
            "device": "Test GPU", "date": "2026-11-29", "command": "python benchmarks/tune_attention.py --lazy",
            "heads": 28, "kv_heads": hk, "note": "A note.",
            "rows": [{**row, "variant": "hopper_lazy"}, {**row, "variant": "hopper_eager", "ms": 2.6}]})
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Attention kernel variants: lazy rescale A/B (Test GPU)" in text
    assert "## Attention kernel variants: lazy rescale A/B, 28/28 heads (Test GPU)" in text
    assert "| 65536 | random, width 26 | 0.052 | hopper_lazy | 2.50 | 500 | 2.49 | 150 | 0 | 2.50 / 2.60 | 1620 |" \
        in text
    assert "| 65536 | random, width 26 | 0.052 | hopper_eager | 2.60 |" in text and "A note." in text


def test_tune_attention_width_sweep_has_its_own_section(tmp_path, monkeypatch):
    """``--lazy --widths``: a section of its own per sweep, named by its layouts, widths and sizes (the plain
    ``--lazy`` one stays), saying that the graph times alternate too."""
    import tune_attention

    monkeypatch.setattr(common, "BENCHMARKS_MD", tmp_path / "BENCHMARKS.md")
    row = {"n": 32768, "layout": "random", "density": 0.04, "width": 12, "ms": 0.5, "rounds": [0.5, 0.51],
           "sm_mhz": 1700, "tflops": 400.0, "graph_ms": 0.45, "graph_rounds": [0.45, 0.46], "host_us": 90.0,
           "max_diff": 0.0}
    for cmd in ("--lazy", "--lazy --widths 12"):
        tune_attention.write_markdown({
            "device": "Test GPU", "date": "2026-11-29", "command": f"python benchmarks/tune_attention.py {cmd}",
            "heads": 28, "kv_heads": 4, "rows": [{**row, "variant": "hopper_lazy"}]})
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Attention kernel variants: lazy rescale A/B (Test GPU)" in text
    assert "## Attention kernel variants: lazy rescale A/B, random widths 12–12 at 32K (Test GPU)" in text
    assert text.count("`graph ms` is the median of alternating replay rounds as well.") == 2
    assert "| 32768 | random, width 12 | 0.040 | hopper_lazy | 0.50 | 400 | 0.45 | 90 | 0 | 0.50 / 0.51 | 1700 |" \
        in text


@pytest.mark.parametrize("n", [32768, 65536, 131072 - 100])
def test_width_sweep_densities_give_those_widths(n):
    """The width sweep's density (w − ½) / blocks gives ``random_layout``'s layouts and ``block_topk``'s exactly w
    blocks wide."""
    import torch
    from attention import random_layout

    from vidsparse import PATTERNS
    from vidsparse.attention.patterns import SeqMeta

    nb = -(-n // 128)
    q, k = torch.randn(2, 1, 2, n, 64).unbind(0)
    for w in (8, 13, 24, 25):
        assert random_layout(2, n, (w - 0.5) / nb, device="cpu").kv_index.shape[-1] == w
        lay = PATTERNS.from_spec(f"block_topk:density={(w - 0.5) / nb}").estimate(q, k, SeqMeta())
        assert lay.kv_index.shape[-1] == w


def test_host_us_is_the_median_batch_per_call(monkeypatch):
    """``common.host_us`` (tune_attention's and host_overhead's host column): each batch's wall time over its calls,
    in µs, the median over batches, with the GPU synchronised before each batch and after the last."""
    import torch

    syncs, calls, clock = [], [], iter([0.0, 0.001, 1.0, 1.004, 2.0, 2.002])  # batches of 1, 4 and 2 ms
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: syncs.append(len(calls)))
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    us = common.host_us(lambda: calls.append(1), calls=10, batches=3)
    assert abs(us - 200.0) < 1e-9  # median of 100, 400, 200 µs per call (up to the float subtraction)
    assert len(calls) == 30 and syncs == [0, 10, 20, 30]
