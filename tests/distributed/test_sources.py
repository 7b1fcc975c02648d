from tests.distributed.launch import torchrun


def test_es_spsa_zosgd_split_across_two_ranks_equal_single_process():
    out = torchrun("sources_worker.py", timeout=240)
    for rank in (0, 1):
        for kind in ("ES", "ES-raw", "SPSA", "ZOSGD"):
            assert f"CHECK rank{rank} {kind} identical ok" in out, out[-3000:]
        for check in ("bytes", "failure", "nonfinite"):
            assert f"CHECK rank{rank} {check} ok" in out, out[-3000:]
