"""Population methods and noise search split across 2 gloo ranks vs one process with the same seeds.

Every rank also runs the single-process reference (comm=None) and compares bit for bit. Prints
``CHECK rank<r> <name> ok`` lines; any failed assertion exits non-zero.
"""

import functools
import os

import torch
import torch.distributed as dist

import gradkit as gk
import gradkit.guide as G
from gradkit.distributed import DistributedError

f64 = torch.float64
RING = G.toy.ring(6, radius=3.0, std=0.4)
A = torch.tensor([0.8, -0.3], dtype=f64)


def reward(x):
    return x @ A


def gather_rows(x, rows, total):
    """Every rank's rows, in order (test-side only; the library never needs it)."""
    sizes = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]]))
    width = max(int(s) for s in sizes)
    pad = torch.zeros(width, *x.shape[1:], dtype=x.dtype)
    pad[: x.shape[0]] = x
    out = [torch.empty_like(pad) for _ in sizes]
    dist.all_gather(out, pad)
    return torch.cat([o[: int(s)] for o, s in zip(out, sizes)])


def check(rank, name):
    print(f"CHECK rank{rank} {name} ok", flush=True)


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(123 + rank)          # a rank's global RNG must not matter

    # -- FK steering: textbook (systematic, adaptive, two groups), rows split 5 / 5 inside groups of 5
    for name, kw, total in [("fk", dict(potential="max", n_particles=5), 10),
                            ("fk-diff-everystep", dict(potential="diff", adaptive=False), 7),
                            ("fk-reference", dict(reference=True, resampling="multinomial", adaptive=False), 8)]:
        x0 = torch.randn(total, 2, dtype=f64, generator=torch.Generator().manual_seed(1))
        single = G.FKSteering(reward, 3.0, seed=2, comm=None, **kw).run(RING, x0, steps=12, seed=4)
        fk = G.FKSteering(reward, 3.0, seed=2, **kw)
        split = fk.run(RING, x0, steps=12, seed=4)
        assert split.x.shape[0] < total, split.x.shape
        xs = gather_rows(split.x, split.rows, total)
        assert torch.equal(xs, single.x), name
        assert torch.equal(split.log_weights, single.log_weights), name
        assert len(split.ancestry) == len(single.ancestry) > 0, name
        assert all(torch.equal(a[1], b[1]) and a[0] == b[0] for a, b in zip(split.ancestry, single.ancestry)), name
        assert split.nfe == single.nfe, name
        # rewards: one all-gather per potential step (12), ceil(total/2) values + a status word, to 1 peer;
        # two seed checks. Groups aligned with the ranks ("fk": rows 0-4 | 5-9) never move a particle across
        # ranks, so nothing else travels; one group over both ranks moves some particles' states.
        scalars = 12 * (-(-total // 2) + 1) * 8 + 2 * 8
        sent = split.info["comm"]["bytes_sent"]
        assert (sent == scalars) if name == "fk" else (sent > scalars), (name, sent, scalars)
        g = fk.run(RING, x0, steps=12, seed=4, gather=True)
        assert torch.equal(g.x, single.x), name
        check(rank, name)

    # -- only scalars travel when no particle changes rank: λ = 0 never resamples
    x0 = torch.randn(10, 2, dtype=f64, generator=torch.Generator().manual_seed(3))
    out = G.FKSteering(reward, 0.0, final_resample=False).run(RING, x0, steps=6, seed=1)
    # per potential step one all-gather of ceil(10/2) rewards + a status word, float64, to 1 peer; + 2 seed checks
    assert out.info["comm"]["bytes_sent"] == 6 * (5 + 1) * 8 + 2 * 8, out.info["comm"]
    check(rank, "bytes")

    # -- FK correctors, best-of-N, look-ahead search
    x0 = torch.randn(9, 2, dtype=f64, generator=torch.Generator().manual_seed(5))
    model = G.toy.ring(6, radius=3.0, std=0.4, classes="parity")
    a = G.FKCorrector(2.0, adaptive=False, comm=None).run(model, x0, cond=0, steps=8, seed=2)
    b = G.FKCorrector(2.0, adaptive=False).run(model, x0, cond=0, steps=8, seed=2, gather=True)
    assert torch.equal(a.x, b.x) and torch.equal(a.log_weights, b.log_weights)
    check(rank, "fkc")
    a = G.BestOfN(reward, 3, mode="soft", comm=None).run(RING, x0, steps=8, seed=2)
    b = G.BestOfN(reward, 3, mode="soft").run(RING, x0, steps=8, seed=2)
    assert torch.equal(a.x, b.x) and torch.equal(a.info["chosen"], b.info["chosen"]) and b.x.shape == (3, 2)
    check(rank, "bon")
    a = G.LookAheadSearch(reward, 4, select="softmax", comm=None).run(RING, x0, steps=8, seed=2)
    b = G.LookAheadSearch(reward, 4, select="softmax").run(RING, x0, steps=8, seed=2, gather=True)
    assert torch.equal(a.x, b.x)
    check(rank, "lookahead")

    # -- noise search: CMA-ES candidates split; SPSA directions split
    g = G.toy.gaussian([1.0, -2.0], [1.2, 0.9])
    y = torch.tensor([[0.3, 0.7]], dtype=f64)
    ns = G.NoiseSearch(functools.partial(sq, y=y), steps=5)
    a = ns.search(g, torch.zeros(1, 2, dtype=f64), budget=200, seed=3)
    b = ns.search(g, torch.zeros(1, 2, dtype=f64), budget=200, seed=3, distributed=True)
    assert torch.equal(a.x0, b.x0) and torch.equal(a.loss, b.loss)
    check(rank, "noise-search-cmaes")
    opt = functools.partial(torch.optim.SGD, lr=0.5)
    a = ns.optimize(g, torch.zeros(1, 2, dtype=f64), iters=15, optimizer=lambda p: opt(p),
                    source=functools.partial(gk.sources.SPSA, eps=1e-5, n_directions=4, seed=0, comm=None))
    b = ns.optimize(g, torch.zeros(1, 2, dtype=f64), iters=15, optimizer=lambda p: opt(p),
                    source=functools.partial(gk.sources.SPSA, eps=1e-5, n_directions=4, seed=0, comm="auto"))
    assert torch.equal(a.x0, b.x0)
    check(rank, "noise-search-spsa")

    # -- a failing rank: every rank raises, naming it
    def bad(x):
        if rank == 1:
            raise ZeroDivisionError("reward model crashed")
        return reward(x)

    try:
        G.FKSteering(bad, 1.0).run(RING, x0, steps=4, seed=1)
        raise AssertionError("no error")
    except DistributedError as exc:
        assert "rank(s) [1]" in str(exc) and "reward model crashed" in str(exc), str(exc)
    check(rank, "failure")
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def sq(x, y):
    return 0.5 * ((x - y) ** 2).sum(1)


if __name__ == "__main__":
    main()
