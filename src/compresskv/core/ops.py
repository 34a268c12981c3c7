"""Small tensor operations for the decode step that do not wake the CPU's thread pool.

On CPU, ``torch.matmul`` of batched operands and ``softmax`` always run in a parallel region, and a
parallel region wakes the OpenMP threads. With ``OMP_WAIT_POLICY=PASSIVE`` (what compresskv's
command sets, see ``benchmarks/threads.md``) the threads sleep between regions, and waking them
costs about 50 µs on the 2-core CI machine: a ``[3, 1, 64] @ [3, 64, 32]`` product takes 5 µs with
the threads awake and 53 µs after a large matmul (what precedes it in a real decode step), and a
softmax over ``[1, 3, 3, 2]`` takes 55 µs (softmax and ``exp`` go parallel at any size). A projected cache's decode step had about ten such
operations per layer: more than halving the cache saved at 1k tokens. Elementwise kernels go
parallel only above ATen's grain size (32768 elements), so the same operations written as
broadcast multiplies, sums and sigmoids run on the calling thread.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch

T = TypeVar("T")

#: ATen's ``internal::GRAIN_SIZE``: elementwise kernels over fewer elements run on one thread
SMALL = 32768
#: On CPU, a decode step's attention reading at most this many bytes of keys and values runs on the
#: calling thread (:func:`serial_when_small`)
SERIAL_READ_BYTES = 2 << 20


def _pooled(x: torch.Tensor) -> bool:
    """Whether small operations on ``x`` may be written elementwise: on CPU, with a thread pool to
    keep asleep (with one thread there is no wake-up, and ATen's own kernel is the faster); never
    under torch.compile (inductor fuses the ops itself; and ``get_num_threads`` does not trace)."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and torch.get_num_threads() > 1


def small_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.matmul(a, b)`` for ``[..., m, k]`` and ``[..., k, n]`` operands (batch dims broadcast);
    as a broadcast multiply and a sum over ``k`` when that is small (see :func:`_pooled`), and
    as ``torch.bmm`` for 3-D operands of one batch size (what :func:`heads_matmul` passes)."""
    if _pooled(a):  # (asked first: the elements count is Python work a decode step pays per product)
        batch = 1
        sa, sb = a.shape[:-2], b.shape[:-2]
        for i in range(1, max(len(sa), len(sb)) + 1):
            batch *= max(sa[-i] if i <= len(sa) else 1, sb[-i] if i <= len(sb) else 1)
        if batch * a.shape[-2] * a.shape[-1] * b.shape[-1] <= SMALL:
            return (a.unsqueeze(-1) * b.unsqueeze(-3)).sum(-2)
    if a.dim() == 3 and b.dim() == 3 and a.shape[0] == b.shape[0]:
        return torch.bmm(a, b)
    return torch.matmul(a, b)


def product_for(x: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The product for a decode step's 3-D operands of one batch size on ``x``'s device:
    :func:`small_matmul` where a thread pool is to be kept asleep, else ``torch.bmm`` itself (asked
    once per read, not per product: each check is Python work a decode step pays per layer)."""
    return small_matmul if _pooled(x) else torch.bmm


def add_product(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                mm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``c + a @ b`` for 3-D operands of one batch size (``c`` broadcast), with ``mm`` the read's
    :func:`product_for`: one ``baddbmm`` where that is ``torch.bmm``, else the product and an add."""
    return torch.baddbmm(c, a, b) if mm is torch.bmm else mm(a, b) + c


def scaled_product(a: torch.Tensor, b: torch.Tensor, alpha: float,
                   mm: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``alpha · (a @ b)`` for 3-D operands of one batch size, with ``mm`` the read's
    :func:`product_for`: where that is ``torch.bmm``, one ``baddbmm`` (``beta=0``: its input is not
    read) whose ``alpha`` scales, so that the scale costs no kernel of its own (a multiply by a
    Python number also converts the number: ~15 µs a layer of a CPU decode step); else the
    product, scaled (compiled, inductor fuses the two)."""
    if mm is torch.bmm and not torch.compiler.is_compiling():
        unread = _UNREAD.get((a.dtype, a.device))
        if unread is None:
            unread = _UNREAD[(a.dtype, a.device)] = a.new_empty(())
        return torch.baddbmm(unread, a, b, beta=0.0, alpha=alpha)
    return mm(a, b) * alpha


#: :func:`scaled_product`'s ``baddbmm`` input (never read), one 0-d tensor per (dtype, device)
_UNREAD: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def heads_matmul(a: torch.Tensor, *mats: torch.Tensor) -> torch.Tensor:
    """``a @ mats[0] @ mats[1] ...`` for ``a`` ``[batch, heads, m, k]`` and each matrix either
    ``[batch, heads, k, n]`` or, one per head, ``[heads, k, n]``; ``[batch, heads, m, n_last]``.

    With a thread pool to keep asleep, :func:`small_matmul` on the operands as they are. Otherwise
    one ``bmm`` per product over ``batch·heads`` 3-D views, the chain staying 3-D: ``torch.matmul``
    of 4-D operands dispatches expand, reshape, bmm and view each time, and a decode step runs
    these products per layer right after the model's linears have streamed every cache line out,
    where each dispatch costs several times its warm cost (see ``benchmarks/results/decode_pca_bmm.md``).
    """
    if _pooled(a):  # small products go elementwise (small_matmul), on the 4-D operands as they are
        out = a
        for b in mats:
            out = small_matmul(out, b)
        return out
    bsz, heads, m, k = a.shape
    out = a.reshape(bsz * heads, m, k)
    for b in mats:
        out = torch.bmm(out, per_batch(b, bsz) if b.dim() == 3 else b.reshape(bsz * heads, *b.shape[-2:]))
    return out.view(bsz, heads, m, -1)


def per_batch(m: torch.Tensor, bsz: int) -> torch.Tensor:
    """Per-head matrices ``[heads, k, n]`` for products over ``[batch·heads]`` views: the same
    matrices for every row of the batch (repeated, as ``torch.matmul`` broadcasting would)."""
    return m if bsz == 1 else m.repeat(bsz, 1, 1)


def small_softmax(x: torch.Tensor) -> torch.Tensor:
    """``x.softmax(-1)``; written out when small (see :func:`_pooled`), with ``exp(y)`` as
    ``σ(y)/σ(−y)``: ``exp`` (a VML kernel) goes parallel from a few hundred elements, ``sigmoid`` only
    above the grain size. ``y = x − max ≤ 0``, so ``σ(−y) ∈ [½, 1]``: no cancellation (measured
    within 1e-6 relative of ``softmax``)."""
    if x.numel() <= SMALL and _pooled(x):
        y = x - x.amax(dim=-1, keepdim=True)
        e = torch.sigmoid(y).div_(torch.sigmoid(y.neg_()))
        return e.div_(e.sum(dim=-1, keepdim=True))
    return x.softmax(dim=-1)


def take_tokens(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``t.gather(2, index[..., None].expand(..., d))`` for ``t`` ``[b, h, T, d]`` and ``index``
    ``[b, h, n]``, as one ``index_select`` of whole token rows (five times faster than ``gather``
    at 4k tokens on a CPU, where eviction's copy was a sixth of a bounded cache's step). ``t`` may
    be a view of the first tokens of a larger room; other layouts fall back to ``gather``."""
    b, h, tokens, d = t.shape
    sb, sh, st, sd = t.stride()
    if sd != 1 or st < d or sh % st or (b > 1 and sb != h * sh) or t.numel() == 0:
        return t.gather(2, index[..., None].expand(-1, -1, -1, d))
    step = sh // st  # token rows from one head's first token to the next head's
    rows = t.as_strided(((b * h - 1) * step + tokens, d), (st, 1))
    heads = torch.arange(b * h, device=t.device).view(b, h, 1) * step
    return rows.index_select(0, (index + heads).flatten()).view(b, h, index.shape[-1], d)


def serial_read(query_len: int, read_bytes: int, device: torch.device) -> bool:
    """Whether an attention call of ``query_len`` new tokens reading ``read_bytes`` of stored keys
    and values is a decode step that :func:`serial_when_small` runs on one thread (eagerly, on CPU,
    at most :data:`SERIAL_READ_BYTES`)."""
    # asked first: torch.get_num_threads does not trace, and a symbolic size compared would guard
    return (not torch.compiler.is_compiling() and query_len == 1 and device.type == "cpu"
            and read_bytes <= SERIAL_READ_BYTES)


def serial_when_small(query_len: int, read_bytes: int, device: torch.device, fn: Callable[..., T], *args: Any,
                      **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``, an attention call of ``query_len`` new tokens reading ``read_bytes``
    of stored keys and values; with one torch thread when it is a decode step (one token: a prompt
    or chunk has query blocks worth the threads) that reads at most :data:`SERIAL_READ_BYTES` on CPU.

    The fused attention kernels split their work by (batch, head, query block): a decode step of a
    small model has a few such items, and waking the thread pool for them costs more than splitting
    saves. Measured in the embedded model's decode (3 KV heads, 2 threads, A/B in one process):
    PCA@0.5 at 1k tokens (0.8 MB of latents per call) 1.04x DynamicCache serial against 1.00x;
    SnapKV@0.75 at 4k (1.5 MB) 1.48x against 1.34x; at 3 MB (PCA@0.5 and SnapKV@0.5 at 4k) even or
    worse; at 6 MB two threads are faster. Switching the count costs under a microsecond; it is put
    back even if ``fn`` raises. (The count is the process's: another Python thread running torch
    ops meanwhile runs them on one thread too.)
    """
    if not serial_read(query_len, read_bytes, device):
        return fn(*args, **kwargs)
    threads = torch.get_num_threads()
    if threads == 1:
        return fn(*args, **kwargs)
    torch.set_num_threads(1)
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)
