"""Kernel launches that fit the GPU they run on.

The Triton kernels' default launches were measured on Hopper, whose SMs give one program up to 227 KB of shared
memory. An A100 gives 163 KB; the GA10x and Ada cards (RTX 30xx and 40xx, A10, A40, L4, L40S) and Blackwell's
consumer parts give 99 KB. Built for sm_86, the attention kernel's default launch for 128 × 128 blocks at head dim
128 (8 warps, 3 stages) needs 160 KB, and xattention's antidiagonal kernel at stride ≥ 16 (256-column tiles, 8 warps)
104 KB: on those cards their first launch failed (``tests/test_launch_fit.py`` builds them for each target;
``benchmarks/launch_memory.py`` tabulates every kernel's default per GPU generation).

Triton compares a compiled kernel's shared memory with the device's limit before it launches anything and raises
``OutOfResources``. ``launch_fitting`` tries a kernel's launches best first, steps down on that error, and remembers
the first that fits per kernel, device and shape class, so later calls go straight to it.

The kernels need compute capability 8.0 or newer (Ampere): bf16 and TF32 tensor-core products, and on Turing
(64 KB) the attention kernel's 128 × 128 tiles alone do not fit. They need Triton 3.4 or newer: the TMA paths that
Hopper takes by default import ``triton.tools.tensor_descriptor``, which Triton 3.3 lacks. With 3.4 and 3.5, as
with 3.6, the Triton kernels build for the targets of ``tests/test_launch_fit.py`` and ``tests/test_hopper_compile.py``
and ``tests/test_attention.py`` passes in the interpreter; the Gluon attention kernel needs 3.6
(``block_sparse_hopper.triton_supported``). ``kernel_device`` says whether a tensor's GPU and the installed Triton
qualify; otherwise the "auto" backends take the torch paths."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Sequence

import torch

MIN_CAPABILITY = (8, 0)
MIN_TRITON = (3, 4)
ATTENTION_HEAD_DIMS = (16, 32, 64, 128)  # the attention kernels' head dims; others take the torch path on "auto"

_PICKED: dict = {}  # (kernel, device, key) -> index of the first launch that fit


def env_int(name: str, default: int, minimum: int = 1, pow2: bool = False) -> int:
    """A whole-number tuning knob of the kernels from the environment (read at each call), else ``default``: an
    ``InputError`` naming the variable for anything but a whole number ≥ ``minimum`` (and a power of two where
    ``pow2``), instead of a ``ValueError`` or a Triton build error deep inside a launch."""
    env = os.environ.get(name, "").strip()
    if not env:
        return default
    try:
        value = int(env)
    except ValueError:
        value = None
    if value is None or value < minimum or (pow2 and value & (value - 1)):
        from ...errors import InputError

        raise InputError(f"{name}={env!r}: expected a whole number ≥ {minimum}" + (", a power of two" if pow2 else "")
                         + f" (or unset: {default})")
    return value


def env_choice(name: str, default: str, choices: Sequence[str]) -> str:
    """A named mode of a kernel path from the environment (read at each call), else ``default``: an ``InputError``
    naming the variable and the choices for anything else."""
    env = os.environ.get(name, "").strip()
    if not env:
        return default
    if env not in choices:
        from ...errors import InputError

        raise InputError(f"{name}={env!r}: expected one of {', '.join(choices)} (or unset: {default})")
    return env


def capability_supported(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability runs the Triton kernels (Ampere or newer)."""
    return tuple(capability) >= MIN_CAPABILITY


def triton_at_least(minimum: tuple[int, int], version: str | None = None) -> bool:
    """Whether the installed Triton (or ``version``, e.g. "3.6.0+git1a2b") is at least ``minimum``; False without
    Triton."""
    if version is None:
        try:
            import triton
        except ImportError:
            return False
        version = triton.__version__
    return _major_minor(version) >= minimum


@functools.cache
def _major_minor(version: str) -> tuple[int, ...]:
    """(major, minor) of a version string, parsed once: the estimation switches ask at every call."""
    return tuple(int(x) for x in re.findall(r"\d+", version)[:2])


_CAPABILITIES: dict = {}


def capability(device) -> tuple[int, int]:
    """``torch.cuda.get_device_capability(device)``, asked once per device: about 5 µs a call on an H200's host, and
    a sparse-attention call asked it four times on its way to the launch (``kernel_device``, ``ops.use_tma``,
    ``block_sparse._hopper_fits``). The function itself is part of the key, so a stand-in (the tests fake old GPUs
    with monkeypatch) is asked in its turn."""
    ask = torch.cuda.get_device_capability
    key = (ask, device)
    cap = _CAPABILITIES.get(key)
    if cap is None:
        cap = _CAPABILITIES[key] = tuple(ask(device))
    return cap


def kernel_device(x: torch.Tensor) -> bool:
    """Whether ``x`` lives on a GPU that runs the Triton kernels: CUDA, compute capability ≥ 8.0, Triton ≥ 3.4."""
    return x.is_cuda and capability_supported(capability(x.device)) and triton_at_least(MIN_TRITON)


def require_kernel_device(x: torch.Tensor) -> None:
    """Raise ``UnsupportedError`` when ``x`` is on a CUDA GPU too old for the kernels, or the installed Triton is
    (a forced "kernel" backend)."""
    if not x.is_cuda or kernel_device(x):
        return
    from ...errors import UnsupportedError

    major, minor = capability(x.device)
    if not capability_supported((major, minor)):
        raise UnsupportedError(f"the Triton kernels need an NVIDIA GPU of compute capability 8.0 or newer; "
                               f"{torch.cuda.get_device_name(x.device)} is {major}.{minor}: use backend 'auto', "
                               "which takes the torch paths there")
    raise UnsupportedError("the Triton kernels need Triton 3.4 or newer (pip install 'triton>=3.4', or a torch that "
                           "brings it), or backend 'auto', which takes the torch paths without it")


def launch_fitting(kernel: str, device: torch.device, key: tuple, configs: Sequence, launch: Callable,
                   instead: str = "the pattern option backend=reference"):
    """``launch(config)`` for the first of ``configs`` (best first) whose shared memory fits ``device``; returns
    what ``launch`` returns. A launch Triton refuses for shared memory launched nothing, so the next is tried; the
    pick is remembered per (``kernel``, device, ``key``). Raises ``UnsupportedError`` when none fits, naming
    ``instead``, the torch path to ask for."""
    from triton.runtime.errors import OutOfResources

    slot = (kernel, device.type, device.index, key)
    start = _PICKED.get(slot, 0)
    refused = None
    for i in range(start, len(configs)):
        try:
            out = launch(configs[i])
        except OutOfResources as exc:
            if exc.name != "shared memory":
                raise
            refused = exc
            continue
        _PICKED[slot] = i
        return out
    from ...errors import UnsupportedError

    raise UnsupportedError(f"{kernel}: no launch fits this GPU's shared memory (the last tried needs "
                           f"{refused.required} bytes, the GPU gives {refused.limit}); use {instead}")


def picked(kernel: str, device: torch.device, key: tuple) -> int | None:
    """Index of the launch ``launch_fitting`` settled on for this kernel, device and key (None before any)."""
    return _PICKED.get((kernel, device.type, device.index, key))


INT32_LIMIT = 2 ** 31  # element offsets from this on need 64-bit arithmetic (a test lowers it to run that path small)


def sm_count(device: torch.device) -> int:
    """The device's streaming multiprocessors (cached per device index); off CUDA (the interpreter, builds for a
    target on a machine without a GPU) an H100's and H200's 132, so launch rules pick what they pick there."""
    if device.type != "cuda":
        return 132
    return _sm_count_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def f32(x: float) -> float:
    """x rounded to float32, as torch rounds a Python scalar that multiplies a float32 tensor: a kernel's scale
    factor that gives the torch path's bits."""
    return float(torch.tensor(x, dtype=torch.float32))


def needs_int64(*tensors: torch.Tensor) -> bool:
    """Whether an element offset into any of ``tensors`` (its last element's, from its strides) can reach 2^31.
    Triton passes strides below 2^31 as int32, so offsets such as row · stride wrap there (28 heads of 600K tokens
    at d = 128, or one late row of a transposed [B, N, H, D] view); kernels that take this as a constexpr build a
    64-bit variant for such inputs and keep 32-bit offset arithmetic for all others."""
    return any(sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()) if n > 0) >= INT32_LIMIT for t in tensors)
