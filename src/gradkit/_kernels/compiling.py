"""The compiled path of the kernel layer: when to compile, one graph per row signature, background compiles, events.

**One graph serves every layout.** A rule is compiled over a fixed number :data:`ROWS` of *rows* (one tensor of
each list: parameter, gradient, state buffers...), each flattened to 1-D, with the length of every row symbolic
(``torch._dynamo.mark_dynamic``). The graph is traced once on small stand-in tensors of distinct lengths, so it
holds no assumption tying one row's length to another's, and it is then reused for any parameter layout whose rows
have the same dtypes: a layout of n tensors runs as ⌈n / ROWS⌉ calls, the last padded with tiny scratch rows.
Layouts of :data:`WIDE_ROWS` rows or more also get a second, wide graph of that many rows, compiled in a
background thread once the first is ready (under ``kernel="compiled"`` too): each call of a graph costs about
0.15 ms of dispatch, and a 40-tensor model steps ~10–20 % faster in 2 calls than in 5. Both graphs run the same
per-row code, so the switch changes no bit of the result.
A new model, a frozen parameter (GradES) or a new step-count bucket therefore never recompiles. Rows that cannot
be flattened (non-contiguous, fewer than 2 elements, tensor subclasses, mixed lengths) run on the eager path.

**Never blocking under ``kernel="auto"``.** ``auto`` starts on the eager foreach path and keeps, per rule and
dtype signature, the CPU time the stepping thread spent there (not wall time: a busy machine must not make a short
job look long). Once that time exceeds :func:`compile_after` seconds (default 2, the environment variable
``GRADKIT_COMPILE_AFTER``; ``0`` compiles from the first step, ``inf`` never), the graph is compiled in a
background thread on the stand-in tensors while the steps go on eagerly; the first step after it is ready uses it.
Short jobs (whose update rules cost less than that in total) never compile, so they run as fast as the eager path
from the first step. Compiled and eager paths agree to float rounding (FMA contraction), not
bit for bit, so the step at which a run switches (which depends on timing) changes its last bits; pass
``kernel="foreach"`` or ``kernel="compiled"`` for a run that is bit-reproducible from one process to the next.
``kernel="compiled"`` compiles on first use, in the calling thread.

**Announced once.** Every compile logs one ``INFO`` line on the ``gradkit.kernels`` logger with its duration
(``logging.basicConfig(level=logging.INFO)`` shows it); a failed compile logs one ``WARNING`` and ``auto`` stays
eager for the rest of the process. Benchmarks observe compiles through :func:`add_compile_hook`.

Nothing here changes a process-wide torch setting: graphs are few (one per rule and dtype signature), so torch's
default recompile limits suffice; the main thread calls them through ``torch._dynamo.run`` (use compiled code,
never compile), so an unexpected guard failure falls back to eager instead of compiling on the step path.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import shutil
import threading
import time
import types
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ROWS", "WIDE_ROWS", "CompileEvent", "add_compile_hook", "compile_after", "compile_available",
           "resolve_kernel", "wait_for_compiles"]

KERNELS = ("auto", "compiled", "foreach", "loop")

#: Rows per compiled call. A graph is specialised to this count; more rows run as several calls.
ROWS = 8
#: Rows per call of the wide graph that layouts with at least this many rows also use (never padded).
WIDE_ROWS = 32

logger = logging.getLogger("gradkit.kernels")

_probe_lock = threading.Lock()
_probe_result: tuple[bool, str] | None = None
_warned_fallback = False
# Set when a background compile failed: ``auto`` stays eager for the rest of the process.
_auto_disabled: str | None = None


# -- availability ----------------------------------------------------------------------------------------------


def _find_cxx() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@functools.lru_cache(maxsize=1)
def _cheap_unavailable() -> str | None:
    """Why torch.compile certainly cannot work here, from cheap checks made once per process; None when it may."""
    if os.environ.get("GRADKIT_NO_COMPILE"):
        return "GRADKIT_NO_COMPILE is set"
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if _find_cxx() is None:
        return "no C++ compiler found (looked for $CXX, g++, c++, clang++)"
    return None


def compile_available() -> tuple[bool, str]:
    """Whether ``torch.compile`` works here, probed once per process by compiling a tiny function: ``(ok, why)``.

    The probe costs seconds with a cold inductor cache; nothing on the optimizer path calls it (``auto`` decides
    by compiling in the background instead). Tests and benchmarks use it to skip the compiled path with a reason.
    """
    global _probe_result
    with _probe_lock:
        if _probe_result is not None:
            return _probe_result
        why = _cheap_unavailable()
        if why is not None:
            _probe_result = (False, why)
            return _probe_result
        try:

            def probe(x, s):
                return x.mul_(s).add_(1.0)

            out = torch.compile(probe, fullgraph=True, dynamic=False)(torch.ones(4), torch.tensor(2.0))
            ok = bool(torch.equal(out, torch.full((4,), 3.0)))
            _probe_result = (ok, "" if ok else "torch.compile probe returned wrong numbers")
        except Exception as exc:  # any backend failure means: do not use it
            _probe_result = (False, f"torch.compile probe failed: {type(exc).__name__}: {exc}".splitlines()[0])
        return _probe_result


def resolve_kernel(kernel: str) -> str:
    """Validate a ``kernel=`` argument. Costs nothing: no compile happens here.

    ``"auto"`` stays ``"auto"`` (decided lazily at each call, see the module docstring) unless torch.compile
    is known not to work in this process (no C++ compiler, ``GRADKIT_NO_COMPILE``, a failed compile or probe):
    then it resolves to ``"foreach"``, with one ``RuntimeWarning`` per process saying why.

    Args:
        kernel: One of ``"auto"``, ``"compiled"``, ``"foreach"``, ``"loop"``.
    """
    global _warned_fallback
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel != "auto":
        return kernel
    why = auto_unavailable()
    if why is None:
        return "auto"
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(f"gradkit: kernel='auto' uses 'foreach' only because {why}", RuntimeWarning, stacklevel=3)
    return "foreach"


def auto_unavailable() -> str | None:
    """Why ``auto`` will not compile in this process (known without probing), or None."""
    if _probe_result is not None and not _probe_result[0]:
        return _probe_result[1]
    if _auto_disabled is not None:
        return _auto_disabled
    return _cheap_unavailable()


# -- policy --------------------------------------------------------------------------------------------------------


def compile_after() -> float:
    """Seconds of eager CPU time one rule signature accumulates under ``auto`` before its graph is compiled.

    Read from ``GRADKIT_COMPILE_AFTER`` (default 2; ``0`` compiles at the first step, ``inf`` never). A compile
    costs a few seconds of CPU in the background (about one second from inductor's disk cache); the rule of
    thumb is to pay it once the eager path has cost about as much (the ski-rental rule), so a short job never
    pays it and a long one loses at most that much to the slower eager path.
    """
    raw = os.environ.get("GRADKIT_COMPILE_AFTER", "2")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"GRADKIT_COMPILE_AFTER must be a number of seconds (or inf), got {raw!r}") from None
    if math.isnan(value) or value < 0:
        raise ValueError(f"GRADKIT_COMPILE_AFTER must be >= 0, got {raw!r}")
    return value


# -- events --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompileEvent:
    """One compile of an update rule's graph, passed to every hook of :func:`add_compile_hook`.

    Args:
        rule: The rule's name (``adam``, ``lion``...; variants carry their flags: ``adam_amsgrad1_coupled0``).
        signature: The dtypes the graph serves, e.g. ``"cpu float32 ×4"``.
        seconds: Wall time of the compile.
        background: True when compiled in a background thread (``auto``), False when the caller waited.
        ok: False when the compile failed (then ``error`` says why).
        error: The failure, or ``""``.
    """

    rule: str
    signature: str
    seconds: float
    background: bool
    ok: bool
    error: str = ""


_hooks: list[Callable[[CompileEvent], None]] = []


class _HookHandle:
    def __init__(self, fn: Callable[[CompileEvent], None]):
        self._fn = fn

    def remove(self) -> None:
        """Stop calling the hook."""
        if self._fn in _hooks:
            _hooks.remove(self._fn)


def add_compile_hook(fn: Callable[[CompileEvent], None]) -> _HookHandle:
    """Call ``fn(event)`` after every compile of an update rule (benchmarks use it to time compiles).

    Returns a handle whose ``remove()`` uninstalls the hook. Hooks run in the compiling thread.

    Args:
        fn: Called with a :class:`CompileEvent`.
    """
    _hooks.append(fn)
    return _HookHandle(fn)


def _emit(event: CompileEvent) -> None:
    where = "in the background; steps meanwhile ran eagerly" if event.background else "before this step"
    if event.ok:
        logger.info("gradkit: compiled update rule %r (%s) in %.1f s %s; one graph serves every parameter layout",
                    event.rule, event.signature, event.seconds, where)
    else:
        logger.warning("gradkit: compiling update rule %r (%s) failed after %.1f s (%s); kernel='auto' stays on "
                       "the eager foreach path in this process", event.rule, event.signature, event.seconds,
                       event.error)
    for fn in list(_hooks):
        fn(event)


# -- the compiled form of one rule ----------------------------------------------------------------------------------

# A row signature: per list (dtype, requires_grad, is 0-d), the device, the scalar names and dtypes, grad mode.
Signature = tuple


def row_signature(row: Sequence[torch.Tensor]) -> tuple:
    return tuple((t.dtype, t.requires_grad, t.dim() == 0) for t in row)


def _describe(sig: Signature) -> str:
    device, rows, _scalars, _grad = sig
    dtypes = sorted({str(d).replace("torch.", "") for d, _, zero in rows if not zero})
    return f"{device} {'/'.join(dtypes) or 'scalars'} ×{len(rows)}"


_rules: weakref.WeakSet[CompiledRule] = weakref.WeakSet()
WIDE = "wide"  # marks the wide graph's key in CompiledRule.ready / pending / failed


def graph_key(sig: Signature, width: int = ROWS) -> Any:
    """The key of the graph of ``sig`` over ``width`` rows in ``ready`` / ``pending`` / ``failed``: the signature
    itself for the narrow graph, ``(WIDE, sig)`` for the wide one."""
    return sig if width == ROWS else (WIDE, sig)


def wait_for_compiles(timeout: float | None = None) -> bool:
    """Block until every background compile started so far has finished (benchmarks, tests); True if none is left.

    Args:
        timeout: Give up after this many seconds (None: wait as long as it takes).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    for rule in list(_rules):
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not rule.wait(left):
            return False
    return True


class CompiledRule:
    """One rule's compiled graphs (one per :data:`Signature`), their background compiles and eager-time ledger.

    Args:
        fn: The update rule (see :class:`~gradkit._kernels.Elementwise`).
        name: Its name in logs and events.
    """

    def __init__(self, fn: Callable[..., None], name: str):
        self.name = name
        _rules.add(self)

        def multi(lists, scalars):
            # Traced, is_compiling() is True and the loop becomes the graph; run without a matching compiled
            # graph (torch._dynamo.run falls back to the Python frame), nothing is touched and the caller runs
            # the eager path instead.
            if not torch.compiler.is_compiling():
                return False
            for tensors in zip(*lists):
                fn(*tensors, **scalars)
            return True

        # A code object of its own per rule keeps torch.compile's cache (and its limits) per rule.
        code = multi.__code__.replace(co_name=f"gradkit_{name}")
        self._fn = types.FunctionType(code, multi.__globals__, code.co_name, None, multi.__closure__)
        self._compiled: Callable | None = None
        self._run_only: Callable | None = None
        self._lock = threading.Lock()
        self._fn_lock = threading.Lock()
        self.ready: set[Signature] = set()
        self.failed: set[Signature] = set()
        self.pending: set[Signature] = set()
        self.eager_seconds: dict[Any, float] = {}  # eager CPU seconds per (device, dtypes, scalars, grad mode)
        self.activated: set[Any] = set()  # ledgers whose graphs are wanted
        self._pads: dict[Signature, list[list[torch.Tensor]]] = {}
        self.graph_calls = 0  # calls that ran a compiled graph (tests and benchmarks read it)

    # -- compile --------------------------------------------------------------------------------------------------
    def _functions(self) -> tuple[Callable, Callable]:
        # Its own lock: creating them imports torch's compiler stack (seconds), which must never hold up the
        # bookkeeping lock the stepping thread takes.
        with self._fn_lock:
            if self._compiled is None:
                self._compiled = torch.compile(self._fn, fullgraph=True)
                self._run_only = torch._dynamo.run(self._fn)
            return self._compiled, self._run_only  # type: ignore[return-value]

    @staticmethod
    def _standins(sig: Signature, width: int = ROWS) -> tuple[list[list[torch.Tensor]], dict[str, torch.Tensor]]:
        """Tensors of the signature's dtypes, row r of length L + 2r + 1: no two rows share a length, so the traced
        graph ties no row's length to another's. Inductor decides from these lengths whether a loop is worth
        splitting across threads (≥ 512 elements per thread): L = 1024 × max(threads, 4) makes every loop of the
        graph parallel, as the large tensors that make a compile worth it need."""
        device, rows, scalars, _grad = sig
        base = 1024 * max(torch.get_num_threads(), 4)
        lists = []
        for dtype, requires_grad, zero in rows:
            col = []
            for r in range(width):
                t = torch.zeros(() if zero else (base + 2 * r + 1,), dtype=dtype, device=device)
                if requires_grad:
                    t.requires_grad_(True)
                if not zero:
                    torch._dynamo.mark_dynamic(t, 0)
                col.append(t)
            lists.append(col)
        return lists, {k: torch.zeros((), dtype=d, device=device) for k, d in scalars}

    def compile(self, sig: Signature, background: bool, width: int = ROWS) -> bool:
        """Compile the graph of ``sig`` over ``width`` rows on stand-in tensors; True when it is ready."""
        global _auto_disabled
        compiled, _ = self._functions()
        lists, scalars = self._standins(sig, width)
        key = graph_key(sig, width)
        start = time.perf_counter()
        error = ""
        try:
            with torch.set_grad_enabled(sig[3]):
                ok = compiled(lists, scalars) is True
            if not ok:
                error = "the compiled call did not run a graph"
        except Exception as exc:  # noqa: BLE001 - any backend failure: report it and stay eager
            ok, error = False, f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            if not background:
                raise
        finally:
            seconds = time.perf_counter() - start
            with self._lock:
                self.pending.discard(key)
                (self.ready if ok else self.failed).add(key)
            if not ok and background and _auto_disabled is None and width == ROWS:
                _auto_disabled = f"compiling {self.name!r} failed ({error})"
        what = _describe(sig) if width == ROWS else f"{_describe(sig)}, {width} rows per call"
        _emit(CompileEvent(self.name, what, seconds, background, ok, error))
        return ok

    def compile_in_background(self, sig: Signature, width: int = ROWS) -> None:
        key = graph_key(sig, width)
        with self._lock:
            if key in self.pending or key in self.ready or key in self.failed:
                return
            self.pending.add(key)
        thread = threading.Thread(target=self.compile, args=(sig, True, width), name=f"gradkit-compile-{self.name}",
                                  daemon=True)
        thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for this rule's background compiles (tests, benchmarks); True when none is pending.

        Args:
            timeout: Give up after this many seconds (None: no limit).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.pending:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    # -- run ------------------------------------------------------------------------------------------------------
    def pad_rows(self, sig: Signature) -> list[list[torch.Tensor]]:
        """ROWS − 1 distinct scratch rows (length 2) that fill the last call of a layout (graphs reject aliased
        inputs, so each filler row is its own tensors)."""
        pads = self._pads.get(sig)
        if pads is None:
            device, rows, _, _ = sig
            pads = [[torch.zeros(() if zero else (2,), dtype=dtype, device=device).requires_grad_(requires_grad)
                     for dtype, requires_grad, zero in rows] for _ in range(ROWS - 1)]
            self._pads[sig] = pads
        return pads

    def run(self, sig: Signature, rows: list[list[torch.Tensor]], scalars: dict[str, torch.Tensor],
            may_compile: bool) -> list[int]:
        """Run ``rows`` (flattened) through the graph of ``sig`` in calls of :data:`ROWS` rows.

        With :data:`WIDE_ROWS` rows or more, full calls of the wide graph go first once it is ready (its compile
        is started here, in the background, the first time). Returns the indices (into ``rows``) of the rows no
        graph ran: the caller runs those eagerly. With ``may_compile`` (``kernel="compiled"``) a guard failure of
        the narrow graph recompiles in this thread, as torch.compile does; otherwise (``auto``) it never compiles
        here, and the wide graph never does.
        """
        compiled, run_only = self._functions()
        fn = compiled if may_compile else run_only
        left: list[int] = []
        first = 0
        if len(rows) >= WIDE_ROWS:
            if graph_key(sig, WIDE_ROWS) in self.ready:
                while len(rows) - first >= WIDE_ROWS:
                    chunk = rows[first:first + WIDE_ROWS]
                    if run_only([list(col) for col in zip(*chunk)], scalars) is not True:
                        break  # no wide graph for these rows (a guard failed): the narrow one takes them
                    self.graph_calls += 1
                    first += WIDE_ROWS
            else:
                self.compile_in_background(sig, WIDE_ROWS)
        for start in range(first, len(rows), ROWS):
            chunk = rows[start:start + ROWS]
            if len(chunk) < ROWS:
                chunk = chunk + self.pad_rows(sig)[: ROWS - len(chunk)]
            if fn([list(col) for col in zip(*chunk)], scalars) is True:
                self.graph_calls += 1
            else:
                left.extend(range(start, min(start + ROWS, len(rows))))
        return left
