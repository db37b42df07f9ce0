"""What benchmarks/profile_estimation.py reports besides its timings: the streaming read behind its read floor (in
Triton's interpreter) and the share table it writes to BENCHMARKS.md."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import common  # noqa: E402
import profile_estimation as pe  # noqa: E402


@pytest.mark.parametrize("shape", [(3, 5000), (1, 256 * 4), (7,)])
def test_stream_sum_reads_every_element_once(shape):
    """The partial sums add up to the tensor's sum: lengths that end inside a step, a whole number of programs, and
    fewer elements than one step; bf16 read, fp32 accumulated."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (conftest sets it without CUDA)")
    g = torch.Generator().manual_seed(len(shape))
    x = torch.randn(*shape, generator=g).bfloat16()
    parts = pe.stream_sum(x, block=256, iters=4)
    assert parts.shape == (-(-x.numel() // 1024),)
    torch.testing.assert_close(parts.sum(), x.float().sum(), atol=1e-3, rtol=1e-5)


def _run(n: int, attention_ms: float, est_ms: float, floor_ms: float) -> dict:
    return {"n": n, "date": "2026-11-28", "device": "Test GPU", "command": f"profile --n {n}",
            "rows": [{"spec": "block_topk:density=0.05", "gpu_ms": est_ms, "ms": 2 * est_ms,
                      "attention_ms": attention_ms, "layout_density": 0.05, "estimate_share": est_ms / attention_ms}],
            "read_floor": {"gpu_ms": floor_ms, "tb_per_s": 1.0, "read": "stream"}}


def test_share_table_lists_each_size_and_the_read_floor(tmp_path, monkeypatch):
    """Runs given in any order become columns by N; each cell is the estimate's GPU ms over the kernel's, and the
    last row the read floor of each run."""
    monkeypatch.setattr(common, "BENCHMARKS_MD", tmp_path / "BENCHMARKS.md")
    pe.write_share_markdown([_run(65536, 2.0, 0.1, 0.05), _run(32768, 0.8, 0.12, 0.076)], note="A note.")
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Estimation against the kernel on its own layout (Test GPU)" in text
    assert "| spec | N = 32768 | N = 65536 |" in text
    assert "| `block_topk:density=0.05` | 0.12 / 0.80 (0.05) = **15.0%** | 0.10 / 2.00 (0.05) = **5.0%** |" in text
    assert "| 0.076 ms (1.00 TB/s, stream) | 0.050 ms (1.00 TB/s, stream) |" in text
    assert "A note." in text


def test_share_table_of_other_head_configs_is_its_own_section(tmp_path, monkeypatch):
    """Runs with 28 K/V heads (``--kv-heads 28``) get a section of their own beside the GQA one, and one table never
    mixes head configurations."""
    monkeypatch.setattr(common, "BENCHMARKS_MD", tmp_path / "BENCHMARKS.md")
    pe.write_share_markdown([_run(32768, 0.8, 0.12, 0.076)])
    mha = [{**_run(32768, 0.9, 0.2, 0.14), "heads": 28, "kv_heads": 28}]
    pe.write_share_markdown(mha)
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Estimation against the kernel on its own layout (Test GPU)" in text
    assert "## Estimation against the kernel on its own layout, 28/28 heads (Test GPU)" in text
    assert "(28 heads / 28 KV heads, d = 128" in text and "0.20 / 0.90 (0.05) = **22.2%**" in text
    with pytest.raises(ValueError, match="one head configuration"):
        pe.write_share_markdown([_run(65536, 2.0, 0.1, 0.05)] + mha)


def test_share_table_of_video_inputs_is_its_own_section(tmp_path, monkeypatch):
    """``--video`` runs (video-structured q/k, grid included) get a section of their own, per head configuration;
    one table never mixes random and video inputs."""
    monkeypatch.setattr(common, "BENCHMARKS_MD", tmp_path / "BENCHMARKS.md")
    pe.write_share_markdown([_run(32768, 0.8, 0.12, 0.076)])
    pe.write_share_markdown([{**_run(32768, 0.8, 0.12, 0.076), "video": True}])
    pe.write_share_markdown([{**_run(32768, 0.9, 0.2, 0.14), "kv_heads": 28, "video": True}])
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Estimation against the kernel on its own layout (Test GPU)" in text
    assert "## Estimation against the kernel on its own layout, video q/k (Test GPU)" in text
    assert "## Estimation against the kernel on its own layout, 28/28 heads, video q/k (Test GPU)" in text
    assert text.count("Video-structured q/k") == 2
    with pytest.raises(ValueError, match="one kind of input"):
        pe.write_share_markdown([_run(32768, 0.8, 0.12, 0.076), {**_run(65536, 2.0, 0.1, 0.05), "video": True}])


def test_share_table_with_recall_and_a_named_section(tmp_path, monkeypatch):
    """``--recall`` rows show each layout's recall beside the share; ``--section`` gives the table a section of its
    own, so it does not replace the main table of the same inputs."""
    monkeypatch.setattr(common, "BENCHMARKS_MD", tmp_path / "BENCHMARKS.md")
    pe.write_share_markdown([{**_run(32768, 0.8, 0.12, 0.076), "video": True}])
    run = {**_run(32768, 0.8, 0.06, 0.076), "video": True}
    run["rows"] = [{**run["rows"][0], "recall": 0.8921}]
    pe.write_share_markdown([run], section="pool_stride")
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## Estimation against the kernel on its own layout, video q/k (Test GPU)" in text
    assert "## Estimation against the kernel on its own layout, video q/k, pool_stride (Test GPU)" in text
    assert "0.06 / 0.80 (0.05) = **7.5%**, recall 0.8921 |" in text
    assert "0.12 / 0.80 (0.05) = **15.0%** |" in text


def test_share_table_marks_static_patterns_built_once(tmp_path, monkeypatch):
    """Runs that time the estimate as a model calls it (``Pattern.layout``, ``per_layer``) say so, and a static
    pattern's cell gives its per-layer share (a cached lookup) beside the one build per shape."""
    monkeypatch.setattr(common, "BENCHMARKS_MD", tmp_path / "BENCHMARKS.md")
    run = _run(16384, 0.5, 0.003, 0.04)
    run["per_layer"] = True
    run["rows"].append({"spec": "power", "gpu_ms": 0.002, "ms": 0.01, "attention_ms": 0.46, "layout_density": 0.12,
                        "estimate_share": 0.002 / 0.46, "build_ms": 0.4, "build_gpu_ms": 0.066})
    pe.write_share_markdown([run])
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "GPU ms (CUDA-graph replay) as a model's prefill calls it in each layer / the kernel's ms" in text
    assert "| `power` | 0.00 / 0.46 (0.12) = **0.4%** (static: built once per shape, 0.07 ms) |" in text
    assert "| `block_topk:density=0.05` | 0.00 / 0.50 (0.05) = **0.6%** |" in text


def test_module_ab_swaps_the_kernel_module_for_each_value_and_restores_it(tmp_path, monkeypatch):
    """``--module-ab``: each timed call sees the module loaded from the file ("before", a module object of its own)
    or the imported one ("current"), alternating, twice per spec; afterwards the imported one is back."""
    import shutil

    from vidsparse.attention.kernels import block_select
    from vidsparse.attention.patterns import SeqMeta

    name = block_select.__name__
    copy = tmp_path / "before.py"
    shutil.copy(block_select.__file__, copy)
    seen = []
    monkeypatch.setattr(pe, "bench_ms", lambda fn, rep_ms: (fn(), seen.append(sys.modules[name]), 1.0)[2])
    monkeypatch.setattr(pe, "graph_ms", lambda fn: 0.5)
    q = k = torch.zeros(1, 2, 256, 16)
    rows = pe.module_ab(["block_topk:density=0.5"], name, str(copy), q, k, SeqMeta(64, 64, True))
    assert [r["value"] for r in rows] == ["before", "current"] * 2
    assert seen[1] is seen[3] is block_select and seen[0] is seen[2] is not block_select
    assert seen[0].__file__ == str(copy) and seen[0].select_blocks is not block_select.select_blocks
    assert sys.modules[name] is block_select and all(r["gpu_ms"] == 0.5 for r in rows)
