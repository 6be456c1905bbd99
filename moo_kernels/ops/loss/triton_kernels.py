"""Triton helpers of the token-level loss, shared by every loss entry point (jit functions and the kernels of
the statistics before and the reduction after each entry point's own kernel).

The loss's normaliser depends on the mask only (and for GSPO on the sequence mean log-ratio), so an entry point
computes each token's loss and its gradient together:

1. row_stats_kernel       one program per sequence: n_b = sum_t m (and the sums of the sequence-level modes
                          and of the off-policy mask: see row_stats_kernel)
2. totals_kernel          one program: M = sum_b n_b, S = #{b : n_b > 0} (in a fixed order) and the
                          aggregation's denominator
3. (the entry point's kernel) per token: token_inputs -> token_terms -> its gradient times token_weights, and
                          one row of partial sums per program (store_partials)
4. reduce_partials_kernel one program: the loss and the metrics from the partials, in a fixed order

row_scale, the weight of a token's l m in the loss: token-mean 1 / (num_tokens or M); token-sum 1;
seq-mean-token-mean 1 / (S n_b); seq-mean-token-sum 1 / S; seq-mean-token-sum-norm 1 / (B max_len), with
num_sequences for S and B when given; 0 where the denominator is not > 0. The aggregation's options reach
totals_kernel alone: the entry points' kernels take only agg.
No float atomics anywhere: the loss and the gradient have the same bits run after run.

Arguments are named after the loss's spec (moo_kernels.ops.loss.spec.LossSpec); an absent tensor or option is
None, and the code that reads it is left out at compile time. A tensor's strides travel as a tuple
`<name>_strides` = (stride of b, stride of t), 0 for t when a [B] tensor is broadcast over the tokens.

The row statistics, the totals and the scale are float64, and so are the per-token weights m * scale and
m / M until they are formed: a float mask of subnormal (or huge) weights has a sum and a scale beyond
float32's range, while the weights themselves are within it. A bool mask counts any nonzero byte as 1.
Masked tokens influence nothing: every value of theirs is selected away (never multiplied by m = 0),
whatever NaN or inf their inputs hold. Constants are built with tl.zeros / tl.full, never from an input
(logp * 0 is NaN for an infinite logp).
"""

import triton
import triton.language as tl

from moo_kernels import _codes

CLIP = tl.constexpr(_codes.MODE["clip"])
GSPO = tl.constexpr(_codes.MODE["gspo"])
CISPO = tl.constexpr(_codes.MODE["cispo"])
SAPO = tl.constexpr(_codes.MODE["sapo"])
GMPO = tl.constexpr(_codes.MODE["gmpo"])
VESPO = tl.constexpr(_codes.MODE["vespo"])
# the row statistics: sum m, the sequence log-ratio sum (GSPO sum d m, GMPO sum d' m, VESPO sum d m + sum log w),
# the off-policy mask's mean, GMPO's sum A m and sum log(w + 1e-10) m
STATS = tl.constexpr(5)
TOKEN_MEAN = tl.constexpr(_codes.AGG["token-mean"])
SEQ_MEAN_TOKEN_MEAN = tl.constexpr(_codes.AGG["seq-mean-token-mean"])
SEQ_MEAN_TOKEN_SUM_NORM = tl.constexpr(_codes.AGG["seq-mean-token-sum-norm"])
TOKEN_SUM = tl.constexpr(_codes.AGG["token-sum"])
K1 = tl.constexpr(_codes.KL["k1"])
K2 = tl.constexpr(_codes.KL["k2"])
ABS = tl.constexpr(_codes.KL["abs"])
LOW_VAR_KL = tl.constexpr(_codes.KL["low_var_kl"])
K1_ST = tl.constexpr(_codes.KL["k1+"])
K3_ST = tl.constexpr(_codes.KL["k3+"])
LOW_VAR_KL_ST = tl.constexpr(_codes.KL["low_var_kl+"])
ABS_ST = tl.constexpr(_codes.KL["abs+"])
LOW_VAR_KL_MAX = tl.constexpr(10.0)
LOG_RATIO_MAX = tl.constexpr(_codes.LOG_RATIO_MAX)
VESPO_LOG_W_MIN = tl.constexpr(-18.420680743952367)  # log(1e-8), TRL's lower clamp of the sequence log-weight
VESPO_LOG_PHI_MAX = tl.constexpr(88.0)  # beyond it exp leaves float32's range: phi is 0
GMPO_IS_EPS = tl.constexpr(1e-10)
# the columns of a row of partial sums: loss, pg, kl, clip, low, high, dual, ratio sum, ratio min, ratio max, ppo_kl,
# (11: unused, the place of active_tokens in the output), masked (the policy term dropped)
NUM_PARTIALS = tl.constexpr(13)


@triton.jit
def at(ptr, strides, b, t, ok):
    """ptr[b, t] through its strides as float32 (a block of tokens t, or one; 0 where not ok); None for an absent
    ptr (jit functions return None alone, never inside a tuple)."""
    x = None
    if ptr is not None:
        x = tl.load(ptr + b * strides[0] + t * strides[1], mask=ok, other=0.0).to(tl.float32)
    return x


@triton.jit
def flag_at(ptr, strides, b):
    """ptr[b] != 0 (a [B] bool tensor read as bytes); None for an absent ptr."""
    x = None
    if ptr is not None:
        x = tl.load(ptr + b * strides[0]) != 0
    return x


@triton.jit
def mask_weight(mask, mask_strides, b, t, ok):
    """(weight m in float64, active = m != 0) of the mask at (b, t) (0 where not ok): a bool mask (read as
    bytes) counts any nonzero byte as 1."""
    x = tl.load(mask + b * mask_strides[0] + t * mask_strides[1], mask=ok, other=0)
    m = x.to(tl.float64)
    if mask.dtype.element_ty == tl.uint8:
        m = tl.where(x != 0, 1.0, 0.0).to(tl.float64)
    return m, x != 0


@triton.jit
def row_stats_kernel(
    logp, logp_strides, old_logp, old_logp_strides, sampling_logp, sampling_logp_strides, mask, mask_strides,
    advantages, advantages_strides, token_advantages, token_advantages_strides, is_weights, is_weights_strides,
    stats, T, offpolicy_mask_threshold, clip_low, clip_high, mode: tl.constexpr, IS_ROW: tl.constexpr,
    BLOCK_T: tl.constexpr,
):  # fmt: skip
    """stats[b] = (sum_t m; the sequence log-ratio sum: GSPO sum_t d m, GMPO sum_t d' m (the sign-clipped d),
    VESPO sum_t d m + sum_t clamp(log is_weights, log 1e-8, LOG_RATIO_MAX) (IS_ROW, a [B] is_weights: its
    clamped log once, in a row with an active token); the off-policy mask's mean of
    sampling_logp - logp (with offpolicy_mask_threshold: sampling_logp, else old_logp; NaN counts 0); GMPO's
    sum_t A m and sum_t log(is_weights + 1e-10) m), over active tokens, each 0 where its mode or input is
    absent."""
    b = tl.program_id(0).to(tl.int64)
    n = tl.zeros([BLOCK_T], dtype=tl.float64)
    sd = tl.zeros([BLOCK_T], dtype=tl.float64)
    skl = tl.zeros([BLOCK_T], dtype=tl.float64)
    sa = tl.zeros([BLOCK_T], dtype=tl.float64)
    sw = tl.zeros([BLOCK_T], dtype=tl.float64)
    has = tl.zeros([BLOCK_T], dtype=tl.int32)  # active tokens (a float mask's weights may cancel in n)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T).to(tl.int64)
        ok = t < T
        m, active = mask_weight(mask, mask_strides, b, t, ok)
        n += m
        has += tl.where(active, 1, 0)
        if (mode == GSPO or mode == GMPO or mode == VESPO) and old_logp is not None:
            lp = at(logp, logp_strides, b, t, ok)
            old = at(old_logp, old_logp_strides, b, t, ok)
            d = tl.minimum(tl.maximum(lp - old, -LOG_RATIO_MAX), LOG_RATIO_MAX)
            if mode == GMPO:  # the sign-clip: the side of the clip range that caps the objective
                adv = at(advantages, advantages_strides, b, t, ok)
                if token_advantages is not None:
                    adv += at(token_advantages, token_advantages_strides, b, t, ok)
                d = tl.where((adv > 0) & (d > clip_high), clip_high, d)
                d = tl.where((adv < 0) & (d < -clip_low), -clip_low, d)
                d = tl.where(adv == 0, 0.0, d)
            sd += tl.where(active, d.to(tl.float64) * m, 0.0)
        if mode == GMPO:
            adv = at(advantages, advantages_strides, b, t, ok)
            if token_advantages is not None:
                adv += at(token_advantages, token_advantages_strides, b, t, ok)
            sa += tl.where(active, adv.to(tl.float64) * m, 0.0)
            if is_weights is not None:
                w = tl.load(is_weights + b * is_weights_strides[0] + t * is_weights_strides[1], mask=ok,
                            other=1.0).to(tl.float64)  # fmt: skip
                sw += tl.where(active, tl.log(w + GMPO_IS_EPS) * m, 0.0)
        if mode == VESPO and is_weights is not None and not IS_ROW:  # token weights enter the sequence weight
            w = tl.load(is_weights + b * is_weights_strides[0] + t * is_weights_strides[1], mask=ok,
                        other=1.0).to(tl.float64)  # fmt: skip
            lw = tl.minimum(tl.maximum(tl.log(w), VESPO_LOG_W_MIN), LOG_RATIO_MAX)
            sd += tl.where(active, lw, 0.0)
        if offpolicy_mask_threshold is not None:
            if sampling_logp is not None:
                src = tl.load(sampling_logp + b * sampling_logp_strides[0] + t * sampling_logp_strides[1], mask=ok,
                              other=0.0).to(tl.float64)  # fmt: skip
            elif old_logp is not None:
                src = tl.load(old_logp + b * old_logp_strides[0] + t * old_logp_strides[1], mask=ok,
                              other=0.0).to(tl.float64)  # fmt: skip
            else:
                src = None
            if src is not None:
                lp64 = tl.load(logp + b * logp_strides[0] + t * logp_strides[1], mask=ok, other=0.0).to(tl.float64)
                diff = src - lp64
                skl += tl.where(active & (diff == diff), diff * m, 0.0)
    n_row = tl.sum(n, axis=0)
    sd_row = tl.sum(sd, axis=0)
    if mode == VESPO and is_weights is not None and IS_ROW:  # a sequence's weight: once
        w_row = tl.load(is_weights + b * is_weights_strides[0]).to(tl.float64)
        lw_row = tl.minimum(tl.maximum(tl.log(w_row), VESPO_LOG_W_MIN), LOG_RATIO_MAX)
        sd_row += tl.where(tl.sum(has, axis=0) > 0, lw_row, 0.0)
    tl.store(stats + b * STATS, n_row)
    tl.store(stats + b * STATS + 1, sd_row)
    tl.store(stats + b * STATS + 2, tl.sum(skl, axis=0) / tl.maximum(n_row, 1.0))
    tl.store(stats + b * STATS + 3, tl.sum(sa, axis=0))
    tl.store(stats + b * STATS + 4, tl.sum(sw, axis=0))


@triton.jit
def totals_kernel(
    stats, totals, B, agg: tl.constexpr, max_len, num_tokens: tl.float64, num_sequences: tl.float64,
    BLOCK_B: tl.constexpr,
):  # fmt: skip
    """totals = (M = sum_b n_b, S = number of sequences with n_b > 0, the aggregation's denominator: M or
    num_tokens (token-mean), 1 (token-sum), S or num_sequences (seq-mean-token-mean: times n_b per row;
    seq-mean-token-sum), B or num_sequences times max_len (seq-mean-token-sum-norm))."""
    acc_n = tl.zeros([BLOCK_B], dtype=tl.float64)
    acc_s = tl.zeros([BLOCK_B], dtype=tl.float64)
    for b0 in range(0, B, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        n = tl.load(stats + b * STATS, mask=b < B, other=0.0)
        acc_n += n
        acc_s += tl.where(n > 0, 1.0, 0.0)
    total_m = tl.sum(acc_n, axis=0)
    seqs = tl.sum(acc_s, axis=0)
    # num_tokens / num_sequences are NaN when absent (typed float64 parameters: moo_kernels._spec.ABSENT_FLOAT)
    if agg == TOKEN_MEAN:
        den = tl.where(num_tokens == num_tokens, num_tokens, total_m)
    elif agg == TOKEN_SUM:
        den = tl.full([], 1.0, tl.float64)
    elif agg == SEQ_MEAN_TOKEN_SUM_NORM:
        den = tl.where(num_sequences == num_sequences, num_sequences, tl.cast(B, tl.float64))
        den = den * tl.cast(max_len, tl.float64)
    else:  # seq-mean-token-mean, seq-mean-token-sum
        den = tl.where(num_sequences == num_sequences, num_sequences, seqs)
    tl.store(totals + 0, total_m)
    tl.store(totals + 1, seqs)
    tl.store(totals + 2, den)


@triton.jit
def row_scale(stats, totals, b, agg: tl.constexpr):
    """d loss / d (l m) for the tokens of row b, float64: the aggregation's normaliser (totals_kernel; per row for
    seq-mean-token-mean), 0 where it is not > 0."""
    den = tl.load(totals + 2)
    if agg == SEQ_MEAN_TOKEN_MEAN:
        n_row = tl.load(stats + b * STATS)
        den = tl.where(n_row > 0, den * n_row, 0.0)
    return tl.where(den > 0, 1.0 / tl.where(den > 0, den, 1.0), 0.0)


@triton.jit
def token_weights(m, stats, totals, b, agg: tl.constexpr):
    """(m * scale, m / M) in float32, formed in float64 from the float64 mask weight m: the weight of a token's l
    in the loss and in the metrics' means (0 unless M = sum(m) > 0)."""
    scale = row_scale(stats, totals, b, agg)
    total_m = tl.load(totals + 0)
    inv_m = tl.where(total_m > 0, 1.0 / tl.where(total_m > 0, total_m, 1.0), 0.0)
    return (m * scale).to(tl.float32), (m * inv_m).to(tl.float32)


@triton.jit
def sequence_ratio(stats, b):
    """The GSPO sequence ratio of row b: exp of the mean log-ratio over its active tokens (clamped)."""
    sd = tl.load(stats + b * STATS + 1)
    n_row = tl.load(stats + b * STATS)
    seq_d = tl.minimum(tl.maximum(sd / tl.maximum(n_row, 1.0), -LOG_RATIO_MAX), LOG_RATIO_MAX)
    return tl.exp(seq_d.to(tl.float32))


@triton.jit
def vespo_phi(log_w, w, k, lam):
    """VESPO's gamma weight of a sequence, float64: exp(lambda + k log w - lambda w), 0 beyond float32's range."""
    lam = tl.maximum(lam, 1e-4)
    log_phi = lam + k * log_w - lam * w
    return tl.where(log_phi <= VESPO_LOG_PHI_MAX, tl.exp(tl.minimum(log_phi, VESPO_LOG_PHI_MAX)), 0.0)


@triton.jit
def sequence_terms(
    stats, b, has_is_weights: tl.constexpr, mode: tl.constexpr, vespo_k_pos, vespo_lambda_pos, vespo_k_neg,
    vespo_lambda_neg,
):  # fmt: skip
    """(seq_rho, seq_a, seq_b) of row b for token_terms, float32: GSPO (its sequence ratio, 0, 0); GMPO (R, the
    token value -Abar R G, 0); VESPO (w, phi where A >= 0, phi where A < 0); otherwise (1, 0, 0)."""
    seq_rho = tl.full([], 1.0, tl.float32)
    seq_a = tl.zeros([], dtype=tl.float32)
    seq_b = tl.zeros([], dtype=tl.float32)
    if mode == GSPO:
        seq_rho = sequence_ratio(stats, b)
    elif mode == GMPO:
        n_row = tl.maximum(tl.load(stats + b * STATS), 1.0)
        r = tl.exp(tl.minimum(tl.maximum(tl.load(stats + b * STATS + 1) / n_row, -LOG_RATIO_MAX), LOG_RATIO_MAX))
        value = -(tl.load(stats + b * STATS + 3) / n_row) * r
        if has_is_weights:
            value = value * tl.exp(tl.load(stats + b * STATS + 4) / n_row)
        seq_rho = r.to(tl.float32)
        seq_a = value.to(tl.float32)
    elif mode == VESPO:
        log_w = tl.minimum(tl.maximum(tl.load(stats + b * STATS + 1), VESPO_LOG_W_MIN), LOG_RATIO_MAX)
        w = tl.exp(log_w)
        seq_rho = w.to(tl.float32)
        seq_a = vespo_phi(log_w, w, vespo_k_pos, vespo_lambda_pos).to(tl.float32)
        seq_b = vespo_phi(log_w, w, vespo_k_neg, vespo_lambda_neg).to(tl.float32)
    return seq_rho, seq_a, seq_b


@triton.jit
def token_inputs(
    b, t, ok, lp, advantages, advantages_strides, token_advantages, token_advantages_strides, old_logp,
    old_logp_strides,
):  # fmt: skip
    """(advantage, logp - old_logp unclamped) at (b, t) (a block of tokens, or one), read where ok. The optional
    operands of token_terms come one by one: flag_at(offpolicy, ...), at(is_weights, ...), at(ref_logp, ...)."""
    adv = at(advantages, advantages_strides, b, t, ok)
    if token_advantages is not None:
        adv += at(token_advantages, token_advantages_strides, b, t, ok)
    raw = tl.zeros(lp.shape, dtype=tl.float32)  # on-policy: d = 0 whatever logp holds
    if old_logp is not None:
        raw = lp - at(old_logp, old_logp_strides, b, t, ok)
    return adv, raw


@triton.jit
def token_terms(
    lp, raw, adv, active, seq_rho, seq_a, seq_b, off, w_is, ref, beta, clip_low, clip_high, dual_clip, ratio_cap,
    offpolicy_gamma, mode: tl.constexpr, kl: tl.constexpr, kl_bias_correction: tl.constexpr, sapo_tau_pos,
    sapo_tau_neg, keep,
):  # fmt: skip
    """Loss of tokens and its derivative in logp, elementwise (blocks of tokens or a single token).

    lp: log-probs; raw: logp - old_logp (unclamped); seq_rho, seq_a, seq_b: the row's values of sequence_terms;
    off, w_is, ref, keep: None when absent. Returns (loss, pg, dloss/dlogp, k, rho, d, clipped, low, high, dual);
    loss, pg and k are 0 where inactive.
    """
    zero = tl.zeros(lp.shape, dtype=tl.float32)
    false = tl.full(lp.shape, 0, tl.int1)
    d = tl.minimum(tl.maximum(raw, -LOG_RATIO_MAX), LOG_RATIO_MAX)
    clipped, low, high, dual = false, false, false, false
    if mode == CLIP or mode == GSPO:
        if mode == GSPO:
            rho = zero + seq_rho
            d_rho = rho  # token form sg(s) exp(logp - sg(logp)): d rho / d logp = s
        else:
            rho = tl.exp(d)
            d_rho = tl.where(tl.abs(raw) <= LOG_RATIO_MAX, rho, 0.0)
        lo = 1.0 - clip_low
        hi = 1.0 + clip_high
        rho1 = rho
        d_rho1 = d_rho
        if ratio_cap is not None:
            rho1 = tl.minimum(rho, ratio_cap)
            d_rho1 = tl.where(rho <= ratio_cap, d_rho, 0.0)
        l1 = -adv * rho1
        l2 = -adv * tl.minimum(tl.maximum(rho, lo), hi)
        clipped = l2 > l1
        pg = tl.where(clipped, l2, l1)
        g = tl.where(clipped, tl.where((rho >= lo) & (rho <= hi), -adv * d_rho, 0.0), -adv * d_rho1)
        if dual_clip is not None:
            l3 = -adv * dual_clip
            dual = (adv < 0) & (pg > l3)
            pg = tl.where(dual, l3, pg)
            g = tl.where(dual, 0.0, g)
        low = (rho < lo) & (adv < 0)
        high = (rho > hi) & (adv > 0)
    elif mode == CISPO:
        rho = tl.exp(d)
        lo = 1.0 - clip_low
        hi = 1.0 + clip_high
        w = tl.minimum(tl.maximum(rho, lo), hi)
        pg = -w * adv * lp
        g = -w * adv
        clipped = w != rho
        low = (rho < lo) & (adv < 0)
        high = (rho > hi) & (adv > 0)
    elif mode == GMPO:  # the sequence's -Abar R G, with the gradient where the sign-clip did not cut d
        rho = zero + seq_rho
        outside = (d < -clip_low) | (d > clip_high)  # verl's clip flags
        low = outside & (adv < 0)
        high = outside & (adv > 0)
        clipped = ((adv > 0) & (d > clip_high)) | ((adv < 0) & (d < -clip_low))
        pg = zero + seq_a
        g = tl.where(clipped | (adv == 0) | (tl.abs(raw) > LOG_RATIO_MAX), 0.0, seq_a)
    elif mode == VESPO:  # -sg(phi) A logp, phi of the sequence weight by the sign of A
        rho = zero + seq_rho
        phi = tl.where(adv >= 0, seq_a, seq_b)
        pg = -phi * adv * lp
        g = -phi * adv
    elif mode == SAPO:  # the soft gate sigmoid(tau (rho - 1)) 4 / tau
        rho = tl.exp(d)
        d_rho = tl.where(tl.abs(raw) <= LOG_RATIO_MAX, rho, 0.0)
        tau = tl.where(adv > 0, sapo_tau_pos, sapo_tau_neg)
        s = tl.sigmoid(tau * (rho - 1.0))
        pg = -adv * s * (4.0 / tau)
        g = -adv * (4.0 * s * (1.0 - s)) * d_rho
    else:  # reinforce
        rho = tl.exp(d)
        pg = -adv * lp
        g = -adv
    if off is not None:  # f = p / (p + gamma) as 1 / (1 + gamma / p): finite, and so is f (1 - f), for any logp
        f = 1.0 / (1.0 + offpolicy_gamma * tl.exp(-lp))
        pg = tl.where(off, -adv * f, pg)
        g = tl.where(off, -adv * (f * (1.0 - f)), g)
        clipped = clipped & ~off
        low = low & ~off
        high = high & ~off
        dual = dual & ~off
    if w_is is not None:
        if mode != GMPO and mode != VESPO:  # those hold the importance weights in their sequence values
            pg = pg * w_is
            g = g * w_is
    if keep is not None:  # the off-policy sequence mask: the policy term only
        pg = tl.where(keep, pg, 0.0)
        g = tl.where(keep, g, 0.0)
    pg = tl.where(active, pg, 0.0)

    # ---- KL to the reference ---------------------------------------------------------------------------------
    k = zero
    loss = pg
    if ref is not None:
        u = lp - ref
        if kl == K1 or kl == K1_ST:
            k = u
            gk = tl.full(lp.shape, 1.0, tl.float32)
        elif kl == K2:
            k = 0.5 * u * u
            gk = u
        elif kl == ABS or kl == ABS_ST:
            k = tl.abs(u)
            gk = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, 0.0))
        else:  # k3, low_var_kl (k3 at most 10, no gradient beyond) and their straight-through forms
            uc = tl.minimum(tl.maximum(u, -LOG_RATIO_MAX), LOG_RATIO_MAX)
            e = tl.exp(-uc)
            k = e + uc - 1.0
            gk = tl.where(tl.abs(u) <= LOG_RATIO_MAX, 1.0 - e, 0.0)
            if kl == LOW_VAR_KL or kl == LOW_VAR_KL_ST:
                gk = tl.where(k <= LOW_VAR_KL_MAX, gk, 0.0)
                k = tl.where(k <= LOW_VAR_KL_MAX, k, LOW_VAR_KL_MAX)
        if kl == K1_ST or kl == K3_ST or kl == LOW_VAR_KL_ST or kl == ABS_ST:
            gk = u  # straight-through: the gradient of k2
        if kl_bias_correction:  # rho k: d = rho dk + k d rho (the token ratio; the spec refuses gspo)
            tok_rho = rho
            if mode == GMPO or mode == VESPO:
                tok_rho = tl.exp(d)
            gk = gk * tok_rho + k * tl.where(tl.abs(raw) <= LOG_RATIO_MAX, tok_rho, 0.0)
            k = k * tok_rho
        k = tl.where(active, k, 0.0)
        # beta = 0 reports the estimate without adding it (a select: 0 * inf would be NaN)
        with_kl = beta > 0
        loss = tl.where(with_kl, pg + beta * k, pg)
        g = tl.where(with_kl, g + beta * gk, g)
    return loss, pg, g, k, rho, d, clipped, low, high, dual


@triton.jit
def store_partials(base, loss_tok, pg, k, wl, wmean, active, clipped, low, high, dual, rho, d, dropped):
    """One row of partial sums (the columns of reduce_partials_kernel) over a block of tokens: wl = m scale,
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
    tl.store(base + 11, 0.0)
    tl.store(base + 12, tl.sum(tl.where(dropped & active, wmean, 0.0), axis=0))


@triton.jit
def reduce_partials_kernel(parts, totals, out, P, BLOCK_P: tl.constexpr):
    """out = [loss, pg_loss, kl_mean, clip_frac, low, high, dual, ratio_mean, ratio_min, ratio_max,
    ppo_kl, active_tokens, masked_frac], reduced over the P partial rows in a fixed order (the means are sums of the
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
        x = tl.load(parts + r[:, None] * NUM_PARTIALS + cols[None, :], mask=ok, other=0.0)
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
    total_m = tl.load(totals + 0)
    is_mean = ((cols >= 2) & (cols <= 7)) | (cols == 10) | (cols == 12)
    red = tl.where(is_mean, tl.where(total_m > 0, red, 0.0), red)
    red = tl.where(cols == 11, total_m, red)
    tl.store(out + cols, red, mask=cols < NUM_PARTIALS)
