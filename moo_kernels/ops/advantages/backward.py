"""Analytic backward of the advantage step, in float64 PyTorch segment reductions.

Recomputes the forward intermediates with the reference's helpers and applies the chain rule step
by step in reverse order (clip, sign, batch whitening, combination, per-group normalisation). It
is plain tensor code, so it runs on any device and traces under torch.compile. The tests check it
against autograd through the reference and with gradcheck.

The one identity used throughout: for a group statistic over the entries that take part,
d mu / d x_i = 1 / n and d sigma / d x_i = (x_i - mu) / (d * sigma), d = n - 1 or n.
"""

from __future__ import annotations

import torch

from moo_kernels.ops.advantages.reference import (
    F64,
    Stats,
    _segment_sum,
    batch_scale_stats,
    batch_step,
    batch_whiten,
    forward_state,
    gpg_factor,
    loo_parts,
    objective_eps,
    passk_parts,
)
from moo_kernels.ops.advantages.spec import AdvantageSpec, Derived


def _plain(st: Stats) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, std, varies) of scaled statistics, in the column's own units."""
    return st.count, st.mean, st.std, st.varies


def _recip(x: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    return torch.where(ok, 1.0 / torch.where(ok, x, torch.ones_like(x)), torch.zeros_like(x))


def normalize_backward(x, take, gi, num_groups, stats, normalize, eps, unbiased, g_a, g_mu, g_sd, weight=None):
    """Gradient w.r.t. x of sum(g_a * A) + sum(g_mu * mu) + sum(g_sd * sigma), A = normalize(x); weight: the
    statistics' weights of the entries ([N], the batch whitening with lengths)."""
    count, mu, sd, varies = stats
    dev = torch.where(take, x - mu[gi], torch.zeros_like(x))
    g_a = torch.where(take, g_a, torch.zeros_like(g_a))
    s1 = _segment_sum(g_a, gi, num_groups)
    if normalize == "zscore":
        c = _recip(sd + eps, varies & (sd + eps > 0))
        g_mu = g_mu - c * s1
        g_sd = g_sd - c * c * _segment_sum(g_a * dev, gi, num_groups)
    elif normalize == "center":
        c = torch.ones_like(sd)
        g_mu = g_mu - s1
    elif normalize == "rloo":
        c = torch.where(count > 1, count * _recip(count - 1, count > 1), torch.zeros_like(count))
        g_mu = g_mu - c * s1
    else:  # "none": A = x, no statistic involved
        c = torch.ones_like(sd)
    denom = count - 1 if unbiased else count
    has_sd = varies & (denom > 0) & (sd > 0)
    coef_sd = g_sd * _recip(denom * sd, has_sd)
    mu_term = (g_mu / torch.where(count > 0, count, torch.ones_like(count)))[gi]
    if weight is None:
        g_x = c[gi] * g_a + mu_term + coef_sd[gi] * dev
    else:  # the statistics' part in proportion to each entry's weight
        g_x = c[gi] * g_a + (mu_term + coef_sd[gi] * dev) * weight.to(F64)
    return torch.where(take, g_x, torch.zeros_like(g_x))


def column_backward(column, x, take, gi, num_groups, st, plain, unit, eps, unbiased, g_a, g_mu, g_sd, lengths):
    """normalize_backward for every column code (reference.column_scaled). x: the column's values as the parts
    read them (r0, or d under scalarize) with st their scaled statistics; plain: (values in the column's own
    units, their (count, mean, std, varies)) and unit the scale per group between the two; eps in plain units."""
    xp, pst = plain
    if column in ("zscore", "center", "rloo", "none"):
        return normalize_backward(xp, take, gi, num_groups, pst, column, eps, unbiased, g_a, g_mu, g_sd)
    count, mu, sd, _ = pst
    zero = torch.zeros_like(xp)
    u = torch.where(take, x / st.scale[gi], zero)
    g_a = torch.where(take, g_a, zero)
    if column in ("passk", "passk_unscaled"):
        winner, at_second, n_second, margin_u = passk_parts(x, u, take, gi, num_groups, st)
        den = (sd + eps) if column == "passk" else torch.ones_like(sd)
        coef = torch.where(winner, g_a * _recip(den, den > 0)[gi], zero)
        g_x = coef - torch.where(at_second, (_segment_sum(coef, gi, num_groups) * _recip(n_second, n_second > 0))[gi],
                                 zero)  # fmt: skip
        if column == "passk":
            margin = margin_u * unit[gi]
            g_sd = g_sd - _segment_sum(coef * margin, gi, num_groups) * _recip(den, den > 0)
    elif column == "opo":
        length = lengths.to(F64).view((-1,) + (1,) * (xp.dim() - 1))
        lw = torch.where(take, length, zero)
        total = _segment_sum(lw, gi, num_groups)
        share = torch.where((total > 0)[gi], lw * _recip(total, total > 0)[gi], take * _recip(count, count > 0)[gi])
        g_x = g_a - share * _segment_sum(g_a, gi, num_groups)[gi]
    elif column == "loo_std":
        diff_u, sd_u, live = loo_parts(x, u, take, gi, num_groups, st, unbiased)
        n = count[gi]
        s_j = sd_u * unit[gi]
        diff = diff_u * unit[gi]
        norm = live & (sd_u > 0)
        q = torch.where(norm, g_a * _recip(s_j + eps, norm), torch.where(live, g_a, zero))
        many = n >= 2
        g_x = torch.where(many, (n * q - _segment_sum(q, gi, num_groups)[gi]) * _recip(n - 1, many), zero)
        d_prime = n - 2 if unbiased else n - 1
        h = torch.where(norm, -q * diff * _recip((s_j + eps) * d_prime * s_j, norm), zero)
        mu_loo = (n * mu[gi] - xp) * _recip(n - 1, many)
        hh = _segment_sum(h, gi, num_groups)[gi]
        pp = _segment_sum(h * mu_loo, gi, num_groups)[gi]
        g_x = g_x + torch.where(take, xp * (hh - h) - (pp - h * mu_loo), zero)
    else:
        raise ValueError(f"unknown column {column!r}")
    g_x = g_x + normalize_backward(xp, take, gi, num_groups, pst, "none", eps, unbiased, zero, g_mu, g_sd)
    return torch.where(take, g_x, zero)


def advantages_backward(
    rewards: torch.Tensor,
    o: AdvantageSpec,
    derived: Derived,
    gmask,
    mean,
    std,
    weff,
    g_adv,
    g_weff,
    g_mean,
    g_std,
    needs_rewards: bool,
    needs_weights: bool,
):
    """Gradients of the outputs (advantages, weights, mean, std): (grad of rewards, grad of o.weights), each None
    when not needed."""
    r = rewards.to(F64)
    w = o.weights.to(F64)
    n_samples, k = r.shape
    G = derived.num_groups
    gi = derived.sample_groups(o, rewards)
    unbiased = o.std == "unbiased"
    zeros_n = torch.zeros(n_samples, dtype=F64, device=r.device)
    zeros_gk = torch.zeros(G, k, dtype=F64, device=r.device)

    def grad_or_zero(g, like):
        return like if g is None else g.to(F64)

    g_adv = grad_or_zero(g_adv, zeros_n)
    g_weff = grad_or_zero(g_weff, zeros_gk)
    g_mean = grad_or_zero(g_mean, zeros_gk)
    g_std = grad_or_zero(g_std, zeros_gk)

    f = forward_state(rewards, gi, G, o, check_finite=False)
    finite, feasible, take, r0 = f.finite, f.feasible, f.take, f.r0
    is_open = torch.ones_like(r, dtype=torch.bool) if o.reward_gates is None else o.reward_gates != 0
    stats = _plain(f.stats)
    count, mu, sd, varies = stats
    s = f.s
    s_stats = _plain(f.s_stats) if f.s_stats is not None else None
    contrib = feasible & gmask[gi]

    # forward recompute of the combined advantage
    column, batch = derived.column, derived.batch
    adv = f.adv
    a_k = f.a
    weights_eff = f.weights
    adv_bn = batch_step(adv, f, contrib, o)
    z = torch.zeros(n_samples, dtype=torch.long, device=r.device)
    scale = torch.where(
        adv_bn > 0, torch.full_like(adv_bn, o.positive_scale), torch.full_like(adv_bn, o.negative_scale)
    )

    # backward: masks, clip, sign
    g = torch.where(contrib, g_adv, torch.zeros_like(g_adv))
    if o.clip is not None:
        signed = adv_bn * scale
        g = torch.where((signed >= -o.clip) & (signed <= o.clip), g, torch.zeros_like(g))
    g = g * scale
    zg = torch.zeros(1, dtype=F64, device=r.device)
    g_s_batch = None  # the gradient reaching the combined reward through the batch step
    if batch == "whiten":
        b_st = batch_whiten(adv, contrib, o.eps, unbiased, o.lengths)[1]
        g = normalize_backward(adv, contrib, z, 1, _plain(b_st), "zscore", o.eps, unbiased, g, zg, zg, o.lengths)
    elif batch == "scale":
        b_st = batch_scale_stats(f, contrib, o)
        den = b_st.std + o.eps
        ok = den > 0
        g_in = torch.where(contrib & ok, g, torch.zeros_like(g))
        g_den = -(g_in * adv).sum() * _recip(den * den, ok)
        g = torch.where(ok, g * _recip(den, ok), g)
        s_sat = f.s.clamp(-torch.finfo(F64).max, torch.finfo(F64).max)
        g_s_batch = normalize_backward(s_sat, contrib, z, 1, _plain(b_st), "none", o.eps, unbiased,
                                       torch.zeros_like(g), zg, g_den.reshape(1), o.lengths)  # fmt: skip
    elif batch == "gpg":
        g = g * gpg_factor(f, contrib)

    # combination
    g_w = g_weff.sum(dim=0) if o.weighting != "variance" else torch.zeros_like(w)
    g_sd_total = g_std
    if o.weighting == "scalarize":
        zG = torch.zeros(G, dtype=F64, device=r.device)
        g_s = column_backward(column, f.d, feasible, gi, G, f.s_stats, (s, s_stats), f.s_scale, o.eps, unbiased, g,
                              zG, zG, o.lengths)  # fmt: skip
        g_a_k = torch.zeros_like(r0)
    else:
        g_a_k = g[:, None] * weights_eff[gi]
        g_s = None
        if o.weighting == "fixed":
            g_w = g_w + (g[:, None] * a_k).sum(dim=0)
        else:
            g_wt = g_weff + _segment_sum(g[:, None] * a_k, gi, G)
            tot = (w * sd).sum(dim=1, keepdim=True)
            g_u = (g_wt - (g_wt * weights_eff).sum(dim=1, keepdim=True)) * _recip(tot, tot > 0)
            g_w = g_w + (g_u * sd).sum(dim=0)
            g_sd_total = g_sd_total + g_u * w
    if g_s_batch is not None:
        g_s = g_s_batch if g_s is None else g_s + g_s_batch

    grad_r = grad_w = None
    if needs_rewards:
        eps = objective_eps(o, r.device)  # eps + std_floor per objective (the floor is a constant)
        x = torch.where(take, r0, torch.zeros_like(r0))
        g_r = column_backward(column, x, take, gi, G, f.stats, (r0, stats), f.stats.scale, eps, unbiased, g_a_k,
                              g_mean, g_sd_total, o.lengths)  # fmt: skip
        if g_s is not None:
            g_r = g_r + torch.where(finite, g_s[:, None] * w, torch.zeros_like(r0))
        g_r = torch.where(is_open & finite, g_r, torch.zeros_like(g_r))
        grad_r = g_r.to(rewards.dtype)
    if needs_weights:
        if g_s is not None:
            g_w = g_w + (g_s[:, None] * r0).sum(dim=0)
        grad_w = g_w.to(o.weights.dtype)
    return grad_r, grad_w
