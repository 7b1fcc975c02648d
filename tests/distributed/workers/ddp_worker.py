"""Every gradkit optimizer under DistributedDataParallel (gloo, 2 ranks) vs one process on the global batch.

Prints one line per optimizer: ``DDP <name> maxdiff=<vs single process> ranks_equal=<0|1>``, or
``DDP <name> SKIP <reason>``.
"""

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import gradkit as gk
from gradkit.models import mlp


def optimizers():
    return gk.optim.available().items()


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    for name, cls in optimizers():
        model = mlp((8, 16, 4), seed=0)
        single = copy.deepcopy(model)
        start = copy.deepcopy(model)
        ddp = DDP(model)
        kw = {"kernel": "foreach"}
        try:
            opt = cls(ddp.parameters(), **kw)
            ref = cls(single.parameters(), **kw)
        except Exception as exc:
            print(f"DDP {name} SKIP cannot construct from params alone: {exc}", flush=True)
            continue
        if getattr(cls, "needs_graph", False):
            # torch's DDP reducer copies gradients into flat buckets in place, which autograd forbids for the
            # create_graph=True gradients a Hessian-based step differentiates through.
            print(f"DDP {name} UNSUPPORTED DistributedDataParallel cannot reduce create_graph=True gradients",
                  flush=True)
            continue
        gen = torch.Generator().manual_seed(1)
        try:
            for _ in range(12):
                x = torch.randn(16, 8, generator=gen)
                y = torch.randint(0, 4, (16,), generator=gen)
                part = slice(rank * 16 // world, (rank + 1) * 16 // world)
                opt.zero_grad()
                F.cross_entropy(ddp(x[part]), y[part]).backward()
                opt.step()
                ref.zero_grad()
                F.cross_entropy(single(x), y).backward()
                ref.step()
        except Exception as exc:
            print(f"DDP {name} SKIP {type(exc).__name__}: {exc}".splitlines()[0], flush=True)
            continue
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        equal = all(torch.equal(gathered[0], g) for g in gathered)
        diff = max(float((a - b).detach().abs().max()) for a, b in zip(model.parameters(), single.parameters()))
        moved = max(float((a - b).detach().abs().max()) for a, b in zip(model.parameters(), start.parameters()))
        print(f"DDP {name} maxdiff={diff:.3e} ranks_equal={int(equal)} moved={moved:.3e}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
