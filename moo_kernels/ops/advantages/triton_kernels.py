"""Triton kernels of the multi-objective advantage step (kernels only; see cuda.py for launchers).

One program owns BLOCK_G whole groups and walks them in chunks of BLOCK_J samples, the K objectives
side by side in BLOCK_K lanes. Pass 1 gathers the group statistics (per chunk two-pass, merged across
chunks with Chan's formula, plus min/max so that constant groups are exact); pass 2 normalises,
combines and writes. For the common GRPO sizes a group fits in one chunk and pass 2 re-reads it
from L1/L2, so HBM sees each reward once. batch_normalize needs a batch-wide statistic: pass 2
then writes the raw advantage and a per-program partial (count, mean, M2, min, max) that the
second kernel combines in a fixed order (deterministic, no float atomics) before finishing.
"""

import triton
import triton.language as tl

# Mode codes (mirrors moo_kernels._options).
ZSCORE = tl.constexpr(0)
CENTER = tl.constexpr(1)
RLOO = tl.constexpr(2)
SCALARIZE = tl.constexpr(0)
VARIANCE = tl.constexpr(2)
NO_ERROR = tl.constexpr(2**62)


@triton.jit
def _to_compute(x, F64: tl.constexpr):
    if F64:
        return x.to(tl.float64)
    else:
        return x.to(tl.float32)


@triton.jit
def _chunk_stats(x, take, AXIS: tl.constexpr):
    """Count, mean, M2, min and max of x over `take`, reduced along AXIS."""
    cnt = tl.sum(take.to(x.dtype), axis=AXIS)
    mean = tl.sum(tl.where(take, x, 0.0), axis=AXIS) / tl.maximum(cnt, 1.0)
    d = tl.where(take, x - tl.expand_dims(mean, AXIS), 0.0)
    m2 = tl.sum(d * d, axis=AXIS)
    lo = tl.min(tl.where(take, x, float("inf")), axis=AXIS)
    hi = tl.max(tl.where(take, x, float("-inf")), axis=AXIS)
    return cnt, mean, m2, lo, hi


@triton.jit
def _chan_merge(n, mean, m2, lo, hi, cn, cmean, cm2, clo, chi):
    tot = n + cn
    frac = cn / tl.maximum(tot, 1.0)
    delta = cmean - mean
    mean = mean + delta * frac
    m2 = m2 + cm2 + delta * delta * (n * frac)
    return tot, mean, m2, tl.minimum(lo, clo), tl.maximum(hi, chi)


@triton.jit
def _finalize_stats(n, mean, m2, lo, hi, UNBIASED: tl.constexpr):
    """Mean and std from merged moments; exact (mean = value, std = 0) when nothing varies."""
    varies = hi > lo
    mean = tl.where(varies, mean, tl.where(n > 0, hi, 0.0))
    if UNBIASED:
        denom = n - 1.0
    else:
        denom = n
    var = tl.where(varies & (denom > 0), m2 / tl.maximum(denom, 1.0), 0.0)
    return mean, tl.sqrt(var), varies


@triton.jit
def _normalize(x, mean, sd, n, eps, NORMALIZE: tl.constexpr):
    if NORMALIZE == ZSCORE:
        den = sd + eps
        out = tl.where(den > 0, (x - mean) / tl.where(den > 0, den, 1.0), 0.0)
    elif NORMALIZE == CENTER:
        out = x - mean
    elif NORMALIZE == RLOO:
        many = n > 1
        out = tl.where(many, (x - mean) * n / tl.where(many, n - 1.0, 1.0), 0.0)
    else:
        out = x
    return out


@triton.jit
def _finish(a, contrib, infeasible, pos_scale, neg_scale, clip, infeasible_adv, HAS_CLIP: tl.constexpr):
    """Sign shaping, clipping, then the fixed values of infeasible / rejected / invalid samples."""
    a = a * tl.where(a > 0, pos_scale, neg_scale)
    if HAS_CLIP:
        a = tl.minimum(tl.maximum(a, -clip), clip)
    return tl.where(contrib, a, tl.where(infeasible, infeasible_adv, 0.0))


@triton.jit
def _load_chunk(
    j0,
    start,
    count,
    jj,
    kk,
    k_ok,
    r_ptr,
    stride_rn,
    stride_rk,
    order_ptr,
    valid_ptr,
    rg_ptr,
    stride_rgn,
    stride_rgk,
    gates_ptr,
    stride_gn,
    stride_gm,
    M,
    gated_value,
    CONTIGUOUS: tl.constexpr,
    HAS_VALID: tl.constexpr,
    HAS_RGATES: tl.constexpr,
    HAS_GATES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    F64: tl.constexpr,
):
    """Samples j0 + jj of each group: rewards [BG, BJ, BK] after reward gates, and masks."""
    j = j0 + jj
    in_group = j[None, :] < count[:, None]
    pos = start[:, None] + j[None, :]
    if CONTIGUOUS:
        row = pos
    else:
        row = tl.load(order_ptr + pos, mask=in_group, other=0)
    valid = in_group
    if HAS_VALID:
        valid = valid & (tl.load(valid_ptr + row, mask=in_group, other=0) != 0)
    feasible = valid
    if HAS_GATES:
        mm = tl.arange(0, BLOCK_M)
        g = tl.load(
            gates_ptr + row[:, :, None] * stride_gn + mm[None, None, :] * stride_gm,
            mask=valid[:, :, None] & (mm < M)[None, None, :],
            other=1,
        )
        feasible = feasible & (tl.min(g.to(tl.int32), axis=2) != 0)
    m3 = valid[:, :, None] & k_ok[None, None, :]
    x = tl.load(r_ptr + row[:, :, None] * stride_rn + kk[None, None, :] * stride_rk, mask=m3, other=0.0)
    x = _to_compute(x, F64)
    if HAS_RGATES:
        gate = tl.load(rg_ptr + row[:, :, None] * stride_rgn + kk[None, None, :] * stride_rgk, mask=m3, other=1)
        x = tl.where(gate != 0, x, gated_value)
    finite = m3 & (tl.abs(x) < float("inf"))
    x = tl.where(finite, x, 0.0)
    return x, finite, m3, row, in_group, valid, feasible


@triton.jit
def _advantages_fwd_kernel(
    r_ptr,
    stride_rn,
    stride_rk,
    order_ptr,
    offsets_ptr,
    group_size,
    num_groups,
    max_count,
    w_ptr,
    valid_ptr,
    rg_ptr,
    stride_rgn,
    stride_rgk,
    gates_ptr,
    stride_gn,
    stride_gm,
    M,
    adv_ptr,
    gmask_ptr,
    smask_ptr,
    weff_ptr,
    mean_ptr,
    std_ptr,
    code_ptr,
    part_ptr,
    status_ptr,
    K,
    eps,
    gated_value,
    infeasible_adv,
    min_feasible,
    pos_scale,
    neg_scale,
    clip,
    BLOCK_G: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CONTIGUOUS: tl.constexpr,
    HAS_VALID: tl.constexpr,
    HAS_RGATES: tl.constexpr,
    HAS_GATES: tl.constexpr,
    NORMALIZE: tl.constexpr,
    UNBIASED: tl.constexpr,
    WEIGHTING: tl.constexpr,
    DROP_ZERO_VAR: tl.constexpr,
    BATCH_NORM: tl.constexpr,
    CHECK_FINITE: tl.constexpr,
    CHECK_WEIGHTS: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    F64: tl.constexpr,
):
    pid = tl.program_id(0)
    g = pid.to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    g_ok = g < num_groups
    if CONTIGUOUS:
        start = g * group_size
        count = tl.where(g_ok, group_size, 0).to(tl.int64)
    else:
        start = tl.load(offsets_ptr + g, mask=g_ok, other=0)
        count = tl.load(offsets_ptr + g + 1, mask=g_ok, other=0) - start
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    jj = tl.arange(0, BLOCK_J).to(tl.int64)
    w = _to_compute(tl.load(w_ptr + kk, mask=k_ok, other=0.0), F64)
    if CHECK_WEIGHTS:
        bad_w = tl.min(tl.where(k_ok & ~((w >= 0) & (w < float("inf"))), kk.to(tl.int64), NO_ERROR), axis=0)
        tl.atomic_min(status_ptr + 1, bad_w, mask=(pid == 0) & (bad_w < NO_ERROR))

    # ---- pass 1: per-objective and combined-reward statistics --------------------------------
    zk = tl.zeros([BLOCK_G, BLOCK_K], dtype=w.dtype)
    n, mean, m2, lo, hi = zk, zk, zk, zk + float("inf"), zk - float("inf")
    zg = tl.sum(zk, axis=1)
    sn, smean, sm2, slo, shi = zg, zg, zg, zg + float("inf"), zg - float("inf")
    for j0 in range(0, max_count, BLOCK_J):
        x, finite, m3, row, in_group, valid, feasible = _load_chunk(
            j0,
            start,
            count,
            jj,
            kk,
            k_ok,
            r_ptr,
            stride_rn,
            stride_rk,
            order_ptr,
            valid_ptr,
            rg_ptr,
            stride_rgn,
            stride_rgk,
            gates_ptr,
            stride_gn,
            stride_gm,
            M,
            gated_value,
            CONTIGUOUS,
            HAS_VALID,
            HAS_RGATES,
            HAS_GATES,
            BLOCK_M,
            F64,
        )
        if CHECK_FINITE:
            flat = tl.where(m3 & ~finite, row[:, :, None] * K + kk[None, None, :], NO_ERROR)
            first = tl.min(tl.min(tl.min(flat, axis=2), axis=1), axis=0)
            tl.atomic_min(status_ptr, first, mask=first < NO_ERROR)
        take = feasible[:, :, None] & finite
        cn, cmean, cm2, clo, chi = _chunk_stats(x, take, 1)
        n, mean, m2, lo, hi = _chan_merge(n, mean, m2, lo, hi, cn, cmean, cm2, clo, chi)
        s = tl.sum(x * w[None, None, :], axis=2)
        cn, cmean, cm2, clo, chi = _chunk_stats(s, feasible, 1)
        sn, smean, sm2, slo, shi = _chan_merge(sn, smean, sm2, slo, shi, cn, cmean, cm2, clo, chi)

    mean, sd, _ = _finalize_stats(n, mean, m2, lo, hi, UNBIASED)
    smean, ssd, svaries = _finalize_stats(sn, smean, sm2, slo, shi, UNBIASED)
    if WEIGHTING == VARIANCE:
        ws = w[None, :] * sd
        tot = tl.sum(ws, axis=1)[:, None]
        weff = tl.where(tot > 0, ws / tl.where(tot > 0, tot, 1.0), 0.0)
    else:
        weff = zk + w[None, :]
    accept = sn >= min_feasible
    if DROP_ZERO_VAR:
        accept = accept & svaries
    gk = g[:, None] * K + kk[None, :]
    gk_ok = g_ok[:, None] & k_ok[None, :]
    tl.store(mean_ptr + gk, mean, mask=gk_ok)
    tl.store(std_ptr + gk, sd, mask=gk_ok)
    tl.store(weff_ptr + gk, weff, mask=gk_ok)
    tl.store(gmask_ptr + g, accept.to(tl.uint8), mask=g_ok)

    # ---- pass 2: normalise, combine, finish (or hand over to the batch kernel) ----------------
    zero = tl.sum(zg, axis=0)
    bn, bmean, bm2, blo, bhi = zero, zero, zero, zero + float("inf"), zero - float("inf")
    for j0 in range(0, max_count, BLOCK_J):
        x, finite, m3, row, in_group, valid, feasible = _load_chunk(
            j0,
            start,
            count,
            jj,
            kk,
            k_ok,
            r_ptr,
            stride_rn,
            stride_rk,
            order_ptr,
            valid_ptr,
            rg_ptr,
            stride_rgn,
            stride_rgk,
            gates_ptr,
            stride_gn,
            stride_gm,
            M,
            gated_value,
            CONTIGUOUS,
            HAS_VALID,
            HAS_RGATES,
            HAS_GATES,
            BLOCK_M,
            F64,
        )
        if WEIGHTING == SCALARIZE:
            s = tl.sum(x * w[None, None, :], axis=2)
            a = _normalize(s, smean[:, None], ssd[:, None], sn[:, None], eps, NORMALIZE)
            a = tl.where(feasible, a, 0.0)
        else:
            a_k = _normalize(x, mean[:, None, :], sd[:, None, :], n[:, None, :], eps, NORMALIZE)
            a_k = tl.where(feasible[:, :, None] & finite, a_k, 0.0)
            a = tl.sum(a_k * weff[:, None, :], axis=2)
        contrib = feasible & accept[:, None]
        infeasible = valid & ~feasible & accept[:, None]
        if BATCH_NORM:
            tl.store(adv_ptr + row, a.to(adv_ptr.dtype.element_ty), mask=in_group)
            tl.store(code_ptr + row, (contrib.to(tl.uint8) + 2 * infeasible.to(tl.uint8)), mask=in_group)
            cn, cmean, cm2, clo, chi = _chunk_stats(a, contrib, 1)
            cn, cmean, cm2, clo, chi = _merge_rows(cn, cmean, cm2, clo, chi)
            bn, bmean, bm2, blo, bhi = _chan_merge(bn, bmean, bm2, blo, bhi, cn, cmean, cm2, clo, chi)
        else:
            a = _finish(a, contrib, infeasible, pos_scale, neg_scale, clip, infeasible_adv, HAS_CLIP)
            tl.store(adv_ptr + row, a.to(adv_ptr.dtype.element_ty), mask=in_group)
            keep = contrib | (infeasible & (infeasible_adv != 0.0))
            tl.store(smask_ptr + row, keep.to(tl.uint8), mask=in_group)
    if BATCH_NORM:
        tl.store(part_ptr + pid * 5 + 0, bn)
        tl.store(part_ptr + pid * 5 + 1, bmean)
        tl.store(part_ptr + pid * 5 + 2, bm2)
        tl.store(part_ptr + pid * 5 + 3, blo)
        tl.store(part_ptr + pid * 5 + 4, bhi)


@triton.jit
def _merge_rows(cn, cmean, cm2, clo, chi):
    """Chan-merge per-group moments [BG] into one set of scalars (fixed order: a tree in tl.reduce)."""
    tot = tl.sum(cn, axis=0)
    mean = tl.sum(cn * cmean, axis=0) / tl.maximum(tot, 1.0)
    d = cmean - mean
    m2 = tl.sum(cm2 + cn * d * d, axis=0)
    return tot, mean, m2, tl.min(clo, axis=0), tl.max(chi, axis=0)


@triton.jit
def _advantages_batchnorm_kernel(
    adv_ptr,
    code_ptr,
    smask_ptr,
    part_ptr,
    num_parts,
    N,
    eps,
    infeasible_adv,
    pos_scale,
    neg_scale,
    clip,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
    UNBIASED: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    F64: tl.constexpr,
):
    """Whiten the contributing advantages with the batch statistic, then finish every sample."""
    pp = tl.arange(0, BLOCK_P)
    acc_n = tl.zeros([BLOCK_P], dtype=tl.float64 if F64 else tl.float32)
    acc_s = acc_n
    for p0 in range(0, num_parts, BLOCK_P):
        ok = p0 + pp < num_parts
        pn = tl.load(part_ptr + (p0 + pp) * 5 + 0, mask=ok, other=0.0)
        pm = tl.load(part_ptr + (p0 + pp) * 5 + 1, mask=ok, other=0.0)
        acc_n += pn
        acc_s += pn * pm
    tot = tl.sum(acc_n, axis=0)
    mean = tl.sum(acc_s, axis=0) / tl.maximum(tot, 1.0)
    acc_m2 = acc_n * 0.0
    acc_lo = acc_m2 + float("inf")
    acc_hi = acc_m2 - float("inf")
    for p0 in range(0, num_parts, BLOCK_P):
        ok = p0 + pp < num_parts
        pn = tl.load(part_ptr + (p0 + pp) * 5 + 0, mask=ok, other=0.0)
        pm = tl.load(part_ptr + (p0 + pp) * 5 + 1, mask=ok, other=0.0)
        pm2 = tl.load(part_ptr + (p0 + pp) * 5 + 2, mask=ok, other=0.0)
        acc_m2 += pm2 + pn * (pm - mean) * (pm - mean)
        acc_lo = tl.minimum(acc_lo, tl.load(part_ptr + (p0 + pp) * 5 + 3, mask=ok, other=float("inf")))
        acc_hi = tl.maximum(acc_hi, tl.load(part_ptr + (p0 + pp) * 5 + 4, mask=ok, other=float("-inf")))
    mean, sd, varies = _finalize_stats(
        tot, mean, tl.sum(acc_m2, axis=0), tl.min(acc_lo, axis=0), tl.max(acc_hi, axis=0), UNBIASED
    )
    den = sd + eps
    white = varies & (den > 0)
    den = tl.where(white, den, 1.0)

    offs = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs < N
    a = _to_compute(tl.load(adv_ptr + offs, mask=ok, other=0.0), F64)
    code = tl.load(code_ptr + offs, mask=ok, other=0)
    contrib = code == 1
    infeasible = code == 2
    a = tl.where(contrib, tl.where(white, (a - mean) / den, 0.0), a)
    a = _finish(a, contrib, infeasible, pos_scale, neg_scale, clip, infeasible_adv, HAS_CLIP)
    tl.store(adv_ptr + offs, a.to(adv_ptr.dtype.element_ty), mask=ok)
    keep = contrib | (infeasible & (infeasible_adv != 0.0))
    tl.store(smask_ptr + offs, keep.to(tl.uint8), mask=ok)
