"""LikelihoodRatio: gradients from noise injected at layer outputs and score-function weighting, forward only.

"One Forward is Enough for Neural Network Training via Likelihood Ratio Method" (Jiang et al., 2023): each
supported layer's output ``z = μ(x; θ)`` becomes ``z + σε`` with ``ε ~ N(0, I)``; since
``∇_θ log N(z; μ, σ²I) = J_μᵀ ε / σ``, the gradient of the expected loss ``F(θ) = E_ε L`` is

    ∇F = E[(L − b) · Σ_layers J_μᵀ ε / σ]     (b independent of the sample's noise),

estimated from ``n_samples`` noisy forward passes. For ``nn.Linear`` the score is ``εᵀx/σ`` (weight) and
``Σε/σ`` (bias), a matrix product; no activation is stored and no backward pass runs through the network.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .._validate import check_int, check_positive
from ._perturb import call_forward_only, stream_seed
from .base import Closure, Source, check_loss

__all__ = ["SUPPORTED_LAYERS", "LikelihoodRatio"]

#: Layers whose outputs receive noise and whose parameters get a likelihood-ratio gradient.
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LikelihoodRatio(Source):
    """Likelihood-ratio (score-function) gradient source with noise at ``nn.Linear`` / ``nn.ConvNd`` outputs.

    Supported models: every trainable parameter must belong to an ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``
    or ``nn.Conv3d`` (sub-classes included); anything else (embeddings, normalisation layers, bare
    ``nn.Parameter``s used in ``forward``) raises ``ValueError`` at construction naming the parameter — freeze
    it (``requires_grad_(False)``) or train it with another source. Layers are hooked by their forward
    hooks, so a layer called twice gets independent noise each call and its scores add up.

    What is estimated: the gradient of the *noisy* network's expected loss ``E_ε L(θ, ε)``; it approaches the
    noiseless gradient as ``σ → 0`` (exactly equal when the loss is quadratic in the last linear layer's output
    and no other layer is noisy). Each call runs ``n_samples`` forward passes under ``torch.no_grad``. With
    ``antithetic=True`` (``n_samples`` even) samples come in mirrored pairs ``ε, −ε``. The baseline ``b`` of a
    pair is the mean loss of the pairs evaluated before it in this call (the previous call's mean for the
    first pair), so it never depends on the pair's own noise and the estimate stays unbiased. The closure
    returns the batch-mean loss: noise is independent per example, so the estimate is unbiased but its
    variance grows with the batch size. Returns the mean noisy loss.

    Args:
        model: the module whose Linear/Conv layers get noise and gradients.
        sigma: σ, the standard deviation of the output noise (default 0.1).
        n_samples: noisy forward passes per estimate (default 16; even when antithetic).
        seed: seed of the noise (default 0).
        antithetic: mirrored noise pairs ε, −ε (default True).
        on_nonfinite: ``"raise"`` (default), ``"skip"`` or ``"ignore"`` (see :class:`~gradkit.sources.Source`).
    """

    paper = "One Forward is Enough for Neural Network Training via Likelihood Ratio Method"

    self_guarded = True

    def __init__(self, model: nn.Module, sigma: float = 0.1, n_samples: int = 16, *, seed: int = 0,
                 antithetic: bool = True, on_nonfinite: str = "raise"):
        if not isinstance(model, nn.Module):
            raise ValueError("model must be a torch.nn.Module: LikelihoodRatio hooks its layers, "
                             f"got {type(model).__name__}")
        super().__init__(model, on_nonfinite=on_nonfinite)
        self.sigma = check_positive("sigma", sigma)
        self.n_samples = check_int("n_samples", n_samples, 2 if antithetic else 1)
        if antithetic and n_samples % 2:
            raise ValueError(f"n_samples must be even when antithetic=True, got {n_samples}")
        self.antithetic = bool(antithetic)
        self.seed = check_int("seed", seed, 0)
        self.model = model
        owned: dict[int, bool] = {}
        self.layers: list[nn.Module] = []
        for mod in model.modules():
            trainable = [p for p in mod._parameters.values() if p is not None and p.requires_grad]
            if not trainable:
                continue
            ok = isinstance(mod, SUPPORTED_LAYERS)
            for p in trainable:
                owned[id(p)] = owned.get(id(p), True) and ok
            if ok:
                self.layers.append(mod)
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        owners = {id(p): type(m).__name__ for m in model.modules() for p in m._parameters.values() if p is not None}
        bad = [f"{names.get(id(p), '?')} (in {owners.get(id(p), '?')})" for p in self.params
               if not owned.get(id(p), False)]
        if bad:
            raise ValueError("LikelihoodRatio supports parameters of nn.Linear and nn.Conv1d/2d/3d only (noise is "
                             "injected at their outputs); unsupported trainable parameters: " + ", ".join(bad)
                             + ". Freeze them or use another source.")
        self.step_count = 0
        self.baseline = 0.0
        self._gens: dict[torch.device, torch.Generator] = {}

    # -- one noisy forward pass ------------------------------------------------------------------------
    def _noise(self, like: torch.Tensor, pair: int, layer: int, call: int) -> torch.Tensor:
        gen = self._gens.get(like.device)
        if gen is None:
            gen = self._gens[like.device] = torch.Generator(device=like.device)
        gen.manual_seed(stream_seed(self.seed, self.step_count, pair, layer, call))
        return torch.randn(like.shape, generator=gen, dtype=like.dtype, device=like.device)

    @staticmethod
    def _score(mod: nn.Module, x: torch.Tensor, eps: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``[(param, J_μᵀ ε)]`` for the layer's trainable parameters (to be divided by σ)."""
        out = []
        if isinstance(mod, nn.Linear):
            e2, x2 = eps.reshape(-1, eps.shape[-1]), x.reshape(-1, x.shape[-1])
            if mod.weight.requires_grad:
                out.append((mod.weight, e2.T @ x2))
            if mod.bias is not None and mod.bias.requires_grad:
                out.append((mod.bias, e2.sum(0)))
            return out
        # Convolutions: the score is the weight-gradient of <ε, conv(x)>, taken by autograd on this layer
        # alone (a local vector-Jacobian product; nothing else of the network is differentiated).
        leaves = [p.detach().requires_grad_(p.requires_grad) if p is not None else None
                  for p in (mod.weight, mod.bias)]
        wanted = [(p, q) for p, q in zip((mod.weight, mod.bias), leaves) if q is not None and q.requires_grad]
        with torch.enable_grad():
            y = mod._conv_forward(x.detach(), leaves[0], leaves[1])
            grads = torch.autograd.grad(y, [q for _, q in wanted], grad_outputs=eps)
        return [(p, g) for (p, _), g in zip(wanted, grads)]

    def _sample(self, closure: Closure, pair: int, sign: float) -> tuple[float, dict[int, torch.Tensor]]:
        scores: dict[int, torch.Tensor] = {}
        calls = [0] * len(self.layers)

        def hook(li: int):
            def fn(mod, inputs, output):
                eps = self._noise(output, pair, li, calls[li])
                if sign < 0:
                    eps.neg_()
                calls[li] += 1
                for p, s in self._score(mod, inputs[0], eps):
                    if id(p) in scores:
                        scores[id(p)].add_(s)
                    else:
                        scores[id(p)] = s
                return output + self.sigma * eps
            return fn

        handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(self.layers)]
        try:
            loss = float(check_loss(call_forward_only(closure, self.active_params()),
                                    finite=self.on_nonfinite != "ignore"))
        finally:
            for h in handles:
                h.remove()
        return loss, scores

    def estimate(self, closure: Closure) -> torch.Tensor:
        return self._guarded(self.active_params(), lambda: self._estimate(closure))

    def _estimate(self, closure: Closure) -> torch.Tensor:
        active = self.active_params()
        acc = {id(p): torch.zeros_like(p) for p in active}
        n = self.n_samples
        group = 2 if self.antithetic else 1
        done: list[float] = []
        for j in range(n // group):
            b = sum(done) / len(done) if done else self.baseline
            for s in range(group):
                loss, scores = self._sample(closure, j, -1.0 if s else 1.0)
                w = (loss - b) / (n * self.sigma)
                for pid, sc in scores.items():
                    if pid in acc:
                        acc[pid].add_(sc, alpha=w)
                done.append(loss)
        for p in active:
            p.grad = acc[id(p)]
        self.step_count += 1
        self.baseline = sum(done) / len(done)
        return torch.tensor(self.baseline)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step_count, "seed": self.seed, "baseline": self.baseline}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step"])
        self.seed = int(state["seed"])
        self.baseline = float(state["baseline"])
