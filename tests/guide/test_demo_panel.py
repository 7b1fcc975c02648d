"""The guided-sampling panel of ``gradkit demo`` (tiny test-bed: seconds)."""

import pytest

pytest.importorskip("sklearn")


def test_guided_panel_on_the_tiny_testbed(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    from gradkit.demo import guided_panel

    monkeypatch.setenv("GRADKIT_CACHE_DIR", str(tmp_path / "cache"))
    assert guided_panel(tmp_path, quick=True, budget="tiny") == 0
    out = capsys.readouterr().out
    rows = {ln.split("|")[1].strip(): ln.split("|")[4].strip() for ln in out.splitlines() if ln.startswith("| ")}
    assert rows["conditional"] == "32" and rows["CFG w=2"] == "64"  # NFE per sample
    assert rows["CFG w=2 + ink reward (SPSA, 8 directions)"] == "64"  # SPSA calls the reward, never the flow
    assert (tmp_path / "guided.png").stat().st_size > 1000


def test_quick_demo_skips_the_panel_when_the_testbed_is_not_cached(tmp_path, monkeypatch, capsys):
    from gradkit.cli import main

    monkeypatch.setenv("GRADKIT_CACHE_DIR", str(tmp_path / "empty"))
    assert main(["demo", "--quick", "--only", "guided", "--out", str(tmp_path)]) == 0
    assert "skipped" in capsys.readouterr().out
    assert not (tmp_path / "empty").exists()


def test_full_demo_trains_a_demo_sized_flow_when_nothing_is_cached(tmp_path, monkeypatch, capsys):
    """`make demo` on a fresh machine must not train the benchmark's flow (minutes): the demo-sized one instead,
    the benchmark's network with fewer steps (here 20 to keep the test short), cached under its own key."""
    pytest.importorskip("matplotlib")
    from gradkit import demo
    from gradkit.guide import testbed

    monkeypatch.setenv("GRADKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "DEMO_FLOW_STEPS", 20)
    monkeypatch.setattr(testbed, "FULL", {**testbed.FULL, "judge": testbed.TINY["judge"]})  # seconds, not a minute
    assert demo.guided_panel(tmp_path, quick=False) == 0
    assert "demo-sized flow (20 of the benchmark's 6000 steps)" in capsys.readouterr().out
    assert (tmp_path / "guided.png").stat().st_size > 1000
    assert not testbed.is_cached("full")  # the benchmark's flow was not trained
    cached = {p.name.split("-")[1] for p in (tmp_path / "cache").iterdir()}
    assert cached == {"flow", "weak_flow", "guide", "judge", "noisy_guide"}
