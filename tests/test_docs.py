"""The documentation's Python examples run as written."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize("page,expect", [("ask.md", ("vanilla", "fastv", "kivi")),
                                         ("attention.md", ("PyramidLayout", "PermutedLayout", "density"))])
def test_python_blocks_run(page, expect, capsys):
    pytest.importorskip("transformers")
    text = (DOCS / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert blocks
    for code in blocks:
        exec(compile(code, f"{page}", "exec"), {})
    out = capsys.readouterr().out
    assert all(e in out for e in expect)
