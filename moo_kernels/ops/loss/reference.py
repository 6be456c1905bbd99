"""Float64 reference of the token-level policy loss: the semantics, the oracle, the fallback.

Per token t of sequence b, with mask m_bt (a bool mask counts 0 / 1, any nonzero byte as 1; a float mask
acts as a weight). A token is active when m != 0. Masked tokens influence nothing, whatever their inputs hold
(NaN, inf): every input is replaced by 0 there before anything is computed (a select, never a product with
m = 0), so their loss, metrics and gradient are exactly 0.

- advantage   A_bt = advantages[b] (or advantages[b, t]) + token_advantages[b, t]
- log-ratio   d_bt = clamp(logp - old_logp, -LOG_RATIO_MAX, LOG_RATIO_MAX); rho = exp(d). old_logp None
              means on-policy: d = 0 exactly and rho = 1 with d rho / d logp = 1 (the token form
              exp(logp - sg(logp))), whatever logp holds (-inf included)
- mode "clip"      L = max(-A min(rho, ratio_cap), -A clamp(rho, 1 - clip_low, 1 + clip_high)),
                   then for A < 0 with dual_clip c: L = min(L, -c A)
- mode "gspo"      as "clip", with rho replaced by the sequence ratio
                   s_b = exp(clamp(sum_t d m / sum_t m, -LOG_RATIO_MAX, LOG_RATIO_MAX)) in the GSPO token form
                   sg(s_b) exp(logp - sg(logp)): value s_b, d rho / d logp_bt = s_b
- mode "cispo"     L = -sg(clamp(rho, 1 - clip_low, 1 + clip_high)) A logp
- mode "reinforce" L = -A logp
- mode "sapo"      L = -A sigmoid(tau (rho - 1)) 4 / tau, tau = sapo_tau_pos where A > 0, else sapo_tau_neg
                   (d L / d logp = -A 4 s (1 - s) d rho / d logp, s the sigmoid); no clip
- mode "gmpo"      (verl's geo_mean) per sequence, with the sign-clipped log-ratio d'_t = d_t except where
                   A_t > 0 and d_t > clip_high (d' = clip_high) or A_t < 0 and d_t < -clip_low (d' = -clip_low),
                   d' = 0 where A_t = 0: R_b = exp(clamp(sum_t d' m / n_b, +-LOG_RATIO_MAX)), the mean
                   advantage Abar_b = sum_t A m / n_b and, with is_weights, their geometric mean
                   G_b = exp(sum_t log(w_t + 1e-10) m / n_b) (else 1); every active token's L = -Abar_b R_b G_b
                   (is_weights enter G alone). d L / d logp_t = -Abar R G where d' = d (the clip did not cut;
                   0 where A_t = 0 or the log-ratio clamps): the exact gradient of the sequence's loss once
                   aggregated (every aggregation weighs a row's tokens alike). verl's loss is the mean over
                   the B sequences: agg "seq-mean-token-mean" with num_sequences = B.
- mode "vespo"     (TRL's vespo) L = -sg(phi) A logp, with the sequence weight w_b = exp(log w_b),
                   log w_b = clamp(sum_t d m + log W_b, log 1e-8, LOG_RATIO_MAX) over active tokens, with the
                   importance weights entering w alone: log W_b = sum_t clamp(log is_weights_bt, log 1e-8,
                   LOG_RATIO_MAX) over the active tokens of a [B, T] is_weights, clamp(log is_weights_b, ...)
                   once for a [B] one (a sequence's weight, TRL's sequence-level vLLM ratio);
                   log phi = lambda + k log w - lambda w with (k, lambda) = (vespo_k_pos,
                   max(vespo_lambda_pos, 1e-4)) where A >= 0, else the _neg pair, computed in float64;
                   phi = exp(log phi) where log phi <= 88 (float32's range), else 0 (TRL: its nan_to_num)
- offpolicy[b]     L = -A f(p), p = exp(logp), f(p) = p / (p + offpolicy_gamma): no ratio, no clip;
                   computed as f = 1 / (1 + gamma exp(-logp)), df / dlogp = f (1 - f) (finite for any logp)
- is_weights       L <- is_weights * L (behaviour-policy correction, not differentiated; not for "gmpo" and
                   "vespo", whose sequence weights hold them)
- offpolicy_mask_threshold: L <- 0 (and its gradient) where A < 0 and the sequence's mean of sampling_logp -
                   logp over active tokens (NaN as 0, weighted by m, over max(sum m, 1); sampling_logp defaults to
                   old_logp, on-policy 0) exceeds the threshold
- policy_mask      L <- 0 (and its gradient) where policy_mask is False
- KL (beta > 0)    l = L + beta k, with u = logp - ref_logp:
                   k1 = u, k2 = u^2 / 2, k3 = exp(-u') + u' - 1 with u' = clamp(u, -LOG_RATIO_MAX, LOG_RATIO_MAX)
                   (no gradient where the clamp is active), abs = |u| (gradient sign(u), 0 at 0), low_var_kl =
                   min(k3, 10) (no gradient where k3 > 10); "k1+", "k3+", "low_var_kl+", "abs+": the value of the
                   named estimator, the gradient of k2 (u). kl_bias_correction: k <- rho k with the token ratio
                   rho = exp(d) (d rho / d logp = rho, 1 on-policy; 0 where the log-ratio clamps; not with gspo)

Aggregation of l over active tokens (S: the number of sequences with an active token, or num_sequences when
given, the count over the data-parallel ranks and micro-batches of the step):
- "token-mean":              sum(l m) / sum(m), or / num_tokens when given (data-parallel ranks and
                             gradient-accumulation micro-batches then agree); 0 unless sum(m) > 0
- "token-sum":               sum(l m)   (no normaliser)
- "seq-mean-token-mean":     sum over sequences with an active token of sum_t(l m) / sum_t(m), over S
- "seq-mean-token-sum":      sum over sequences with an active token of sum_t(l m), over S
- "seq-mean-token-sum-norm": sum(l m) / (B * max_len)   (Dr. GRPO: a constant normaliser; num_sequences replaces
                             B when given)

A sequence counts in the seq-mean aggregations when sum_t m > 0.

Metrics (0-dim tensors, over active tokens, weighted by m; a mean divides by sum(m) when it is > 0, else it
is 0): pg_loss (the aggregated policy term),
kl_mean, clip_frac (the clipped term is strictly the larger loss: its gradient is cut),
clip_frac_low (rho < 1 - clip_low and A < 0), clip_frac_high (rho > 1 + clip_high and A > 0),
dual_clip_frac (A < 0 and the dual-clip bound is taken), ratio_mean, ratio_min, ratio_max (min / max over
the active tokens, 0 when there is none; "gspo" and "gmpo" report the sequence ratio, "vespo" its w),
ppo_kl (mean of old_logp - logp), active_tokens (sum of m), masked_frac (tokens whose policy term
offpolicy_mask_threshold or policy_mask dropped). For "gmpo" clip_frac counts the tokens whose log-ratio the
sign-clip cut, clip_frac_low / clip_frac_high those with d outside [-clip_low, clip_high] and A < 0 / A > 0
(verl's pg_clipfrac_lower / pg_clipfrac). Off-policy tokens count as unclipped.

An infinite log-prob at an active token gives whatever the formulas give in the limit: on-policy the ratio
is 1 (gradient 1), the log-ratio clamps at +-LOG_RATIO_MAX (zero gradient beyond the clamp), f(p) is 0 or 1
(zero gradient); the loss itself is infinite where the formula is (REINFORCE / CISPO -A logp, k1, k2).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from moo_kernels._codes import LOG_RATIO_MAX
from moo_kernels.ops.loss.spec import LossSpec, loss_spec

F64 = torch.float64


class _WithSlope(torch.autograd.Function):
    """value, with d value / d x = slope (both given, x's shape): the on-policy ratio (1, slope 1) and the
    off-policy shaping (f, slope f (1 - f)) keep a finite gradient for any log-prob, infinite ones included."""

    @staticmethod
    def forward(x, value, slope):
        return value.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[2])

    @staticmethod
    def backward(ctx, g):
        (slope,) = ctx.saved_tensors
        return g * slope, None, None


class Inputs(NamedTuple):
    """The inputs in float64 with every masked position replaced by 0 (what the formulas see)."""

    lp: torch.Tensor  # logp, differentiable when logp is
    m: torch.Tensor  # mask weight (bool: 0 / 1)
    active: torch.Tensor  # m != 0
    A: torch.Tensor  # advantages [B, T] (+ token_advantages)
    old: torch.Tensor | None
    ref: torch.Tensor | None
    isw: torch.Tensor | None  # [B, T]
    off: torch.Tensor | None  # [B, T] bool


def safe_inputs(logp: torch.Tensor, o: LossSpec) -> Inputs:
    """The inputs in float64, each selected to 0 at masked tokens."""
    B, T = logp.shape
    m = o.mask.to(F64)  # a bool byte other than 0 / 1 converts to 1
    active = m != 0
    zero = torch.zeros((B, T), dtype=F64, device=logp.device)

    def safe(x):
        if x is None:
            return None
        x = x.to(F64)
        return torch.where(active, x[:, None].expand(B, T) if x.dim() == 1 else x, zero)

    A = safe(o.advantages)
    if o.token_advantages is not None:
        A = A + safe(o.token_advantages)
    off = o.offpolicy.to(torch.bool)[:, None].expand(B, T) if o.offpolicy is not None else None
    return Inputs(safe(logp), m, active, A, safe(o.old_logp), safe(o.ref_logp), safe(o.is_weights), off)


def _spec(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, options: dict) -> LossSpec:
    """The loss arguments, validated and completed with their defaults (clip_high from clip_low, ...)."""
    return loss_spec(tuple(logp.shape), logp.device, "logp", advantages=advantages, mask=mask, **options)


def offpolicy_shape(lp: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, df / dlogp) of f(p) = p / (p + gamma), p = exp(logp), as 1 / (1 + gamma exp(-logp)) and f (1 - f)."""
    f = 1.0 / (1.0 + gamma * torch.exp(-lp.detach()))
    return f, f * (1.0 - f)


LOW_VAR_KL_MAX = 10.0  # verl clamps low_var_kl (its k3) to [-10, 10]; k3 >= 0


VESPO_LOG_W_MIN = math.log(1e-8)  # TRL's lower clamp of the sequence log-weight
VESPO_LOG_PHI_MAX = 88.0  # exp beyond it leaves float32's range: phi is 0 there
GMPO_IS_EPS = 1e-10  # verl's geometric mean of the importance weights takes log(w + 1e-10)


def gmpo_terms(x: Inputs, d: torch.Tensor, raw: torch.Tensor, o: LossSpec):
    """(R, Abar, G, cut-free) of mode "gmpo" (module docstring): [B, 1] sequence values, and where each token's
    log-ratio kept its gradient through the sign-clip ([B, T] bool)."""
    m, A = x.m, x.A
    n = m.sum(dim=1, keepdim=True).clamp(min=1.0)
    hi, lo = o.clip_high, -o.clip_low
    cut_hi = (A > 0) & (d > hi)
    cut_lo = (A < 0) & (d < lo)
    dprime = torch.where(cut_hi, torch.full_like(d, hi), torch.where(cut_lo, torch.full_like(d, lo), d))
    dprime = torch.where((A == 0) | ~x.active, torch.zeros_like(d), dprime)
    R = torch.exp(((dprime * m).sum(dim=1, keepdim=True) / n).clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX))
    Abar = (A * m).sum(dim=1, keepdim=True) / n
    G = torch.ones_like(R)
    if x.isw is not None:
        logw = torch.where(x.active, torch.log(x.isw + GMPO_IS_EPS), torch.zeros_like(d))
        G = torch.exp((logw * m).sum(dim=1, keepdim=True) / n)
    free = ~cut_hi & ~cut_lo & (A != 0) & (raw.abs() <= LOG_RATIO_MAX)
    return R, Abar, G, free


def vespo_terms(x: Inputs, d: torch.Tensor, o: LossSpec):
    """(phi [B, T], w [B, 1]) of mode "vespo" (module docstring), no gradient."""
    zero = torch.zeros_like(d)
    logw = (torch.where(x.active, d, zero) * x.m).sum(dim=1, keepdim=True)
    if o.is_weights is not None and o.is_weights.dim() == 1:  # a sequence's weight: once
        li = torch.log(o.is_weights.to(F64)).clamp(VESPO_LOG_W_MIN, LOG_RATIO_MAX)
        logw = logw + torch.where(x.active.any(dim=1), li, torch.zeros_like(li))[:, None]
    elif x.isw is not None:
        li = torch.log(x.isw).clamp(VESPO_LOG_W_MIN, LOG_RATIO_MAX)
        logw = logw + torch.where(x.active, li, zero).sum(dim=1, keepdim=True)
    logw = logw.clamp(VESPO_LOG_W_MIN, LOG_RATIO_MAX)
    w = torch.exp(logw)
    pos = x.A >= 0
    k = torch.where(pos, torch.full_like(d, o.vespo_k_pos), torch.full_like(d, o.vespo_k_neg))
    lam_pos, lam_neg = max(o.vespo_lambda_pos, 1e-4), max(o.vespo_lambda_neg, 1e-4)
    lam = torch.where(pos, torch.full_like(d, lam_pos), torch.full_like(d, lam_neg))
    log_phi = lam + k * logw - lam * w
    phi = torch.where(log_phi <= VESPO_LOG_PHI_MAX, torch.exp(log_phi.clamp(max=VESPO_LOG_PHI_MAX)), zero)
    return phi, w


def policy_keep(lp, o: LossSpec, m, active, A) -> torch.Tensor | None:
    """Where the policy term stays ([B, T] bool): offpolicy_mask_threshold and policy_mask; None without
    either."""
    keep = offpolicy_keep(lp, o, m, active, A)
    if o.policy_mask is not None:
        pm = o.policy_mask.to(torch.bool)
        keep = pm if keep is None else keep & pm
    return keep


def offpolicy_keep(lp, o: LossSpec, m, active, A) -> torch.Tensor | None:
    """Where the policy term stays under offpolicy_mask_threshold ([B, T] bool), None without the threshold."""
    if o.offpolicy_mask_threshold is None:
        return None
    src = o.sampling_logp if o.sampling_logp is not None else o.old_logp
    zero = torch.zeros_like(lp)
    if src is None:
        mean = zero.sum(dim=1)
    else:
        diff = src.to(F64) - lp
        diff = torch.where(active & ~torch.isnan(diff), diff, zero)
        mean = (diff * torch.where(active, m, zero)).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
    return (A >= 0) | (mean[:, None] <= o.offpolicy_mask_threshold)


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kl: str) -> torch.Tensor:
    """The KL estimate of each token (differentiable by autograd with the gradients of the module docstring)."""
    u = logp - ref_logp
    base = kl.rstrip("+")
    if base == "k1":
        k = u
    elif base == "k2":
        k = 0.5 * u * u
    elif base == "abs":
        k = u.abs()
    else:
        uc = u.clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)
        k = torch.exp(-uc) + uc - 1.0
        if base == "low_var_kl":
            k = torch.where(k <= LOW_VAR_KL_MAX, k, torch.full_like(k, LOW_VAR_KL_MAX))
    if kl.endswith("+"):  # straight-through: this value, the gradient of k2
        k2 = 0.5 * u * u
        k = k.detach() + (k2 - k2.detach())
    return k


def kl_gradient(u: torch.Tensor, kl: str) -> torch.Tensor:
    """d k / d logp of kl_estimate, in closed form."""
    if kl.endswith("+") or kl == "k2":
        return u
    if kl == "k1":
        return torch.ones_like(u)
    if kl == "abs":
        return torch.sign(u)
    e = torch.exp(-u.clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX))
    g = torch.where(u.abs() <= LOG_RATIO_MAX, 1.0 - e, torch.zeros_like(u))
    if kl == "low_var_kl":
        uc = u.clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)
        g = torch.where(e + uc - 1.0 <= LOW_VAR_KL_MAX, g, torch.zeros_like(u))
    return g


def aggregate(l: torch.Tensor, m: torch.Tensor, o: LossSpec) -> torch.Tensor:
    """The loss from per-token values l (0 at masked tokens) and mask weights m, by o.agg."""
    agg = o.agg
    total = (l * m).sum()
    if agg == "token-sum":
        return total
    if agg == "token-mean":
        den = torch.as_tensor(o.num_tokens, dtype=l.dtype) if o.num_tokens is not None else m.sum()
        return torch.where(den > 0, total / torch.where(den > 0, den, 1.0), torch.zeros_like(total))
    if agg == "seq-mean-token-sum-norm":
        return total / (_sequences(m, o, active=False) * o.max_len)
    per_seq = (l * m).sum(dim=1)
    n = m.sum(dim=1)
    has = n > 0
    if agg == "seq-mean-token-mean":
        per_seq = torch.where(has, per_seq / torch.where(has, n, torch.ones_like(n)), torch.zeros_like(n))
    seqs = torch.as_tensor(_sequences(m, o, active=True), dtype=l.dtype)
    return torch.where(seqs > 0, per_seq.sum() / seqs.clamp(min=1), torch.zeros_like(total))


def _sequences(m: torch.Tensor, o: LossSpec, active: bool) -> float | torch.Tensor:
    """S of the seq-mean aggregations: num_sequences when given, else the sequences with an active token (active)
    or all B of them (seq-mean-token-sum-norm)."""
    if o.num_sequences is not None:
        return o.num_sequences
    return (m.sum(dim=1) > 0).to(m.dtype).sum() if active else m.shape[0]


def policy_loss_reference(
    logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, **options
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Returns (loss, metrics) in float64; differentiable w.r.t. logp by autograd (0 at masked tokens). options:
    the loss's arguments (moo_kernels.ops.loss.spec.LossSpec), by name."""
    return loss_reference(logp, _spec(logp, advantages, mask, options))


def loss_reference(logp: torch.Tensor, o: LossSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """policy_loss_reference of validated arguments."""
    x = safe_inputs(logp, o)
    lp, m, active, A = x.lp, x.m, x.active, x.A
    zero = torch.zeros_like(m)
    ones = torch.ones_like(m)
    d = (lp - x.old).clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX) if x.old is not None else zero

    if o.mode == "gspo":
        n = m.sum(dim=1, keepdim=True)
        dseq = (d * m).sum(dim=1, keepdim=True) / n.clamp(min=1)
        seq = torch.exp(dseq.clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)).detach().expand_as(lp)
        rho = _WithSlope.apply(lp, seq, seq)  # sg(s) exp(logp - sg(logp)): value s, d rho / d logp = s
    elif x.old is None:
        rho = _WithSlope.apply(lp, ones, ones)  # exp(logp - sg(logp)): value 1, d rho / d logp = 1
    else:
        rho = torch.exp(d)
    tok_rho = rho  # the token ratio (kl_bias_correction; "gmpo" and "vespo" report a sequence ratio as rho)

    clipped = low = high = dual = torch.zeros_like(active)
    if o.mode in ("clip", "gspo"):
        lo, hi = 1.0 - o.clip_low, 1.0 + o.clip_high
        rho1 = rho if o.ratio_cap is None else torch.clamp(rho, max=o.ratio_cap)
        l1 = -A * rho1
        l2 = -A * rho.clamp(lo, hi)
        pg = torch.maximum(l1, l2)
        clipped = l2 > l1
        if o.dual_clip is not None:
            l3 = -A * o.dual_clip
            dual = (A < 0) & (pg > l3)
            pg = torch.where(A < 0, torch.minimum(pg, l3), pg)
        low = (rho.detach() < lo) & (A < 0)
        high = (rho.detach() > hi) & (A > 0)
    elif o.mode == "cispo":
        lo, hi = 1.0 - o.clip_low, 1.0 + o.clip_high
        w = rho.detach().clamp(lo, hi)
        pg = -w * A * lp
        clipped = w != rho.detach()
        low = (rho.detach() < lo) & (A < 0)
        high = (rho.detach() > hi) & (A > 0)
    elif o.mode == "reinforce":
        pg = -A * lp
    elif o.mode == "gmpo":
        raw = lp.detach() - x.old if x.old is not None else zero
        R, Abar, G, free = gmpo_terms(x, d.detach(), raw, o)
        # the token form: value -Abar R G, d / d logp = -Abar R G where the log-ratio kept its gradient
        unit = _WithSlope.apply(lp, ones, free.to(F64))
        pg = -(Abar * R * G).expand_as(lp) * unit
        r = R.expand_as(lp)
        rho = _WithSlope.apply(lp, r, r)  # reported only
        outside = (d.detach() < -o.clip_low) | (d.detach() > o.clip_high)  # verl's clip flags
        low, high = outside & (A < 0), outside & (A > 0)
        clipped = ((A > 0) & (d.detach() > o.clip_high)) | ((A < 0) & (d.detach() < -o.clip_low))
    elif o.mode == "vespo":
        phi, w = vespo_terms(x, d.detach(), o)
        pg = -phi * A * lp
        rho = w.expand_as(lp)
    elif o.mode == "sapo":
        tau = torch.where(A > 0, torch.full_like(A, o.sapo_tau_pos), torch.full_like(A, o.sapo_tau_neg))
        pg = -A * torch.sigmoid(tau * (rho - 1.0)) * (4.0 / tau)
    else:
        raise ValueError(f"unknown mode {o.mode!r}")

    if x.off is not None:
        f, df = offpolicy_shape(lp, o.offpolicy_gamma)
        pg = torch.where(x.off, -A * _WithSlope.apply(lp, f, df), pg)
        clipped, low, high, dual = (y & ~x.off for y in (clipped, low, high, dual))
    if x.isw is not None and o.mode not in ("gmpo", "vespo"):
        pg = pg * x.isw
    keep = policy_keep(lp.detach(), o, m, active, A)
    if keep is not None:
        pg = torch.where(keep, pg, zero)
    pg = torch.where(active, pg, zero)

    k = kl_estimate(lp, x.ref, o.kl) if x.ref is not None else zero
    if x.ref is not None and o.kl_bias_correction:
        k = k * tok_rho
    k = torch.where(active, k, zero)
    loss_tok = pg + o.beta * k if o.beta > 0 else pg
    loss = aggregate(loss_tok, m, o)

    den = m.sum()

    def mean(y):
        s = torch.where(active, y.to(F64), zero) * m
        return torch.where(den > 0, s.sum() / torch.where(den > 0, den, 1.0), torch.zeros((), dtype=F64))

    r = rho.detach()
    big = torch.full_like(r, float("inf"))
    any_active = bool(active.any())
    metrics = {
        "pg_loss": aggregate(pg, m, o).detach(),
        "kl_mean": mean(k.detach()),
        "clip_frac": mean(clipped),
        "clip_frac_low": mean(low),
        "clip_frac_high": mean(high),
        "dual_clip_frac": mean(dual),
        "ratio_mean": mean(r),
        "ratio_min": torch.where(active, r, big).min() if any_active else torch.zeros((), dtype=F64),
        "ratio_max": torch.where(active, r, -big).max() if any_active else torch.zeros((), dtype=F64),
        "ppo_kl": mean(-(d.detach())),
        "active_tokens": den,
        "masked_frac": mean(~keep) if keep is not None else torch.zeros((), dtype=F64),
    }
    return loss, metrics


def policy_loss_grad_reference(
    logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, **options
) -> torch.Tensor:
    """Closed-form d loss / d logp of policy_loss_reference, in float64 (no autograd).

    The op's reference backend uses it (an op implementation runs below autograd); the tests check it
    against autograd through policy_loss_reference. The formulas are those of the kernels. Exactly 0 at
    masked tokens (a select).
    """
    return loss_grad_reference(logp, _spec(logp, advantages, mask, options))


def loss_grad_reference(logp: torch.Tensor, o: LossSpec) -> torch.Tensor:
    """policy_loss_grad_reference of validated arguments."""
    x = safe_inputs(logp.detach(), o)
    lp, m, active, A = x.lp, x.m, x.active, x.A
    B, T = lp.shape
    zero = torch.zeros_like(lp)
    raw = lp - x.old if x.old is not None else zero
    inside = raw.abs() <= LOG_RATIO_MAX
    d = raw.clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)
    mode = o.mode
    lo, hi = 1.0 - o.clip_low, 1.0 + o.clip_high
    if mode in ("clip", "gspo"):
        if mode == "gspo":
            n = m.sum(dim=1, keepdim=True)
            mean_d = (d * m).sum(dim=1, keepdim=True) / n.clamp(min=1)
            rho = torch.exp(mean_d.clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)).expand(B, T)
            d_rho = rho
        else:
            rho = torch.exp(d)
            d_rho = torch.where(inside, rho, zero)
        cap = o.ratio_cap
        rho1 = rho if cap is None else rho.clamp(max=cap)
        d_rho1 = d_rho if cap is None else torch.where(rho <= cap, d_rho, zero)
        l1, l2 = -A * rho1, -A * rho.clamp(lo, hi)
        clipped = l2 > l1
        g = torch.where(clipped, torch.where((rho >= lo) & (rho <= hi), -A * d_rho, zero), -A * d_rho1)
        if o.dual_clip is not None:
            pg = torch.maximum(l1, l2)
            g = torch.where((A < 0) & (pg > -A * o.dual_clip), zero, g)
    elif mode == "cispo":
        g = -torch.exp(d).clamp(lo, hi) * A
    elif mode == "gmpo":
        R, Abar, G, free = gmpo_terms(x, d, raw, o)
        g = torch.where(free, (-Abar * R * G).expand(B, T), zero)
    elif mode == "vespo":
        phi, _ = vespo_terms(x, d, o)
        g = -phi * A
    elif mode == "sapo":
        rho = torch.exp(d)
        d_rho = torch.where(inside, rho, zero) if x.old is not None else torch.ones_like(rho)
        tau = torch.where(A > 0, torch.full_like(A, o.sapo_tau_pos), torch.full_like(A, o.sapo_tau_neg))
        s = torch.sigmoid(tau * (rho - 1.0))
        g = -A * 4.0 * s * (1.0 - s) * d_rho
    else:
        g = -A
    if x.off is not None:
        _, df = offpolicy_shape(lp, o.offpolicy_gamma)
        g = torch.where(x.off, -A * df, g)
    if x.isw is not None and mode not in ("gmpo", "vespo"):
        g = g * x.isw
    keep = policy_keep(lp, o, m, active, A)
    if keep is not None:
        g = torch.where(keep, g, zero)
    if x.ref is not None and o.beta > 0:
        u = lp - x.ref
        gk = kl_gradient(u, o.kl)
        if o.kl_bias_correction:  # d (rho k) = rho dk + k d rho, the token ratio (the spec refuses gspo)
            if x.old is None:
                rho_k = d_rho_k = torch.ones_like(u)
            else:
                rho_k = torch.exp(d)
                d_rho_k = torch.where(inside, rho_k, zero)
            gk = gk * rho_k + kl_estimate(lp, x.ref, o.kl).detach() * d_rho_k
        g = g + o.beta * gk
    wm = m * token_scale(m, o)
    return torch.where(active, g * wm, zero)


def token_scale(m: torch.Tensor, o: LossSpec) -> torch.Tensor:
    """d loss / d (l_bt m_bt) of each aggregation: the per-token normaliser, [B, 1] or a 0-dim tensor."""
    agg, max_len, num_tokens = o.agg, o.max_len, o.num_tokens
    n = m.sum(dim=1, keepdim=True)

    def inv(x):
        x = torch.as_tensor(x, dtype=m.dtype)
        return torch.where(x > 0, 1.0 / torch.where(x > 0, x, torch.ones_like(x)), torch.zeros_like(x))

    if agg == "token-sum":
        return torch.ones((), dtype=m.dtype)
    if agg == "token-mean":
        return inv(torch.as_tensor(num_tokens, dtype=m.dtype) if num_tokens is not None else m.sum())
    if agg == "seq-mean-token-mean":
        return inv(_sequences(m, o, active=True) * n)
    if agg == "seq-mean-token-sum":
        return inv(_sequences(m, o, active=True))
    return inv(_sequences(m, o, active=False) * max_len)
