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


def update_markdown(section: str, body: str) -> None:
    """Replace (or append) the ``## section`` of BENCHMARKS.md with ``body``."""
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n\nTables are written by the scripts in `benchmarks/`; each names its device and date.\n"
    header = f"## {section}"
    block = f"{header}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(header)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(block + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + block
    BENCHMARKS_MD.write_text(text)


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
