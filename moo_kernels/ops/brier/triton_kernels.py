"""Triton kernel of the Brier reward (elementwise, with an in-kernel range check)."""

import triton
import triton.language as tl

NO_ERROR = tl.constexpr(2**62)


@triton.jit
def _brier_fwd_kernel(c_ptr, q_ptr, out_ptr, status_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    c = tl.load(c_ptr + offs, mask=ok, other=0).to(tl.float32)
    q = tl.load(q_ptr + offs, mask=ok, other=0.0)
    bad = ok & ~((q >= 0) & (q <= 1))
    first = tl.min(tl.where(bad, offs, NO_ERROR), axis=0)
    tl.atomic_min(status_ptr, first, mask=first < NO_ERROR)
    d = q - c.to(q.dtype)
    tl.store(out_ptr + offs, c.to(q.dtype) - d * d, mask=ok)
