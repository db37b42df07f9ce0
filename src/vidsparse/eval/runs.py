"""Run directories: one per configuration, ``{bench}__{model with / as --}__{recipe}__{budget}/`` holding
``config.yaml``, ``predictions.jsonl`` and, once finished, ``metrics.json``.

A finished run (``metrics.json`` present) is skipped. An interrupted run resumes: every prediction is one JSON line
appended and fsynced, a torn last line (the process died mid-write) is dropped on reading, and samples already
predicted are not run again — nothing lost, nothing duplicated."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..moments import write_json


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "-", text.replace("/", "--")).strip("-") or "none"


def run_dir(out: str, bench: str, model: str, recipe_name: str, budget: int) -> Path:
    return Path(out) / f"{slug(bench)}__{slug(model)}__{slug(recipe_name)}__{budget}"


class Run:
    def __init__(self, path: Path, config: dict):
        self.path = path
        self.config = config
        self.pred_path = path / "predictions.jsonl"
        self.metrics_path = path / "metrics.json"

    def _ensure(self) -> None:
        """Create the directory and config.yaml with the first result, so a run that fails at once leaves nothing."""
        cfg_path = self.path / "config.yaml"
        if not cfg_path.exists():
            import yaml

            from ..moments import write_atomic

            self.path.mkdir(parents=True, exist_ok=True)
            write_atomic(str(cfg_path), lambda p: Path(p).write_text(yaml.safe_dump(self.config, sort_keys=False)))

    @property
    def finished(self) -> bool:
        return self.metrics_path.is_file()

    def done(self) -> dict[str, dict]:
        """Predictions already written, by sample id (a torn last line is ignored and cut off)."""
        out: dict[str, dict] = {}
        if not self.pred_path.exists():
            return out
        good = 0
        with open(self.pred_path, "rb") as fh:
            data = fh.read()
        for line in data.split(b"\n"):
            if not line.strip():
                good += len(line) + 1
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break  # torn write: everything after it is discarded
            out[str(row["id"])] = row
            good += len(line) + 1
        if good < len(data):
            with open(self.pred_path, "r+b") as fh:
                fh.truncate(min(good, len(data)))
        return out

    def append(self, row: dict) -> None:
        self._ensure()
        line = (json.dumps(row, sort_keys=True) + "\n").encode()
        fd = os.open(self.pred_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def finish(self, metrics: dict) -> None:
        self._ensure()
        write_json(str(self.metrics_path), metrics)
