"""Shared helpers for benchmark scripts: device/library facts, JSON results, BENCHMARKS.md sections."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
BENCHMARKS_MD = ROOT.parent / "BENCHMARKS.md"


def device_name() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores)"


def versions(*names: str) -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = None
    return out


def save(name: str, payload: dict) -> Path:
    """Write ``results/<device slug>/<name>.json`` and return its path."""
    slug = re.sub(r"[^a-z0-9]+", "-", payload["device"].lower()).strip("-")[:60]
    path = RESULTS / slug / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def new_payload(name: str, command: str, **facts) -> dict:
    """A results payload: the benchmark's name, today's date, the device, torch/triton/vidsparse versions, bf16,
    ``facts``, the command that reproduces it and an empty list of rows."""
    return {"benchmark": name, "date": today(), "device": device_name(),
            "versions": versions("torch", "triton", "vidsparse"), "dtype": "bfloat16", **facts, "command": command,
            "rows": []}


def update_markdown(section: str, body: str) -> None:
    """Replace (or append) the ``## section`` of BENCHMARKS.md with ``body``."""
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n\nTables are written by the scripts in `benchmarks/`; each names its device and date.\n"
    header = f"## {section}"
    block = f"{header}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(header)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(block + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    BENCHMARKS_MD.write_text(text.rstrip("\n") + "\n")  # the last section rewritten: no blank line at the end


def markdown_args(ap, name: str) -> None:
    """``--markdown-from`` (a saved ``name``.json) and ``--note`` for a script whose section can be rewritten."""
    ap.add_argument("--markdown-from", default="", help=f"a saved {name}.json: rewrite its table only")
    ap.add_argument("--note", default="", help="with --markdown-from: a paragraph added to the section (saved into the "
                    "results file)")


def rewrite_markdown(args, write) -> bool:
    """With ``--markdown-from``: ``write`` the section from the saved results; returns whether it did. ``--note``
    replaces their note and is saved into the results file, so that a later rewrite without it keeps it."""
    if not args.markdown_from:
        return False
    path = Path(args.markdown_from)
    p = json.loads(path.read_text())
    if args.note:
        p["note"] = args.note
        path.write_text(json.dumps(p, indent=1) + "\n")
    write(p)
    return True


def run_rows(name: str, payload: dict, cases, run, write) -> None:
    """``payload["rows"]`` gets ``run(case, monitor)`` for each case (clocks sampled by a ``GpuMonitor``), saved as
    ``name`` after each so that partial results survive a time limit; then the seconds taken, the final save and
    ``write(payload)``."""
    import time

    import torch

    t0 = time.time()
    monitor = GpuMonitor()
    try:
        for case in cases:
            payload["rows"].append(run(case, monitor))
            torch.cuda.empty_cache()
            save(name, payload)
    finally:
        monitor.close()
    payload["seconds"] = time.time() - t0
    print(f"wrote {save(name, payload)}")
    write(payload)


def kernel_times(fn, calls: int = 3) -> list[dict]:
    """The GPU kernels ``fn`` launches, by torch.profiler over ``calls`` calls: [{kernel, ms_per_call,
    count_per_call}], largest first."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if us > 0:
            rows.append({"kernel": ev.key[:140], "ms_per_call": us / 1000 / calls, "count_per_call": ev.count / calls})
    return sorted(rows, key=lambda r: -r["ms_per_call"])


def host_us(fn, calls: int = 20, batches: int = 1) -> float:
    """The host's µs per call of ``fn`` (Python and launch time): ``calls`` calls issued back to back from an idle
    GPU (nothing waits for it while they are issued), the median over ``batches`` such runs."""
    import statistics
    import time

    import torch

    times = []
    for _ in range(batches):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)


def load_copy(path: str, name: str):
    """Another copy of one of vidsparse's modules (an earlier commit's, from ``git show REV:src/... > FILE``) loaded
    as ``name`` inside the package the name gives, so that its relative imports resolve: for in-process A/Bs."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def swapped(module, name, replacement, fn):
    """``fn`` with ``module.name`` replaced by ``replacement`` while it runs: an A/B of one step inside a call in the
    same process (the call must look the name up in ``module`` at each call)."""
    original = getattr(module, name)

    def run():
        setattr(module, name, replacement)
        try:
            return fn()
        finally:
            setattr(module, name, original)
    return run


def ms_cell(x: dict) -> str:
    """A timing's table cell: ms, and the SM clock while it ran where sampled."""
    return f"{x['ms']:.3f}" + (f" ({x['sm_mhz']:.0f} MHz)" if "sm_mhz" in x else "")


def gpu_cell(x: dict) -> str:
    """A timing's CUDA-graph replay in ms ("-" where the call could not be captured)."""
    return "-" if x.get("graph_ms") is None else f"{x['graph_ms']:.3f}"


def today() -> str:
    return _dt.date.today().isoformat()


def cuda_sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_empty() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class GpuMonitor:
    """SM clock, power draw and temperature of CUDA device 0, sampled through NVML (the driver's
    ``libnvidia-ml.so.1``, called with ctypes: no extra package) by a background thread every ``interval_s``.

    Under sustained tensor-core load an H100 runs into its power cap and lowers the SM clock, so a kernel's time
    depends on what ran before it; ``interleaved`` tells from ``samples`` at which clock each measurement ran. ``ok``
    is False where NVML is missing (no NVIDIA driver): nothing is sampled then."""

    THROTTLE = {0x4: "sw_power_cap", 0x8: "hw_slowdown", 0x20: "sw_thermal", 0x40: "hw_thermal",
                0x80: "hw_power_brake"}

    def __init__(self, interval_s: float = 0.05):
        import ctypes
        import threading
        import time

        self.samples: list[tuple[float, int, float, int, int]] = []  # (monotonic s, MHz, W, °C, throttle reasons)
        self.ok = False
        try:
            nvml = ctypes.CDLL("libnvidia-ml.so.1")
            if nvml.nvmlInit_v2() != 0:
                return
            handle = ctypes.c_void_p()
            if nvml.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(handle)) != 0:
                return
            get_clock, get_power = nvml.nvmlDeviceGetClockInfo, nvml.nvmlDeviceGetPowerUsage
            get_temp = nvml.nvmlDeviceGetTemperature
            get_reasons = getattr(nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
                nvml.nvmlDeviceGetCurrentClocksThrottleReasons
        except (OSError, AttributeError):
            return
        self.ok = True
        self._stop = threading.Event()

        def sample():
            clock, power, temp, reasons = ctypes.c_uint(), ctypes.c_uint(), ctypes.c_uint(), ctypes.c_ulonglong()
            while not self._stop.is_set():
                get_clock(handle, 1, ctypes.byref(clock))  # NVML_CLOCK_SM
                get_power(handle, ctypes.byref(power))  # milliwatts
                get_temp(handle, 0, ctypes.byref(temp))  # NVML_TEMPERATURE_GPU
                get_reasons(handle, ctypes.byref(reasons))
                self.samples.append((time.monotonic(), clock.value, power.value / 1000, temp.value, reasons.value))
                self._stop.wait(interval_s)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self.ok:
            self._stop.set()
            self._thread.join()


def summarize_samples(samples, names: dict) -> dict:
    """Median SM clock and power, highest temperature and the throttle reasons seen in (time, MHz, W, °C, reasons)
    samples; {} for none."""
    import statistics

    if not samples:
        return {}
    reasons = 0
    for s in samples:
        reasons |= s[4]
    return {"sm_mhz": statistics.median(s[1] for s in samples),
            "power_w": round(statistics.median(s[2] for s in samples), 1), "temp_c": max(s[3] for s in samples),
            "throttle": [v for k, v in names.items() if reasons & k], "samples": len(samples)}


def interleaved(fns: dict, timer, rounds: int = 3, monitor: GpuMonitor | None = None) -> dict:
    """Time each of ``fns`` (name -> callable) ``rounds`` times, alternating between them (A B C A B C ...), so that
    each sees the same drift in clock and temperature; ``timer(fn)`` returns one measurement in ms. Returns
    name -> {"ms": median of the rounds, "rounds": [...]} plus, with a working ``monitor``, the clock and power
    during that callable's own measurements. Each callable is called once before the first round, so that its
    first-call work (a kernel variant's JIT compile, autotuning, caches) lies outside the spans its samples come from:
    the timer warms up alike, but the GPU idles through a compile, and its samples read as the callable's (the
    attention table's pyramid and pbs rows, the first calls of their kernels in the process, read 120 W at 1,980 MHz
    while they ran at the power cap)."""
    import statistics
    import time

    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    spans = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.monotonic()
            times[name].append(timer(fn))
            spans[name].append((t0, time.monotonic()))
    out = {}
    for name in fns:
        out[name] = {"ms": statistics.median(times[name]), "rounds": times[name]}
        if monitor is not None and monitor.ok:
            samples = [s for s in list(monitor.samples) if any(a <= s[0] <= b for a, b in spans[name])]
            out[name].update(summarize_samples(samples, GpuMonitor.THROTTLE))
    return out
