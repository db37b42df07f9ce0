"""Building kernels for a GPU on a machine without one: a stand-in Triton driver that names the target and the
shared memory a program may use, and runs build scripts in a fresh interpreter (the test session runs Triton in
interpreter mode, TRITON_INTERPRET=1, under which nothing compiles for a GPU). Triton ships ptxas and cuobjdump.

The stand-in is enough for ``warmup`` builds and for launches: Triton compiles, compares the kernel's shared memory
with ``BUILD_SHARED`` exactly as it does on a GPU (raising ``OutOfResources`` before launching), and the launch
itself only records the kernel's name, shared memory, warps and stages in ``launched``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = r"""
import json, os, sys
import torch, triton
from triton.backends.compiler import GPUTarget

CAP, SHARED = int(os.environ["BUILD_CAP"]), int(os.environ["BUILD_SHARED"])
launched = []


class Launcher:  # built per compiled kernel before Triton's shared-memory check; called for each launch
    def __init__(self, src, metadata):
        self.entry = [src.fn.__name__, metadata.shared, metadata.num_warps, metadata.num_stages]

    def __call__(self, *args, **kwargs):
        launched.append(self.entry)


class Utils:
    def get_device_properties(self, device):
        return {"max_shared_mem": SHARED, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):  # module, function, registers, spills, threads
        return 0, 0, 0, 0, 1024


class Target:
    launcher_cls = Launcher
    utils = Utils()

    def get_current_target(self):
        return GPUTarget("cuda", CAP, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


triton.runtime.driver.set_active(Target())
"""

# After DRIVER: launches the named cases (sys.argv[1], comma-separated) of the kernels through their public wrappers
# on CPU tensors at their default launches; prints {case: [[kernel, shared bytes, warps, stages], ...] or an error}
LAUNCH = r"""
from vidsparse.attention.kernels import antidiagonal as ad, block_select as sel, block_sparse as bs
from vidsparse.attention.kernels import gather as ga, pooled_scores as ps, row_mass as rm, token_select as ts
from vidsparse.attention.kernels import vs_layout as vs
from vidsparse.errors import VidsparseError

bf, i32 = torch.bfloat16 if CAP >= 80 else torch.float16, torch.int32  # Turing has no bf16


def attention(d, pyramid=False, tma=False):
    q, k = torch.zeros(1, 4, 1024, d, dtype=bf), torch.zeros(1, 2, 1024, d, dtype=bf)
    idx, cnt = torch.zeros(1, 4, 8, 8, dtype=i32), torch.ones(1, 4, 8, dtype=i32)
    pooled = (torch.zeros(3, 1, 4, 8, 2, dtype=i32), torch.zeros(3, 1, 4, 8, dtype=i32)) if pyramid else None
    bs.block_sparse_attention(q, k, k, idx, cnt, 128, 128, True, None, pooled=pooled, tma=tma, hopper=False)


def antidiagonal(s):
    q, k = torch.zeros(1, 4, 1024, 128, dtype=bf), torch.zeros(1, 2, 1024, 128, dtype=bf)
    ad.antidiagonal_block_mass(q, k, s, 128, 128, True)


def row_copies():  # the row gather and scatter in each of their index modes (own head, head map, flattened planes)
    x, idx = torch.zeros(2, 2, 300, 128, dtype=bf), torch.zeros(2, 2, 40, dtype=torch.long)
    ga.gather_rows(x, idx)
    ga.gather_rows(x, torch.zeros(1, 4, 40, dtype=torch.long), torch.tensor([0, 0, 1, 1]))
    ga.gather_rows(x, idx[:1], planes=torch.tensor([3, 0]))
    ga.scatter_rows(x, idx, torch.zeros(2, 2, 40, 128, dtype=bf))
    ga.scatter_rows(x, idx[:1], torch.zeros(1, 2, 40, 128, dtype=bf), planes=torch.tensor([3, 0]))
    ga.pool_rows(x, idx, 128)  # pbs's permuted keys' block means
    ga.segment_order(torch.zeros(2, 2, 3000), 1024)  # pbs's permutation
    ga.gather_qkv(x, x, x, idx[:1], torch.tensor([3, 0]), torch.tensor([1, 2]))  # a token layout's q, k, v at once


nkb = 1024  # 128K tokens in 128-token blocks
scores = torch.zeros(1, 1, 4, nkb)
CASES = {
    "attention_d128": lambda: attention(128),
    "attention_d64": lambda: attention(64),
    "attention_d128_tma": lambda: attention(128, tma=True),  # Hopper's default for permuted keys without Gluon
    "pyramid_d128": lambda: attention(128, pyramid=True),
    "antidiagonal_s8": lambda: antidiagonal(8),
    "antidiagonal_s16": lambda: antidiagonal(16),
    "antidiagonal_s32": lambda: antidiagonal(32),
    "scores": lambda: ps.scores(torch.zeros(1, 4, 256, 128), torch.zeros(1, 2, 256, 128)),
    "column_mass": lambda: rm.column_mass(torch.zeros(1, 4, 64, 128, dtype=bf), torch.zeros(1, 2, 4096, 128, dtype=bf),
                                          torch.arange(4032, 4096)),
    "phase_mass": lambda: rm.phase_mass(torch.zeros(1, 4, 64, 128, dtype=bf), torch.zeros(1, 2, 4096, 128, dtype=bf),
                                        torch.arange(4032, 4096), (256, 16)),
    "phase_share": lambda: [rm.phase_share(torch.zeros(1, 4, 64, 128, dtype=bf), torch.zeros(1, 2, 4096, 128, dtype=bf),
                                           torch.arange(4032, 4096), s, tau=0.6) for s in ((256, 16), (256,))],
    "row_copies": row_copies,
    "vs_layout": lambda: [vs.vertical_slash_layout(torch.zeros(1, 4, n), torch.zeros(1, 4, n), 1000, 6096, 30, 100,
                                                   128, 128, n, n, True) for n in (16384, 131072)],
    "drop_light": lambda: [ts.drop_light(torch.zeros(1, 4, n), 0.05, 4, n - 128) for n in (ts.RESIDENT, 131072)],
    "select_blocks": lambda: sel.select_blocks(scores, torch.full((4,), 8), 64, 1, 1, 128, 128, 512, nkb * 128, True),
    "select_mass": lambda: sel.select_mass(scores, 0.9, 1, 1, 128, 128, 512, nkb * 128, True),
    "select_levels": lambda: sel.select_levels(scores, torch.zeros(4, 4, dtype=i32), (8, 8, 8, 8), 1, 1, 128, 128,
                                               512, nkb * 128, True),
}
result = {}
for name in sys.argv[1].split(","):
    launched.clear()
    try:
        CASES[name]()
        result[name] = list(launched)
    except VidsparseError as exc:
        result[name] = {"error": type(exc).__name__, "message": str(exc)}
print(json.dumps(result))
"""

# every case but the TMA one (a Hopper path) and stride 32
ALL = ("attention_d128,attention_d64,pyramid_d128,antidiagonal_s8,antidiagonal_s16,scores,column_mass,select_blocks,"
       "select_mass,select_levels,drop_light,vs_layout")

HOPPER = (90, 227 * 1024)  # compute capability, shared memory per program (bytes)


def tool(name: str) -> str:
    import triton.backends.nvidia as nv

    path = Path(nv.__file__).parent / "bin" / name
    if not path.exists():
        pytest.skip(f"Triton's {name} is not installed")
    return str(path)


def build(cache, script: str, *args, target: tuple[int, int] = HOPPER) -> str:
    """Runs ``DRIVER`` + ``script`` for ``target`` (capability, shared bytes) in a fresh interpreter, compiling into
    the Triton cache ``cache`` -> its stdout."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(cache), BUILD_CAP=str(target[0]), BUILD_SHARED=str(target[1]))
    run = subprocess.run([sys.executable, "-c", DRIVER + script, *map(str, args)], capture_output=True, text=True,
                         env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def dump(cubin, flag: str) -> str:
    """cuobjdump's ``-sass`` or ``--dump-resource-usage`` output for a cubin."""
    return subprocess.run([tool("cuobjdump"), flag, str(cubin)], capture_output=True, text=True, check=True).stdout
