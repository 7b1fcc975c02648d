"""Search spaces over a model: low-rank adapters whose singular values are the searched vector (ESSA), and a
continuous prompt in a random low-dimensional subspace (BBT / BBTv2, :class:`PromptEmbedding`).

Paper: "ESSA: Evolutionary Strategies for Scalable Alignment": adapters ΔW = B·A on chosen linear layers are
SVD-factored, ΔW = U·diag(s)·Vᵀ, U and V are frozen and only the singular values s are searched, which
shrinks the search from millions of weights to (rank × layers) numbers.

Each adapted ``nn.Linear`` computes ``y = W x + b + U diag(s) Vᵀ x`` through a forward hook; the weights W are
never copied or modified.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .._validate import check_choice, check_int, check_positive
from .param_vector import Settable

__all__ = ["LoRASingularValues", "PromptEmbedding"]


def _orthonormal(rows: int, cols: int, gen: torch.Generator, dtype: torch.dtype, device) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(rows, cols, generator=gen, dtype=torch.float64).to(device))
    # Sign fix makes the basis a deterministic function of the draw (QR is unique up to column signs).
    return (q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q)).to(dtype)


class LoRASingularValues(Settable):
    """ESSA's search space: ``rank`` singular values per adapted linear layer, as one flat vector.

    Args:
        model: the network; its weights stay untouched.
        rank: r, the adapter rank per layer (at most ``min(in, out)``).
        layers: names of the ``nn.Linear`` modules to adapt (default: every ``nn.Linear``).
        basis: where U, V come from when ``adapters`` is not given: ``"weight"`` — the top-r singular vectors of
            each layer's own W (s then moves W's principal directions); ``"random"`` — random orthonormal
            columns (seeded by ``seed``).
        adapters: ``{layer name: (A [r, in], B [out, r])}`` trained LoRA factors (ESSA: after a short
            supervised fine-tune); each ``B·A`` is SVD-factored, U/V frozen, and ``x0`` holds its singular
            values, so searching starts exactly at the fine-tuned adapters.
        seed: seed of the random orthonormal columns of ``basis="random"`` (default 0).

    ``dim``: length of the searched vector; ``x0``: its starting value; ``set(s)`` / ``get()``; ``vector``
    is the live tensor the hooks read (``requires_grad_()`` it to fine-tune the same space by backprop);
    ``factors()``: the U and V tensors; ``remove()`` detaches the hooks.
    """

    paper = "ESSA: Evolutionary Strategies for Scalable Alignment"

    def __init__(self, model: nn.Module, rank: int, *, layers: Sequence[str] | None = None,
                 basis: str = "weight", adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                 seed: int = 0):
        self.rank = check_int("rank", rank, 1)
        self.basis = check_choice("basis", basis, ("weight", "random"))
        modules = dict(model.named_modules())
        if layers is None:
            layers = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        layers = list(layers)
        if not layers:
            raise ValueError("layers must name at least one nn.Linear (the model has none)")
        for name in layers:
            if not isinstance(modules.get(name), nn.Linear):
                raise ValueError(f"layers: {name!r} is not an nn.Linear of the model")
            lin = modules[name]
            if self.rank > min(lin.in_features, lin.out_features):
                raise ValueError(f"rank must be <= min(in, out) = {min(lin.in_features, lin.out_features)} "
                                 f"for layer {name!r}, got {rank}")
        if adapters is not None:
            unknown = set(adapters) - set(layers)
            if unknown:
                raise ValueError(f"adapters name layers that are not adapted: {sorted(unknown)}")
        self.layers = layers
        first = modules[layers[0]].weight
        self.dtype, self.device = first.dtype, first.device
        gen = torch.Generator().manual_seed(seed)
        self.U: list[torch.Tensor] = []
        self.V: list[torch.Tensor] = []
        x0 = []
        for name in layers:
            lin = modules[name]
            w = lin.weight.detach().to(torch.float64)
            if adapters is not None and name in adapters:
                a, b = adapters[name]
                if a.shape != (self.rank, lin.in_features) or b.shape != (lin.out_features, self.rank):
                    raise ValueError(f"adapters[{name!r}] must be (A [{self.rank}, {lin.in_features}], "
                                     f"B [{lin.out_features}, {self.rank}]), got {tuple(a.shape)}, {tuple(b.shape)}")
                u, s, vh = torch.linalg.svd(b.detach().to(torch.float64) @ a.detach().to(torch.float64),
                                            full_matrices=False)
                u, s, v = u[:, :self.rank], s[:self.rank], vh[:self.rank].T
            elif self.basis == "weight":
                u, _, vh = torch.linalg.svd(w, full_matrices=False)
                u, v, s = u[:, :self.rank], vh[:self.rank].T, torch.zeros(self.rank, dtype=torch.float64)
            else:
                u = _orthonormal(lin.out_features, self.rank, gen, torch.float64, "cpu")
                v = _orthonormal(lin.in_features, self.rank, gen, torch.float64, "cpu")
                s = torch.zeros(self.rank, dtype=torch.float64)
            self.U.append(u.to(self.dtype).to(self.device).contiguous())
            self.V.append(v.to(self.dtype).to(self.device).contiguous())
            x0.append(s)
        self.x0 = torch.cat(x0)
        self.dim = self.x0.numel()
        self.vector = self.x0.to(dtype=self.dtype, device=self.device).clone()
        self._handles = [modules[name].register_forward_hook(self._hook(i)) for i, name in enumerate(layers)]

    def _hook(self, i: int):
        r = self.rank

        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            h = inputs[0] @ self.V[i]
            s = self.vector[..., i * r:(i + 1) * r]
            if s.dim() == 2:  # population mode: s [pop, r] against activations [pop, ..., r]
                s = s.view(s.shape[0], *([1] * (h.dim() - 2)), r)
            return output + (h * s) @ self.U[i].T

        return hook

    def __len__(self) -> int:
        return self.dim

    def get(self) -> torch.Tensor:
        return self.vector.detach().clone()

    @torch.no_grad()
    def set(self, s: torch.Tensor) -> None:
        """Write the singular values (``[dim]``, any float dtype) read by the adapted layers."""
        s = torch.as_tensor(s)
        if s.shape != (self.dim,):
            raise ValueError(f"s must have shape [{self.dim}], got {tuple(s.shape)}")
        self.vector.copy_(s)

    @contextlib.contextmanager
    def population(self, candidates: torch.Tensor) -> Iterator[None]:
        """Evaluate a whole population in one forward pass: inside, feed inputs with a leading population
        dimension (``x.expand(pop, *x.shape)`` costs no copy) and candidate k's adapters act on slice k."""
        c = torch.as_tensor(candidates)
        if c.dim() != 2 or c.shape[1] != self.dim:
            raise ValueError(f"candidates must have shape [pop, {self.dim}], got {tuple(c.shape)}")
        saved = self.vector
        self.vector = c.to(dtype=self.dtype, device=self.device)
        try:
            yield
        finally:
            self.vector = saved

    def factors(self) -> list[torch.Tensor]:
        """U and V of every adapted layer (``requires_grad_()`` them to fine-tune whole adapters by backprop)."""
        return [*self.U, *self.V]

    def delta_weight(self, i: int) -> torch.Tensor:
        """ΔW = U diag(s) Vᵀ of the i-th adapted layer."""
        r = self.rank
        return (self.U[i] * self.vector[i * r:(i + 1) * r]) @ self.V[i].T

    def remove(self) -> None:
        """Detach the hooks: the model computes with its own weights again."""
        for h in self._handles:
            h.remove()
        self._handles = []


# -- BBT: a prompt A·z + p0 in a random subspace ---------------------------------------------------------------------
def _clipped_std(t: torch.Tensor, rounds: int = 5) -> float:
    """Standard deviation of ``t`` after clipping outliers to mean ± 3 std, ``rounds`` times (BBTv2's code)."""
    x = t.detach().reshape(-1).to(torch.float64)
    for _ in range(rounds):
        mu, sd = x.mean(), x.std(unbiased=False)
        x = x.clamp(float(mu - 3 * sd), float(mu + 3 * sd))
    return float(x.std(unbiased=False))


class _PromptHook:
    """A picklable forward (pre-)hook applying site ``i``'s prompt (closures would make the model unpicklable)."""

    def __init__(self, space: PromptEmbedding, i: int, pre: bool):
        self.space, self.i, self.pre = space, i, pre

    def __call__(self, module: nn.Module, args: Any, output: Any = None) -> Any:
        if self.pre:
            if not args or not isinstance(args[0], torch.Tensor):
                raise ValueError(f"PromptEmbedding site {self.i}: the module's first input must be a tensor")
            return (self.space._apply(self.i, args[0]), *args[1:])
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"PromptEmbedding site {self.i}: the module's output must be a tensor")
        return self.space._apply(self.i, output)


class PromptEmbedding:
    """BBT's search space: a continuous prompt ``p = A·z + p₀`` with a fixed random projection A, z searched.

    Papers: "Black-Box Tuning for Language-Model-as-a-Service" (Sun et al., 2022) — the prompt of a frozen model
    lives in a random d-dimensional subspace of the D = n·width prompt space, ``p = A z + p₀``, and z ∈ R^d is
    searched by CMA-ES from forward passes only; "BBTv2: Towards a Gradient-Free Future with Large Language
    Models" (Sun et al., 2022) — deep prompts, one ``z_l`` and one ``A_l`` per layer, optimised layer by layer in
    turn ("divide and conquer"), and A drawn from ``N(0, σ_A²)`` with ``σ_A = α·σ̂ / (√d·σ)`` (σ̂ the standard
    deviation of the activations the prompt joins, σ the search's step size), instead of BBT's uniform
    (PyTorch ``nn.Linear`` / He) initialisation ``U(−1/√d, 1/√d)``.

    A *site* is a module whose output (``where="output"``, e.g. the token embedding) or first input
    (``where="input"``, e.g. the first layer of a non-sequence model, or a transformer block) receives a prompt
    through a hook; the model's weights are never touched. The first site uses ``mode``:

    * ``"prepend"``: n soft tokens are concatenated in front of a ``[batch, T, width]`` tensor (shape
      ``(n, width)``); at the deeper sites (BBTv2) the first n positions — the prompt's — are replaced by that
      layer's prompt;
    * ``"add"``: the prompt is added to the tensor — to every example (shape = the tensor's shape without the
      batch dimension, e.g. ``(features,)`` for an input-side prompt of an MLP), or to the first n positions of a
      ``[batch, T, width]`` tensor (shape ``(n, width)``, BBT's placeholder-token form).

    The searched vector is the concatenation ``z = (z_0, …, z_{L−1})`` (``dim = L·d``, ``x0`` = zeros so the
    search starts at ``p₀``). :meth:`population` evaluates a whole population in one forward: feed the batch
    repeated once per candidate, candidate-major (``x.repeat(pop, 1, ...)``), and candidate k's prompts act on
    rows ``k·B … (k+1)·B − 1``; with ``site=i`` the candidates are ``[pop, d]`` values of ``z_i`` only (the other
    sites at their current value), which is how BBTv2 searches one layer at a time. ``vector`` is the live
    tensor the hooks read (``requires_grad_()`` it to tune the same prompt by backprop).

    What we checked in the authors' code (read, not copied): BBT's ``random_proj='he'`` is ``nn.Linear``'s default
    uniform initialisation and ``'normal'`` draws ``N(0, (α σ̂/(√d σ))²)`` per layer with σ̂ measured on the first
    forward (hidden states with 3-σ clipping, 5 rounds; the word-embedding matrix for the input layer — we
    measure the site's activations for every layer), deep prompts replace the prompt positions' hidden states at
    every layer, and the deep search alternates one CMA-ES generation per layer with each layer's best z kept.

    Args:
        sites: the module (or modules, BBTv2's deep prompts: first the input site, then one per deeper layer)
            receiving a prompt.
        shape: the prompt shape at every site, or one shape per site (e.g. ``(n_tokens, width)`` or
            ``(features,)``).
        dim: d, the dimension of each site's searched z (BBT's intrinsic dimension).
        mode: ``"prepend"`` (default) or ``"add"`` at the first site (deeper sites replace / add, see above).
        where: ``"output"`` (default) or ``"input"`` of the site modules.
        projection: ``"normal"`` (default, BBTv2), ``"uniform"`` (BBT) or ``"identity"`` (A = I, z is the prompt
            itself: requires ``dim`` = the prompt's size; for backprop tuning of the full prompt).
        sigma: σ, the step size of the search the normal projection is scaled for (default 1.0).
        alpha: α, the extra factor of the normal projection's scale (default 1.0).
        std: σ̂ for the normal projection: one number, one per site, or ``None`` (default) to measure it on the
            first forward through each site.
        p0: the initial prompt p₀ (one tensor, or one per site; default zeros).
        seed: seed of the projections.
    """

    paper = ("Black-Box Tuning for Language-Model-as-a-Service; "
             "BBTv2: Towards a Gradient-Free Future with Large Language Models")

    def __init__(self, sites: nn.Module | Sequence[nn.Module], shape: Sequence[int] | Sequence[Sequence[int]],
                 dim: int, *, mode: str = "prepend", where: str = "output", projection: str = "normal",
                 sigma: float = 1.0, alpha: float = 1.0, std: float | Sequence[float] | None = None,
                 p0: torch.Tensor | Sequence[torch.Tensor] | None = None, seed: int = 0):
        self.sites = [sites] if isinstance(sites, nn.Module) else list(sites)
        if not self.sites or not all(isinstance(m, nn.Module) for m in self.sites):
            raise ValueError("sites must be an nn.Module or a non-empty list of modules")
        n_sites = len(self.sites)
        if len(shape) > 0 and all(isinstance(s, int) for s in shape):
            shapes = [tuple(int(v) for v in shape)] * n_sites
        else:
            shapes = [tuple(int(v) for v in s) for s in shape]
        if len(shapes) != n_sites or any(len(s) == 0 or min(s) < 1 for s in shapes):
            raise ValueError(f"shape must be one positive shape, or one per site ({n_sites}), got {shape!r}")
        self.shapes = shapes
        self.site_dim = check_int("dim", dim, 1)
        self.mode = check_choice("mode", mode, ("prepend", "add"))
        self.where = check_choice("where", where, ("output", "input"))
        self.projection = check_choice("projection", projection, ("normal", "uniform", "identity"))
        if self.mode == "prepend" and any(len(s) != 2 for s in shapes):
            raise ValueError("shape must be (n_tokens, width) at every site for mode='prepend'")
        if self.projection == "identity" and any(math.prod(s) != self.site_dim for s in shapes):
            raise ValueError("projection='identity' needs dim = the prompt size (prod(shape)) at every site")
        self.sigma = check_positive("sigma", sigma)
        self.alpha = check_positive("alpha", alpha)
        if std is None:
            self.std: list[float | None] = [None] * n_sites
        else:
            stds = [std] * n_sites if isinstance(std, (int, float)) else list(std)
            if len(stds) != n_sites:
                raise ValueError(f"std must be one number or one per site ({n_sites}), got {std!r}")
            self.std = [check_positive("std", s) for s in stds]
        first = next((p for m in self.sites for p in m.parameters()), None)
        self.dtype = first.dtype if first is not None else torch.get_default_dtype()
        self.device = first.device if first is not None else torch.device("cpu")
        if p0 is None:
            p0s = [torch.zeros(s, dtype=self.dtype, device=self.device) for s in shapes]
        else:
            p0s = [p0] * n_sites if isinstance(p0, torch.Tensor) else list(p0)
            if len(p0s) != n_sites or any(tuple(p.shape) != s for p, s in zip(p0s, shapes)):
                raise ValueError(f"p0 must have the prompt shape at every site {shapes}")
            p0s = [p.detach().to(dtype=self.dtype, device=self.device).clone() for p in p0s]
        self.p0 = p0s
        self.seed = check_int("seed", seed, 0)
        self._A: list[torch.Tensor | None] = [None] * n_sites
        for i in range(n_sites):
            self._build(i)
        self.dim = n_sites * self.site_dim
        self.x0 = torch.zeros(self.dim, dtype=torch.float64)
        self.vector = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        self._pop: int | None = None
        self._handles = [
            (m.register_forward_pre_hook(_PromptHook(self, i, True)) if self.where == "input"
             else m.register_forward_hook(_PromptHook(self, i, False)))
            for i, m in enumerate(self.sites)]

    # -- the projection ---------------------------------------------------------------------------------------
    def _build(self, i: int) -> None:
        size, d = math.prod(self.shapes[i]), self.site_dim
        if self.projection == "identity":
            self._A[i] = torch.eye(d, dtype=self.dtype, device=self.device)
            return
        if self.projection == "normal" and self.std[i] is None:
            return  # measured on the first forward through the site
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        if self.projection == "uniform":
            a = (torch.rand(size, d, generator=gen, dtype=torch.float64) * 2 - 1) / math.sqrt(d)
        else:
            scale = self.alpha * self.std[i] / (math.sqrt(d) * self.sigma)
            a = torch.randn(size, d, generator=gen, dtype=torch.float64) * scale
        self._A[i] = a.to(dtype=self.dtype, device=self.device)

    def projections(self) -> list[torch.Tensor | None]:
        """A_i ``[prod(shape_i), d]`` per site (None while a normal projection waits for its first forward)."""
        return list(self._A)

    def prompt(self, i: int, z: torch.Tensor | None = None) -> torch.Tensor:
        """Site i's prompt ``A_i z_i + p₀_i`` (``[*shape]``, or ``[pop, *shape]`` for a population)."""
        a = self._A[i]
        if a is None:
            raise RuntimeError(f"site {i}'s projection is measured on the first forward: run the model once first")
        z = self.vector if z is None else z
        zi = z[..., i * self.site_dim:(i + 1) * self.site_dim].to(a.dtype)
        return (zi @ a.T).reshape(*zi.shape[:-1], *self.shapes[i]) + self.p0[i]

    # -- the hook ---------------------------------------------------------------------------------------------
    def _apply(self, i: int, t: torch.Tensor) -> torch.Tensor:
        if self._A[i] is None:
            self.std[i] = _clipped_std(t)
            self._build(i)
        shape = self.shapes[i]
        pop = self._pop
        p = self.prompt(i).to(t.dtype)
        if pop is None:
            p = p.unsqueeze(0)
            pop = 1
        n = t.shape[0]
        if n % pop:
            raise ValueError(f"site {i}: a population of {pop} needs a batch that is a multiple of it "
                             f"(candidate-major x.repeat(pop, ...)), got {n} rows")
        b = n // pop
        x = t.reshape(pop, b, *t.shape[1:])
        pe = p.unsqueeze(1)  # [pop, 1, *shape]
        if self.mode == "prepend":
            if t.dim() != 3 or t.shape[-1] != shape[1]:
                raise ValueError(f"site {i}: mode='prepend' needs a [batch, T, {shape[1]}] tensor, "
                                 f"got {tuple(t.shape)}")
            pe = pe.expand(pop, b, *shape)
            rest = x if i == 0 else x[:, :, shape[0]:]
            out = torch.cat([pe, rest], dim=2)
        elif tuple(t.shape[1:]) == shape:
            out = x + pe
        elif t.dim() == 3 and len(shape) == 2 and t.shape[2] == shape[1] and t.shape[1] >= shape[0]:
            out = torch.cat([x[:, :, :shape[0]] + pe, x[:, :, shape[0]:]], dim=2)
        else:
            raise ValueError(f"site {i}: cannot add a prompt of shape {shape} to a tensor of shape {tuple(t.shape)}")
        return out.reshape(n, *out.shape[2:])

    # -- the searched vector ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.dim

    def _slice(self, site: int | None) -> slice:
        if site is None:
            return slice(0, self.dim)
        if not 0 <= site < len(self.sites):
            raise ValueError(f"site must be in [0, {len(self.sites) - 1}], got {site}")
        return slice(site * self.site_dim, (site + 1) * self.site_dim)

    def get(self, site: int | None = None) -> torch.Tensor:
        """A copy of z (or of ``z_site``)."""
        return self.vector[self._slice(site)].detach().clone()

    @torch.no_grad()
    def set(self, z: torch.Tensor, site: int | None = None) -> None:
        """Write z (``[dim]``), or ``z_site`` (``[d]``) with ``site=``."""
        z = torch.as_tensor(z)
        sl = self._slice(site)
        want = sl.stop - sl.start
        if z.shape != (want,):
            raise ValueError(f"z must have shape [{want}], got {tuple(z.shape)}")
        self.vector[sl] = z.to(self.vector)

    @contextlib.contextmanager
    def at(self, z: torch.Tensor, site: int | None = None) -> Iterator[None]:
        """Temporarily set z (or ``z_site``)."""
        saved = self.get()
        self.set(z, site)
        try:
            yield
        finally:
            self.set(saved)

    @contextlib.contextmanager
    def population(self, candidates: torch.Tensor, site: int | None = None) -> Iterator[None]:
        """Evaluate ``candidates`` ``[pop, dim]`` (or ``[pop, d]`` for one ``site``) in one forward: feed the batch
        repeated candidate-major, ``pop`` times."""
        c = torch.as_tensor(candidates)
        sl = self._slice(site)
        want = sl.stop - sl.start
        if c.dim() != 2 or c.shape[1] != want:
            raise ValueError(f"candidates must have shape [pop, {want}], got {tuple(c.shape)}")
        full = self.vector.detach().expand(c.shape[0], self.dim).clone()
        full[:, sl] = c.to(full)
        saved, saved_pop = self.vector, self._pop
        self.vector, self._pop = full, c.shape[0]
        try:
            yield
        finally:
            self.vector, self._pop = saved, saved_pop

    def state_dict(self) -> dict[str, Any]:
        """z and the measured σ̂ (the projections are regenerated from the seed)."""
        return {"vector": self.vector.detach().clone(), "std": list(self.std), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        if state["vector"].shape != self.vector.shape or len(state["std"]) != len(self.sites):
            raise ValueError("state was saved from a PromptEmbedding of another size")
        self.seed = int(state["seed"])
        self.std = list(state["std"])
        for i in range(len(self.sites)):
            self._A[i] = None
            self._build(i)
        with torch.no_grad():
            self.vector.copy_(state["vector"])

    def remove(self) -> None:
        """Detach the hooks: the model computes without prompts again."""
        for h in self._handles:
            h.remove()
        self._handles = []
