"""The "Guided sampling" example of README.md runs as written (on the tiny test-bed, to stay fast)."""

import functools
import re
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

README = Path(__file__).resolve().parents[2] / "README.md"


def _example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Guided sampling"):]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def test_readme_guided_sampling_example_runs(tmp_path, monkeypatch, capsys):
    from gradkit.guide import testbed

    code = _example()
    assert len(code.strip().splitlines()) <= 14 and "SPSA" in code and "CFG" in code
    monkeypatch.setenv("GRADKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(testbed, "load", functools.partial(testbed.load, "tiny", log=lambda s: None))
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.strip()  # the example prints its result
