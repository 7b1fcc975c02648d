"""The ESSA-style demo behind ``gradkit bench search --part lora`` (kept apart: not a benchmark of its own).

ESSA ("ESSA: Evolutionary Strategies for Scalable Alignment"): fine-tune LoRA adapters briefly with supervision,
SVD-factor them, then optimise only the singular values with an evolution strategy on the task's reward.
Here: a digits MLP, a shifted input distribution, the cross-entropy on the shifted training set as fitness.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

import gradkit as gk
from gradkit.search.spaces import LoRASingularValues

__all__ = ["essa_demo", "shifted"]


def shifted(x: torch.Tensor, shift: str) -> torch.Tensor:
    """8×8 digits flipped left-right (``"flip"``) or with a fixed random pixel permutation (``"permute"``).

    Args:
        x: Digits images ``[n, 64]``.
        shift: The distribution shift (``"flip"``...).
    """
    if shift == "flip":
        idx = torch.arange(64).view(8, 8).flip(1).reshape(-1)
    elif shift == "permute":
        idx = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    else:
        raise ValueError(f"shift must be 'flip' or 'permute', got {shift!r}")
    return x[:, idx]


class _LoRA:
    """Plain LoRA adapters y += B A x on every nn.Linear via forward hooks (B starts at 0)."""

    def __init__(self, model: nn.Module, rank: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        mods = dict(model.named_modules())
        self.A = {n: (torch.randn(rank, mods[n].in_features, generator=gen) / math.sqrt(mods[n].in_features))
                  .requires_grad_() for n in self.names}
        self.B = {n: torch.zeros(mods[n].out_features, rank, requires_grad=True) for n in self.names}
        self.handles = [mods[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, n):
        def hook(module, inputs, output):
            return output + (inputs[0] @ self.A[n].T) @ self.B[n].T

        return hook

    def parameters(self) -> list[torch.Tensor]:
        return [*self.A.values(), *self.B.values()]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _acc(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).float().mean())


def essa_demo(pretrained: nn.Module, data, *, shift: str = "flip", rank: int = 4, budget: int = 3000,
              sft_steps: int = 30, sft_examples: int = 100, seed: int = 0) -> dict:
    """Run SFT → SVD → singular-value search (CMAES, SepCMAES) beside backprop on the same adapters.

    Cost unit: one forward pass over the shifted training set (an ES candidate); a full-batch backprop step
    counts 3 (forward + backward ≈ 2 forwards).

    Args:
        pretrained: The model trained on the unshifted digits.
        data: ``(x_train, y_train, x_test, y_test)``.
        shift: The shift applied to the images. Default ``"flip"``.
        rank: LoRA rank. Default 4.
        budget: Fitness evaluations of each searcher. Default 3000.
        sft_steps: Steps of the short supervised LoRA fine-tune.
        sft_examples: Shifted examples that fine-tune sees.
        seed: Seed of every random choice.
    """
    xtr, ytr, xte, yte = data
    sxtr, sxte = shifted(xtr, shift), shifted(xte, shift)
    model = copy.deepcopy(pretrained)
    for p in model.parameters():
        p.requires_grad_(False)
    before = _acc(model, sxte, yte)

    # 1. Supervised LoRA fine-tune on a few labelled shifted examples (ESSA's SFT stage).
    lora = _LoRA(model, rank, seed)
    opt = torch.optim.Adam(lora.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(sft_steps):
        i = torch.randint(0, sft_examples, (32,), generator=gen)
        loss = F.cross_entropy(model(sxtr[i]), ytr[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    sft_acc = _acc(model, sxte, yte)
    sft_cost = sft_steps * 3 * 32 / len(sxtr)
    adapters = {n: (lora.A[n].detach().clone(), lora.B[n].detach().clone()) for n in lora.names}
    n_lora = sum(p.numel() for p in lora.parameters())
    lora.remove()

    curves: dict[str, list[tuple[float, float]]] = {}
    final: dict[str, tuple[int, float, float]] = {}

    # 2. ESSA: search only the singular values of the SVD-factored adapters.
    space = LoRASingularValues(model, rank=rank, adapters=adapters)
    n = len(sxtr)

    def fitness(cands: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), space.population(cands):
            logits = model(sxtr.expand(len(cands), *sxtr.shape))
        return F.cross_entropy(logits.reshape(-1, 10), ytr.repeat(len(cands)), reduction="none") \
            .view(len(cands), n).mean(1).double()

    sigma0 = 0.25 * float(space.x0.abs().mean())
    for label, method in (("ESSA: CMAES on singular values", "cmaes"),
                          ("ESSA: SepCMAES on singular values", "sep_cmaes")):
        curve = [(sft_cost, sft_acc)]

        def record(es, curve=curve):
            if es.generation % 10 == 0:
                with space.at(es.mean):
                    curve.append((sft_cost + es.nfev, _acc(model, sxte, yte)))

        r = gk.search.minimize(fitness, space.x0, sigma0, method=method, seed=seed, budget=budget,
                               callback=record)
        with space.at(r.searcher.mean):
            acc = _acc(model, sxte, yte)
        curve.append((sft_cost + r.nfev, acc))
        curves[label] = curve
        final[label] = (space.dim, sft_cost + r.nfev, acc)

    # 3. Backprop on the same search space (s only) and on the same adapters (A, B), full batch, Adam.
    steps = budget // 3
    s = space.x0.to(torch.float32).clone().requires_grad_(True)
    space.vector = s
    curve = adam_curve([s], steps, lambda: F.cross_entropy(model(sxtr), ytr), sft_cost, sft_acc,
                       lambda: _acc(model, sxte, yte))
    curves["backprop (Adam) on singular values"] = curve
    final["backprop (Adam) on singular values"] = (space.dim, sft_cost + 3 * steps, curve[-1][1])
    space.remove()

    lora = _LoRA(model, rank, seed)
    with torch.no_grad():
        for name in lora.names:
            lora.A[name].copy_(adapters[name][0])
            lora.B[name].copy_(adapters[name][1])
    curve = adam_curve(list(lora.parameters()), steps, lambda: F.cross_entropy(model(sxtr), ytr), sft_cost,
                       _acc(model, sxte, yte), lambda: _acc(model, sxte, yte))
    lora.remove()
    curves["backprop (Adam) on the LoRA factors A, B"] = curve
    final["backprop (Adam) on the LoRA factors A, B"] = (n_lora, sft_cost + 3 * steps, curve[-1][1])
    return {"before": before, "sft": sft_acc, "sft_cost": round(sft_cost, 1), "rank": rank, "n_lora": n_lora,
            "space_dim": space.dim, "layers": len(adapters), "curves": curves, "final": final}


def adam_curve(params, steps, loss_fn, cost0, acc0, accuracy):
    """Full-batch Adam (lr 1e-2) for ``steps`` steps; ``[(forward passes, accuracy)]`` every 10 steps, a step
    counting 3 forward passes' worth, starting at ``(cost0, acc0)``."""
    opt = torch.optim.Adam(params, lr=1e-2)
    curve = [(cost0, acc0)]
    for t in range(1, steps + 1):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if t % 10 == 0 or t == steps:
            curve.append((cost0 + 3 * t, accuracy()))
    return curve
