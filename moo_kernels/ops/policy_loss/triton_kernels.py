"""Triton kernels of the token-level policy loss (kernels only; see cuda.py for the launchers).

The normaliser of every aggregation is known before the loss is (it depends on the mask only, and
for GSPO on the sequence mean log-ratio), so the forward computes each token's loss and its gradient
together and writes the gradient at once; the backward only rescales it by the incoming gradient.

1. _row_stats_kernel     one program per sequence: active weight n_b = sum_t m (and, for GSPO,
                         sum_t d m), then the scale of its tokens (below) is derived in the main kernel
2. _totals_kernel        one program: M = sum_b n_b and S = #{b : n_b > 0}, in a fixed order
3. _policy_loss_fwd_kernel  grid (B, T / BLOCK_T): per token loss l, gradient dl/dlogp, metrics;
                         writes grad = dl/dlogp * (m * scale) and one row of partial sums per program:
                         the loss's sum l m scale and the metrics' sums x m / M (already means)
4. _reduce_partials_kernel  one program: loss and metrics from the partials, in a fixed order

scale: token-mean 1 / (num_tokens or M); seq-mean-token-mean 1 / (S n_b); seq-mean-token-sum 1 / S;
seq-mean-token-sum-norm 1 / (B max_len); 0 where the denominator is not > 0. No float atomics anywhere:
the loss and the gradient have the same bits run after run.

The row statistics, the totals and the scale are float64, and so are the per-token weights m * scale and
m / M until they are formed: a float mask of subnormal (or huge) weights has a sum and a scale beyond
float32's range, while the weights themselves are within it. A bool mask counts any nonzero byte as 1.
Masked tokens influence nothing: every value of theirs is selected away (never multiplied by m = 0),
whatever NaN or inf their inputs hold. Constants are built with tl.zeros / tl.full,
never from an input (logp * 0 is NaN for an infinite logp).
"""

import triton
import triton.language as tl

# Mode / aggregation / KL codes (mirror moo_kernels.ops.policy_loss.cuda).
CLIP = tl.constexpr(0)
GSPO = tl.constexpr(1)
CISPO = tl.constexpr(2)
TOKEN_MEAN = tl.constexpr(0)
SEQ_MEAN_TOKEN_MEAN = tl.constexpr(1)
SEQ_MEAN_TOKEN_SUM = tl.constexpr(2)
K1 = tl.constexpr(1)
K2 = tl.constexpr(2)
LOG_RATIO_MAX = tl.constexpr(20.0)
NUM_PARTIALS = tl.constexpr(11)  # loss, pg, kl, clip, low, high, dual, ratio sum, ratio min, ratio max, ppo_kl


@triton.jit
def _mask_weight(mask_ptr, offs, ok):
    """(weight m in float64, active = m != 0) of the mask at offs (0 where not ok): a bool mask (read as
    bytes) counts any nonzero byte as 1."""
    x = tl.load(mask_ptr + offs, mask=ok, other=0)
    m = x.to(tl.float64)
    if mask_ptr.dtype.element_ty == tl.uint8:
        m = tl.where(x != 0, 1.0, 0.0).to(tl.float64)
    return m, x != 0


@triton.jit
def _row_stats_kernel(
    logp_ptr,
    old_ptr,
    mask_ptr,
    stats_ptr,
    T,
    s_lb,
    s_lt,
    s_ob,
    s_ot,
    s_mb,
    s_mt,
    BLOCK_T: tl.constexpr,
    HAS_OLD: tl.constexpr,
    GSPO_MODE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    n = tl.zeros([BLOCK_T], dtype=tl.float64)
    sd = tl.zeros([BLOCK_T], dtype=tl.float64)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        ok = t < T
        m, active = _mask_weight(mask_ptr, b * s_mb + t * s_mt, ok)
        n += m
        if GSPO_MODE and HAS_OLD:
            lp = tl.load(logp_ptr + b * s_lb + t * s_lt, mask=ok, other=0.0).to(tl.float32)
            old = tl.load(old_ptr + b * s_ob + t * s_ot, mask=ok, other=0.0).to(tl.float32)
            d = tl.minimum(tl.maximum(lp - old, -LOG_RATIO_MAX), LOG_RATIO_MAX)
            sd += tl.where(active, d.to(tl.float64) * m, 0.0)
    tl.store(stats_ptr + b * 2, tl.sum(n, axis=0))
    tl.store(stats_ptr + b * 2 + 1, tl.sum(sd, axis=0))


@triton.jit
def _totals_kernel(stats_ptr, totals_ptr, B, BLOCK_B: tl.constexpr):
    acc_n = tl.zeros([BLOCK_B], dtype=tl.float64)
    acc_s = tl.zeros([BLOCK_B], dtype=tl.float64)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        n = tl.load(stats_ptr + b * 2, mask=b < B, other=0.0)
        acc_n += n
        acc_s += tl.where(n > 0, 1.0, 0.0)
    tl.store(totals_ptr + 0, tl.sum(acc_n, axis=0))
    tl.store(totals_ptr + 1, tl.sum(acc_s, axis=0))


@triton.jit
def _token_weights(m, stats_ptr, totals_ptr, b, norm_const, AGG: tl.constexpr, HAS_NUM_TOKENS: tl.constexpr):
    """(m * scale, m / M) in float32, formed in float64 from the float64 mask weight m: the weight of a
    token's l in the loss and in the metrics' means (0 unless M = sum(m) > 0)."""
    scale = _row_scale(stats_ptr, totals_ptr, b, norm_const, AGG, HAS_NUM_TOKENS)
    total_m = tl.load(totals_ptr + 0)
    inv_m = tl.where(total_m > 0, 1.0 / tl.where(total_m > 0, total_m, 1.0), 0.0)
    return (m * scale).to(tl.float32), (m * inv_m).to(tl.float32)


@triton.jit
def _row_scale(stats_ptr, totals_ptr, b, norm_const, AGG: tl.constexpr, HAS_NUM_TOKENS: tl.constexpr):
    """d loss / d (l m) for the tokens of row b, float64: the aggregation's normaliser, 0 where it is not
    > 0."""
    n_row = tl.load(stats_ptr + b * 2)
    total_m = tl.load(totals_ptr + 0)
    seqs = tl.load(totals_ptr + 1)
    norm = tl.cast(norm_const, tl.float64)
    if AGG == TOKEN_MEAN:
        den = norm if HAS_NUM_TOKENS else total_m
    elif AGG == SEQ_MEAN_TOKEN_MEAN:
        den = tl.where(n_row > 0, seqs * n_row, 0.0)
    elif AGG == SEQ_MEAN_TOKEN_SUM:
        den = seqs
    else:
        den = norm
    return tl.where(den > 0, 1.0 / tl.where(den > 0, den, 1.0), 0.0)


@triton.jit
def _token_inputs(
    b, t, ok, lp, adv_ptr, s_ab, s_at, tadv_ptr, s_tb, s_tt, old_ptr, s_ob, s_ot, off_ptr, isw_ptr, s_wb, s_wt,
    ref_ptr, s_rb, s_rt,
    HAS_TADV: tl.constexpr, HAS_OLD: tl.constexpr, HAS_OFF: tl.constexpr, HAS_ISW: tl.constexpr,
    HAS_REF: tl.constexpr,
):  # fmt: skip
    """The per-token operands of _token_terms at (b, t) (a block of tokens, or one), read where ok:
    (advantage, logp - old_logp unclamped, off-policy flag, importance weight, reference log-prob)."""
    adv = tl.load(adv_ptr + b * s_ab + t * s_at, mask=ok, other=0.0).to(tl.float32)
    if HAS_TADV:
        adv += tl.load(tadv_ptr + b * s_tb + t * s_tt, mask=ok, other=0.0).to(tl.float32)
    raw = tl.zeros(lp.shape, dtype=tl.float32)  # on-policy: d = 0 whatever logp holds
    if HAS_OLD:
        raw = lp - tl.load(old_ptr + b * s_ob + t * s_ot, mask=ok, other=0.0).to(tl.float32)
    off = False
    if HAS_OFF:
        off = tl.load(off_ptr + b) != 0
    w_is = 1.0
    if HAS_ISW:
        w_is = tl.load(isw_ptr + b * s_wb + t * s_wt, mask=ok, other=0.0).to(tl.float32)
    ref = 0.0
    if HAS_REF:
        ref = tl.load(ref_ptr + b * s_rb + t * s_rt, mask=ok, other=0.0).to(tl.float32)
    return adv, raw, off, w_is, ref


@triton.jit
def _token_terms(
    lp,
    raw,
    adv,
    active,
    seq_rho,
    off,
    w_is,
    ref,
    beta,
    clip_lo,
    clip_hi,
    dual_clip,
    ratio_cap,
    gamma,
    MODE: tl.constexpr,
    KL: tl.constexpr,
    HAS_OFF: tl.constexpr,
    HAS_ISW: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    HAS_CAP: tl.constexpr,
):
    """Loss of tokens and its derivative in logp, elementwise (blocks of tokens or a single token).

    lp: log-probs; raw: logp - old_logp (unclamped); seq_rho: the GSPO sequence ratio. Returns
    (loss, pg, dloss/dlogp, k, rho, d, clipped, low, high, dual); loss, pg and k are 0 where inactive.
    """
    zero = tl.zeros(lp.shape, dtype=tl.float32)
    false = tl.full(lp.shape, 0, tl.int1)
    d = tl.minimum(tl.maximum(raw, -LOG_RATIO_MAX), LOG_RATIO_MAX)
    clipped, low, high, dual = false, false, false, false
    if MODE == CLIP or MODE == GSPO:
        if MODE == GSPO:
            rho = zero + seq_rho
            d_rho = rho  # token form sg(s) exp(logp - sg(logp)): d rho / d logp = s
        else:
            rho = tl.exp(d)
            d_rho = tl.where(tl.abs(raw) <= LOG_RATIO_MAX, rho, 0.0)
        lo = 1.0 - clip_lo
        hi = 1.0 + clip_hi
        if HAS_CAP:
            rho1 = tl.minimum(rho, ratio_cap)
            d_rho1 = tl.where(rho <= ratio_cap, d_rho, 0.0)
        else:
            rho1 = rho
            d_rho1 = d_rho
        l1 = -adv * rho1
        l2 = -adv * tl.minimum(tl.maximum(rho, lo), hi)
        clipped = l2 > l1
        pg = tl.where(clipped, l2, l1)
        g = tl.where(clipped, tl.where((rho >= lo) & (rho <= hi), -adv * d_rho, 0.0), -adv * d_rho1)
        if HAS_DUAL:
            l3 = -adv * dual_clip
            dual = (adv < 0) & (pg > l3)
            pg = tl.where(dual, l3, pg)
            g = tl.where(dual, 0.0, g)
        low = (rho < lo) & (adv < 0)
        high = (rho > hi) & (adv > 0)
    elif MODE == CISPO:
        rho = tl.exp(d)
        lo = 1.0 - clip_lo
        hi = 1.0 + clip_hi
        w = tl.minimum(tl.maximum(rho, lo), hi)
        pg = -w * adv * lp
        g = -w * adv
        clipped = w != rho
        low = (rho < lo) & (adv < 0)
        high = (rho > hi) & (adv > 0)
    else:  # reinforce
        rho = tl.exp(d)
        pg = -adv * lp
        g = -adv
    if HAS_OFF:  # f = p / (p + gamma) as 1 / (1 + gamma / p): finite, and so is f (1 - f), for any logp
        f = 1.0 / (1.0 + gamma * tl.exp(-lp))
        pg = tl.where(off, -adv * f, pg)
        g = tl.where(off, -adv * (f * (1.0 - f)), g)
        clipped = clipped & ~off
        low = low & ~off
        high = high & ~off
        dual = dual & ~off
    if HAS_ISW:
        pg = pg * w_is
        g = g * w_is
    pg = tl.where(active, pg, 0.0)

    # ---- KL to the reference -------------------------------------------------------------------------
    if HAS_REF:
        u = lp - ref
        if KL == K1:
            k = u
            gk = tl.full(lp.shape, 1.0, tl.float32)
        elif KL == K2:
            k = 0.5 * u * u
            gk = u
        else:
            uc = tl.minimum(tl.maximum(u, -LOG_RATIO_MAX), LOG_RATIO_MAX)
            e = tl.exp(-uc)
            k = e + uc - 1.0
            gk = tl.where(tl.abs(u) <= LOG_RATIO_MAX, 1.0 - e, 0.0)
        k = tl.where(active, k, 0.0)
        # beta = 0 reports the estimate without adding it (a select: 0 * inf would be NaN)
        with_kl = beta > 0
        loss = tl.where(with_kl, pg + beta * k, pg)
        g = tl.where(with_kl, g + beta * gk, g)
    else:
        k = zero
        loss = pg
    return loss, pg, g, k, rho, d, clipped, low, high, dual


@triton.jit
def _policy_loss_fwd_kernel(
    logp_ptr,
    old_ptr,
    ref_ptr,
    mask_ptr,
    adv_ptr,
    tadv_ptr,
    isw_ptr,
    off_ptr,
    stats_ptr,
    totals_ptr,
    grad_ptr,
    part_ptr,
    B,
    T,
    s_lb,
    s_lt,
    s_ob,
    s_ot,
    s_rb,
    s_rt,
    s_mb,
    s_mt,
    s_ab,
    s_at,
    s_tb,
    s_tt,
    s_wb,
    s_wt,
    s_gb,
    s_gt,
    beta,
    clip_lo,
    clip_hi,
    dual_clip,
    ratio_cap,
    gamma,
    norm_const,
    MODE: tl.constexpr,
    AGG: tl.constexpr,
    KL: tl.constexpr,
    HAS_OLD: tl.constexpr,
    HAS_REF: tl.constexpr,
    HAS_TADV: tl.constexpr,
    HAS_ISW: tl.constexpr,
    HAS_OFF: tl.constexpr,
    HAS_DUAL: tl.constexpr,
    HAS_CAP: tl.constexpr,
    HAS_NUM_TOKENS: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pt = tl.program_id(1)
    t = pt.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    ok = t < T

    m, active = _mask_weight(mask_ptr, b * s_mb + t * s_mt, ok)
    wl, wmean = _token_weights(m, stats_ptr, totals_ptr, b, norm_const, AGG, HAS_NUM_TOKENS)
    lp = tl.load(logp_ptr + b * s_lb + t * s_lt, mask=ok, other=0.0).to(tl.float32)
    adv, raw, off, w_is, ref = _token_inputs(
        b, t, ok, lp, adv_ptr, s_ab, s_at, tadv_ptr, s_tb, s_tt, old_ptr, s_ob, s_ot, off_ptr, isw_ptr, s_wb, s_wt,
        ref_ptr, s_rb, s_rt, HAS_TADV, HAS_OLD, HAS_OFF, HAS_ISW, HAS_REF,
    )  # fmt: skip
    seq_rho = 1.0
    if MODE == GSPO:
        sd = tl.load(stats_ptr + b * 2 + 1)
        n_row = tl.load(stats_ptr + b * 2)
        seq_d = tl.minimum(tl.maximum(sd / tl.maximum(n_row, 1.0), -LOG_RATIO_MAX), LOG_RATIO_MAX)
        seq_rho = tl.exp(seq_d.to(tl.float32))
    loss_tok, pg, g, k, rho, d, clipped, low, high, dual = _token_terms(
        lp, raw, adv, active, seq_rho, off, w_is, ref, beta, clip_lo, clip_hi, dual_clip, ratio_cap, gamma,
        MODE, KL, HAS_OFF, HAS_ISW, HAS_REF, HAS_DUAL, HAS_CAP,
    )  # fmt: skip

    if WRITE_GRAD:
        tl.store(grad_ptr + b * s_gb + t * s_gt, tl.where(active, g * wl, 0.0).to(grad_ptr.dtype.element_ty), mask=ok)

    # ---- partial sums of this program ------------------------------------------------------------------
    pid = b * tl.num_programs(1) + pt
    _store_partials(
        part_ptr + pid * NUM_PARTIALS, loss_tok, pg, k, wl, wmean, active, clipped, low, high, dual, rho, d
    )  # fmt: skip


@triton.jit
def _store_partials(base, loss_tok, pg, k, wl, wmean, active, clipped, low, high, dual, rho, d):
    """One row of partial sums (the columns of _reduce_partials_kernel) over a block of tokens: wl = m scale,
    the weight in the loss, wmean = m / M, the weight in the metrics' means; every value selected where
    active."""
    counts = active & (wl != 0)  # a token whose weight in the loss is 0 adds 0, even an infinite loss
    tl.store(base + 0, tl.sum(tl.where(counts, loss_tok * wl, 0.0), axis=0))
    tl.store(base + 1, tl.sum(tl.where(counts, pg * wl, 0.0), axis=0))
    tl.store(base + 2, tl.sum(tl.where(active, k * wmean, 0.0), axis=0))
    tl.store(base + 3, tl.sum(tl.where(clipped & active, wmean, 0.0), axis=0))
    tl.store(base + 4, tl.sum(tl.where(low & active, wmean, 0.0), axis=0))
    tl.store(base + 5, tl.sum(tl.where(high & active, wmean, 0.0), axis=0))
    tl.store(base + 6, tl.sum(tl.where(dual & active, wmean, 0.0), axis=0))
    tl.store(base + 7, tl.sum(tl.where(active, rho * wmean, 0.0), axis=0))
    tl.store(base + 8, tl.min(tl.where(active, rho, float("inf")), axis=0))
    tl.store(base + 9, tl.max(tl.where(active, rho, float("-inf")), axis=0))
    tl.store(base + 10, tl.sum(tl.where(active, -d * wmean, 0.0), axis=0))


@triton.jit
def _reduce_partials_kernel(part_ptr, totals_ptr, out_ptr, P, BLOCK_P: tl.constexpr):
    """out = [loss, pg_loss, kl_mean, clip_frac, low, high, dual, ratio_mean, ratio_min, ratio_max,
    ppo_kl, active_tokens], reduced over the P partial rows in a fixed order (the means are sums of the
    partials already: their weights are m / M)."""
    cols = tl.arange(0, 16)
    col_ok = cols < NUM_PARTIALS
    is_min = cols == 8
    is_max = cols == 9
    init = tl.where(is_min, float("inf"), tl.where(is_max, float("-inf"), 0.0))
    acc = tl.zeros([BLOCK_P, 16], dtype=tl.float32) + init[None, :]
    rows = tl.arange(0, BLOCK_P)
    for p0 in range(0, P, BLOCK_P):
        r = (p0 + rows).to(tl.int64)
        ok = (r < P)[:, None] & col_ok[None, :]
        x = tl.load(part_ptr + r[:, None] * NUM_PARTIALS + cols[None, :], mask=ok, other=0.0)
        x = tl.where(ok, x, init[None, :])
        acc = tl.where(is_min[None, :], tl.minimum(acc, x), tl.where(is_max[None, :], tl.maximum(acc, x), acc + x))
    total = tl.sum(acc, axis=0)
    lo = tl.min(acc, axis=0)
    hi = tl.max(acc, axis=0)
    red = tl.where(is_min, lo, tl.where(is_max, hi, total)).to(tl.float64)
    # min / max are over the active tokens, 0 when there is none (the min stays +inf then: a ratio is never
    # infinite)
    any_active = tl.sum(tl.where(is_min, red, 0.0), axis=0) < float("inf")
    red = tl.where(is_min | is_max, tl.where(any_active, red, 0.0), red)
    # the means (columns 2..7 and 10) are 0 unless M = sum(m) > 0 (a select: their weights m / M are 0 then,
    # and an infinite estimate times 0 would be NaN)
    total_m = tl.load(totals_ptr + 0)
    is_mean = ((cols >= 2) & (cols <= 7)) | (cols == 10)
    red = tl.where(is_mean, tl.where(total_m > 0, red, 0.0), red)
    red = tl.where(cols == NUM_PARTIALS, total_m, red)
    tl.store(out_ptr + cols, red, mask=cols <= NUM_PARTIALS)
