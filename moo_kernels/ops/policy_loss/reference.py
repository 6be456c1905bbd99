"""Float64 reference of the token-level policy loss: the semantics, the oracle, the fallback.

Per token t of sequence b, with mask m_bt (0 or 1, a float mask acts as a weight):

- advantage   A_bt = advantages[b] (or advantages[b, t]) + token_advantages[b, t]
- log-ratio   d_bt = clamp(logp - old_logp, -LOG_RATIO_MAX, LOG_RATIO_MAX); old_logp None means
              on-policy, old = logp.detach() (ratio 1, gradient still flows); rho = exp(d)
- mode "clip"      L = max(-A min(rho, ratio_cap), -A clamp(rho, 1 - clip_low, 1 + clip_high)),
                   then for A < 0 with dual_clip c: L = min(L, -c A)
- mode "gspo"      as "clip", with rho replaced by the sequence ratio
                   s_b = exp(clamp(sum_t d m / sum_t m, -LOG_RATIO_MAX, LOG_RATIO_MAX)) in the GSPO token form
                   sg(s_b) exp(logp - sg(logp)): value s_b, d rho / d logp_bt = s_b
- mode "cispo"     L = -sg(clamp(rho, 1 - clip_low, 1 + clip_high)) A logp
- mode "reinforce" L = -A logp
- offpolicy[b]     L = -A f(p), p = exp(logp), f(p) = p / (p + offpolicy_gamma): no ratio, no clip
- is_weights       L <- is_weights * L (behaviour-policy correction, not differentiated)
- KL (beta > 0)    l = L + beta k, with u = logp - ref_logp:
                   k1 = u, k2 = u^2 / 2, k3 = exp(-u') + u' - 1 with u' = clamp(u, -LOG_RATIO_MAX, LOG_RATIO_MAX)

Aggregation of l over active tokens:
- "token-mean":              sum(l m) / sum(m), or / num_tokens when given (data-parallel ranks and
                             gradient-accumulation micro-batches then agree); 0 when nothing is active
- "seq-mean-token-mean":     mean over sequences with an active token of sum_t(l m) / sum_t(m)
- "seq-mean-token-sum":      mean over sequences with an active token of sum_t(l m)
- "seq-mean-token-sum-norm": sum(l m) / (B * max_len)   (Dr. GRPO: a constant normaliser)

Metrics (0-dim tensors, over active tokens, weighted by m): pg_loss (the aggregated policy term),
kl_mean, clip_frac (the clipped term is strictly the larger loss: its gradient is cut),
clip_frac_low (rho < 1 - clip_low and A < 0), clip_frac_high (rho > 1 + clip_high and A > 0),
dual_clip_frac (A < 0 and the dual-clip bound is taken), ratio_mean, ratio_min, ratio_max,
ppo_kl (mean of old_logp - logp), active_tokens (sum of m). Off-policy tokens count as unclipped.
"""

from __future__ import annotations

import torch

F64 = torch.float64
LOG_RATIO_MAX = 20.0

MODES = ("clip", "gspo", "cispo", "reinforce")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
KLS = ("k1", "k2", "k3")
METRICS = (
    "pg_loss",
    "kl_mean",
    "clip_frac",
    "clip_frac_low",
    "clip_frac_high",
    "dual_clip_frac",
    "ratio_mean",
    "ratio_min",
    "ratio_max",
    "ppo_kl",
    "active_tokens",
)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kl: str) -> torch.Tensor:
    u = logp - ref_logp
    if kl == "k1":
        return u
    if kl == "k2":
        return 0.5 * u * u
    u = u.clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)
    return torch.exp(-u) + u - 1.0


def aggregate(l: torch.Tensor, m: torch.Tensor, agg: str, max_len: int | None, num_tokens: float | None):
    total = (l * m).sum()
    if agg == "token-mean":
        den = torch.as_tensor(num_tokens, dtype=l.dtype) if num_tokens is not None else m.sum()
        return torch.where(den > 0, total / den.clamp(min=1e-30), torch.zeros_like(total))
    if agg == "seq-mean-token-sum-norm":
        return total / (l.shape[0] * max_len)
    per_seq = (l * m).sum(dim=1)
    n = m.sum(dim=1)
    has = n > 0
    if agg == "seq-mean-token-mean":
        per_seq = torch.where(has, per_seq / torch.where(has, n, torch.ones_like(n)), torch.zeros_like(n))
    seqs = has.to(l.dtype).sum()
    return torch.where(seqs > 0, per_seq.sum() / seqs.clamp(min=1), torch.zeros_like(total))


def policy_loss_reference(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    kl: str = "k3",
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    ratio_cap: float | None = None,
    mode: str = "clip",
    is_weights: torch.Tensor | None = None,
    offpolicy: torch.Tensor | None = None,
    offpolicy_gamma: float = 0.1,
    token_advantages: torch.Tensor | None = None,
    agg: str = "token-mean",
    max_len: int | None = None,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns (loss, metrics) in float64; differentiable w.r.t. logp by autograd."""
    clip_high = clip_low if clip_high is None else clip_high
    lp = logp.to(F64)
    B, T = lp.shape
    m = mask.to(F64)
    active = m != 0
    A = advantages.to(F64)
    A = A[:, None].expand(B, T) if A.dim() == 1 else A
    if token_advantages is not None:
        A = A + token_advantages.to(F64)
    old = lp.detach() if old_logp is None else old_logp.to(F64)
    d = (lp - old).clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)
    zero = torch.zeros_like(lp)

    if mode == "gspo":
        n = m.sum(dim=1, keepdim=True)
        dseq = (d * m).sum(dim=1, keepdim=True) / n.clamp(min=1)
        seq = torch.exp(dseq.clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)).detach()
        rho = seq * torch.exp(lp - lp.detach())
    else:
        rho = torch.exp(d)

    clipped = low = high = dual = torch.zeros_like(active)
    if mode in ("clip", "gspo"):
        lo, hi = 1.0 - clip_low, 1.0 + clip_high
        rho1 = rho if ratio_cap is None else torch.clamp(rho, max=ratio_cap)
        l1 = -A * rho1
        l2 = -A * rho.clamp(lo, hi)
        pg = torch.maximum(l1, l2)
        clipped = l2 > l1
        if dual_clip is not None:
            l3 = -A * dual_clip
            dual = (A < 0) & (pg > l3)
            pg = torch.where(A < 0, torch.minimum(pg, l3), pg)
        low = (rho.detach() < lo) & (A < 0)
        high = (rho.detach() > hi) & (A > 0)
    elif mode == "cispo":
        lo, hi = 1.0 - clip_low, 1.0 + clip_high
        w = rho.detach().clamp(lo, hi)
        pg = -w * A * lp
        clipped = w != rho.detach()
        low = (rho.detach() < lo) & (A < 0)
        high = (rho.detach() > hi) & (A > 0)
    elif mode == "reinforce":
        pg = -A * lp
    else:
        raise ValueError(f"unknown mode {mode!r}")

    if offpolicy is not None:
        off = offpolicy.to(torch.bool)[:, None].expand(B, T)
        p = torch.exp(lp)
        pg = torch.where(off, -A * p / (p + offpolicy_gamma), pg)
        clipped, low, high, dual = (x & ~off for x in (clipped, low, high, dual))
    if is_weights is not None:
        w = is_weights.to(F64)
        pg = pg * (w[:, None] if w.dim() == 1 else w)
    pg = torch.where(active, pg, zero)

    k = kl_estimate(lp, ref_logp.to(F64), kl) if ref_logp is not None else zero
    k = torch.where(active, k, zero)
    loss_tok = pg + beta * k if beta > 0 else pg
    loss = aggregate(loss_tok, m, agg, max_len, num_tokens)

    def mean(x):
        den = m.sum()
        return torch.where(den > 0, (x.to(F64) * m).sum() / den.clamp(min=1e-30), torch.zeros((), dtype=F64))

    r = rho.detach()
    big = torch.full_like(r, float("inf"))
    any_active = bool(active.any())
    metrics = {
        "pg_loss": aggregate(pg, m, agg, max_len, num_tokens).detach(),
        "kl_mean": mean(k.detach()),
        "clip_frac": mean(clipped),
        "clip_frac_low": mean(low),
        "clip_frac_high": mean(high),
        "dual_clip_frac": mean(dual),
        "ratio_mean": mean(r),
        "ratio_min": torch.where(active, r, big).min() if any_active else torch.zeros((), dtype=F64),
        "ratio_max": torch.where(active, r, -big).max() if any_active else torch.zeros((), dtype=F64),
        "ppo_kl": mean(-(d.detach())),
        "active_tokens": m.sum(),
    }
    return loss, metrics


def policy_loss_grad_reference(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, **kw) -> torch.Tensor:
    """Closed-form d loss / d logp of policy_loss_reference, in float64 (no autograd).

    The op's reference backend uses it (an op implementation runs below autograd); the tests check it
    against autograd through policy_loss_reference. The formulas are those of the kernels.
    """
    o = dict(
        old_logp=None,
        ref_logp=None,
        beta=0.0,
        kl="k3",
        clip_low=0.2,
        clip_high=None,
        dual_clip=None,
        ratio_cap=None,
        mode="clip",
        is_weights=None,
        offpolicy=None,
        offpolicy_gamma=0.1,
        token_advantages=None,
        agg="token-mean",
        max_len=None,
        num_tokens=None,
    )
    o.update(kw)
    clip_high = o["clip_low"] if o["clip_high"] is None else o["clip_high"]
    lp = logp.detach().to(F64)
    B, T = lp.shape
    m = mask.to(F64)
    A = advantages.to(F64)
    A = A[:, None].expand(B, T) if A.dim() == 1 else A
    if o["token_advantages"] is not None:
        A = A + o["token_advantages"].to(F64)
    raw = lp - o["old_logp"].to(F64) if o["old_logp"] is not None else torch.zeros_like(lp)
    inside = raw.abs() <= LOG_RATIO_MAX
    d = raw.clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)
    mode = o["mode"]
    lo, hi = 1.0 - o["clip_low"], 1.0 + clip_high
    if mode in ("clip", "gspo"):
        if mode == "gspo":
            n = m.sum(dim=1, keepdim=True)
            mean_d = (d * m).sum(dim=1, keepdim=True) / n.clamp(min=1)
            rho = torch.exp(mean_d.clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)).expand(B, T)
            d_rho = rho
        else:
            rho = torch.exp(d)
            d_rho = torch.where(inside, rho, torch.zeros_like(rho))
        cap = o["ratio_cap"]
        rho1 = rho if cap is None else rho.clamp(max=cap)
        d_rho1 = d_rho if cap is None else torch.where(rho <= cap, d_rho, torch.zeros_like(d_rho))
        l1, l2 = -A * rho1, -A * rho.clamp(lo, hi)
        clipped = l2 > l1
        g = torch.where(clipped, torch.where((rho >= lo) & (rho <= hi), -A * d_rho, torch.zeros_like(A)), -A * d_rho1)
        if o["dual_clip"] is not None:
            pg = torch.maximum(l1, l2)
            g = torch.where((A < 0) & (pg > -A * o["dual_clip"]), torch.zeros_like(g), g)
    elif mode == "cispo":
        g = -torch.exp(d).clamp(lo, hi) * A
    else:
        g = -A
    if o["offpolicy"] is not None:
        off = o["offpolicy"].to(torch.bool)[:, None].expand(B, T)
        p = torch.exp(lp)
        g = torch.where(off, -A * o["offpolicy_gamma"] * p / (p + o["offpolicy_gamma"]) ** 2, g)
    if o["is_weights"] is not None:
        w = o["is_weights"].to(F64)
        g = g * (w[:, None] if w.dim() == 1 else w)
    if o["ref_logp"] is not None and o["beta"] > 0:
        u = lp - o["ref_logp"].to(F64)
        if o["kl"] == "k1":
            gk = torch.ones_like(u)
        elif o["kl"] == "k2":
            gk = u
        else:
            gk = torch.where(
                u.abs() <= LOG_RATIO_MAX, 1.0 - torch.exp(-u.clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)), torch.zeros_like(u)
            )
        g = g + o["beta"] * gk
    return g * m * token_scale(m, o["agg"], o["max_len"], o["num_tokens"])


def token_scale(m: torch.Tensor, agg: str, max_len: int | None, num_tokens: float | None) -> torch.Tensor:
    """d loss / d (l_bt m_bt) of each aggregation: the per-token normaliser, [B, 1] or a 0-dim tensor."""
    n = m.sum(dim=1, keepdim=True)
    seqs = (n > 0).to(m.dtype).sum()

    def inv(x):
        return torch.where(x > 0, 1.0 / torch.where(x > 0, x, torch.ones_like(x)), torch.zeros_like(x))

    if agg == "token-mean":
        return inv(torch.as_tensor(num_tokens, dtype=m.dtype) if num_tokens is not None else m.sum())
    if agg == "seq-mean-token-mean":
        return inv(seqs * n)
    if agg == "seq-mean-token-sum":
        return inv(seqs)
    return torch.as_tensor(1.0 / (m.shape[0] * max_len), dtype=m.dtype)
