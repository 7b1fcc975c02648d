import pytest
import torch

import gradkit as gk
from tests.distributed.launch import torchrun


def test_minimize_distributed_on_two_ranks_equals_single_process():
    out = torchrun("search_worker.py", timeout=240)
    for rank in (0, 1):
        for check in ("cmaes", "sep_cmaes", "snes", "failure"):
            assert f"CHECK rank{rank} {check} ok" in out, out[-3000:]


def test_minimize_distributed_needs_a_seed():
    with pytest.raises(ValueError, match="seed"):
        gk.search.minimize(lambda x: (x**2).sum(1), torch.zeros(3), 1.0, distributed=True)
