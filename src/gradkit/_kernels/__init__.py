"""gradkit's kernel layer: multi-tensor elementwise updates written once, run four ways.

An update rule is a Python function over *one* tensor of each kind (parameter, gradient, state buffers) and
keyword scalars, using tensor methods and operators only, and writing its results in place (``copy_``,
``lerp_``, ``mul_``...). :class:`Elementwise` runs it

* ``"loop"``: once per tensor with Python-float scalars. Readable, the reference the others are checked against.
* ``"foreach"``: once on :class:`TensorList` arguments, so every operation is one ``torch._foreach_*`` call
  over all tensors (on CPU in cache-sized blocks).
* ``"compiled"``: traced by ``torch.compile(fullgraph=True)`` over rows flattened to 1-D with symbolic lengths,
  scalars passed as 0-d tensors: inductor fuses the rule into one pass over memory per tensor, a changing
  learning rate never recompiles, and one graph per rule and dtype signature serves every parameter layout.
  Compiled on first use, in the calling thread.
* ``"auto"`` (the default): eager (foreach) from the first step, with no probe and no compile on the
  construction path; a rule whose eager time passes ``GRADKIT_COMPILE_AFTER`` seconds (default 2) is compiled in a
  background thread and used from the first step after it is ready. Where torch has a fused kernel for the
  algorithm (Adam, AdamW) ``auto`` uses it instead. See :mod:`gradkit._kernels.compiling`.

Shared reductions (:mod:`gradkit._kernels.reductions`) read the host once per call, whatever the number of
tensors. Nothing here changes a process-wide torch setting.
"""

from __future__ import annotations

from .compiling import (
    KERNELS,
    ROWS,
    WIDE_ROWS,
    CompileEvent,
    add_compile_hook,
    compile_after,
    compile_available,
    resolve_kernel,
    wait_for_compiles,
)
from .elementwise import Elementwise
from .fused import fused_adam
from .reductions import all_finite, sq_norm_total, sq_norms
from .tensorlist import TensorList, group_by_device_dtype

__all__ = [
    "KERNELS",
    "ROWS",
    "WIDE_ROWS",
    "CompileEvent",
    "Elementwise",
    "TensorList",
    "add_compile_hook",
    "all_finite",
    "compile_after",
    "compile_available",
    "fused_adam",
    "group_by_device_dtype",
    "resolve_kernel",
    "sq_norm_total",
    "sq_norms",
    "wait_for_compiles",
]
