"""C++ launcher of the policy loss: allocates the outputs and calls the OpenMP kernel of csrc/policy_loss.cpp.

The extension takes raw addresses, dtype codes and strides (in elements), so every input keeps its dtype and
strides (a [B] tensor is read with token stride 0, a bool mask in place as bytes) and nothing is copied. Returns
(loss, metrics[11], grad) like the Triton launcher: grad is d loss / d logp for an incoming gradient of 1, in
logp's dtype (None when no gradient is needed).
"""

from __future__ import annotations

import torch

from moo_kernels._backend import cpp
from moo_kernels.ops.policy_loss.problem import AGG_CODES, KL_CODES, MODE_CODES, PolicyLossProblem

DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3, torch.bool: 4}
NUM_METRICS = 11


def _operand(x: torch.Tensor | None) -> tuple[int, int, int, int]:
    """(address, dtype code, row stride, token stride); a [B] tensor broadcasts along tokens with stride 0."""
    if x is None:
        return 0, 2, 0, 0
    if x.dim() == 1:
        return x.data_ptr(), DTYPE_CODES[x.dtype], x.stride(0), 0
    return x.data_ptr(), DTYPE_CODES[x.dtype], x.stride(0), x.stride(1)


def policy_loss_cpp(p: PolicyLossProblem):
    lp = p.logp
    B, T = lp.shape
    dt = torch.float64 if lp.dtype == torch.float64 else torch.float32
    loss = torch.empty((), dtype=dt)
    metrics = torch.empty(NUM_METRICS, dtype=dt)
    grad = torch.empty((B, T), dtype=lp.dtype) if p.write_grad else None
    cpp().policy_loss(
        logp=_operand(lp),
        old_logp=_operand(p.old_logp),
        ref_logp=_operand(p.ref_logp),
        mask=_operand(p.mask),
        advantages=_operand(p.advantages),
        token_advantages=_operand(p.token_advantages),
        is_weights=_operand(p.is_weights),
        offpolicy=p.offpolicy.data_ptr() if p.offpolicy is not None else 0,
        grad=_operand(grad),
        B=B,
        T=T,
        mode=MODE_CODES[p.mode],
        agg=AGG_CODES[p.agg],
        kl=KL_CODES[p.kl],
        beta=p.beta,
        clip_low=p.clip_low,
        clip_high=p.clip_high,
        dual_clip=p.dual_clip,
        ratio_cap=p.ratio_cap,
        offpolicy_gamma=p.offpolicy_gamma,
        num_tokens=p.num_tokens,
        norm_const=p.norm_const(),
        loss_out=loss.data_ptr(),
        metrics_out=metrics.data_ptr(),
        out_f64=dt == torch.float64,
    )
    return loss, metrics, grad
