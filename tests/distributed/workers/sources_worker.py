"""ES, SPSA and ZOSGD split across 2 gloo ranks vs one process with the same seeds and total population.

Prints ``CHECK <name> ok`` lines on every rank; any failed assertion exits non-zero.
"""

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import gradkit as gk
from gradkit.distributed import Comm, DistributedError
from gradkit.models import mlp

STEPS = 6


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def same_on_all_ranks(t):
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return all(torch.equal(out[0], o) for o in out)


def make(kind, model, comm):
    if kind == "ES":
        src = gk.sources.ES(model, sigma=0.05, population=6, seed=3, comm=comm)
    elif kind == "ES-raw":
        src = gk.sources.ES(model, sigma=0.05, population=5, antithetic=False, rank_shaping=False, seed=3, comm=comm)
    elif kind == "SPSA":
        src = gk.sources.SPSA(model, eps=1e-3, n_directions=5, seed=3, comm=comm)
    else:
        zo = gk.sources.ZOSGD(model, lr=1e-2, eps=1e-3, n_directions=3, seed=3, comm=comm)
        return gk.Pipeline(zo, optimizer=zo)
    return gk.Pipeline(src, optimizer=gk.optim.AdamW(model.parameters(), lr=1e-2, kernel="foreach"))


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    comm = Comm(timeout=20.0)

    for kind in ("ES", "ES-raw", "SPSA", "ZOSGD"):
        split, single = mlp((6, 8, 3), seed=1), mlp((6, 8, 3), seed=1)
        pipe_split, pipe_single = make(kind, split, comm), make(kind, single, None)
        for _ in range(STEPS):
            a = pipe_split.step(lambda: F.cross_entropy(split(x), y))
            b = pipe_single.step(lambda: F.cross_entropy(single(x), y))
            assert torch.equal(a, b), (kind, a, b)
        assert same_on_all_ranks(flat(split)), kind
        assert torch.equal(flat(split), flat(single)), (kind, float((flat(split) - flat(single)).abs().max()))
        assert not torch.equal(flat(split), flat(mlp((6, 8, 3), seed=1))), f"{kind} did not move"
        print(f"CHECK rank{rank} {kind} identical ok", flush=True)

    # Bytes on the wire per step do not depend on the model size: only per-direction scalars travel.
    sent = []
    for width in (4, 400):
        model = mlp((6, width, 3), seed=1)
        c = Comm(timeout=20.0)
        pipe = gk.Pipeline(gk.sources.SPSA(model, n_directions=4, seed=0, comm=c),
                           optimizer=gk.optim.AdamW(model.parameters(), kernel="foreach"))
        pipe.step(lambda: F.cross_entropy(model(x), y))
        sent.append(c.bytes_sent)
    assert sent[0] == sent[1] and sent[0] <= 64, sent
    print(f"CHECK rank{rank} bytes ok {sent}", flush=True)

    # A closure raising on rank 1: every rank raises naming rank 1; parameters everywhere unperturbed.
    model = mlp((6, 8, 3), seed=1)
    pipe = make("ES", model, comm)
    before = flat(model)

    def bad():
        if rank == 1:
            raise OSError("disk on fire")
        return F.cross_entropy(model(x), y)

    try:
        pipe.step(bad)
        raise AssertionError("no error")
    except DistributedError as exc:
        assert "rank(s) [1]" in str(exc) and "disk on fire" in str(exc), str(exc)
    assert torch.equal(flat(model), before)
    print(f"CHECK rank{rank} failure ok", flush=True)

    # A NaN loss on one rank: NonFiniteError everywhere, so on_nonfinite="skip" skips on every rank alike.
    model = mlp((6, 8, 3), seed=1)
    pipe = gk.Pipeline(gk.sources.SPSA(model, n_directions=2, seed=0, comm=comm),
                       optimizer=gk.optim.AdamW(model.parameters(), kernel="foreach"), on_nonfinite="skip")
    before = flat(model)
    pipe.step(lambda: F.cross_entropy(model(x), y) * (float("nan") if rank == 0 else 1.0))
    assert pipe.skipped == 1 and torch.equal(flat(model), before)
    pipe.step(lambda: F.cross_entropy(model(x), y))
    assert same_on_all_ranks(flat(model)) and not torch.equal(flat(model), before)
    print(f"CHECK rank{rank} nonfinite ok", flush=True)

    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


if __name__ == "__main__":
    main()
