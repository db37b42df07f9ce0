"""Kernels compiled for sm_90 on a machine without a GPU (Triton ships ptxas and cuobjdump). The Gluon attention
kernel must build, issue warpgroup MMAs (HGMMA), redistribute registers between its partitions (setmaxnreg) and spill
no tile to local memory; the estimation kernels (the last two tests) must use the tensor cores and no local memory.
Their numerics are checked on the GPU (tests/test_attention_gpu.py)."""

from __future__ import annotations

import json
import re

import pytest
from builds import LAUNCH, build, dump


def _gluon_builds() -> bool:
    try:
        from vidsparse.attention.kernels.block_sparse_hopper import triton_supported
    except ImportError:  # Triton 3.4 and older: no Gluon Hopper API
        return False
    return triton_supported()


BUILD = r"""
from vidsparse.attention.kernels import block_sparse_hopper as hop

d, causal, lse, varlen = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3] == "1", sys.argv[5] == "1"
kpos, pyramid, lazy = sys.argv[6] == "1", sys.argv[7] == "1", sys.argv[8] == "1"
# through the launch wrapper, so the build gets the arguments a real call passes (None for what it does not use)
n, h, hk = 512, 4, 2
q = torch.zeros(1, h, n, d, dtype=torch.bfloat16)
kv = torch.zeros(1, hk, n, d, dtype=torch.bfloat16)
idx, cnt = torch.zeros(1, h, n // 128, 2, dtype=torch.int32), torch.ones(1, h, n // 128, dtype=torch.int32)
lens = torch.full((1,), n, dtype=torch.int32) if varlen else None
pooled = (torch.zeros(3, 1, h, n // 128, 2, dtype=torch.int32), torch.zeros(3, 1, h, n // 128, dtype=torch.int32))
hop.block_sparse_attention_hopper(q, kv, kv, idx, cnt, causal, 0.1, lens, lens, return_lse=lse,
                                  key_pos=torch.arange(n).expand(1, hk, n) if kpos else None,
                                  pooled=pooled if pyramid else None, lazy_rescale=lazy)
(k,) = hop._fwd.device_caches[0][0].values()  # the one build that launch made
open(sys.argv[4], "wb").write(k.asm["cubin"])
print(json.dumps({"ptx_setmaxnreg": "setmaxnreg" in k.asm["ptx"], "shared": k.metadata.shared,
                  "ptx_2_8": "0f41000000" in k.asm["ptx"]}))  # fp32 8.0: the lazy rescale's threshold, log2 2^8
"""


@pytest.mark.skipif(not _gluon_builds(), reason="the Gluon kernel builds with Triton 3.6 or newer")
@pytest.mark.parametrize("d,causal,lse,varlen,kpos,pyramid,lazy", [
    (128, True, False, False, False, False, False), (64, False, True, True, False, False, False),
    (128, True, True, True, False, False, False), (128, True, True, False, True, False, False),
    (128, True, False, False, False, True, False), (64, False, False, False, False, True, False),
    (128, True, False, False, False, False, True), (128, True, True, True, False, False, True),
    (64, False, False, False, False, False, True), (128, True, True, False, True, False, True),
    (128, True, False, False, False, True, True)])
def test_hopper_kernel_builds_with_wgmma_and_no_spills(tmp_path, d, causal, lse, varlen, kpos, pyramid, lazy):
    """Built in a fresh interpreter: the test session runs Triton in interpreter mode (TRITON_INTERPRET=1), under
    which Gluon cannot compile. ``kpos``: keys with their original positions (permuted keys, key subsets);
    ``pyramid``: pooled levels after the exact blocks; ``lazy``: the lazy rescale of long rows asked for (the launch
    builds it only without key positions and pooled levels)."""
    cubin = tmp_path / "k.cubin"
    out = build(tmp_path / "cache", BUILD, d, int(causal), int(lse), cubin, int(varlen), int(kpos), int(pyramid),
                int(lazy))
    info = json.loads(out.strip().splitlines()[-1])
    sass, usage = dump(cubin, "-sass"), dump(cubin, "--dump-resource-usage")
    assert "HGMMA" in sass and "UTMASTG" in sass  # the output's whole tiles leave through a TMA store
    assert info["ptx_setmaxnreg"]
    assert info["ptx_2_8"] == (lazy and not kpos and not pyramid)  # the build the launch made is the lazy one
    # no spills, except that the pyramid's partitions, which also track a tile's pooled steps, keep a few scalars
    # (up to 10 words: 40 bytes of stack) on the stack — never a tensor's registers (a 64×128 fp32 tile takes 64
    # words a thread). (Built with every stride 1, as this test did before it launched through the wrapper, Triton
    # folds the strides in as constants and the pyramid spilled less: those builds were not the ones real calls run.)
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))
    spills = len(re.findall(r"\b(?:STL|LDL)(?:\.\w+)*\s", sass))
    limit = (40, 40) if pyramid else (0, 0)
    assert "LOCAL:0" in usage and stack <= limit[0] and spills <= limit[1], (usage, spills)
    assert info["shared"] <= 227 * 1024


ESTIMATION_BUILD = r"""
from vidsparse.attention.kernels import block_select as bs, pooled_scores as ps

f32, i32, b8 = torch.empty(16), torch.empty(16, dtype=torch.int32), torch.empty(16, dtype=torch.bool)
k = ps._scores.warmup(f32, f32, f32, 4, 7, 256, 256, D=128, BD=128, BM=ps.BM, BN=ps.BN, BK=ps.BK,
                      PRECISION=ps.PRECISION, num_warps=ps.WARPS, grid=(1,))
open(sys.argv[1], "wb").write(k.asm["cubin"])
k = bs._select.warmup(f32, i32, b8, i32, i32, 1, 1, 1, 28, 512, 512, 52, 1, 1, 128, 128, 65536, 0, 0, bs.FEW,
                      CAUSAL=True, W=512, num_warps=bs._warps(512), grid=(1,))
open(sys.argv[2], "wb").write(k.asm["cubin"])
"""


ANTIDIAGONAL_BUILD = r"""
from vidsparse.attention.kernels import antidiagonal as ad

s, d = int(sys.argv[1]), int(sys.argv[2])
(bn, warps, stages), dk = ad.fitting_launches(s, d)[0], ad.launch_defaults(s, d)[2]
x = torch.empty(1, 4, 2048, d, dtype=torch.bfloat16)
(qa, _), (ka, _) = ad._strided_rows(x, s, 128, dk), ad._strided_rows(x, s, bn, dk)
f, i = torch.empty(16), torch.empty(16, dtype=torch.int32)
k = ad._antidiagonal_mass.warmup(qa, ka, f, f, i, f, *([1] * 14), 0, 4, 1, 2048, 2048, 2048 // s, 2048 // s, 16,
                                 2048 // s, 0, 0.1, 4, 2, 4, S=s, D=d, QR=128 // s, KC=128 // s, BM=128, BN=bn, KBT=16,
                                 CAUSAL=True, PRECISION="tf32", NUM_STAGES=stages, TMA=True, SPLITS=4, DK=dk, I64=False,
                                 num_warps=warps, grid=(1,))
open(sys.argv[3], "wb").write(k.asm["cubin"])
print(json.dumps({"shared": k.metadata.shared, "warps": warps}))
"""


@pytest.mark.parametrize("stride,d", [(8, 128), (16, 128), (8, 64)])
def test_antidiagonal_kernel_builds_at_its_defaults(tmp_path, stride, d):
    """xattention's block-mass kernel at its default launch (TMA boxes, 3 stages) builds for sm_90 on the tensor cores
    without local memory; at strides up to 8 its 4-warp program takes at most half an SM's registers (255 each at
    most) and shared memory (at most 113 KB), so that two programs run on each SM."""
    cubin = tmp_path / "k.cubin"
    info = json.loads(build(tmp_path / "cache", ANTIDIAGONAL_BUILD, stride, d, cubin).strip().splitlines()[-1])
    sass, usage = dump(cubin, "-sass"), dump(cubin, "--dump-resource-usage")
    assert "HGMMA" in sass and "LOCAL:0" in usage, usage
    assert info["shared"] <= 227 * 1024
    if stride <= 8:
        assert info["warps"] == 4 and info["shared"] <= 113 * 1024, info


def test_estimation_kernels_build_for_sm90(tmp_path):
    """The pooled-score product runs on the tensor cores (HGMMA: TF32×3, not FFMA as cuBLAS runs torch's fp32 GEMM)
    and the selection kernel, with its int64 rounds for rows that pick few blocks, builds without local memory."""
    scores, select = tmp_path / "scores.cubin", tmp_path / "select.cubin"
    build(tmp_path / "cache", ESTIMATION_BUILD, scores, select)
    sass = dump(scores, "-sass")
    assert "HGMMA" in sass and "FFMA" not in sass
    usage = dump(select, "--dump-resource-usage")
    assert "LOCAL:0" in usage, usage


ROW_MASS_BUILD = r"""
from vidsparse.attention.kernels import row_mass as rm

# 64 probe rows with diagonals (vertical_slash) and 128 rows without (token_sparse, pbs) in the transposed pass and
# in the rows-major one, 16K keys, 28 heads over 4, bf16
k = torch.zeros(1, 4, 16384, 128, dtype=torch.bfloat16)
for r, first, mode in ((64, 16320, "keys"), (128, None, "keys"), (128, None, "rows")):
    os.environ["VIDSPARSE_COL_MASS"] = mode
    rm.column_mass(torch.zeros(1, 28, r, 128, dtype=torch.bfloat16), k, torch.arange(16384 - r, 16384),
                   diagonal_first=first)
for name in ("_row_stats", "_row_mass", "_col_mass"):
    for i, kern in enumerate(getattr(rm, name).device_caches[0][0].values()):
        open(f"{sys.argv[1]}/{name}{i}.cubin", "wb").write(kern.asm["cubin"])
"""


def test_probe_row_passes_build_for_sm90_without_spills(tmp_path):
    """The probe rows' two passes (``kernels.row_mass``) build for sm_90 at their launches for vertical_slash (64 rows
    with the diagonals' skew) and token_sparse / pbs (128 rows in two chunks, atomic columns: the transposed column
    pass and the rows-major one): the products on the tensor cores and nothing in local
    memory."""
    build(tmp_path / "cache", ROW_MASS_BUILD, tmp_path)
    cubins = sorted(tmp_path.glob("*.cubin"))
    assert len([c for c in cubins if c.name.startswith("_row_mass")]) >= 2, cubins  # with and without diagonals
    assert any(c.name.startswith("_row_stats") for c in cubins), cubins
    assert any(c.name.startswith("_col_mass") for c in cubins), cubins
    for cubin in cubins:
        usage = dump(cubin, "--dump-resource-usage")
        assert "LOCAL:0" in usage and "STACK:0" in usage, (cubin.name, usage)
        assert "HMMA" in dump(cubin, "-sass") or "HGMMA" in dump(cubin, "-sass")


TOKEN_SELECT_BUILD = r"""
from vidsparse.attention.kernels import token_select as ts

for n in (ts.RESIDENT, 131072):  # the longest row searched in registers, and a longer one read in chunks
    ts.drop_light(torch.zeros(1, 4, n), 0.05, 4, n - 128)
for i, k in enumerate(ts._drop_light.device_caches[0][0].values()):
    open(f"{sys.argv[1]}/{i}.cubin", "wb").write(k.asm["cubin"])
"""


def test_token_selection_builds_for_sm90_without_spills(tmp_path):
    """``token_sparse``'s selection kernel at its two default launches (the longest row it keeps in registers across
    the search's 31 steps, and a longer row read in chunks) builds for sm_90 with nothing spilled to the stack or to
    local memory."""
    build(tmp_path / "cache", TOKEN_SELECT_BUILD, tmp_path)
    cubins = sorted(tmp_path.glob("*.cubin"))
    assert len(cubins) == 2
    for cubin in cubins:
        usage = dump(cubin, "--dump-resource-usage")
        assert "STACK:0" in usage and "LOCAL:0" in usage, usage


VS_LAYOUT_BUILD = r"""
from vidsparse.attention.kernels import vs_layout as vs

# a row in registers on 8 warps, and rows in chunks; 128 and 1,024 key blocks per layout row. (A 32K row in registers
# on 16 warps spills, and was faster so: ``kernels/vs_layout.py``.)
for n in (16384, 131072):
    vs.vertical_slash_layout(torch.zeros(1, 4, n), torch.zeros(1, 4, n), 1000, 6096, 30, 100, 128, 128, n, n, True)
for f in (vs._lines, vs._rows):
    for i, k in enumerate(f.device_caches[0][0].values()):
        open(f"{sys.argv[1]}/{f.__name__}{i}.cubin", "wb").write(k.asm["cubin"])
"""


def test_vertical_slash_layout_builds_for_sm90_without_spills(tmp_path):
    """``vertical_slash``'s line selection (a row in registers and a row in chunks) and layout-row kernels at their
    default launches build for sm_90 with nothing spilled."""
    build(tmp_path / "cache", VS_LAYOUT_BUILD, tmp_path)
    cubins = sorted(tmp_path.glob("*.cubin"))
    assert [c.name for c in cubins] == ["_lines0.cubin", "_lines1.cubin", "_rows0.cubin", "_rows1.cubin"]
    for cubin in cubins:
        usage = dump(cubin, "--dump-resource-usage")
        assert "STACK:0" in usage and "LOCAL:0" in usage, usage


SHARED_ROWS_BUILD = r"""
from vidsparse.attention.kernels import block_select as bs

nb = 128  # 16K tokens in 128-token blocks: 8 rows per program
s = torch.zeros(1, 4, nb, nb)
bs.select_levels(s, torch.zeros(nb, 4, dtype=torch.int32), (8, 8, 8, 8), 1, 1, 128, 128, 128 * nb, 128 * nb, True)
bs.select_mass(s, 0.9, 1, 1, 128, 128, 128 * nb, 128 * nb, True)
bs.select_mass(s, 0.9, 0, 0, 128, 128, 128 * nb, 128 * nb, False, extra=torch.zeros(nb, nb, dtype=torch.bool),
               first=torch.zeros(1, 2, dtype=torch.int32))  # pbs's
for f in (bs._levels_rows, bs._select_mass_rows):
    for i, k in enumerate(f.device_caches[0][0].values()):
        open(f"{sys.argv[1]}/{f.__name__}{i}.cubin", "wb").write(k.asm["cubin"])
"""


def test_shared_row_selections_build_for_sm90_without_spills(tmp_path):
    """The mass (also with pbs's extra forced blocks) and pyramid-level selections with 8 rows of 128 blocks per
    program (their launch at 16K tokens) build for sm_90 with nothing spilled."""
    build(tmp_path / "cache", SHARED_ROWS_BUILD, tmp_path)
    cubins = sorted(tmp_path.glob("*.cubin"))
    assert [c.name for c in cubins] == ["_levels_rows0.cubin", "_select_mass_rows0.cubin", "_select_mass_rows1.cubin"]
    for cubin in cubins:
        usage = dump(cubin, "--dump-resource-usage")
        assert "STACK:0" in usage and "LOCAL:0" in usage, usage


POOLED_TOPK_BUILD = r"""
from vidsparse.attention.kernels import pooled_topk as pt

# 128 and 64 key blocks of 128 tokens; 8 blocks a row (rounds of max-reductions) and 40 (the counting search); the
# selection launched dependent on the key pooling, as on Hopper
for n, hk, width in ((16384, 4, 8), (16384, 28, 8), (8192, 4, 8), (16384, 4, 40)):
    nb = n // 128
    q, k = torch.zeros(1, 28, n, 128, dtype=torch.bfloat16), torch.zeros(1, hk, n, 128, dtype=torch.bfloat16)
    pt.pooled_topk(q, k, torch.full((nb,), width, dtype=torch.int32), width, 1, 1, 128, 128, True, 8, 8, pdl=True)
for name in ("_pooled_topk", "_pool_keys"):
    for i, k in enumerate(getattr(pt, name).device_caches[0][0].values()):
        open(f"{sys.argv[1]}/{name}{i}.cubin", "wb").write(k.asm["cubin"])
        open(f"{sys.argv[1]}/{name}{i}.ptx", "w").write(k.asm["ptx"])
"""


def test_pooled_topk_builds_for_sm90_with_tf32x3_and_no_spills(tmp_path):
    """``block_topk``'s fused estimate at its 16K and 8K launches (bf16; both selections) builds for sm_90: the product
    on the tensor cores in TF32 (×3, as ``pooled_scores``), nothing in local memory, and at most the 8 stack bytes
    of the 28/28-head build that ``kernels/pooled_topk.py`` measured faster than a build without them. Launched
    dependent on the key pooling, it waits for that kernel (``griddepcontrol.wait``), which lets it start at once
    (``griddepcontrol.launch_dependents``) and spills nothing either."""
    build(tmp_path / "cache", POOLED_TOPK_BUILD, tmp_path)
    cubins = sorted(tmp_path.glob("_pooled_topk*.cubin"))
    assert len(cubins) >= 3  # two widths, two selections (and Triton specialises on the heads' divisibility)
    for cubin in cubins:
        assert ".F32.TF32" in dump(cubin, "-sass")  # HMMA from registers (the pooled queries never hit memory)
        usage = dump(cubin, "--dump-resource-usage")
        assert "LOCAL:0" in usage and int(re.search(r"STACK:(\d+)", usage).group(1)) <= 8, usage
        assert "griddepcontrol.wait" in cubin.with_suffix(".ptx").read_text()
    keys = sorted(tmp_path.glob("_pool_keys*.cubin"))
    assert keys
    for cubin in keys:
        usage = dump(cubin, "--dump-resource-usage")
        assert "STACK:0" in usage and "LOCAL:0" in usage, usage
        assert "griddepcontrol.launch_dependents" in cubin.with_suffix(".ptx").read_text()


def test_row_copies_and_phase_masses_build_for_sm90(tmp_path):
    """The row gather in its three index modes (own head, head map, flattened planes), the row scatter in its two, the
    gathered rows' block means, pbs's segment sort, the q/k/v gather of a token layout, and grid's one-pass phase
    masses (the statistics kernel with two strides) and its merge and stride choice with two strides and with one
    compile for sm_90 and launch through their wrappers. (Their numerics: the interpreter tests in
    test_attention.py and the GPU tests.)"""
    got = json.loads(build(tmp_path / "cache", LAUNCH, "row_copies,phase_mass,phase_share").strip().splitlines()[-1])
    assert [k[0] for k in got["row_copies"]] == (["_rows"] * 3 + ["_scatter"] * 2
                                                 + ["_pool_rows", "_segment_sort", "_rows_qkv"]), got
    assert [k[0] for k in got["phase_mass"]] == ["_row_stats"], got
    assert [k[0] for k in got["phase_share"]] == ["_row_stats", "_phase_share"] * 2, got
