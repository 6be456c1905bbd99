"""The entropy terms of the loss from logits (moo_kernels.ops.logits.spec.EntropySpec), from each position's
entropy H [B, T]: the entropy mask (top_entropy_quantile / entropy_threshold), which joins the loss's policy_mask,
and the entropy bonus -entropy_coef * Hbar with d Hbar / d H. O(B T) work on the device, without a host
synchronisation; every backend and the reference share them, the bonus computed in float64.
"""

from __future__ import annotations

import torch

from moo_kernels.ops.logits.spec import EntropySpec
from moo_kernels.ops.loss.reference import token_scale
from moo_kernels.ops.loss.spec import LossSpec

F64 = torch.float64


def masked_quantile(x: torch.Tensor, active: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(x[active], q) (linear interpolation) as a 0-dim tensor in x's dtype, without the host
    synchronisation of a boolean index: the inactive values sort last as +inf. +inf when no value is active."""
    n = active.sum()
    vals = torch.where(active, x, torch.full_like(x, float("inf"))).flatten().sort().values
    rank = (n - 1).clamp(min=0).to(x.dtype) * q
    below = rank.floor()
    lo = vals[below.long()]
    hi = vals[rank.ceil().long()]
    out = torch.lerp(lo, hi, rank - below) if q > 0 else lo
    return torch.where(n > 0, out, torch.full_like(out, float("inf")))


def entropy_keep(entropy: torch.Tensor, spec: LossSpec, es: EntropySpec) -> torch.Tensor | None:
    """[B, T] bool: where the entropy mask keeps a token's policy term (H >= the threshold), None when off."""
    active = spec.mask != 0
    if es.entropy_threshold is not None:
        threshold = torch.tensor(es.entropy_threshold, dtype=entropy.dtype, device=entropy.device)
    elif es.top_entropy_quantile < 1.0:
        threshold = masked_quantile(entropy, active, 1.0 - es.top_entropy_quantile)
    else:
        return None
    return entropy >= threshold


def with_policy_mask(spec: LossSpec, keep: torch.Tensor | None) -> LossSpec:
    """The loss's spec with keep joined to its policy_mask."""
    if keep is None:
        return spec
    if spec.policy_mask is not None:
        keep = keep & spec.policy_mask.to(torch.bool)
    return LossSpec.make({**spec.kwargs(), "policy_mask": keep})


def entropy_bonus(
    entropy: torch.Tensor, spec: LossSpec, es: EntropySpec, keep: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hbar, d Hbar / d H), float64: entropy_agg "mean" sum(H m') / max(sum m', 1) with m' = m where keep (TRL);
    "loss" sum(H m' scale), scale the loss's per-token normaliser (verl's agg_loss). Masked tokens and those the
    entropy mask drops are selected away (their entropy may be anything)."""
    m = spec.mask.to(F64)
    on = m != 0
    if keep is not None:
        on = on & keep
    zero = torch.zeros_like(m)
    m_eff = torch.where(on, m, zero)
    if es.entropy_agg == "mean":
        weights = m_eff / m_eff.sum().clamp(min=1.0)
    else:
        weights = m_eff * token_scale(m, spec)
    h = torch.where(on, entropy.to(F64), zero)
    return (h * weights).sum(), weights
