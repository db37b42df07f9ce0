"""Kernel launches fit the GPU's shared memory (``attention/kernels/fit.py``). The kernels are built for each target
by Triton and launched through a stand-in driver (``builds.py``): Triton's own check refuses a launch whose shared
memory passes the target's limit, as it does on a GPU, and the stand-in records what got through. Numerics of the
launches picked on a smaller GPU are checked on the GPU (``test_attention_gpu.py``, a lowered limit)."""

from __future__ import annotations

import json

import pytest
import torch
from builds import ALL, LAUNCH, build

from vidsparse.attention.kernels import fit
from vidsparse.errors import UnsupportedError

OutOfResources = pytest.importorskip("triton.runtime.errors").OutOfResources

@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("triton")


def _launch(cache, cases: str, target) -> dict:
    return json.loads(build(cache, LAUNCH, cases, target=target).strip().splitlines()[-1])


def test_every_kernel_launches_within_99_kb_on_sm86(cache):
    """GA10x and Ada cards (RTX 30xx/40xx, A10, L4, L40S) give a program 99 KB. Before fit.py the attention kernel's
    default launch at head dim 128 (3 stages: 160 KB) and xattention's at stride 16 (256-column tiles, 8 warps:
    104 KB) were refused there; now they step down to 2 stages and to 128-column tiles with 4 warps. Every other
    kernel's launch fits as it is."""
    limit = 99 * 1024
    got = _launch(cache, ALL, (86, limit))
    for name, launches in got.items():
        assert isinstance(launches, list) and launches, (name, launches)
        assert all(shared <= limit for _, shared, _, _ in launches), (name, launches)
    assert got["attention_d128"] == [["_block_sparse_fwd", 98304, 8, 2]]
    assert got["attention_d64"] == [["_block_sparse_fwd", 81920, 8, 3]]  # its default fits
    assert [w for _, _, w, _ in got["antidiagonal_s16"]] == [4]
    assert got["antidiagonal_s8"][0][2:] == [4, 3]  # the stride-8 default (128 columns, 4 warps) fits


def test_defaults_kept_where_they_fit(cache):
    """On Hopper (227 KB) the measured defaults launch; on an A100 (163 KB) the attention kernel's 3 stages fit."""
    hopper = _launch(cache, "attention_d128,attention_d128_tma,antidiagonal_s16", (90, 227 * 1024))
    assert [(w, st) for _, _, w, st in hopper["attention_d128"]] == [(8, 3)]  # 224 KB built for sm_90
    assert [(w, st) for _, _, w, st in hopper["attention_d128_tma"]] == [(8, 3)]
    assert [(w, st) for _, _, w, st in hopper["antidiagonal_s16"]] == [(8, 3)]
    a100 = _launch(cache, "attention_d128", (80, 163 * 1024))
    assert a100["attention_d128"] == [["_block_sparse_fwd", 163840, 8, 3]]


def test_no_fitting_launch_is_a_clear_error(cache):
    got = _launch(cache, "attention_d128,antidiagonal_s8", (86, 32 * 1024))
    for name in got:
        assert got[name]["error"] == "UnsupportedError", got
        assert "shared memory" in got[name]["message"] and "32768" in got[name]["message"], got
    assert "use backend 'torch'" in got["attention_d128"]["message"]  # sparse_attention's torch path
    assert "use the pattern option backend=reference" in got["antidiagonal_s8"]["message"]


def test_a_scores_launch_override_that_does_not_fit_is_a_clear_error(cache, monkeypatch):
    """``VIDSPARSE_SCORES_CONFIG`` (a tuning knob) can name a launch larger than the GPU allows: the error names it
    instead of Triton's OutOfResources. A malformed value is an input error."""
    from vidsparse.attention.kernels import pooled_scores
    from vidsparse.errors import InputError

    monkeypatch.setenv("VIDSPARSE_SCORES_CONFIG", "256/256/128/8/tf32x3")
    got = _launch(cache, "scores", (86, 99 * 1024))["scores"]
    assert got["error"] == "UnsupportedError" and "VIDSPARSE_SCORES_CONFIG" in got["message"], got
    for bad in ("128/128", "128/128/128/eight/tf32x3"):
        monkeypatch.setenv("VIDSPARSE_SCORES_CONFIG", bad)
        with pytest.raises(InputError, match="VIDSPARSE_SCORES_CONFIG"):
            pooled_scores._config("VIDSPARSE_SCORES_CONFIG", (128, 128, 128, 8, "tf32x3"))


def test_launch_fitting_steps_down_and_remembers():
    """The first launch that Triton does not refuse for shared memory runs; later calls start from it; a refusal for
    another resource is not a reason to step down."""
    tried = []

    def launch(stages):
        tried.append(stages)
        if stages > 2:
            raise OutOfResources(40000 * stages, 100000, "shared memory")
        return f"ran {stages}"

    dev, key = torch.device("cpu"), ("step-down test", 1)
    assert fit.launch_fitting("k", dev, key, (4, 3, 2, 1), launch) == "ran 2"
    assert tried == [4, 3, 2] and fit.picked("k", dev, key) == 2
    tried.clear()
    assert fit.launch_fitting("k", dev, key, (4, 3, 2, 1), launch) == "ran 2"
    assert tried == [2]
    assert fit.picked("k", dev, ("another shape", 1)) is None

    def tmem(_):
        raise OutOfResources(600, 512, "tensor memory")

    with pytest.raises(OutOfResources):
        fit.launch_fitting("k", dev, ("tmem test",), (1, 2), tmem)
    with pytest.raises(UnsupportedError, match="120000 bytes, the GPU gives 100000"):
        fit.launch_fitting("k", dev, ("none fits",), (4, 3), launch)


class OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA, for the device checks (the GPU's capability is faked alongside)."""

    is_cuda = property(lambda self: True)


@pytest.mark.parametrize("cap,ok", [((7, 5), False), ((8, 0), True), ((8, 9), True), ((9, 0), True),
                                    ((12, 0), True)])
def test_kernels_need_ampere(cap, ok):
    assert fit.capability_supported(cap) is ok


def test_capability_is_asked_once_per_device_and_function(monkeypatch):
    """The launch paths ask the device's compute capability through ``fit.capability``: once per device, and again
    whenever ``torch.cuda.get_device_capability`` is another function (a test's stand-in is always asked)."""
    asked = []

    def t4(device=None):
        asked.append(("t4", device))
        return (7, 5)

    def a10(device=None):
        asked.append(("a10", device))
        return (8, 6)

    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", t4)
    assert fit.capability(cuda0) == (7, 5) and fit.capability(cuda0) == (7, 5) and fit.capability(cuda1) == (7, 5)
    assert asked == [("t4", cuda0), ("t4", cuda1)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", a10)
    assert fit.capability(cuda0) == (8, 6) and fit.capability(cuda0) == (8, 6)
    assert asked[2:] == [("a10", cuda0)]


def test_auto_backends_pass_over_an_old_gpu(monkeypatch):
    """On a CUDA GPU older than Ampere the "auto" backends take the torch paths, and a forced "kernel" backend is a
    clear error (the tensor's device is faked: this machine has no GPU)."""
    from vidsparse.attention import BlockLayout, ops
    from vidsparse.attention.patterns import base
    from vidsparse.models.hf import subset_attention

    x = torch.zeros(1, 1, 4, 16).as_subclass(OnCuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    assert not ops.kernel_available(x)
    assert not base.use_kernel("auto", x)
    with pytest.raises(UnsupportedError, match="Tesla T4 is 7.5"):
        base.use_kernel("kernel", x)
    with pytest.raises(UnsupportedError, match="compute capability 8.0"):
        ops.sparse_attention(x, x, x, BlockLayout.dense(4, 4, 128, 128), backend="kernel")
    with pytest.raises(UnsupportedError, match="compute capability 8.0"):
        subset_attention(x, x, x, torch.arange(2), backend="kernel")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    assert base.use_kernel("auto", x) and base.use_kernel("kernel", x)


def test_kernels_need_triton_34(monkeypatch):
    """Triton 3.3 has no ``triton.tools.tensor_descriptor``, which the TMA paths import on Hopper: with it the "auto"
    backends take the torch paths and a forced "kernel" backend is a clear error."""
    import triton

    from vidsparse.attention import ops
    from vidsparse.attention.patterns import base

    assert not fit.triton_at_least((3, 4), "3.3.1") and fit.triton_at_least((3, 4), "3.4.0")
    x = torch.zeros(1, 1, 4, 16).as_subclass(OnCuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(triton, "__version__", "3.3.1")
    assert not ops.kernel_available(x) and not base.use_kernel("auto", x)
    with pytest.raises(UnsupportedError, match="Triton 3.4 or newer"):
        base.use_kernel("kernel", x)
    monkeypatch.setattr(triton, "__version__", "3.4.0")
    assert ops.kernel_available(x) and base.use_kernel("auto", x)


def test_gluon_kernel_only_with_the_triton_it_builds_on(monkeypatch):
    """Triton 3.5 imports the Gluon Hopper API but its warp_specialize has another signature: the Gluon kernel's
    build failed there (a CompilationError at the first call), so Hopper then runs the Triton kernel. (The device is
    faked as in the test above.)"""
    hop = pytest.importorskip("vidsparse.attention.kernels.block_sparse_hopper", exc_type=ImportError)
    import triton

    from vidsparse.attention.kernels import block_sparse as bs

    assert not hop.triton_supported("3.5.1") and hop.triton_supported("3.6.0")
    assert hop.triton_supported("3.7.0+git1a2b3c") and hop.triton_supported("4.0")

    q = torch.zeros(1, 2, 256, 128, dtype=torch.bfloat16).as_subclass(OnCuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    assert bs._hopper_fits(q, q, q, 128, 128, 0.1)
    monkeypatch.setattr(triton, "__version__", "3.5.1")
    assert not bs._hopper_fits(q, q, q, 128, 128, 0.1)


def test_launch_memory_table_marks_launches_over_the_limit(tmp_path, monkeypatch):
    """benchmarks/launch_memory.py's table: KB (warps, stages) per kernel and target, bold past the target's limit,
    "-" where a case was not built."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import common
    import launch_memory

    monkeypatch.setattr(common, "BENCHMARKS_MD", tmp_path / "BENCHMARKS.md")
    res = {"date": "2026-11-28", "device": "Test CPU", "triton": "3.6.0", "command": "launch_memory",
           "limits": {"86": 101376, "90": 232448},
           "targets": {"86": {"attention_d128": [["_block_sparse_fwd", 163840, 8, 3]]},
                       "90": {"attention_d128": [["_block_sparse_fwd", 229376, 8, 3]],
                              "attention_d128_tma": [["_block_sparse_fwd", 229400, 8, 3]]}}}
    launch_memory.write_markdown(res)
    text = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| attention_d128 | **160.0 (8, 3)** | 224.0 (8, 3) |" in text
    assert "| attention_d128_tma | - | 224.0 (8, 3) |" in text
    assert "| attention_d64 | - | - |" in text
