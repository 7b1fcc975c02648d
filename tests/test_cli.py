import subprocess
import sys

import pytest

from gradkit.cli import main, methods


def test_list_prints_every_method_with_paper(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for _stage, name, paper in methods():
        assert name in out and paper in out
    assert "Symbolic Discovery of Optimization Algorithms" in out


def test_python_dash_m_entry_point():
    res = subprocess.run([sys.executable, "-m", "gradkit", "--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "gradkit" in res.stdout


def test_demo_quick_runs_and_writes_outputs(tmp_path, capsys):
    pytest.importorskip("sklearn")
    assert main(["demo", "--quick", "--only", "AdamW", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out
    table = (tmp_path / "demo.md").read_text()
    acc = float(table.splitlines()[2].split("|")[2])
    assert acc > 0.9, table
    assert (tmp_path / "demo.png").stat().st_size > 10_000
