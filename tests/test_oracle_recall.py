"""benchmarks/oracle_recall.py's oracle: each sampled row's mass on its most massive key blocks, against a loop."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import oracle_recall as orc  # noqa: E402


def test_oracle_keeps_each_rows_most_massive_blocks():
    """Rows in the 1st, 3rd and 5th of five 32-token blocks (the last one partial): at 40% of the causal blocks,
    at least 2, each row keeps its 2, 2 and 2 heaviest blocks; at density 1 every row keeps all its mass."""
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 4, 150, 16, generator=g) * 2, torch.randn(1, 2, 150, 16, generator=g) * 2
    rows = torch.tensor([20, 80, 149])
    want = []
    for h in range(4):
        for r in rows.tolist():
            p = torch.softmax(q[0, h, r] @ k[0, h // 2, : r + 1].T / math.sqrt(16), -1)
            mass = torch.stack([p[j: j + 32].sum() for j in range(0, r + 1, 32)])
            count = max(2, math.ceil((r // 32 + 1) * 0.4))
            want.append(float(mass.sort(descending=True).values[:count].sum()))
    assert abs(orc.oracle(q, k, rows, 0.4, block=32) - sum(want) / len(want)) < 1e-6
    assert abs(orc.oracle(q, k, rows, 1.0, block=32) - 1.0) < 1e-6
