"""Shared test harness: parity against a reference optimizer, state_dict round-trips, bad input."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

SHAPES: tuple[tuple[int, ...], ...] = ((33, 17), (17,), (4, 6, 5), (1,), (64, 8))


def make_params(shapes: Sequence[tuple[int, ...]] = SHAPES, seed: int = 0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).requires_grad_() for s in shapes]


def two_groups(params, **second_group_overrides):
    """Split parameters into two param groups; the second overrides some hyper-parameters."""
    k = max(1, len(params) // 2)
    return [{"params": params[:k]}, {"params": params[k:], **second_group_overrides}]


def grad_for(step: int, p: torch.Tensor, index: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """The gradient fed at ``step`` to parameter ``index``: independent of the run, so runs see one sequence."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + index)
    # A drifting mean plus noise: moments and sign changes both get exercised.
    return (torch.randn(p.shape, generator=gen, dtype=p.dtype) + 0.3 * torch.sin(torch.tensor(step / 7.0))) * scale


def run_sequence(factory: Callable[[list[torch.Tensor]], torch.optim.Optimizer], steps: int = 200,
                 shapes=SHAPES, seed: int = 0, start: int = 0, params=None, opt=None, scale: float = 1.0,
                 closure_hook: Callable | None = None):
    """Feed ``steps`` gradients of the shared sequence; returns (params, optimizer)."""
    params = make_params(shapes, seed) if params is None else params
    opt = factory(params) if opt is None else opt
    for t in range(start, start + steps):
        for i, p in enumerate(params):
            p.grad = grad_for(t, p, i, seed, scale)
        if closure_hook is not None:
            closure_hook(opt, params, t)
        opt.step()
    return params, opt


def max_abs_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    return max(float((x.detach() - y.detach()).abs().max()) for x, y in zip(a, b))


def assert_parity(ours, ref, steps: int = 200, atol: float = 1e-5, shapes=SHAPES, scale: float = 1.0):
    """Both factories fed the same gradient sequence end within ``atol`` (max abs, every element)."""
    p_ours, _ = run_sequence(ours, steps, shapes, scale=scale)
    p_ref, _ = run_sequence(ref, steps, shapes, scale=scale)
    diff = max_abs_diff(p_ours, p_ref)
    assert diff <= atol, f"max |ours - reference| = {diff:.3g} after {steps} steps (tolerance {atol})"
    # The run must have moved the parameters, or parity proves nothing.
    moved = max_abs_diff(p_ours, make_params(shapes))
    assert moved > 100 * atol, f"parameters barely moved ({moved:.3g}); the parity check is vacuous"
    return diff


def assert_state_dict_roundtrip(factory, steps: int = 50, shapes=SHAPES):
    """50 steps, save, load into a fresh optimizer on fresh copies, 50 more == 100 straight, bit for bit."""
    straight, _ = run_sequence(factory, 2 * steps, shapes)
    first, opt = run_sequence(factory, steps, shapes)
    saved = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone().requires_grad_() for p in first]
    del opt, first
    fresh = factory(params)
    fresh.load_state_dict(saved)
    resumed, _ = run_sequence(factory, steps, shapes, start=steps, params=params, opt=fresh)
    for a, b in zip(straight, resumed):
        assert torch.equal(a, b), f"resumed run differs by {float((a - b).abs().max()):.3g}"


def feed_grads(opt_or_cls, params, step: int = 0, seed: int = 0, nan: bool = False, only=None) -> None:
    """Set ``.grad`` for one step as the optimizer's capabilities require (the capability table drives the tests).

    Plain optimizers get :func:`grad_for`'s sequence; one with ``needs_graph`` gets the same values plus ``p``, as the
    gradient of ``Σ g·p + ½‖p‖²`` taken with ``create_graph=True`` (so its Hessian-vector products are defined).
    ``nan`` poisons one element of the last parameter's gradient; ``only`` restricts which parameters get one.
    """
    targets = [p for p in params if only is None or any(p is q for q in only)]
    for p in params:
        p.grad = None
    if getattr(opt_or_cls, "needs_graph", False):
        loss = sum((grad_for(step, p, i, seed) * p).sum() + 0.5 * (p * p).sum() for i, p in enumerate(targets))
        if nan:
            loss = loss + (targets[-1].reshape(-1)[0] * float("nan"))
        loss.backward(create_graph=True)
        return
    for i, p in enumerate(targets):
        p.grad = grad_for(step, p, i, seed)
    if nan:
        targets[-1].grad.reshape(-1)[0] = float("nan")


def table_cells(text: str, label: str) -> list[str]:
    """The cells of the Markdown table row of ``text`` whose first cell is ``label``."""
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]
