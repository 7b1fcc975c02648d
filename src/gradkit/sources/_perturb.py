"""Seeded perturbations of parameters: regenerated from seeds, applied in place, undone bit-exactly.

The one place zeroth-order and evolution-strategy sources (SPSA, ZOSGD, ES) get their random directions.
Direction ``k`` of step ``t`` for parameter ``i`` is drawn from a private ``torch.Generator`` seeded with a hash
of ``(seed, t, k, i)``, so it can be regenerated anywhere — on another rank, or after an exception — and is
never stored. A step is split into two separable halves, which is what distributed training needs (every rank
regenerates every direction from the shared seed; only scalars travel):

* :meth:`Perturbation.evaluate` — the closure at ``p + a·z_k`` for chosen directions ``k`` and offsets ``a``:
  loss *scalars* (or one loss per row, for a batched closure);
* :meth:`Perturbation.combine` (into ``.grad``) and :meth:`Perturbation.apply` (straight into the parameters)
  — ``Σ_k w_k z_k`` regenerated from the seeds, chunk by chunk.

Memory. Directions are generated in flat chunks of ``chunk`` elements into scratch buffers that live as long as
the perturbation (a few MiB whatever the model size), so a step allocates nothing of a parameter's size and the
allocator is not churned. Consecutive evaluations along the same direction (``+εz`` then ``−εz``) move the
parameters from one offset to the other in one pass, and the last shift of a step can stay in place until the
update, which then undoes it in the same pass (:meth:`Perturbation.apply` / :meth:`Perturbation.combine` with
``fuse=True``): a ZOSGD step regenerates each direction three times instead of five.

Bit-exact restoration. In floating point ``(p + d) − d`` is not always ``p``: information is lost when ``p + d``
rounds onto a coarser grid (crossing into a higher binade, ``|d| ≫ |p|``, double-rounding ties). Storing a copy of
the parameters would double parameter memory, which is what the fused zeroth-order mode must avoid. Instead, when a
chunk is shifted, the round trip ``q = fl(fl(p + d) − d)`` is computed and the elements whose bit pattern differs
from ``p`` ("lossy": ~11 % of float32 weights with full-precision mantissas at ``ε = 1e-3``, ~4 % of a fresh
initialisation) are recorded compactly: their positions (chunk-local int32 indices, or a bitmask of one bit per
element when that is smaller) and an int8 code ``k`` with ``p = q + k·ulp(q)`` (|k| = 1 for ~90 % of them); the few
where no such code gives ``p`` exactly (−0.0, NaN payloads, |k| > 127) keep their full value. Undoing the shift
computes the same ``q`` and applies the codes, so restoration is exact by construction, for any values, also when
the closure raises or the process is interrupted mid-shift (records are kept chunk by chunk). The record costs ~0.24
bytes per element (≈ 6 % of float32 parameter memory) instead of 8 bytes per lossy element for an (index, value)
list, and lives in a reused ring buffer (:class:`_Ring`), so it never fragments the heap. ``exact=False`` (the
sources' ``exact_restore=False``) drops this bookkeeping, as MeZO does.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .._validate import check_choice
from ..errors import NonFiniteError

__all__ = ["DISTRIBUTIONS", "Perturbation", "stream_seed"]

DISTRIBUTIONS = ("gaussian", "rademacher")

_MASK64 = (1 << 64) - 1
_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of a float tensor (a view as the integer type of the same width)."""
    return t.view(_INT_OF_SIZE[t.element_size()])


def _pack(mask: torch.Tensor) -> torch.Tensor:
    """A bool vector as a bitmask, 8 elements per byte (numpy's packbits on CPU)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.packbits(mask.numpy(), bitorder="little"))
    n = mask.numel()
    u8 = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=mask.device)
    u8[:n] = mask.view(torch.uint8)
    return (u8.view(-1, 8) * _BITS.to(mask.device)).sum(1, dtype=torch.uint8)


def _unpack(bits: torch.Tensor, n: int) -> torch.Tensor:
    """The positions (int64) of the set bits among the first ``n`` of a bitmask made by :func:`_pack`."""
    if bits.device.type == "cpu":
        return _nonzero(torch.from_numpy(np.unpackbits(bits.numpy(), count=n, bitorder="little").view(bool)))
    mask = (bits[:, None] & _BITS.to(bits.device)).ne(0).view(-1)[:n]
    return _nonzero(mask)


def _nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Positions (int64) of the True elements of a 1-D bool tensor (numpy's on CPU: ~4x faster than torch's)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.nonzero().view(-1)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def stream_seed(*keys: int) -> int:
    """A 63-bit generator seed from integer keys; nearby keys give unrelated streams (SplitMix64 chaining)."""
    h = 0x5DEECE66D
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return h & ((1 << 63) - 1)


def grad_enabled_error(where: str) -> RuntimeError:
    """The error for a closure that ran a backward pass (or built a graph) inside a forward-only source."""
    return RuntimeError(
        f"the {where} ran a backward pass or built an autograd graph, but this gradient source only evaluates "
        "losses (it estimates the gradient from function values, at inference memory). A training framework "
        "probably wrapped the closure with torch.enable_grad() and loss.backward() — e.g. Lightning's automatic "
        "optimization. Pass a closure that only computes the loss: with Lightning use manual optimization "
        "(self.automatic_optimization = False; see gradkit.integrations.lightning). Parameters and .grad were "
        "left as they were."
    )


class _GradWatch:
    """Detects a closure that ran ``backward()``: some parameter's ``.grad`` changed identity or version."""

    def __init__(self, params: Sequence[torch.Tensor]):
        self.params = params
        self.before = [(p.grad, None if p.grad is None else p.grad._version) for p in params]

    def changed(self) -> bool:
        return any(p.grad is not g or (g is not None and g._version != v)
                   for p, (g, v) in zip(self.params, self.before))

    def restore(self) -> None:
        for p, (g, _) in zip(self.params, self.before):
            p.grad = g


def call_forward_only(closure: Callable[[], Any], params: Sequence[torch.Tensor], where: str = "closure") -> Any:
    """Run ``closure()`` under ``torch.no_grad``; raise if it ran a backward pass or returned a graph.

    ``.grad`` of ``params`` is put back as it was before raising, so nothing is left filled.
    """
    watch = _GradWatch(params)
    with torch.no_grad():
        out = closure()
    if watch.changed() or (isinstance(out, torch.Tensor) and out.requires_grad):
        watch.restore()
        raise grad_enabled_error(where)
    return out


def check_losses(loss: Any, batch: int | None, *, where: str = "closure") -> torch.Tensor:
    """A closure's value as a float64 tensor: ``[]`` for a scalar loss, ``[B]`` for per-sample losses.

    ``batch``: ``B`` when the source's parameters are one tensor with leading dimension ``B`` (then a 1-D loss of
    length ``B`` is accepted as one loss per row), else None (scalar losses only).
    """
    if not isinstance(loss, torch.Tensor):
        raise ValueError(f"the {where} must return a scalar tensor, got {type(loss).__name__}")
    if not loss.is_floating_point():
        raise ValueError(f"the {where} must return a real floating-point loss, got dtype {loss.dtype}")
    if batch is not None and loss.dim() == 1 and loss.numel() == batch:
        return loss.detach().to(torch.float64)
    if loss.numel() != 1:
        extra = (f" (or {batch} per-sample losses, one per row of the parameter)" if batch is not None else "")
        raise ValueError(f"the {where} must return a scalar tensor{extra}, got shape {tuple(loss.shape)}")
    return loss.detach().reshape(()).to(torch.float64)


class _Slot:
    """A tensor kept in a :class:`_Ring` (or, when the ring was full, in memory of its own)."""

    __slots__ = ("ring", "span", "tensor")

    def __init__(self, ring: _Ring, span: list | None, tensor: torch.Tensor):
        self.ring, self.span, self.tensor = ring, span, tensor

    def get(self) -> torch.Tensor:
        return self.tensor

    def free(self) -> None:
        if self.span is not None:
            self.ring.free(self.span)
        else:
            self.ring.overflow -= self.tensor.numel() * self.tensor.element_size()
        self.span = None
        self.tensor = None  # type: ignore[assignment]


class _Ring:
    """A first-in-first-out arena for restoration records, reused by every shift.

    Records are made chunk after chunk and freed in the same order (a move frees chunk ``c``'s old record just
    before it makes the new one), so a ring buffer holds them with no allocation per chunk. This matters more
    than the record's size: thousands of small record tensors interleaved with the forward pass's large
    temporaries fragment glibc's heap and keep about a chunk of memory resident per chunk shifted (≈ +60 MiB
    on a 34 M-parameter model, more than the record itself). When a record does not fit, it gets memory of its
    own and the ring grows (to 1.05× the largest load seen) the next time it is empty.
    """

    def __init__(self, device: torch.device, hint: int):
        self.device = device
        self.capacity = max(1 << 20, int(hint))
        self.buf: torch.Tensor | None = None
        self.spans: deque[list] = deque()  # [start, stop, freed] in allocation order
        self.tail = 0
        self.live = 0
        self.overflow = 0
        self.peak = 0

    def _grow_if_empty(self) -> None:
        if not self.spans and self.overflow == 0:
            self.tail = 0
            want = int(self.peak * 1.05) + (64 << 10)
            if self.buf is not None and want > self.capacity:
                self.capacity, self.buf = want, None

    def _find(self, size: int) -> int | None:
        if self.buf is None:
            self.buf = torch.empty(self.capacity, dtype=torch.uint8, device=self.device)
        if not self.spans:
            return 0 if size <= self.capacity else None
        head = self.spans[0][0]
        if self.tail > head:  # live data in [head, tail): free space at the end, then before head
            if self.tail + size <= self.capacity:
                return self.tail
            return 0 if size <= head else None
        return self.tail if self.tail + size <= head else None  # wrapped: free space in [tail, head)

    def put(self, t: torch.Tensor) -> _Slot:
        nbytes = t.numel() * t.element_size()
        size = (nbytes + 7) // 8 * 8  # 8-byte alignment for any dtype's view
        self._grow_if_empty()
        start = self._find(size)
        self.peak = max(self.peak, self.live + self.overflow + size)
        if start is None:
            self.overflow += nbytes
            return _Slot(self, None, t.clone())
        span = [start, start + size, False]
        self.spans.append(span)
        self.tail = start + size
        self.live += size
        view = self.buf[start:start + nbytes].view(t.dtype)
        view.copy_(t.reshape(-1))
        return _Slot(self, span, view)

    def reset(self) -> None:
        """Forget every record (called when no shift is alive, so none is in use)."""
        self.spans.clear()
        self.tail = self.live = self.overflow = 0

    def free(self, span: list) -> None:
        span[2] = True
        self.live -= span[1] - span[0]
        while self.spans and self.spans[0][2]:
            self.spans.popleft()


class _Record:
    """How to restore one chunk exactly: lossy positions, their int8 codes, and the few full values."""

    __slots__ = ("bad", "code", "full", "where")

    def __init__(self, where: _Slot):
        self.where = where
        self.code: _Slot | None = None
        self.full: _Slot | None = None
        self.bad: _Slot | None = None

    def _slots(self) -> list[_Slot]:
        return [s for s in (self.where, self.code, self.bad, self.full) if s is not None and s.tensor is not None]

    @property
    def nbytes(self) -> int:
        return sum(s.tensor.numel() * s.tensor.element_size() for s in self._slots())

    def free(self) -> None:
        for s in self._slots():
            s.free()


class _Shift:
    """The chunks of one direction currently shifted, each with its offset and its restoration record.

    ``chunks[i]`` lists ``[alpha, record]`` per chunk of parameter ``i`` in order; ``alpha == 0`` marks a chunk
    that is back at its original value (an interrupted move leaves a mix of shifted and restored chunks).
    """

    def __init__(self, step: int, k: int):
        self.step, self.k = step, k
        self.chunks: dict[int, list[list]] = {}


class Perturbation:
    """Seeded directions over a fixed list of parameters.

    Args:
        params: the parameters to perturb (their order fixes the direction streams).
        seed: seed ``s`` of the streams; direction ``k`` of step ``t`` for parameter ``i`` is drawn from a
            generator seeded with ``stream_seed(s, t, k, i)``.
        distribution: ``"gaussian"`` (default, ``z ~ N(0, I)``) or ``"rademacher"`` (``±1`` with equal
            probability); both have ``E[z zᵀ] = I``.
        chunk: elements per generated chunk (default 2¹⁷: 512 KiB of float32 scratch per buffer).
        exact: keep the record that makes restoration bit-exact (default True); ``False`` drops it, so
            ``p + d − d`` may differ from ``p`` in the last bit of a few elements, as in MeZO.
    """

    def __init__(self, params: Sequence[torch.Tensor], seed: int, distribution: str = "gaussian",
                 chunk: int = 1 << 17, exact: bool = True):
        self.params = list(params)
        self.exact = bool(exact)
        self.seed = int(seed)
        self.distribution = check_choice("distribution", distribution, DISTRIBUTIONS)
        self.chunk = int(chunk)
        self._scratch: dict[tuple, torch.Tensor] = {}
        self._rings: dict[torch.device, _Ring] = {}
        self._pending: _Shift | None = None
        self.record_bytes = 0  # size of the restoration record while parameters are shifted (last peak)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_scratch"] = {}  # buffers are re-created on demand
        state["_rings"] = {}
        if self._pending is not None:
            raise RuntimeError("cannot copy a Perturbation while its parameters are shifted")
        return state

    # -- directions ------------------------------------------------------------------------------------
    def _buffer(self, slot: str, like: torch.Tensor, n: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = like.dtype if dtype is None else dtype
        key = (slot, dtype, like.device)
        buf = self._scratch.get(key)
        if buf is None or buf.numel() < n:
            buf = self._scratch[key] = torch.empty(max(n, min(self.chunk, like.numel())), dtype=dtype,
                                                   device=like.device)
        return buf[:n]

    def _chunks(self, i: int, step: int, k: int, slot: str = "z") -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(start, stop, z[start:stop])`` over the flattened direction ``k`` of parameter ``i``.

        ``z`` lives in the scratch buffer ``slot`` and is overwritten by the next chunk; each call has its own
        generator, so several directions can be walked side by side (in different slots).
        """
        p = self.params[i]
        gen = torch.Generator(device=p.device)
        gen.manual_seed(stream_seed(self.seed, step, k, i))
        n = p.numel()
        for a in range(0, n, self.chunk):
            b = min(n, a + self.chunk)
            z = self._buffer(slot, p, b - a)
            if self.distribution == "gaussian":
                torch.randn(b - a, generator=gen, dtype=p.dtype, device=p.device, out=z)
            else:
                bits = self._buffer(slot + "_bits", p, b - a, torch.int8)
                bits.random_(0, 2, generator=gen)
                z.copy_(bits).mul_(2).sub_(1)
            yield a, b, z

    def direction(self, i: int, step: int, k: int) -> torch.Tensor:
        """Direction ``k`` of step ``step`` for parameter ``i`` (a fresh tensor, same on every call)."""
        p = self.params[i]
        out = torch.empty(p.numel(), dtype=p.dtype, device=p.device)
        for a, b, z in self._chunks(i, step, k):
            out[a:b] = z
        return out.view(p.shape)

    def _active(self) -> list[int]:
        # A controller may freeze parameters after construction: frozen ones are neither shifted nor updated.
        return [i for i, p in enumerate(self.params) if p.requires_grad]

    @contextlib.contextmanager
    def _flat(self, i: int) -> Iterator[torch.Tensor]:
        """A flat view of parameter ``i``; a non-contiguous one is worked on as a contiguous copy, written back."""
        p = self.params[i]
        if p.is_contiguous():
            yield p.view(-1)
            return
        flat = p.detach().contiguous().view(-1)
        try:
            yield flat
        finally:
            with torch.no_grad():
                p.copy_(flat.view(p.shape))

    # -- the restoration record of one chunk ---------------------------------------------------------
    def _ring(self, like: torch.Tensor) -> _Ring:
        ring = self._rings.get(like.device)
        if ring is None:
            hint = sum(p.numel() * p.element_size() for p in self.params if p.device == like.device) // 16
            ring = self._rings[like.device] = _Ring(like.device, hint)
        return ring

    @staticmethod
    def _ulp(q: torch.Tensor) -> torch.Tensor:
        """The spacing of floating-point numbers above ``|q|`` (inf or NaN where that is not a number)."""
        a = q.abs()
        return torch.nextafter(a, torch.full_like(a, math.inf)) - a

    def _encode(self, seg: torch.Tensor, back: torch.Tensor, lossy: torch.Tensor) -> _Record | None:
        """What undoing needs to turn ``back`` (= fl(fl(p + d) − d)) into ``seg`` (= p) where they differ.

        Positions: chunk-local int32 indices, or a bitmask when that is smaller. Values: ``p = q + k·ulp(q)``
        with ``k`` an int8 code (|k| = 1 for ~90 % of the lossy elements); the few where that does not give
        ``p`` exactly (|k| > 127, zeros, NaN) keep their full value. None when the round trip is exact.
        """
        pos = _nonzero(lossy)
        count = pos.numel()
        if count == 0:
            return None
        n = seg.numel()
        ring = self._ring(seg)
        where = pos.to(torch.int32) if count * 32 < n else _pack(lossy)
        rec = _Record(ring.put(where))
        p_l, q_l = seg.index_select(0, pos), back.index_select(0, pos)
        ulp = self._ulp(q_l)
        code = torch.nan_to_num((p_l - q_l) / ulp).round_().clamp_(-127, 127).to(torch.int8)
        ok = _bits(q_l + code.to(seg.dtype) * ulp) == _bits(p_l)  # else (−0.0, NaN, |k| > 127): full value
        rec.code = ring.put(code)
        if not bool(ok.all()):
            bad = _nonzero(~ok)
            rec.bad, rec.full = ring.put(bad.to(torch.int32)), ring.put(p_l[bad])
        return rec

    def _decode(self, seg: torch.Tensor, rec: _Record) -> None:
        """``seg`` holds fl(fl(p + d) − d): write back ``p`` where the round trip lost bits; frees the record."""
        where = rec.where.get()
        pos = where.long() if where.dtype == torch.int32 else _unpack(where, seg.numel())
        q_l = seg.index_select(0, pos)
        seg.index_copy_(0, pos, q_l + rec.code.get().to(seg.dtype) * self._ulp(q_l))
        if rec.bad is not None:
            seg.index_copy_(0, pos[rec.bad.get().long()], rec.full.get())
        rec.free()

    # -- shifting one chunk ------------------------------------------------------------------------------
    def _shift_chunk(self, seg: torch.Tensor, d: torch.Tensor) -> tuple | None:
        """``seg += d`` in place (``d`` is consumed); the record that undoes it exactly (None if nothing lost)."""
        if not self.exact:
            seg.add_(d)
            return None
        moved = torch.add(seg, d, out=self._buffer("moved", seg, seg.numel()))
        back = torch.sub(moved, d, out=d)  # d is no longer needed: it now holds fl(fl(p + d) − d)
        # Compared as bit patterns: −0.0 vs +0.0 and NaN payloads count, so restoration is exact to the bit.
        lossy = torch.ne(_bits(back), _bits(seg), out=self._buffer("lossy", seg, seg.numel(), torch.bool))
        record = self._encode(seg, back, lossy)
        seg.copy_(moved)
        return record

    def _unshift_chunk(self, seg: torch.Tensor, d: torch.Tensor, record: tuple | None) -> None:
        seg.sub_(d)
        if record is not None:
            self._decode(seg, record)

    def _scaled(self, z: torch.Tensor, alpha: float) -> torch.Tensor:
        """``fl(alpha·z)`` in a scratch buffer, ``z`` kept (a move and a fused undo need ``z`` afterwards)."""
        return torch.mul(z, alpha, out=self._buffer("moved", z, z.numel()))

    def _shift(self, shift: _Shift, alpha: float) -> None:
        """Shift every active parameter by ``alpha·z_k`` (from wherever each chunk is now) — a move or a shift."""
        for i in self._active():
            entries = shift.chunks.setdefault(i, [])
            with self._flat(i) as flat:
                for c, (a, b, z) in enumerate(self._chunks(i, shift.step, shift.k)):
                    seg = flat[a:b]
                    if c < len(entries) and entries[c][0] != 0.0:
                        self._unshift_chunk(seg, self._scaled(z, entries[c][0]), entries[c][1])
                        entries[c][0], entries[c][1] = 0.0, None
                    record = self._shift_chunk(seg, z.mul_(alpha))
                    if c < len(entries):
                        entries[c][0], entries[c][1] = alpha, record
                    else:
                        entries.append([alpha, record])
        live = sum(r.nbytes for es in shift.chunks.values() for _, r in es if r is not None)
        self.record_bytes = max(self.record_bytes, live)

    def _unshift(self, shift: _Shift) -> None:
        for i, entries in shift.chunks.items():
            last = max((c for c, e in enumerate(entries) if e[0] != 0.0), default=-1)
            if last < 0:  # nothing of this parameter is shifted (e.g. already undone by a fused update)
                continue
            with self._flat(i) as flat:
                for c, (a, b, z) in enumerate(self._chunks(i, shift.step, shift.k)):
                    if c > last:
                        break
                    alpha, record = entries[c]
                    if alpha != 0.0:
                        self._unshift_chunk(flat[a:b], z.mul_(alpha), record)
                        entries[c][0], entries[c][1] = 0.0, None

    @contextlib.contextmanager
    def shifted(self, step: int, k: int, alpha: float) -> Iterator[None]:
        """Parameters are ``p + alpha·z_k`` inside the block and exactly ``p`` again after it, even on error."""
        shift = _Shift(step, k)
        try:
            with torch.no_grad():
                self._shift(shift, alpha)
            yield
        finally:
            with torch.no_grad():
                self._unshift(shift)

    # -- evaluate ------------------------------------------------------------------------------------------
    def batch_size(self) -> int | None:
        """``B`` when the perturbation holds one parameter with a leading dimension (per-row losses allowed)."""
        if len(self.params) == 1 and self.params[0].dim() >= 1:
            return self.params[0].shape[0]
        return None

    def evaluate(self, closure: Callable[[], torch.Tensor], step: int, shifts: Sequence[tuple[int, float]],
                 *, where: str = "closure", on_nonfinite: str = "raise", keep_last: bool = False) -> torch.Tensor:
        """Loss at ``p + a·z_k`` for each ``(k, a)`` in ``shifts``, under ``torch.no_grad``, as float64.

        Returns ``[len(shifts)]``, or ``[len(shifts), B]`` when the closure returns one loss per row of the single
        parameter (see :meth:`batch_size`). ``on_nonfinite="raise"``: a non-finite loss raises
        :class:`~gradkit.NonFiniteError` (parameters restored first); any other value returns it as is.
        A closure that returns something other than a scalar (or ``B`` losses) raises ``ValueError``; one that
        runs ``backward()`` or builds a graph raises ``RuntimeError``. ``keep_last``: leave the last shift in
        place for :meth:`apply` / :meth:`combine` (``fuse=True``) to undo in their pass (:meth:`release` undoes
        it otherwise); on any error every shift is undone.
        """
        batch = self.batch_size()
        rows: list[torch.Tensor] = []
        shift: _Shift | None = None
        active = [self.params[i] for i in self._active()]
        self.release()
        for ring in self._rings.values():
            ring.reset()
        try:
            for k, a in shifts:
                with torch.no_grad():
                    if shift is not None and shift.k != k:
                        self._unshift(shift)
                        shift = None
                    if shift is None:
                        shift = _Shift(step, k)
                    self._shift(shift, a)  # a move when the previous evaluation used the same direction
                loss = check_losses(call_forward_only(closure, active, where), batch, where=where)
                if rows and loss.shape != rows[0].shape:
                    raise ValueError(f"the {where} returned losses of shape {tuple(loss.shape)} after "
                                     f"{tuple(rows[0].shape)}: it must return the same shape at every evaluation")
                if on_nonfinite == "raise" and not bool(torch.isfinite(loss).all()):
                    raise NonFiniteError(f"the {where} returned a non-finite loss ({loss.tolist()}); "
                                         "nothing was updated")
                rows.append(loss)
        except BaseException:
            if shift is not None:
                with torch.no_grad():
                    self._unshift(shift)
            raise
        if shift is not None:
            if keep_last:
                self._pending = shift
            else:
                with torch.no_grad():
                    self._unshift(shift)
        if not rows:
            return torch.empty(0, dtype=torch.float64)
        return torch.stack(rows)

    def release(self) -> None:
        """Undo a shift left in place by ``evaluate(..., keep_last=True)`` (no-op when there is none)."""
        if self._pending is not None:
            shift, self._pending = self._pending, None
            with torch.no_grad():
                self._unshift(shift)

    # -- combine / apply -----------------------------------------------------------------------------------
    def _coefficients(self, weights: Any, n: int) -> list[float] | torch.Tensor:
        w = torch.as_tensor(weights, dtype=torch.float64)
        if w.shape[0] != n:
            raise ValueError(f"expected {n} weights, got shape {tuple(w.shape)}")
        return w.tolist() if w.dim() == 1 else w

    def _row_weights(self, w: torch.Tensor, a: int, b: int, p: torch.Tensor) -> torch.Tensor:
        """Per-element weights of elements ``a:b`` of ``p`` (flattened) from per-row weights ``w`` ``[B]``."""
        row = p.numel() // p.shape[0]
        lo, hi = a // row, (b - 1) // row + 1
        return w[lo:hi].to(p.dtype).repeat_interleave(row)[a - lo * row: b - lo * row]

    def _walk(self, i: int, step: int, ks: Sequence[int], coef: list[float] | torch.Tensor,
              visit: Callable, pending: _Shift | None) -> None:
        """Regenerate ``z_k`` for each ``k`` of ``ks`` in turn, chunk by chunk: ``visit(a, b, seg, z, w, j)``.

        Directions are visited in the order of ``ks`` (sums are formed in the same order on every rank). The
        pending shift of parameter ``i`` is undone during the first direction's pass, before its ``visit``; when
        it is that same direction, ``z`` is regenerated once for both uses.
        """
        p = self.params[i]
        entries = pending.chunks.get(i) if pending is not None else None
        with self._flat(i) as flat:
            for j, k in enumerate(ks):
                walk = self._chunks(i, step, k)
                undo = None
                if j == 0 and entries:
                    undo = walk if pending.k == k else self._chunks(i, step, pending.k, slot="zp")
                for c, (a, b, z) in enumerate(walk):
                    seg = flat[a:b]
                    if undo is not None:
                        zp = z if undo is walk else next(undo)[2]
                        if c < len(entries) and entries[c][0] != 0.0:
                            self._unshift_chunk(seg, self._scaled(zp, entries[c][0]), entries[c][1])
                            entries[c][0], entries[c][1] = 0.0, None
                    w = coef[j] if isinstance(coef, list) else self._row_weights(coef[j], a, b, p)
                    visit(a, b, seg, z, w, j)

    def _take_pending(self, step: int, fuse: bool) -> _Shift | None:
        pending, self._pending = self._pending, None
        if pending is not None and (not fuse or pending.step != step):
            self._pending = pending
            self.release()
            pending = None
        return pending

    def _finish(self, pending: _Shift | None) -> None:
        """Undo whatever of a pending shift the pass did not (parameters not updated, or an error mid-pass)."""
        if pending is not None:
            self._pending = pending
            self.release()

    def combine(self, step: int, ks: Sequence[int], weights: Any, *, fuse: bool = True) -> None:
        """Overwrite ``.grad`` with ``Σ_j weights[j]·z_{ks[j]}`` (one parameter-sized buffer per parameter).

        ``weights``: ``len(ks)`` numbers, or ``[len(ks), B]`` per-row weights (row ``b`` of the single parameter
        gets ``Σ_j weights[j, b]·z_{ks[j]}[b]``). A shift left in place by ``evaluate(keep_last=True)`` is undone
        in the same pass (``fuse=True``) or first.
        """
        coef = self._coefficients(weights, len(ks))
        pending = self._take_pending(step, fuse)
        try:
            with torch.no_grad():
                for i in self._active():
                    p = self.params[i]
                    acc = torch.zeros(p.numel(), dtype=p.dtype, device=p.device)

                    def visit(a, b, seg, z, w, j, acc=acc):
                        if isinstance(w, float):
                            acc[a:b].add_(z, alpha=w)
                        else:
                            acc[a:b].addcmul_(z, w)

                    self._walk(i, step, ks, coef, visit, pending)
                    p.grad = acc.view(p.shape)
        finally:
            self._finish(pending)

    def apply(self, step: int, ks: Sequence[int], weights: Any, scale: float | Sequence[float | None],
              decay: float | Sequence[float] = 0.0, *, fuse: bool = True) -> None:
        """``p ← p·(1 − decay) + scale·Σ_j weights[j]·z_{ks[j]}`` in place, with no gradient buffer (fused update).

        ``scale`` and ``decay``: one number for every trainable parameter, or one per parameter of the
        perturbation (``scale`` None: that parameter is not updated). ``weights`` as in :meth:`combine`. A pending
        shift (``evaluate(keep_last=True)``) is undone in the same pass, before the decay and the update.
        """
        coef = self._coefficients(weights, len(ks))
        n = len(self.params)
        scales = [float(scale)] * n if isinstance(scale, (int, float)) else list(scale)
        decays = [float(decay)] * n if isinstance(decay, (int, float)) else [float(d) for d in decay]
        pending = self._take_pending(step, fuse)
        try:
            with torch.no_grad():
                for i in self._active():
                    if scales[i] is None:
                        continue
                    s, dec = float(scales[i]), decays[i]

                    def visit(a, b, seg, z, w, j, s=s, dec=dec):
                        if dec and j == 0:  # decoupled decay first, as p·(1 − ηλ) − η·ĝ
                            seg.mul_(1.0 - dec)
                        if isinstance(w, float):
                            seg.add_(z, alpha=s * w)
                        else:
                            seg.addcmul_(z, w, value=s)

                    self._walk(i, step, ks, coef, visit, pending)
        finally:
            self._finish(pending)


def finite_mean(values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Mean over ``dim`` of the finite entries (NaN where none is finite)."""
    ok = torch.isfinite(values)
    total = torch.where(ok, values, torch.zeros_like(values)).sum(dim)
    count = ok.sum(dim)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))
