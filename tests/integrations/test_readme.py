"""The README's Integrations examples run as written (tiny models from configs, nothing downloaded)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def section_code(title: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], flags=re.S)


def test_integrations_examples_run(tmp_path, monkeypatch):
    pytest.importorskip("lightning.pytorch", reason="PyTorch Lightning is not installed (extra gradkit[lightning])")
    pytest.importorskip("transformers", reason="transformers is not installed (extra gradkit[transformers])")
    blocks = section_code("Integrations")
    assert len(blocks) == 3
    monkeypatch.chdir(tmp_path)  # checkpoints and output directories land here
    namespace: dict = {"__name__": "readme"}
    for i, code in enumerate(blocks):  # one session: later blocks reuse earlier names (config, data)
        exec(compile(code, f"README.md:Integrations[{i}]", "exec"), namespace)
    assert (tmp_path / "regressor.ckpt").is_file()
    assert (tmp_path / "mezo-out" / "checkpoint-10" / "optimizer.pt").is_file()
