"""torch's own fused optimizer kernels, used by ``kernel="auto"`` where they exist for the algorithm and device.

torch ships one fused kernel per step for Adam and AdamW (``torch._fused_adam_`` / ``torch._fused_adamw_``) on
CPU, CUDA, MPS and XPU. Under ``auto`` gradkit's ``Adam`` / ``AdamW`` call it: full speed from the first step,
nothing to compile, and the same algorithm (``torch.optim.AdamW(fused=True)``); the compiled and foreach paths
of the update rule remain for the other ``kernel=`` values and the tensors the fused kernel does not take.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .tensorlist import group_by_device_dtype

__all__ = ["fused_adam"]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _supported_devices() -> tuple[str, ...]:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        return tuple(_get_fused_kernels_supported_devices())
    except Exception:  # noqa: BLE001 - an older or newer torch without the helper
        return ("cuda", "cpu")


def _fusable(lists: Sequence[Sequence[torch.Tensor]]) -> bool:
    devices = _supported_devices()
    for group in group_by_device_dtype(lists):
        ref = group[0][0]
        if ref.device.type not in devices or ref.dtype not in _FLOATS:
            return False
        if ref.device.type == "mps" and ref.dtype == torch.float64:
            return False
        for lst in group:
            for t in lst:
                if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.is_sparse or t.device != ref.device \
                        or t.dtype != ref.dtype:
                    return False
    return True


def fused_adam(lists: Sequence[Sequence[torch.Tensor]], *, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, step: int, amsgrad: bool, decoupled: bool) -> bool:
    """One Adam (``decoupled=False``, L2 in the gradient) or AdamW step by torch's fused kernel.

    Returns False, having changed nothing, when the kernel does not take these tensors (device, dtype, subclass,
    mixed dtypes); the caller then runs its own rule.

    Args:
        lists: ``[params, grads, exp_avgs, exp_avg_sqs]`` and, with ``amsgrad``, ``max_exp_avg_sqs``.
        lr: Learning rate.
        beta1: First-moment decay β1.
        beta2: Second-moment decay β2.
        eps: ε added to the denominator.
        weight_decay: λ (decoupled: p ← p·(1 − lr·λ); coupled: g ← g + λ·p).
        step: The step number t after this step (1-based), shared by all tensors.
        amsgrad: Use the running maximum of the second moment.
        decoupled: AdamW (True) or Adam (False).
    """
    if not _fusable(lists):
        return False
    kernel = torch._fused_adamw_ if decoupled else torch._fused_adam_
    for group in group_by_device_dtype(lists):
        params, grads, exp_avgs, exp_avg_sqs = group[:4]
        max_sqs = group[4] if amsgrad else []
        step_t = torch.tensor(float(step), dtype=torch.float32, device=params[0].device)
        kernel(params, grads, exp_avgs, exp_avg_sqs, max_sqs, [step_t] * len(params), lr=float(lr), beta1=beta1,
               beta2=beta2, weight_decay=weight_decay, eps=eps, amsgrad=amsgrad, maximize=False)
    return True
