"""Population methods and noise search across 2 gloo ranks (torchrun): bit-identical to one process; only rewards /
log-weights / indices (and the states of particles that change rank) travel; a failing rank raises everywhere."""

from tests.distributed.launch import torchrun


def test_particles_and_noise_search_split_across_two_ranks_equal_single_process():
    out = torchrun("particles_worker.py", timeout=300)
    for rank in (0, 1):
        for check in ("fk", "fk-diff-everystep", "fk-reference", "bytes", "fkc", "bon", "lookahead",
                      "noise-search-cmaes", "noise-search-spsa", "failure"):
            assert f"CHECK rank{rank} {check} ok" in out, out[-3000:]
