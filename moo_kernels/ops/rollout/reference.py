"""Float64 PyTorch reference of rollout_correction: the semantics, which the Triton and C++ kernels follow.

Notation: row b, token t, active a_bt = mask != 0; n = the number of active tokens.
1. Log-ratio d_bt = old_logp - rollout_logp at active tokens (0 elsewhere); a NaN there (a log-prob the sampler
   did not return) counts 0. dc = clamp(d, -20, 20).
2. Raw weights at active tokens (0 elsewhere): level "token" exp(dc_bt); level "sequence" exp(clamp(S_b, -20,
   20)) with S_b = sum_t d_bt over the row's active tokens.
3. mode "truncate": w = clamp(raw, low, high) (a bound that is None is not applied), "truncated" where w != raw;
   mode "mask": w = raw where low <= raw <= high, else 0 ("masked").
4. Rejection (verl's compute_rollout_rejection_mask): per token k1 = -dc, k2 = dc^2 / 2, k3 = exp(dc) - 1 - dc;
   per row their sum, mean (sum / n_b) and max over active tokens (0 for a row without one). A k1 criterion keeps
   where log(lower) <= statistic <= log(upper), the others where statistic <= upper; a token_* criterion decides
   per token, a seq_* one for the whole row. The returned mask is the input mask AND every criterion.
5. Metrics (RolloutMetrics) over the active tokens of the input mask, from w before batch normalisation.
6. batch_normalize: m = mean of w over the active tokens (level "token"), or over the rows with an active token
   of the row's weight (level "sequence"); w <- w / m when m > 1e-8.
The weights are constants (no gradient flows through them).
"""

from __future__ import annotations

import math

import torch

from moo_kernels._codes import LOG_RATIO_MAX
from moo_kernels.ops.rollout.spec import _SLOTS, RolloutSpec

F64 = torch.float64
ESS_EPS = 1e-8  # verl's, in the ESS normalisation
NORM_MIN = 1e-8  # batch_normalize divides only by a mean above this (verl)


def log_ratios(old_logp: torch.Tensor, o: RolloutSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(active [B, T] bool, d [B, T] float64: 1. of the module docstring, unclamped)."""
    active = o.mask != 0
    d = old_logp.to(F64) - o.rollout_logp.to(F64)
    d = torch.where(active & ~torch.isnan(d), d, torch.zeros_like(d))
    return active, d


def rollout_reference(old_logp: torch.Tensor, o: RolloutSpec) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(is_weights [B, T] float64, mask [B, T] bool, {metric: 0-dim float64})."""
    active, d = log_ratios(old_logp, o)
    zero = torch.zeros_like(d)
    dc = d.clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)
    n_row = active.sum(dim=1).to(F64)
    has = n_row > 0
    if o.level == "token":
        raw = torch.where(active, torch.exp(dc), zero)
    else:
        s = d.sum(dim=1, keepdim=True).clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)
        raw = torch.where(active, torch.exp(s).expand_as(d), zero)
    lo = -math.inf if o.low is None else o.low
    hi = math.inf if o.high is None else o.high
    if o.mode == "truncate":
        w = torch.where(active, raw.clamp(lo, hi), zero)
        truncated = active & (w != raw)
        masked = torch.zeros_like(active)
    else:
        keep = (raw >= lo) & (raw <= hi)
        w = torch.where(active & keep, raw, zero)
        truncated = torch.zeros_like(active)
        masked = active & ~keep

    # 4. rejection
    out_mask = active.clone()
    if o.reject is not None:
        thresholds = o.reject.tolist()
        k = {1: -dc, 2: 0.5 * dc * dc, 3: torch.exp(dc) - 1.0 - dc}
        for name, slots in _SLOTS.items():
            values = [thresholds[i] for i in slots]
            if math.isnan(values[0]):
                continue
            kind = int(name[-1])
            per_token = torch.where(active, k[kind], zero)
            if name.startswith("token"):
                stat = per_token
            elif name.startswith("seq_sum"):
                stat = per_token.sum(dim=1, keepdim=True)
            elif name.startswith("seq_mean"):
                stat = per_token.sum(dim=1, keepdim=True) / n_row.clamp(min=1)[:, None]
            else:
                stat = torch.where(active, k[kind], torch.full_like(d, -math.inf)).amax(dim=1, keepdim=True)
                stat = torch.where(has[:, None], stat, torch.zeros_like(stat))
            ok = (stat >= values[0]) & (stat <= values[1]) if kind == 1 else stat <= values[0]
            out_mask = out_mask & ok
    rejected = active & ~out_mask

    # 5. metrics
    n = active.sum().to(F64)
    n1 = n.clamp(min=1)

    def mean(x):
        return torch.where(active, x, zero).sum() / n1

    w_c = w.clamp(0.0, hi)
    m_c = mean(w_c)
    ess = 1.0 / mean((w_c / (m_c + ESS_EPS)) ** 2) if bool(n > 0) else torch.zeros((), dtype=F64)
    rows = has.sum().to(F64)
    metrics = {
        "weight_mean": mean(w),
        "weight_max": torch.where(active, w, torch.full_like(w, -math.inf)).amax().clamp(min=0) if n > 0 else n * 0,
        "weight_min": torch.where(active, w, torch.full_like(w, math.inf)).amin() if n > 0 else n * 0,
        "ess": ess,
        "truncated_frac": truncated.sum().to(F64) / n1,
        "masked_frac": masked.sum().to(F64) / n1,
        "rejected_token_frac": rejected.sum().to(F64) / n1,
        "rejected_seq_frac": rejected.any(dim=1).sum().to(F64) / rows.clamp(min=1),
        "kl_k1": mean(-d),
        "kl_k3": mean(torch.exp(dc) - dc - 1.0),
        "active_tokens": n,
    }

    # 6. batch normalisation
    factor = torch.ones((), dtype=F64, device=d.device)
    if o.batch_normalize:
        if o.level == "token":
            m = metrics["weight_mean"]
        else:
            row_w = torch.where(active, w, zero).amax(dim=1)  # the row's weight (0 where masked)
            m = torch.where(has, row_w, torch.zeros_like(row_w)).sum() / rows.clamp(min=1)
        factor = torch.where(m > NORM_MIN, m, factor)
        w = w / factor
    metrics["batch_norm_factor"] = factor
    return w, out_mask, metrics
