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
