"""Worker of ``gradkit bench distributed`` (run under torchrun); prints ``RESULT {json}`` lines on rank 0."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import gradkit as gk
from gradkit.distributed import Comm
from gradkit.models import mlp


def _width(params: int) -> int:
    # mlp((64, w, w, 10)) has w² + 76·w + 10 + … ≈ params parameters.
    return max(4, int((-76 + math.sqrt(76 * 76 + 4 * params)) / 2))


def _time(step, n: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    """One rank of ``gradkit bench distributed`` (launched by torchrun; reads its settings from the environment).

    Args:
    """
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1e4,1e5")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--population", type=int, default=8)
    args = ap.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 64, generator=gen), torch.randint(0, 10, (64,), generator=gen)

    for size in [int(float(s)) for s in args.sizes.split(",")]:
        w = _width(size)
        for method in ("ES", "SPSA", "DDP"):
            model = mlp((64, w, w, 10), seed=0)
            n_params = sum(p.numel() for p in model.parameters())
            if method == "DDP":
                counted = {"bytes": 0}
                ddp = DistributedDataParallel(model)

                def hook(state, bucket):
                    buf = bucket.buffer()
                    # Ring all-reduce: each rank sends 2·(W−1)/W of the buffer.
                    state["bytes"] += buf.numel() * buf.element_size() * 2 * (world - 1) / world
                    fut = dist.all_reduce(buf.div_(world), async_op=True).get_future()
                    return fut.then(lambda f: f.value()[0])

                ddp.register_comm_hook(counted, hook)
                opt = gk.optim.AdamW(ddp.parameters(), kernel="foreach")
                part = slice(rank * 64 // world, (rank + 1) * 64 // world)

                def step():
                    opt.zero_grad()
                    F.cross_entropy(ddp(x[part]), y[part]).backward()
                    opt.step()

                ms = _time(step, args.steps)
                sent = counted["bytes"] / (args.steps + 1)
            else:
                comm = Comm()
                if method == "ES":
                    src = gk.sources.ES(model, sigma=1e-2, population=args.population, seed=0, comm=comm)
                else:
                    src = gk.sources.SPSA(model, eps=1e-3, n_directions=args.population // 2, seed=0, comm=comm)
                pipe = gk.Pipeline(src, optimizer=gk.optim.AdamW(model.parameters(), kernel="foreach"))
                setup_bytes = comm.bytes_sent  # the one-off seed check is not per-step traffic

                def step():
                    pipe.step(lambda: F.cross_entropy(model(x), y))

                ms = _time(step, args.steps)
                sent = (comm.bytes_sent - setup_bytes) / (args.steps + 1)
            if rank == 0:
                print("RESULT " + json.dumps({"method": method, "params": n_params, "ms": ms, "bytes": sent}),
                      flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
