"""minimize(..., distributed=True) on 2 gloo ranks: same result on every rank as one process; failures propagate."""

import os

import torch
import torch.distributed as dist

import gradkit as gk
from gradkit.distributed import DistributedError
from gradkit.search.functions import rosenbrock


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    evaluated = []

    def f(x):
        evaluated.append(len(x))
        return rosenbrock(x)

    for method in ("cmaes", "sep_cmaes", "snes"):
        evaluated.clear()
        split = gk.search.minimize(f, torch.zeros(6, dtype=torch.float64), 0.5, method, budget=600, seed=7,
                                   distributed=True)
        mine = sum(evaluated)
        single = gk.search.minimize(rosenbrock, torch.zeros(6, dtype=torch.float64), 0.5, method, budget=600,
                                    seed=7)
        assert split.nfev == single.nfev and split.fun == single.fun, (method, split.fun, single.fun)
        assert torch.equal(split.x, single.x), method
        assert mine < split.nfev, (mine, split.nfev)  # this rank evaluated only its share
        xs = [torch.empty_like(split.x) for _ in range(2)]
        dist.all_gather(xs, split.x)
        assert torch.equal(xs[0], xs[1])
        print(f"CHECK rank{rank} {method} ok evaluated {mine}/{split.nfev}", flush=True)

    def bad(x):
        if rank == 1:
            raise ZeroDivisionError("simulator crashed")
        return rosenbrock(x)

    try:
        gk.search.minimize(bad, torch.zeros(4, dtype=torch.float64), 0.5, budget=100, seed=1, distributed=True)
        raise AssertionError("no error")
    except DistributedError as exc:
        assert "rank(s) [1]" in str(exc) and "simulator crashed" in str(exc)
    print(f"CHECK rank{rank} failure ok", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
