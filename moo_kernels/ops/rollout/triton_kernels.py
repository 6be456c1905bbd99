"""Triton kernel of rollout_correction (semantics: moo_kernels/ops/rollout/reference.py).

One program per row, two passes over its tokens in BLOCK_T tiles, in float64: 1. the row's statistics (active
tokens, the sum of d, and for the sequence criteria the sums and maxima of k1, k2, k3); 2. every token's weight
and mask, written, and the row's partial metrics (PARTS values), which the launcher adds over the rows in a fixed
order (torch sums: deterministic, no atomics). low / high arrive as NaN when absent (moo_kernels._spec
.ABSENT_FLOAT); reject is None without rejection (a compile-time branch).
"""

import triton
import triton.language as tl

from moo_kernels import _codes
from moo_kernels.ops.rollout.spec import _SLOTS

SEQUENCE = tl.constexpr(_codes.IS_LEVEL["sequence"])
MASK = tl.constexpr(_codes.IS_MODE["mask"])
LOG_RATIO_MAX = tl.constexpr(_codes.LOG_RATIO_MAX)
PARTS = tl.constexpr(13)  # the partial metrics of a row, in the order of PARTIALS in triton_launch.py
# the first slot of each rejection criterion in the reject tensor (k1: log lower, then log upper)
TOKEN_K1, TOKEN_K2, TOKEN_K3 = (tl.constexpr(_SLOTS[f"token_k{i}"][0]) for i in (1, 2, 3))
SUM_K1, SUM_K2, SUM_K3 = (tl.constexpr(_SLOTS[f"seq_sum_k{i}"][0]) for i in (1, 2, 3))
MEAN_K1, MEAN_K2, MEAN_K3 = (tl.constexpr(_SLOTS[f"seq_mean_k{i}"][0]) for i in (1, 2, 3))
MAX_K2, MAX_K3 = (tl.constexpr(_SLOTS[f"seq_max_k{i}"][0]) for i in (2, 3))


@triton.jit
def _keep_k1(stat, reject, i):
    """log(lower) <= stat <= log(upper) (slots i, i + 1); true when the criterion is off (NaN: no comparison
    holds)."""
    return ~((stat < tl.load(reject + i)) | (stat > tl.load(reject + i + 1)))


@triton.jit
def _keep_upper(stat, reject, i):
    """stat <= upper (slot i); true when the criterion is off."""
    return ~(stat > tl.load(reject + i))


@triton.jit
def rollout_kernel(
    old_logp,
    old_logp_strides,
    rollout_logp,
    rollout_logp_strides,
    mask,
    mask_strides,
    reject,
    out_weights,
    out_mask,
    parts,
    T,
    low: tl.float64,
    high: tl.float64,
    level: tl.constexpr,
    mode: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    tt = tl.arange(0, BLOCK_T)
    zero = tl.sum(tl.zeros([BLOCK_T], dtype=tl.float64), axis=0)

    # ---- pass 1: the row's statistics ---------------------------------------------------------------------
    n, s = zero, zero
    k1s, k2s, k3s, k2m, k3m = zero, zero, zero, zero - float("inf"), zero - float("inf")
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tt
        inb = t < T
        act = inb & (tl.load(mask + row * mask_strides[0] + t * mask_strides[1], mask=inb, other=0) != 0)
        d = _log_ratio(old_logp, old_logp_strides, rollout_logp, rollout_logp_strides, row, t, act)
        n += tl.sum(act.to(tl.float64), axis=0)
        s += tl.sum(d, axis=0)
        if reject is not None:
            dc = tl.minimum(tl.maximum(d, -LOG_RATIO_MAX), LOG_RATIO_MAX)
            k2 = 0.5 * dc * dc
            k3 = tl.exp(dc) - 1.0 - dc
            k1s += tl.sum(tl.where(act, -dc, 0.0), axis=0)
            k2s += tl.sum(tl.where(act, k2, 0.0), axis=0)
            k3s += tl.sum(tl.where(act, k3, 0.0), axis=0)
            k2m = tl.maximum(k2m, tl.max(tl.where(act, k2, float("-inf")), axis=0))
            k3m = tl.maximum(k3m, tl.max(tl.where(act, k3, float("-inf")), axis=0))
    has = n > 0
    keep_row = n >= 0.0  # true
    if reject is not None:  # the sequence criteria
        mean_div = tl.maximum(n, 1.0)
        k2m = tl.where(has, k2m, 0.0)
        k3m = tl.where(has, k3m, 0.0)
        keep_row = keep_row & _keep_k1(k1s, reject, SUM_K1) & _keep_upper(k2s, reject, SUM_K2)
        keep_row = keep_row & _keep_upper(k3s, reject, SUM_K3) & _keep_k1(k1s / mean_div, reject, MEAN_K1)
        keep_row = keep_row & _keep_upper(k2s / mean_div, reject, MEAN_K2)
        keep_row = keep_row & _keep_upper(k3s / mean_div, reject, MEAN_K3) & _keep_upper(k2m, reject, MAX_K2)
        keep_row = keep_row & _keep_upper(k3m, reject, MAX_K3)
    seq_raw = tl.exp(tl.minimum(tl.maximum(s, -LOG_RATIO_MAX), LOG_RATIO_MAX))

    # ---- pass 2: weights, mask and the row's partial metrics -------------------------------------------------
    w_sum, w_max, w_min, wc_sum, wc2_sum = zero, zero - float("inf"), zero + float("inf"), zero, zero
    n_trunc, n_masked, n_rej, k1_sum, k3_sum = zero, zero, zero, zero, zero
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tt
        inb = t < T
        act = inb & (tl.load(mask + row * mask_strides[0] + t * mask_strides[1], mask=inb, other=0) != 0)
        d = _log_ratio(old_logp, old_logp_strides, rollout_logp, rollout_logp_strides, row, t, act)
        dc = tl.minimum(tl.maximum(d, -LOG_RATIO_MAX), LOG_RATIO_MAX)
        if level == SEQUENCE:
            raw = tl.where(act, seq_raw, 0.0)
        else:
            raw = tl.where(act, tl.exp(dc), 0.0)
        above = raw > high  # false for an absent (NaN) bound
        below = raw < low
        if mode == MASK:
            w = tl.where(act & ~above & ~below, raw, 0.0)
            n_masked += tl.sum((act & (above | below)).to(tl.float64), axis=0)
        else:
            w = tl.where(above, high, tl.where(below, low, raw))
            w = tl.where(act, w, 0.0)
            n_trunc += tl.sum((act & (w != raw)).to(tl.float64), axis=0)
        keep = tl.where(keep_row, act, act & ~act)  # act, unless a sequence criterion rejected the row
        if reject is not None:
            keep = keep & _keep_k1(-dc, reject, TOKEN_K1) & _keep_upper(0.5 * dc * dc, reject, TOKEN_K2)
            keep = keep & _keep_upper(tl.exp(dc) - 1.0 - dc, reject, TOKEN_K3)
        tl.store(out_weights + row * T + t, w.to(out_weights.dtype.element_ty), mask=inb)
        tl.store(out_mask + row * T + t, keep.to(tl.uint8), mask=inb)
        wc = tl.where(w > high, high, w)
        w_sum += tl.sum(w, axis=0)
        w_max = tl.maximum(w_max, tl.max(tl.where(act, w, float("-inf")), axis=0))
        w_min = tl.minimum(w_min, tl.min(tl.where(act, w, float("inf")), axis=0))
        wc_sum += tl.sum(wc, axis=0)
        wc2_sum += tl.sum(wc * wc, axis=0)
        n_rej += tl.sum((act & ~keep).to(tl.float64), axis=0)
        k1_sum += tl.sum(-d, axis=0)
        k3_sum += tl.sum(tl.where(act, tl.exp(dc) - dc - 1.0, 0.0), axis=0)
    # the row's weight, for the sequence-level batch normalisation (0 where masked or without active tokens)
    row_w = tl.where(has, tl.maximum(w_max, 0.0), 0.0)
    p = parts + row * PARTS
    tl.store(p + 0, n)
    tl.store(p + 1, w_sum)
    tl.store(p + 2, w_max)
    tl.store(p + 3, w_min)
    tl.store(p + 4, wc_sum)
    tl.store(p + 5, wc2_sum)
    tl.store(p + 6, n_trunc)
    tl.store(p + 7, n_masked)
    tl.store(p + 8, n_rej)
    tl.store(p + 9, (n_rej > 0).to(tl.float64))
    tl.store(p + 10, k1_sum)
    tl.store(p + 11, k3_sum)
    tl.store(p + 12, row_w)


@triton.jit
def _log_ratio(old_logp, old_logp_strides, rollout_logp, rollout_logp_strides, row, t, act):
    """d = old_logp - rollout_logp at active tokens, 0 elsewhere and where it is NaN (float64)."""
    a = tl.load(old_logp + row * old_logp_strides[0] + t * old_logp_strides[1], mask=act, other=0.0)
    b = tl.load(rollout_logp + row * rollout_logp_strides[0] + t * rollout_logp_strides[1], mask=act, other=0.0)
    d = a.to(tl.float64) - b.to(tl.float64)
    return tl.where(act & (d == d), d, 0.0)
