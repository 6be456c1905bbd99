"""Triton kernel of the policy loss from log-probs (see moo_kernels/ops/loss/triton_kernels.py for the stages
around it and the per-token helpers; triton_launch.py for the launcher)."""

import triton
import triton.language as tl

from moo_kernels.ops.loss.triton_kernels import (
    NUM_PARTIALS,
    STATS,
    at,
    flag_at,
    mask_weight,
    sequence_terms,
    store_partials,
    token_inputs,
    token_terms,
    token_weights,
)


@triton.jit
def policy_loss_fwd_kernel(
    logp, logp_strides, grad, grad_strides, stats, totals, parts, T,
    advantages, advantages_strides, mask, mask_strides, old_logp, old_logp_strides, ref_logp, ref_logp_strides,
    token_advantages, token_advantages_strides, is_weights, is_weights_strides, offpolicy, offpolicy_strides,
    policy_mask, policy_mask_strides,
    beta, kl: tl.constexpr, kl_bias_correction: tl.constexpr, clip_low, clip_high, dual_clip, ratio_cap,
    mode: tl.constexpr, offpolicy_gamma, sapo_tau_pos, sapo_tau_neg, offpolicy_mask_threshold,
    vespo_k_pos: tl.float64, vespo_lambda_pos: tl.float64, vespo_k_neg: tl.float64, vespo_lambda_neg: tl.float64,
    agg: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    """Grid (B, T / BLOCK_T): per token the loss l, its gradient d l / d logp and the metrics; writes
    grad = d l / d logp * (m * scale) (when grad is given) and one row of partial sums per program."""
    b = tl.program_id(0).to(tl.int64)
    pt = tl.program_id(1)
    t = pt.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T).to(tl.int64)
    ok = t < T

    m, active = mask_weight(mask, mask_strides, b, t, ok)
    wl, wmean = token_weights(m, stats, totals, b, agg)
    lp = tl.load(logp + b * logp_strides[0] + t * logp_strides[1], mask=ok, other=0.0).to(tl.float32)
    adv, raw = token_inputs(
        b, t, ok, lp, advantages, advantages_strides, token_advantages, token_advantages_strides, old_logp,
        old_logp_strides,
    )  # fmt: skip
    off = flag_at(offpolicy, offpolicy_strides, b)
    w_is = at(is_weights, is_weights_strides, b, t, ok)
    ref = at(ref_logp, ref_logp_strides, b, t, ok)
    seq_rho, seq_a, seq_b = sequence_terms(
        stats, b, is_weights is not None, mode, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg
    )  # fmt: skip
    keep = None
    dropped = tl.full(adv.shape, 0, tl.int1)
    if offpolicy_mask_threshold is not None:  # the sequence's mean of sampling_logp - logp (row statistics)
        drifted = tl.load(stats + b * STATS + 2) > offpolicy_mask_threshold
        keep = tl.where(drifted, adv >= 0.0, tl.full(adv.shape, 1, tl.int1))
    if policy_mask is not None:
        kept = tl.load(policy_mask + b * policy_mask_strides[0] + t * policy_mask_strides[1], mask=ok, other=0) != 0
        if keep is not None:
            kept = kept & keep
        keep = kept
    if keep is not None:
        dropped = keep == 0
    loss_tok, pg, g, k, rho, d, clipped, low, high, dual = token_terms(
        lp, raw, adv, active, seq_rho, seq_a, seq_b, off, w_is, ref, beta, clip_low, clip_high, dual_clip, ratio_cap,
        offpolicy_gamma, mode, kl, kl_bias_correction, sapo_tau_pos, sapo_tau_neg, keep,
    )  # fmt: skip
    if grad is not None:
        g_out = tl.where(active, g * wl, 0.0).to(grad.dtype.element_ty)
        tl.store(grad + b * grad_strides[0] + t * grad_strides[1], g_out, mask=ok)
    pid = b * tl.num_programs(1) + pt
    store_partials(
        parts + pid * NUM_PARTIALS, loss_tok, pg, k, wl, wmean, active, clipped, low, high, dual, rho, d, dropped
    )  # fmt: skip
