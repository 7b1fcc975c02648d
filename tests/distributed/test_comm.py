from tests.distributed.launch import torchrun


def test_comm_gathers_refuses_and_fails_fast_on_two_ranks():
    out = torchrun("comm_worker.py", timeout=120)
    for rank in (0, 1):
        for check in ("gather", "check_same", "failure"):
            assert f"CHECK rank{rank} {check} ok" in out, out[-3000:]
    assert "CHECK rank0 timeout ok" in out, out[-3000:]


def test_comm_single_process_is_a_no_op():
    import torch

    from gradkit.distributed import Comm

    comm = Comm()
    assert (comm.rank, comm.world, comm.active) == (0, 1, False)
    assert comm.split(3) == range(3)
    assert comm.gather_scalars(lambda: torch.tensor([1.0, 2.0]), 2).tolist() == [1.0, 2.0]
    assert comm.bytes_sent == 0
