"""Triton kernels of the multi-objective advantage step (kernels only; see triton_launch.py for launchers).

The algorithm is the reference's (moo_kernels/ops/advantages/reference.py), in float64 tiles: rewards
of any dtype are converted exactly, the weights and the float options arrive as float64. One program
owns BLOCK_G whole groups and walks them in chunks of BLOCK_J samples, the K objectives side by side
in BLOCK_K lanes (padding lanes hold 0). Three passes over the chunks:
  1. count, lo and hi of every objective (exact), hence the power-of-two scales c (and C_g of the
     combined reward);
  2. the scaled moments of u = x / c (two-pass within a chunk, Chan's merge across chunks), and the
     combined reward d_j = SORTEDSUM_k(w'_k * (x_jk / C_g)) with its lo / hi and its moments (each chunk
     scaled by its own power of two, rescaled exactly when merged);
  3. normalise, combine (SORTEDSUM over the objectives), finish and write.
SORTEDSUM is tl.sort along the objective axis, then a static loop adding column k (extracted exactly by
a masked sum) to a running sum started at +0.0: the reference's IEEE operations in its order, so d has
the same bits as on every other backend and "does not vary" (lo == hi of d) is decided identically.
x / c is computed as (x * pre) * inv with pre, inv powers of two (exact, then one rounding): the bits of
the division. For the common GRPO sizes a group fits in one chunk and passes 2 and 3 re-read it from
L1/L2, so HBM sees each reward once. batch_normalize needs a batch-wide statistic: pass 3 then writes
the raw advantage (float64) and a per-program scaled partial (count, mean, M2, min, max, scale) that
the second kernel combines in a fixed order (deterministic, no float atomics) before finishing.

Parameters named like a field of AdvantageSpec or Derived (moo_kernels/ops/advantages/spec.py) receive it:
options as the codes of moo_kernels._codes, tensors as themselves with a `<name>_strides` tuple, None for an
absent tensor (a compile-time branch); the float64 options are typed parameters, and an absent clip is NaN.
"""

import triton
import triton.language as tl

from moo_kernels import _codes

ZSCORE = tl.constexpr(_codes.COLUMN["zscore"])
RLOO = tl.constexpr(_codes.COLUMN["rloo"])
NONE = tl.constexpr(_codes.COLUMN["none"])
PASSK = tl.constexpr(_codes.COLUMN["passk"])
PASSK_UNSCALED = tl.constexpr(_codes.COLUMN["passk_unscaled"])
OPO = tl.constexpr(_codes.COLUMN["opo"])
LOO_STD = tl.constexpr(_codes.COLUMN["loo_std"])
WHITEN = tl.constexpr(_codes.BATCH["whiten"])
BATCH_SCALE = tl.constexpr(_codes.BATCH["scale"])
GPG = tl.constexpr(_codes.BATCH["gpg"])
LOO_TINY = tl.constexpr(2.0**-40)
UNBIASED = tl.constexpr(_codes.STD["unbiased"])
SCALARIZE = tl.constexpr(_codes.WEIGHTING["scalarize"])
VARIANCE = tl.constexpr(_codes.WEIGHTING["variance"])
RAISE = tl.constexpr(_codes.NAN_POLICY["raise"])
NO_ERROR = tl.constexpr(_codes.NO_ERROR)
PARTIAL = tl.constexpr(6)  # values per program of the batch partials
MIN_NORMAL = tl.constexpr(2.2250738585072014e-308)  # 2^-1022
MAX_F64 = tl.constexpr(1.7976931348623157e308)


@triton.jit
def _pow2_floor(m):
    """2^floor(log2 m) for finite m >= 0 (exact, subnormals included: m * 2^54 is normal), 1 where m == 0."""
    tiny = m < MIN_NORMAL
    t = tl.where(tiny, m * 18014398509481984.0, m)
    p = (t.to(tl.int64, bitcast=True) & 0x7FF0000000000000).to(tl.float64, bitcast=True)
    p = tl.where(tiny, p * 5.551115123125783e-17, p)
    return tl.where(m > 0, p, 1.0)


@triton.jit
def _scale_factors(c):
    """pre, inv with x / c == (x * pre) * inv for a power of two c: pre = 2^52 below 2^-1022, else 1."""
    pre = tl.where(c < MIN_NORMAL, 4503599627370496.0, 1.0).to(tl.float64)
    return pre, 1.0 / (c * pre)


@triton.jit
def _sequential_sum(total, s, N: tl.constexpr):
    """total + s[:, 0] + s[:, 1] + ... + s[:, N - 1], added left to right (s: [R, N], N a power of two).
    The columns come out of halvings (reshape, permute, split): no reduction over the N lanes."""
    if N == 1:
        return total + tl.reshape(s, total.shape)
    else:
        R: tl.constexpr = s.shape[0]
        first, second = tl.split(tl.permute(tl.reshape(s, [R, 2, N // 2]), (0, 2, 1)))
        total = _sequential_sum(total, first, N // 2)
        return _sequential_sum(total, second, N // 2)


@triton.jit
def _sorted_sum(t, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    """SORTEDSUM over the last axis of t (ROWS rows of BLOCK_K lanes in all): ascending, then added left
    to right from +0.0. Returns [ROWS]."""
    s = tl.sort(tl.reshape(t, [ROWS, BLOCK_K]))
    return _sequential_sum(tl.zeros([ROWS], dtype=tl.float64), s, BLOCK_K)


@triton.jit
def _saturate(a, scale):
    """a * scale, 0 staying 0 (also when the scale overflowed), within the finite float64 range."""
    v = tl.where(a != 0, a * scale, a)
    return tl.minimum(tl.maximum(v, -MAX_F64), MAX_F64)


@triton.jit
def _chan_merge(n, mean, m2, cn, cmean, cm2):
    tot = n + cn
    frac = cn / tl.maximum(tot, 1.0)
    delta = cmean - mean
    mean = mean + delta * frac
    m2 = m2 + cm2 + delta * delta * (n * frac)
    return tot, mean, m2


@triton.jit
def _chan_merge_scaled(n, mean, m2, c, cn, cmean, cm2, cc):
    """Merge moments of u = x / c with those of u = x / cc (c, cc powers of two, 0 for no nonzero value):
    both rescaled exactly to the larger scale first."""
    top = tl.maximum(c, cc)
    top_s = tl.where(top > 0, top, 1.0)
    ra = c / top_s
    rb = cc / top_s
    n, mean, m2 = _chan_merge(n, mean * ra, m2 * ra * ra, cn, cmean * rb, cm2 * rb * rb)
    return n, mean, m2, top


@triton.jit
def _finalize(n, lo, hi, mean, m2, pre, inv, std: tl.constexpr):
    """Scaled mean and std from merged moments; exact (the common scaled value, std 0) when nothing varies."""
    varies = hi > lo
    mean = tl.where(varies, mean, tl.where(n > 0, (hi * pre) * inv, 0.0))
    if std == UNBIASED:
        denom = n - 1.0
    else:
        denom = n
    var = tl.where(varies & (denom > 0), m2 / tl.maximum(denom, 1.0), 0.0)
    return mean, tl.sqrt(var), varies


@triton.jit
def _finish(a, contrib, infeasible, positive_scale, negative_scale, clip, infeasible_advantage):
    """Sign shaping, clipping (clip is NaN without one: moo_kernels._spec.ABSENT_FLOAT), then the fixed values of
    infeasible / rejected / invalid samples."""
    a = a * tl.where(a > 0, positive_scale, negative_scale)
    a = tl.where(clip == clip, tl.minimum(tl.maximum(a, -clip), clip), a)
    return tl.where(contrib, a, tl.where(infeasible, infeasible_advantage, 0.0))


@triton.jit
def _load_chunk(j0, tile, source, BLOCK_M: tl.constexpr):
    """Samples j0 + jj of each group: float64 rewards [BG, BJ, BK] after reward gates (0 where not
    finite), and masks. Any nonzero byte of valid / gates / reward_gates is true.
    tile: (start, count) of the groups, the sample and objective lanes jj, kk and k_ok (kk < K);
    source: the kernel's inputs (rewards, order, valid, reward_gates, gates with their strides, M, gated_value)."""
    start, count, jj, kk, k_ok = tile
    (rewards, rewards_strides, order, valid, valid_strides, reward_gates, reward_gates_strides, gates, gates_strides,
     M, gated_value) = source  # fmt: skip
    j = j0 + jj
    in_group = j[None, :] < count[:, None]
    pos = start[:, None] + j[None, :]
    if order is None:
        row = pos
    else:
        row = tl.load(order + pos, mask=in_group, other=0)
    is_valid = in_group
    if valid is not None:
        is_valid = is_valid & (tl.load(valid + row * valid_strides[0], mask=in_group, other=0) != 0)
    feasible = is_valid
    if gates is not None:
        mm = tl.arange(0, BLOCK_M)
        g = tl.load(
            gates + row[:, :, None] * gates_strides[0] + mm[None, None, :] * gates_strides[1],
            mask=is_valid[:, :, None] & (mm < M)[None, None, :],
            other=1,
        )
        feasible = feasible & (tl.min(g.to(tl.int32), axis=2) != 0)
    m3 = is_valid[:, :, None] & k_ok[None, None, :]
    x = tl.load(
        rewards + row[:, :, None] * rewards_strides[0] + kk[None, None, :] * rewards_strides[1], mask=m3, other=0.0
    )
    x = x.to(tl.float64)
    if reward_gates is not None:
        gate = tl.load(
            reward_gates + row[:, :, None] * reward_gates_strides[0] + kk[None, None, :] * reward_gates_strides[1],
            mask=m3,
            other=1,
        )
        x = tl.where(gate != 0, x, gated_value)
    finite = m3 & (tl.abs(x) < float("inf"))
    x = tl.where(finite, x, 0.0)
    return x, finite, m3, row, in_group, is_valid, feasible


@triton.jit
def _combined(x, take, wp, fits, top_pre, top_inv, BLOCK_K: tl.constexpr):
    """d = SORTEDSUM_k(w'_k * q_jk), q_jk = x_jk / C_g where the entry takes part and c_gk <= C_g, else 0."""
    q = tl.where(take & fits[:, None, :], (x * top_pre[:, None, None]) * top_inv[:, None, None], 0.0)
    BG: tl.constexpr = x.shape[0]
    BJ: tl.constexpr = x.shape[1]
    return tl.reshape(_sorted_sum(wp[None, None, :] * q, BG * BJ, BLOCK_K), [BG, BJ])


@triton.jit
def _chunk_scaled(v, take, AXIS: tl.constexpr, weight):
    """Count (the sum of the weights with weight), lo, hi, scale (0 when no nonzero value) and moments of
    v / scale over `take` along AXIS (take: entries of weight > 0 when weighted)."""
    if weight is None:
        wt = take.to(tl.float64)
    else:
        wt = tl.where(take, weight, 0.0)
    cn = tl.sum(wt, axis=AXIS)
    lo = tl.min(tl.where(take, v, float("inf")), axis=AXIS)
    hi = tl.max(tl.where(take, v, float("-inf")), axis=AXIS)
    some = tl.sum(take.to(tl.float64), axis=AXIS) > 0
    big = tl.where(some, tl.maximum(tl.abs(lo), tl.abs(hi)), 0.0)
    cc = tl.where(big > 0, _pow2_floor(big), 0.0)
    pre, inv = _scale_factors(tl.where(cc > 0, cc, 1.0))
    u = tl.where(take, (v * tl.expand_dims(pre, AXIS)) * tl.expand_dims(inv, AXIS), 0.0)
    cmean = tl.sum(u * wt, axis=AXIS) / tl.where(cn > 0, cn, 1.0)
    d = tl.where(take, u - tl.expand_dims(cmean, AXIS), 0.0)
    return cn, lo, hi, cc, cmean, tl.sum(d * d * wt, axis=AXIS)


@triton.jit
def _top_merge(hi, n_hi, second, v, take, AXIS: tl.constexpr):
    """Merge a chunk of v (entries where take) into the running maximum, the number of entries equal to it
    and the largest entry below it (-inf for none), along AXIS."""
    chi = tl.max(tl.where(take, v, float("-inf")), axis=AXIS)
    at = take & (v == tl.expand_dims(chi, AXIS))
    cn = tl.sum(at.to(tl.float64), axis=AXIS)
    csec = tl.max(tl.where(take & ~at, v, float("-inf")), axis=AXIS)
    top = tl.maximum(hi, chi)
    n = tl.where(hi == top, n_hi, 0.0) + tl.where(chi == top, cn, 0.0)
    below = tl.maximum(tl.where(hi < top, hi, float("-inf")), tl.where(chi < top, chi, float("-inf")))
    return top, n, tl.maximum(tl.maximum(second, csec), below)


@triton.jit
def _loo_value(u, x, take, n, lo, hi, n_lo, n_hi, mean_u, m2, eps_u, unit, varies, std: tl.constexpr):
    """loo_std's value of each entry (reference.loo_parts / column_scaled); the statistics broadcast against u."""
    many = n >= 2
    f = tl.where(many, n / tl.where(many, n - 1.0, 1.0), 0.0)
    dev = u - mean_u
    diff = dev * f
    others_equal = ((x == lo) & (n_lo == 1) & (n_hi == n - 1)) | ((x == hi) & (n_hi == 1) & (n_lo == n - 1))
    m2_loo = tl.maximum(m2 - f * dev * dev, 0.0)
    m2_loo = tl.where(others_equal | (m2_loo <= m2 * LOO_TINY), 0.0, m2_loo)
    if std == UNBIASED:
        dp = n - 2.0
    else:
        dp = n - 1.0
    sd = tl.sqrt(tl.where(dp > 0, m2_loo / tl.where(dp > 0, dp, 1.0), 0.0))
    raw = tl.minimum(tl.maximum(diff * unit, -MAX_F64), MAX_F64)
    value = tl.where(sd > 0, diff / (sd + eps_u), raw)
    return tl.where(take & many & varies, value, 0.0)


@triton.jit
def advantages_fwd_kernel(
    rewards,
    rewards_strides,
    order,
    offsets,
    group_size,
    num_groups,
    max_count,
    K,
    weights,
    weights_strides,
    valid,
    valid_strides,
    reward_gates,
    reward_gates_strides,
    gates,
    gates_strides,
    M,
    std_floor,
    std_floor_strides,
    lengths,
    lengths_strides,
    out_advantages,
    out_group_mask,
    out_sample_mask,
    out_weights,
    out_mean,
    out_std,
    raw,
    code,
    parts,
    status,
    eps: tl.float64,
    gated_value: tl.float64,
    infeasible_advantage: tl.float64,
    min_feasible,
    positive_scale: tl.float64,
    negative_scale: tl.float64,
    clip: tl.float64,
    column: tl.constexpr,
    std: tl.constexpr,
    weighting: tl.constexpr,
    batch: tl.constexpr,
    drop_zero_variance: tl.constexpr,
    nan_policy: tl.constexpr,
    check_weights: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """The three passes over the chunks of BLOCK_G groups (module docstring). Scratch of the batch step:
    raw [N] float64, code [N] uint8 and parts [programs * PARTIAL] float64 (None without); status [2] int64:
    the first non-finite reward (flat index) and the first bad weight (None when nothing is checked)."""
    NEED_COMB: tl.constexpr = (weighting == SCALARIZE) or drop_zero_variance or (batch == BATCH_SCALE) or (batch == GPG)
    # the columns that need the top of each column (passk) or both ends with their counts (loo_std)
    TOP: tl.constexpr = (column == PASSK) or (column == PASSK_UNSCALED) or (column == LOO_STD)
    UNITLESS: tl.constexpr = (column == ZSCORE) or (column == PASSK) or (column == LOO_STD)
    D_TOP: tl.constexpr = TOP and (weighting == SCALARIZE)
    K_TOP: tl.constexpr = TOP and (weighting != SCALARIZE)
    BGJ: tl.constexpr = BLOCK_G * BLOCK_J  # samples of a chunk
    pid = tl.program_id(0)
    g = pid.to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G).to(tl.int64)
    g_ok = g < num_groups
    if group_size is not None:
        start = g * group_size
        count = tl.where(g_ok, group_size, 0).to(tl.int64)
    else:
        start = tl.load(offsets + g, mask=g_ok, other=0)
        count = tl.load(offsets + g + 1, mask=g_ok, other=0) - start
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    jj = tl.arange(0, BLOCK_J).to(tl.int64)
    w = tl.load(weights + kk * weights_strides[0], mask=k_ok, other=0.0)
    if check_weights:
        bad_w = tl.min(tl.where(k_ok & ~((w >= 0) & (w < float("inf"))), kk.to(tl.int64), NO_ERROR), axis=0)
        tl.atomic_min(status + 1, bad_w, mask=(pid == 0) & (bad_w < NO_ERROR))
    cw = _pow2_floor(tl.max(w, axis=0))
    wp = w / cw  # w' (0 in padding lanes)
    tile = (start, count, jj, kk, k_ok)
    source = (rewards, rewards_strides, order, valid, valid_strides, reward_gates, reward_gates_strides, gates,
              gates_strides, M, gated_value)  # fmt: skip

    # ---- pass 1: count, lo, hi of every objective, hence the scales ---------------------------------
    zk = tl.zeros([BLOCK_G, BLOCK_K], dtype=tl.float64)
    zg = tl.sum(zk, axis=1)
    n, lo, hi = zk, zk + float("inf"), zk - float("inf")
    # with TOP: the entries equal to hi and lo, and the largest entry below hi (_top_merge; lo through -x)
    t_hi, n_hi, second, t_nlo, n_lo, unused = zk - float("inf"), zk, zk - float("inf"), zk - float("inf"), zk, zk
    fn = zg  # feasible samples per group
    for j0 in range(0, max_count, BLOCK_J):
        x, finite, m3, row, in_group, is_valid, feasible = _load_chunk(j0, tile, source, BLOCK_M)
        if nan_policy == RAISE:
            flat = tl.where(m3 & ~finite, row[:, :, None] * K + kk[None, None, :], NO_ERROR)
            first = tl.min(tl.min(tl.min(flat, axis=2), axis=1), axis=0)
            tl.atomic_min(status, first, mask=first < NO_ERROR)
        take = feasible[:, :, None] & finite
        fn += tl.sum(feasible.to(tl.float64), axis=1)
        n += tl.sum(take.to(tl.float64), axis=1)
        lo = tl.minimum(lo, tl.min(tl.where(take, x, float("inf")), axis=1))
        hi = tl.maximum(hi, tl.max(tl.where(take, x, float("-inf")), axis=1))
        if K_TOP:
            t_hi, n_hi, second = _top_merge(t_hi, n_hi, second, x, take, 1)
            t_nlo, n_lo, unused = _top_merge(t_nlo, n_lo, unused, -x, take, 1)
    big = tl.where(n > 0, tl.maximum(tl.abs(lo), tl.abs(hi)), 0.0)
    c = _pow2_floor(big)
    pre, inv = _scale_factors(c)
    # C_g: the largest scale of the weighted objectives with a nonzero entry
    top = tl.max(tl.where((wp[None, :] > 0) & (big > 0), c, 0.0), axis=1)
    top = tl.where(top > 0, top, 1.0)
    top_pre, top_inv = _scale_factors(top)
    fits = c <= top[:, None]

    # ---- pass 2: scaled moments of the objectives and of the combined reward --------------------------
    cnt, mean, m2 = zk, zk, zk
    dn, dmean, dm2, dc, dlo, dhi = zg, zg, zg, zg, zg + float("inf"), zg - float("inf")
    # opo: sum(L) and sum(L u) of each objective (of d: in units of dc, rescaled as dc grows)
    k_sl, k_slu, d_sl, d_slu = zk, zk, zg, zg
    # D_TOP: as t_hi, n_hi, ... of pass 1, for d
    dt_hi, dn_hi, d_second, dt_nlo, dn_lo, d_unused = (
        zg - float("inf"),
        zg,
        zg - float("inf"),
        zg - float("inf"),
        zg,
        zg,
    )
    for j0 in range(0, max_count, BLOCK_J):
        x, finite, m3, row, in_group, is_valid, feasible = _load_chunk(j0, tile, source, BLOCK_M)
        take = feasible[:, :, None] & finite
        u = tl.where(take, (x * pre[:, None, :]) * inv[:, None, :], 0.0)
        cn = tl.sum(take.to(tl.float64), axis=1)
        cmean = tl.sum(u, axis=1) / tl.maximum(cn, 1.0)
        dev = tl.where(take, u - cmean[:, None, :], 0.0)
        cnt, mean, m2 = _chan_merge(cnt, mean, m2, cn, cmean, tl.sum(dev * dev, axis=1))
        if column == OPO:
            lw = tl.load(lengths + row * lengths_strides[0], mask=in_group, other=0).to(tl.float64)
            if weighting != SCALARIZE:
                k_sl += tl.sum(tl.where(take, lw[:, :, None], 0.0), axis=1)
                k_slu += tl.sum(tl.where(take, lw[:, :, None] * u, 0.0), axis=1)
        if NEED_COMB:
            d = _combined(x, take, wp, fits, top_pre, top_inv, BLOCK_K)
            cn, clo, chi, cc, cmean, cm2 = _chunk_scaled(d, feasible, 1, None)
            if column == OPO:
                if weighting == SCALARIZE:
                    c_pre, c_inv = _scale_factors(tl.where(cc > 0, cc, 1.0))
                    d_top = tl.maximum(dc, cc)
                    d_top_s = tl.where(d_top > 0, d_top, 1.0)
                    c_u = tl.where(feasible, (d * c_pre[:, None]) * c_inv[:, None], 0.0)
                    d_sl += tl.sum(tl.where(feasible, lw, 0.0), axis=1)
                    d_slu = d_slu * (dc / d_top_s) + tl.sum(lw * c_u, axis=1) * (cc / d_top_s)
            dn, dmean, dm2, dc = _chan_merge_scaled(dn, dmean, dm2, dc, cn, cmean, cm2, cc)
            dlo = tl.minimum(dlo, clo)
            dhi = tl.maximum(dhi, chi)
            if D_TOP:
                dt_hi, dn_hi, d_second = _top_merge(dt_hi, dn_hi, d_second, d, feasible, 1)
                dt_nlo, dn_lo, d_unused = _top_merge(dt_nlo, dn_lo, d_unused, -d, feasible, 1)

    mean_u, sd_u, varies = _finalize(n, lo, hi, mean, m2, pre, inv, std)
    gk = g[:, None] * K + kk[None, :]
    gk_ok = g_ok[:, None] & k_ok[None, :]
    tl.store(out_mean + gk, tl.where(n > 0, tl.minimum(tl.maximum(c * mean_u, lo), hi), 0.0), mask=gk_ok)
    tl.store(out_std + gk, c * sd_u, mask=gk_ok)
    if NEED_COMB:
        d_c = tl.where(dc > 0, dc, 1.0)
        d_pre, d_inv = _scale_factors(d_c)
        d_mean, d_sd, d_varies = _finalize(dn, dlo, dhi, dmean, dm2, d_pre, d_inv, std)

    # weights of the combination and the per-objective maps (reference.py, step 6)
    if weighting == SCALARIZE:
        tl.store(out_weights + gk, zk + w[None, :], mask=gk_ok)
        p_scale = (top * cw) * d_c
        eps_d = tl.where(eps > 0, eps / p_scale, 0.0)
        d_shift = d_mean
        d_mul = tl.full([BLOCK_G], 1.0, tl.float64)
        d_scale = p_scale
        if column == ZSCORE or column == PASSK:
            den = d_sd + eps_d
            d_mul = tl.where(d_varies & (den > 0), 1.0 / tl.where(den > 0, den, 1.0), 0.0)
        elif column == RLOO:
            d_mul = tl.where(dn > 1, dn / tl.where(dn > 1, dn - 1.0, 1.0), 0.0)
        elif column == NONE:
            d_shift = zg
        elif column == OPO:
            base = tl.where(d_sl > 0, d_slu / tl.where(d_sl > 0, d_sl, 1.0), d_mean)
            d_shift = tl.where(d_varies, base, d_mean)
        if column == PASSK or column == PASSK_UNSCALED:
            d_shift = tl.where(d_second > float("-inf"), (d_second * d_pre) * d_inv, 0.0)
        if UNITLESS:
            d_scale = zg + 1.0
    else:
        if weighting == VARIANCE:
            sel = (wp[None, :] > 0) & (sd_u > 0)
            vmax = tl.max(tl.where(sel, c, 0.0), axis=1)
            vmax = tl.where(vmax > 0, vmax, 1.0)
            t = tl.where(sel, (wp[None, :] * sd_u) * (c / vmax[:, None]), 0.0)
            tot = _sorted_sum(t, BLOCK_G, BLOCK_K)
            tot_s = tl.where(tot > 0, tot, 1.0)
            W = tl.where(tot[:, None] > 0, t / tot_s[:, None], 0.0)
            factor = 1.0
        else:
            W = zk + wp[None, :]
            factor = cw
        if weighting == VARIANCE:
            tl.store(out_weights + gk, W, mask=gk_ok)
        else:
            tl.store(out_weights + gk, zk + w[None, :], mask=gk_ok)
        if column == NONE:
            live = big > 0
        else:
            live = varies
        if UNITLESS:
            e = zk + 1.0
        else:
            e = c
        use = (W > 0) & live
        emax = tl.max(tl.where(use, e, 0.0), axis=1)
        emax = tl.where(emax > 0, emax, 1.0)
        q_scale = emax * factor
        coef = tl.where(use, W * (e / emax[:, None]), 0.0)
        shift = mean_u
        mul = coef
        eps_k = zk + eps
        if std_floor is not None:
            eps_k = eps_k + tl.load(std_floor + kk * std_floor_strides[0], mask=k_ok, other=0.0)[None, :]
        eps_c = eps_k / c
        if column == ZSCORE or column == PASSK:  # (u - mean_u) / (sd_u + (eps + floor_k) / c), 0 when constant
            den = sd_u + eps_c
            mul = tl.where(varies & (den > 0), coef / tl.where(den > 0, den, 1.0), 0.0)
        elif column == RLOO:  # (u - mean_u) * n / (n - 1), 0 when n < 2
            mul = tl.where(n > 1, coef * (n / tl.where(n > 1, n - 1.0, 1.0)), 0.0)
        elif column == NONE:
            shift = zk
        elif column == OPO:  # u - sum(L u) / sum(L), the plain mean when the lengths sum to 0
            base = tl.where(k_sl > 0, k_slu / tl.where(k_sl > 0, k_sl, 1.0), mean_u)
            shift = tl.where(varies, base, mean_u)
        if column == PASSK or column == PASSK_UNSCALED:  # the margin over the second best
            shift = tl.where(second > float("-inf"), (second * pre) * inv, 0.0)

    accept = fn >= min_feasible
    if drop_zero_variance:
        accept = accept & d_varies
    tl.store(out_group_mask + g, accept.to(tl.uint8), mask=g_ok)

    # ---- pass 3: normalise, combine, finish (or hand over to the batch kernel) -----------------------
    zero = tl.sum(zg, axis=0)
    bn, bmean, bm2, bc, blo, bhi = zero, zero, zero, zero, zero + float("inf"), zero - float("inf")
    for j0 in range(0, max_count, BLOCK_J):
        x, finite, m3, row, in_group, is_valid, feasible = _load_chunk(j0, tile, source, BLOCK_M)
        take = feasible[:, :, None] & finite
        if NEED_COMB:
            d = _combined(x, take, wp, fits, top_pre, top_inv, BLOCK_K)
        if weighting == SCALARIZE:
            ud = (d * d_pre[:, None]) * d_inv[:, None]
            if column == LOO_STD:
                a = _loo_value(ud, d, feasible, dn[:, None], dlo[:, None], dhi[:, None], dn_lo[:, None],
                               dn_hi[:, None], d_mean[:, None], dm2[:, None], eps_d[:, None], p_scale[:, None],
                               d_varies[:, None], std)  # fmt: skip
            else:
                pick = feasible
                if column == PASSK or column == PASSK_UNSCALED:  # the one sample at the top of its group
                    pick = pick & (d == dhi[:, None]) & (dn_hi == 1)[:, None] & (dn >= 2)[:, None]
                a = tl.where(pick, (ud - d_shift[:, None]) * d_mul[:, None], 0.0)
            a = _saturate(a, d_scale[:, None])
        else:
            u = (x * pre[:, None, :]) * inv[:, None, :]
            if column == LOO_STD:
                loo = _loo_value(u, x, take, n[:, None, :], lo[:, None, :], hi[:, None, :], n_lo[:, None, :],
                               n_hi[:, None, :], mean_u[:, None, :], m2[:, None, :], eps_c[:, None, :],
                               c[:, None, :], varies[:, None, :], std)  # fmt: skip
                terms = loo * coef[:, None, :]
            else:
                pick = take
                if column == PASSK or column == PASSK_UNSCALED:  # the one entry at the top of its group
                    pick = pick & (x == hi[:, None, :]) & (n_hi == 1)[:, None, :] & (n >= 2)[:, None, :]
                terms = tl.where(pick, (u - shift[:, None, :]) * mul[:, None, :], 0.0)
            a = tl.reshape(_sorted_sum(terms, BLOCK_G * BLOCK_J, BLOCK_K), [BLOCK_G, BLOCK_J])
            a = _saturate(a, q_scale[:, None])
        contrib = feasible & accept[:, None]
        infeasible = is_valid & ~feasible & accept[:, None]
        if batch != 0:
            tl.store(raw + row, a, mask=in_group)
            tl.store(code + row, (contrib.to(tl.uint8) + 2 * infeasible.to(tl.uint8)), mask=in_group)
            if batch == GPG:  # contributing samples, and those with a nonzero combined reward
                bn += tl.sum(tl.sum(contrib.to(tl.float64), axis=1), axis=0)
                bmean += tl.sum(tl.sum((contrib & (d != 0)).to(tl.float64), axis=1), axis=0)
            else:
                if batch == WHITEN:
                    stat_v = a
                else:  # the combined reward s = d * C_g * cw, saturated
                    stat_v = tl.minimum(tl.maximum(d * (top * cw)[:, None], -MAX_F64), MAX_F64)
                stat_take = contrib
                if lengths is not None:
                    stat_l = tl.load(lengths + row * lengths_strides[0], mask=in_group, other=0).to(tl.float64)
                    stat_take = stat_take & (stat_l > 0)
                    stat_w = tl.reshape(stat_l, [BGJ])
                else:
                    stat_w = None
                cn, clo, chi, cc, cmean, cm2 = _chunk_scaled(tl.reshape(stat_v, [BGJ]), tl.reshape(stat_take, [BGJ]),
                                                             0, stat_w)  # fmt: skip
                bn, bmean, bm2, bc = _chan_merge_scaled(bn, bmean, bm2, bc, cn, cmean, cm2, cc)
                blo = tl.minimum(blo, clo)
                bhi = tl.maximum(bhi, chi)
        else:
            a = _finish(a, contrib, infeasible, positive_scale, negative_scale, clip, infeasible_advantage)
            tl.store(out_advantages + row, a.to(out_advantages.dtype.element_ty), mask=in_group)
            keep = contrib | (infeasible & (infeasible_advantage != 0.0))
            tl.store(out_sample_mask + row, keep.to(tl.uint8), mask=in_group)
    if batch != 0:
        tl.store(parts + pid * PARTIAL + 0, bn)
        tl.store(parts + pid * PARTIAL + 1, bmean)
        tl.store(parts + pid * PARTIAL + 2, bm2)
        tl.store(parts + pid * PARTIAL + 3, blo)
        tl.store(parts + pid * PARTIAL + 4, bhi)
        tl.store(parts + pid * PARTIAL + 5, bc)


@triton.jit
def advantages_batchnorm_kernel(
    out_advantages,
    out_sample_mask,
    raw,
    code,
    parts,
    num_parts,
    N,
    eps: tl.float64,
    infeasible_advantage: tl.float64,
    positive_scale: tl.float64,
    negative_scale: tl.float64,
    clip: tl.float64,
    std: tl.constexpr,
    batch: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    """The batch step on the contributing advantages (whiten with their batch statistic, divide by the batch std
    of the combined reward, or GPG's factor), then finish every sample.

    The partials are scaled moments (each of u = a / c_p); they are rescaled exactly to the largest scale
    and merged in a fixed order (for "gpg": two counts)."""
    # the batch statistic first (scalars), then the samples: their tiles are not live across the merge
    if batch == GPG:
        factor = _gpg_factor(parts, num_parts, BLOCK_P)
    else:
        pre, inv, shift, den, apply = _batch_statistic(parts, num_parts, eps, std, batch, BLOCK_P)
    offs = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = offs < N
    a = tl.load(raw + offs, mask=ok, other=0.0)
    c = tl.load(code + offs, mask=ok, other=0)
    contrib = c == 1
    infeasible = c == 2
    if batch == GPG:
        a = tl.where(contrib, tl.minimum(tl.maximum(a * factor, -MAX_F64), MAX_F64), a)
    elif batch == WHITEN:  # (a / c - mean_u) / (sd_u + eps / c), 0 when the batch does not vary
        a = tl.where(contrib, tl.where(apply, ((a * pre) * inv - shift) / den, 0.0), a)
    else:  # (a / c) / (sd_u + eps / c), unchanged when that is 0
        a = tl.where(contrib, tl.where(apply, ((a * pre) * inv) / den, a), a)
    a = _finish(a, contrib, infeasible, positive_scale, negative_scale, clip, infeasible_advantage)
    tl.store(out_advantages + offs, a.to(out_advantages.dtype.element_ty), mask=ok)
    keep = contrib | (infeasible & (infeasible_advantage != 0.0))
    tl.store(out_sample_mask + offs, keep.to(tl.uint8), mask=ok)


@triton.jit
def _gpg_factor(parts, num_parts, BLOCK_P: tl.constexpr):
    """n_c / max(m, 1) from the per-program counts."""
    pp = tl.arange(0, BLOCK_P)
    acc_n = tl.zeros([BLOCK_P], dtype=tl.float64)
    acc_m = acc_n
    for p0 in range(0, num_parts, BLOCK_P):
        ok = p0 + pp < num_parts
        base = parts + (p0 + pp) * PARTIAL
        acc_n += tl.load(base + 0, mask=ok, other=0.0)
        acc_m += tl.load(base + 1, mask=ok, other=0.0)
    return tl.sum(acc_n, axis=0) / tl.maximum(tl.sum(acc_m, axis=0), 1.0)


@triton.jit
def _batch_statistic(parts, num_parts, eps, std: tl.constexpr, batch: tl.constexpr, BLOCK_P: tl.constexpr):
    """The merged batch statistic as (pre, inv: a / c == (a * pre) * inv, the shift mean_u (WHITEN; 0 for
    BATCH_SCALE), the denominator sd_u + eps / c (1 where not applied), whether to apply it)."""
    pp = tl.arange(0, BLOCK_P)
    acc_n = tl.zeros([BLOCK_P], dtype=tl.float64)
    acc_lo = acc_n + float("inf")
    acc_hi = acc_n - float("inf")
    acc_c = acc_n
    for p0 in range(0, num_parts, BLOCK_P):
        ok = p0 + pp < num_parts
        base = parts + (p0 + pp) * PARTIAL
        acc_n += tl.load(base + 0, mask=ok, other=0.0)
        acc_lo = tl.minimum(acc_lo, tl.load(base + 3, mask=ok, other=float("inf")))
        acc_hi = tl.maximum(acc_hi, tl.load(base + 4, mask=ok, other=float("-inf")))
        acc_c = tl.maximum(acc_c, tl.load(base + 5, mask=ok, other=0.0))
    tot = tl.sum(acc_n, axis=0)
    top = tl.max(acc_c, axis=0)
    top = tl.where(top > 0, top, 1.0)
    acc_s = acc_n * 0.0
    for p0 in range(0, num_parts, BLOCK_P):
        ok = p0 + pp < num_parts
        base = parts + (p0 + pp) * PARTIAL
        pn = tl.load(base + 0, mask=ok, other=0.0)
        pm = tl.load(base + 1, mask=ok, other=0.0) * (tl.load(base + 5, mask=ok, other=0.0) / top)
        acc_s += pn * pm
    mean = tl.sum(acc_s, axis=0) / tl.maximum(tot, 1.0)
    acc_m2 = acc_n * 0.0
    for p0 in range(0, num_parts, BLOCK_P):
        ok = p0 + pp < num_parts
        base = parts + (p0 + pp) * PARTIAL
        pn = tl.load(base + 0, mask=ok, other=0.0)
        r = tl.load(base + 5, mask=ok, other=0.0) / top
        pm = tl.load(base + 1, mask=ok, other=0.0) * r
        acc_m2 += tl.load(base + 2, mask=ok, other=0.0) * r * r + pn * (pm - mean) * (pm - mean)
    pre, inv = _scale_factors(top)
    mean_u, sd_u, varies = _finalize(
        tot, tl.min(acc_lo, axis=0), tl.max(acc_hi, axis=0), mean, tl.sum(acc_m2, axis=0), pre, inv, std
    )
    den = sd_u + tl.where(eps > 0, eps / top, 0.0)
    if batch == WHITEN:
        apply = varies & (den > 0)
        shift = mean_u
    else:
        apply = den > 0
        shift = mean_u * 0.0
    return pre, inv, shift, tl.where(apply, den, 1.0), apply
