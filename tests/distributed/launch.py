"""Run a worker script under ``torchrun --standalone --nproc_per_node=N`` (gloo, CPU) with a hard timeout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKERS = Path(__file__).parent / "workers"


def torchrun(script: str, *args: str, nproc: int = 2, timeout: float = 240.0) -> str:
    root = Path(__file__).parents[2]
    # this checkout's src first: the workers must test the code under test, not another installed copy
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(root / "src"), str(root)]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--tee=3", str(WORKERS / script), *args]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"torchrun {script} did not finish in {timeout} s (hang): {exc.stdout!r}")
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"torchrun {script} exited {res.returncode}:\n{out[-4000:]}"
    return out
