"""Every ```python block in the README and docs/ runs, in order, as the reader would run it."""

from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def test_there_are_examples_to_run():
    assert sum(len(BLOCK.findall(d.read_text(encoding="utf-8"))) for d in DOCUMENTS) >= 10


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_python_examples_run(document: Path):
    blocks = BLOCK.findall(document.read_text(encoding="utf-8"))
    namespace: dict = {"__name__": "__docs__"}
    previous = Path.cwd()
    os.chdir(ROOT)  # examples are written to run from the repository root
    try:
        for number, code in enumerate(blocks, start=1):
            with contextlib.redirect_stdout(io.StringIO()):
                try:
                    exec(compile(code, f"{document.name}[block {number}]", "exec"), namespace)
                except Exception as error:
                    pytest.fail(f"{document.name}, python block {number} fails: {error!r}")
    finally:
        os.chdir(previous)
