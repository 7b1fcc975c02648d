import os

import pytest
import torch

from gradkit._kernels import compile_available

# Under pytest-xdist every worker is its own process: one intra-op thread each keeps 2 workers on 2 cores
# from oversubscribing (and keeps reductions deterministic).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_report_header(config):
    ok, why = compile_available()
    return f"gradkit: torch {torch.__version__}; torch.compile {'available' if ok else 'UNAVAILABLE: ' + why}"


@pytest.fixture(params=["loop", "foreach", "compiled"])
def kernel(request):
    """Every kernel path; 'compiled' is skipped, with the reason, where torch.compile cannot run."""
    if request.param == "compiled":
        ok, why = compile_available()
        if not ok:
            pytest.skip(f"torch.compile unavailable: {why}")
    return request.param
