"""Checks gradkit.distributed.Comm on 2 gloo ranks; prints 'CHECK <name> ok' lines, exits non-zero on failure."""

import sys
import time

import torch
import torch.distributed as dist

from gradkit.distributed import Comm, DistributedError


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    comm = Comm(timeout=3.0)
    assert comm.world == 2 and comm.rank == rank

    # 1. Scalars of 5 directions split 3/2 come back in order on every rank.
    got = comm.gather_scalars(lambda: torch.tensor([float(i) for i in comm.split(5)]), 5)
    assert got.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0], got
    assert comm.bytes_sent == 8 * 4  # one packet of (1 flag + 3 slots) float64 to the one peer
    print(f"CHECK rank{rank} gather ok", flush=True)

    # 2. Ranks that disagree on a seed are refused on every rank.
    try:
        comm.check_same(rank, "seed")
        raise AssertionError("check_same accepted different seeds")
    except ValueError as exc:
        assert "seed" in str(exc)
    print(f"CHECK rank{rank} check_same ok", flush=True)

    # 3. A closure raising on rank 1 makes every rank raise, naming rank 1 and its error.
    def compute():
        if rank == 1:
            raise KeyError("boom on purpose")
        return torch.zeros(len(comm.split(4)))

    try:
        comm.gather_scalars(compute, 4)
        raise AssertionError("no error raised")
    except DistributedError as exc:
        assert "rank(s) [1]" in str(exc) and "boom on purpose" in str(exc), str(exc)
    print(f"CHECK rank{rank} failure ok", flush=True)

    # 4. A rank that stops answering: the other raises within the timeout instead of hanging.
    if rank == 1:
        time.sleep(8.0)
        print("CHECK rank1 sleeper ok", flush=True)
    else:
        t0 = time.perf_counter()
        try:
            comm.gather_scalars(lambda: torch.zeros(1), 2)
            raise AssertionError("no timeout")
        except DistributedError as exc:
            elapsed = time.perf_counter() - t0
            assert elapsed < 3.0 + 3.0, elapsed
            assert "timed out" in str(exc) or "failed" in str(exc), str(exc)
        print(f"CHECK rank0 timeout ok {elapsed:.1f}s", flush=True)
    sys.stdout.flush()
    # The process group is unusable after a timeout: leave without a collective shutdown.
    import os

    os._exit(0)


if __name__ == "__main__":
    main()
