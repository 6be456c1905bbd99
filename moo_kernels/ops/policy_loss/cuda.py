"""Triton launcher of the policy loss: row statistics, totals, the fused forward, the reduction.

Used for CUDA tensors, and for CPU tensors under TRITON_INTERPRET=1 with the backend forced to
"triton". Returns (loss, metrics[11], grad): grad is dloss/dlogp for an incoming gradient of 1, in
logp's dtype (None when no gradient is needed).
"""

from __future__ import annotations

import torch
import triton

from moo_kernels.ops.policy_loss import triton_kernels as tk
from moo_kernels.ops.policy_loss.problem import AGG_CODES, KL_CODES, MODE_CODES, PolicyLossProblem

BLOCK_T = 512  # tokens per program of the main kernel
FWD_WARPS = 8  # 2 tokens per thread: every flag on stays within registers (checked ahead of time)
NUM_METRICS = 11


def _strides(x: torch.Tensor | None, dummy: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Pointer and (row, token) strides; a [B] tensor broadcasts along tokens with stride 0."""
    if x is None:
        return dummy, 0, 0
    if x.dim() == 1:
        return x, x.stride(0), 0
    return x, x.stride(0), x.stride(1)


def policy_loss_triton(p: PolicyLossProblem):
    lp = p.logp
    B, T = lp.shape
    dev = lp.device
    f64 = dict(dtype=torch.float64, device=dev)  # row statistics and totals: see triton_kernels
    mask = p.mask.view(torch.uint8) if p.mask.dtype == torch.bool else p.mask
    stats = torch.empty(B, 2, **f64)
    totals = torch.empty(2, **f64)
    grid_t = triton.cdiv(T, BLOCK_T)
    parts = torch.empty(B * grid_t, tk.NUM_PARTIALS.value, dtype=torch.float32, device=dev)
    out = torch.empty(NUM_METRICS + 1, **f64)
    grad = torch.empty_like(lp) if p.write_grad else None

    old, s_ob, s_ot = _strides(p.old_logp, lp)
    gspo = p.mode == "gspo"
    tk._row_stats_kernel[(B,)](
        lp,
        old,
        mask,
        stats,
        T,
        lp.stride(0),
        lp.stride(1),
        s_ob,
        s_ot,
        mask.stride(0),
        mask.stride(1),
        BLOCK_T=min(triton.next_power_of_2(T), 2048),
        HAS_OLD=p.old_logp is not None,
        GSPO_MODE=gspo,
        num_warps=4,
    )
    tk._totals_kernel[(1,)](stats, totals, B, BLOCK_B=min(triton.next_power_of_2(B), 1024), num_warps=4)

    ref, s_rb, s_rt = _strides(p.ref_logp, lp)
    adv, s_ab, s_at = _strides(p.advantages, lp)
    tadv, s_tb, s_tt = _strides(p.token_advantages, lp)
    isw, s_wb, s_wt = _strides(p.is_weights, lp)
    off = p.offpolicy.view(torch.uint8) if p.offpolicy is not None else mask
    g, s_gb, s_gt = _strides(grad, lp)
    tk._policy_loss_fwd_kernel[(B, grid_t)](
        lp,
        old,
        ref,
        mask,
        adv,
        tadv,
        isw,
        off,
        stats,
        totals,
        g,
        parts,
        B,
        T,
        lp.stride(0),
        lp.stride(1),
        s_ob,
        s_ot,
        s_rb,
        s_rt,
        mask.stride(0),
        mask.stride(1),
        s_ab,
        s_at,
        s_tb,
        s_tt,
        s_wb,
        s_wt,
        s_gb,
        s_gt,
        p.beta,
        p.clip_low,
        p.clip_high,
        p.dual_clip or 0.0,
        p.ratio_cap or 0.0,
        p.offpolicy_gamma,
        p.norm_const(),
        MODE=MODE_CODES[p.mode],
        AGG=AGG_CODES[p.agg],
        KL=KL_CODES[p.kl],
        HAS_OLD=p.old_logp is not None,
        HAS_REF=p.ref_logp is not None,
        HAS_TADV=p.token_advantages is not None,
        HAS_ISW=p.is_weights is not None,
        HAS_OFF=p.offpolicy is not None,
        HAS_DUAL=p.dual_clip is not None,
        HAS_CAP=p.ratio_cap is not None,
        HAS_NUM_TOKENS=p.num_tokens is not None,
        WRITE_GRAD=grad is not None,
        BLOCK_T=BLOCK_T,
        num_warps=FWD_WARPS,
    )
    tk._reduce_partials_kernel[(1,)](
        parts, totals, out, parts.shape[0], BLOCK_P=min(triton.next_power_of_2(parts.shape[0]), 256), num_warps=4
    )
    dt = torch.float64 if lp.dtype == torch.float64 else torch.float32
    return out[0].to(dt), out[1:].to(dt), grad
