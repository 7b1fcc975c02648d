"""``gradkit bench distributed``: bytes on the wire and time per step, 1 vs 2 processes, vs parameter count.

Launches ``torchrun --standalone --nproc_per_node=W`` (gloo, CPU) for W = 1 and 2 running
:mod:`gradkit.bench._distributed_worker`, which trains an MLP of the requested size for a few steps with

* ``ES`` (antithetic population) and ``SPSA`` (several directions), split across ranks: every rank
  regenerates every perturbation from the shared seed and only per-direction losses are all-gathered;
* ``DDP``: backprop with ``DistributedDataParallel``, whose gradient all-reduce moves the whole gradient.

Bytes are what *one rank sends* per step: for an all-gather of ``b`` bytes per rank, ``b·(W−1)``; for DDP's ring
all-reduce of a ``B``-byte gradient, ``2·B·(W−1)/W`` (counted by a communication hook). Scaling efficiency
is ``T₁ / (W·T_W)`` for the same total population (1.0 = perfect).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from ._common import machine, markdown_table, out_dir, pyplot, write

HELP = "bytes per step and time per step for distributed ES/SPSA vs DDP, 1 and 2 processes (torchrun, gloo)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add this benchmark's options to its ``gradkit bench`` sub-command.

    Args:
        p: The sub-command's parser.
    """
    p.add_argument("--sizes", default="1e4,1e5,1e6,1e7", help="comma-separated parameter counts")
    p.add_argument("--steps", type=int, default=6, help="timed steps per run (median reported)")
    p.add_argument("--population", type=int, default=8, help="ES population (antithetic) = SPSA 2·directions")
    p.add_argument("--nprocs", default="1,2", help="process counts to launch")


def _launch(world: int, sizes: str, steps: int, population: int) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // world)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "-m", "gradkit.bench._distributed_worker", "--sizes", sizes, "--steps", str(steps),
           "--population", str(population)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if res.returncode != 0:
        raise RuntimeError(f"torchrun with {world} process(es) failed:\n{(res.stdout + res.stderr)[-3000:]}")
    return [json.loads(line[len("RESULT "):]) for line in res.stdout.splitlines() if line.startswith("RESULT ")]


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; print its tables and write them (and plots) under ``args.out``. Returns the exit code.

    Args:
        args: The parsed command line.
    """
    out = out_dir(args.out)
    results: dict[tuple[str, int, int], dict] = {}
    for world in [int(w) for w in args.nprocs.split(",")]:
        print(f"launching torchrun with {world} process(es) ...", flush=True)
        for r in _launch(world, args.sizes, args.steps, args.population):
            results[(r["method"], r["params"], world)] = r
    worlds = sorted({w for _, _, w in results})
    rows = []
    for (method, params, world), r in sorted(results.items()):
        t1 = results.get((method, params, 1), {}).get("ms")
        eff = t1 / (world * r["ms"]) if t1 and world > 1 else float("nan")
        rows.append((method, f"{params:,}", world, round(r["ms"], 1), f"{r['bytes']:,.0f}",
                     round(eff, 2) if eff == eff else "–"))
    table = markdown_table(["method", "parameters", "processes", "ms/step", "bytes sent per rank per step",
                            "scaling efficiency"], rows)
    text = (f"Machine: {machine()}.\nCommand: `gradkit bench distributed --sizes {args.sizes} --steps {args.steps} "
            f"--population {args.population}`\n\n{table}")
    print(table)
    write(out / "distributed.md", text)
    plt = pyplot()
    if plt is not None and max(worlds) > 1:
        w = max(worlds)
        fig, ax = plt.subplots(figsize=(6, 4))
        for method in sorted({m for m, _, _ in results}):
            pts = sorted((p, r["bytes"]) for (m, p, ww), r in results.items() if m == method and ww == w)
            ax.loglog([p for p, _ in pts], [max(b, 1) for _, b in pts], marker="o", label=method)
        ax.set_xlabel("parameters")
        ax.set_ylabel(f"bytes sent per rank per step ({w} processes)")
        ax.set_title("only scalars travel for ES/SPSA; DDP all-reduces the gradient")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "distributed.png", dpi=110)
        print(f"wrote {out / 'distributed.png'}")
    return 0
