"""The README's Python example runs as written and says what it claims."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_library_in_ten_lines_runs():
    text = README.read_text()
    code = re.search(r"## The library in ten lines\n\n```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    eng = scope["eng"]
    assert (eng.m, eng.n) == (4097, 4097)  # 4,096 + 2 inserted − 1 deleted
    assert eng.pending == 0 and eng.n_flushes == 1
