"""Shared pieces of the transform tests: a gradient sequence with spikes, and a round-trip check."""

from __future__ import annotations

import copy

import torch

from tests.helpers import SHAPES, grad_for, make_params


def set_grads(params, step: int, spikes: frozenset[int] = frozenset(), spike: float = 30.0, scale: float = 1.0):
    """Give ``params`` the shared gradient of ``step``; at ``spikes`` steps the gradient is ``spike`` times larger."""
    k = spike if step in spikes else 1.0
    for i, p in enumerate(params):
        p.grad = grad_for(step, p, i, scale=scale * k)


def run_transform(t, steps: int, start: int = 0, params=None, **kw):
    """Apply ``t`` to the shared sequence; returns the transformed gradients of every step."""
    params = make_params(SHAPES) if params is None else params
    out = []
    for s in range(start, start + steps):
        set_grads(params, s, **kw)
        t(params)
        out.append([p.grad.clone() for p in params])
    return out


def assert_transform_roundtrip(factory, steps: int = 40, **kw):
    """``steps`` calls, state_dict, load into a fresh transform, ``steps`` more == ``2·steps`` straight, exactly."""
    straight = run_transform(factory(), 2 * steps, **kw)
    first = factory()
    run_transform(first, steps, **kw)
    saved = copy.deepcopy(first.state_dict())
    fresh = factory()
    fresh.load_state_dict(saved)
    resumed = run_transform(fresh, steps, start=steps, **kw)
    for a_step, b_step in zip(straight[steps:], resumed):
        for a, b in zip(a_step, b_step):
            assert torch.equal(a, b)
