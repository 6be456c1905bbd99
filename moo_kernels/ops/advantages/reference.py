"""Float64 PyTorch reference of the multi-objective advantage step.

This file is the semantics: the Triton and C++ kernels run the same algorithm and must agree with it,
the tests use it as the oracle, and devices without a kernel run it. It is written for clarity
(segment reductions with index_add / scatter_reduce), is differentiable by autograd (the power-of-two
scales below are constants to it), and never produces NaN.

Notation: sample j, objective k, group g = group_index[j], weights w_k >= 0. Everything is computed in
float64: rewards of any dtype are converted exactly, weights are read as float64. Outputs are float32
(float64 for float64 rewards).

0. Bool inputs (valid, reward_gates, gates): any nonzero byte means True.
1. Gates and bad values. reward_gates[j, k] false replaces r_jk by gated_value. A sample is
   *feasible* when valid and every gate in gates[j, :] passes. An entry takes part in the
   statistics of objective k when its sample is feasible and r_jk is finite. A non-finite entry
   (read from a valid sample with an open reward gate) raises under nan_policy="raise"; under
   "ignore" it is left out of the statistics and counts as 0 (r0_jk = 0).
2. Scaled statistics of a column x (objective k, the combined reward d below, or the batch) in a group,
   over the entries that take part: count n, lo = min x, hi = max x (exact), and the power-of-two
   scale c = 2^floor(log2 max|x|) (c = 1 when there is no entry or every entry is 0). Dividing by c
   is exact (up to rounding of results below 2^-1022), so no square over- or underflows for any finite
   input: u = x / c, mean_u = sum(u) / n, M2_u = sum((u - mean_u)^2) (two passes), sd_u =
   sqrt(M2_u / D) with D = n - 1 (std="unbiased", needs n >= 2) or n. The column *varies* when lo < hi.
   A column that does not vary has mean_u = hi / c exactly and sd_u = 0, so its values sit exactly on
   the mean. Reported mean = clamp(c * mean_u, lo, hi) (0 without entries), std = c * sd_u (may
   overflow only where the true std does).
3. Per-column normalisation in scaled units, a_jk and its scale e_gk (the column's code, resolved from
   normalize / estimator / scale by spec.resolve):
   "zscore" a = (u - mean_u) / (sd_u + eps / c), e = 1, and a = 0 when the column does not vary or the
   denominator is 0; "center" a = u - mean_u, e = c; "rloo" a = (u - mean_u) * n / (n - 1) (0 when
   n < 2), e = c; "none" a = u, e = c.
   "passk" (grpo_passk): the one entry equal to the column's maximum hi, when exactly one entry is (and
   n >= 2), gets a = (hi / c - second / c) / (sd_u + eps / c), second the largest entry below hi; every
   other entry 0 (a tie at the top gives every entry 0: the margin is 0); e = 1. "passk_unscaled": the same
   margin without the denominator, e = c. The gradient of the second best goes in equal parts to the entries
   holding it.
   "opo": a = u - b, b = sum(L u) / sum(L) over the entries that take part (L: lengths; the plain mean when
   the lengths sum to 0), 0 when the column does not vary; e = c.
   "loo_std": with D_j = (u_j - mean_u) n / (n - 1) (u_j minus the mean of the others) and M2_j = M2 -
   (u_j - mean_u)^2 n / (n - 1) (the others' sum of squared deviations: 0 when the others are all equal,
   decided exactly from lo / hi and how many entries equal them, or when M2_j <= M2 * 2^-40; clamped to
   >= 0), sd_j = sqrt(M2_j / D') (D' = n - 2 unbiased, n - 1 population; 0 when D' <= 0): a = D_j / (sd_j
   + eps / c) where sd_j > 0, else D_j * c (NeMo-RL: the unnormalised difference, in reward units,
   saturated); 0 when n < 2 or the column does not vary; e = 1.
   The value is a * e; a = 0 where the entry does not take part.
4. SORTEDSUM_k(t_k): the K terms sorted ascending, then added one after another from +0.0, left to
   right (not a tree). Rows holding the same multiset of terms get bitwise the same sum (where equal
   terms or zeros of either sign end up does not matter, nor do extra zero terms), so permuting
   objectives changes no bit of any output.
5. Weights: cw = 2^floor(log2 max_k w_k) (1 when every weight is 0), w'_k = w_k / cw.
   The combined reward (scalarize, drop_zero_variance) of a sample:
       d_j = SORTEDSUM_k(w'_k * q_jk), q_jk = x_jk / C_g (0 where c_gk > C_g),
   x_jk = r0_jk where the entry takes part, else 0; C_g = max c_gk over the objectives with w'_k > 0
   and a nonzero entry in the group (1 if none). |d_j| < 4K. d is computed by the same IEEE float64
   operations in the same order on every backend, so it has the same bits everywhere; its statistics
   (2., over the feasible samples) give c_d, mean_u, sd_u, and s_j = d_j * C_g * cw is sum_k w_k r0_jk.
6. Normalise and combine (weighting):
   - "scalarize": P_g = (C_g * cw) * c_d; zscore a = (u_d - mean_u) / (sd_u + eps / P_g) (as 3.);
     center / rloo / none the scaled value of 3. on d, times P_g. The advantage is that value.
   - "fixed": W_gk = w'_k, F = cw. "variance": w~_gk = w_k sd_gk / sum_l w_l sd_gl computed without
     overflow as t_gk / SORTEDSUM_l t_gl, t_gk = (w'_k * sd_u_gk) * (c_gk / V_g) with V_g = max c_gk
     over the objectives with w'_k > 0 and sd_u_gk > 0 (t = 0 for the others, w~ = 0 when the sum is
     0); W = w~, F = 1. Then A_j = SORTEDSUM_k(a_jk * b_gk) * (E_g * F), b_gk = W_gk * (e_gk / E_g),
     E_g = max e_gk over the live objectives with W_gk > 0 (b = 0 for the others; live: the column
     varies, for "none" it has a nonzero entry). For zscore this is cw * SORTEDSUM_k(w'_k a_jk).
   eps / c and eps / P_g are correctly rounded divisions (0 when eps is 0). The products of scales
   (P_g, E_g * F) are float64 products in the order written; they leave its range only for weights and
   rewards that both span hundreds of orders of magnitude. A scaled value of 0 stays 0 whatever the
   scale, and the combined advantage saturates at the largest finite float64.
7. Groups: rejected when fewer than min_feasible samples are feasible, or (drop_zero_variance) when d
   does not vary over the feasible samples (lo == hi, exactly: fewer than two, or all equal). These
   exact comparisons of bitwise-identical values give identical decisions on every backend, invariant
   to permuting samples or objectives. A sample *contributes* when it is feasible and its group is
   accepted.
8. The batch step (spec.resolve), over the contributing samples as one group, weighted by lengths L when
   given (count = sum L, mean = sum L u / sum L, M2 = sum L (u - mean)^2, D = count - 1 or count: the
   statistics of the batch's tokens; samples with L = 0 are not part of the statistic):
   "whiten" (batch_normalize, reinforce_plus_plus_baseline): A <- (A / c - mean_u) / (sd_u + eps / c) with
   the scaled statistics (2.) of A (0 when they do not vary);
   "scale" (scale="batch"): A <- (A / c) / (sd_u + eps / c) with the statistics of the combined reward s
   (saturated to the finite range), A unchanged when the denominator is 0;
   "gpg": A <- A * n_c / max(m, 1), n_c the number of contributing samples and m the number of them with a
   nonzero combined reward (d_j != 0); a constant (no gradient).
9. Sign shaping: A <- positive_scale * A where A > 0, negative_scale * A where A < 0.
10. clip: A <- clamp(A, -clip, clip).
11. Valid but infeasible samples of accepted groups take infeasible_advantage; samples of rejected
    groups and invalid samples take 0.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from moo_kernels.ops.advantages.spec import AdvantageSpec, resolve

F64 = torch.float64
MAX_F64 = torch.finfo(F64).max


def _segment_sum(x: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    if torch.compiler.is_compiling() and statically_known_true(num_groups == 1):
        # One segment is a plain sum; traced (the backward under torch.compile) it has to be one:
        # inductor's C++ backend (torch 2.13) cannot generate an index_add into a dimension of size 1.
        # (A number of groups counted from the data is symbolic: not known to be 1, and not guarded on.)
        return x.sum(dim=0, keepdim=True)
    out = torch.zeros((num_groups,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    return out.index_add(0, index, x)


def _segment_extreme(
    x: torch.Tensor, take: torch.Tensor, index: torch.Tensor, num_groups: int, reduce: str
) -> torch.Tensor:
    fill = float("inf") if reduce == "amin" else float("-inf")
    vals = torch.where(take, x.detach(), torch.full_like(x, fill))
    out = torch.full((num_groups,) + tuple(x.shape[1:]), fill, dtype=x.dtype, device=x.device)
    idx = index.view((-1,) + (1,) * (x.dim() - 1)).expand_as(x)
    return out.scatter_reduce(0, idx, vals, reduce=reduce, include_self=True)


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), torch.zeros_like(v))


def pow2_floor(m: torch.Tensor) -> torch.Tensor:
    """2^floor(log2 m) for finite m >= 0 (exact, subnormals included), 1 where m == 0."""
    m = m.detach()
    mant, _ = torch.frexp(m)  # m = mant * 2^e, mant in [0.5, 1): m / (2 mant) = 2^(e - 1), exactly
    pos = m > 0
    one = torch.ones_like(m)
    return torch.where(pos, m / torch.where(pos, 2 * mant, one), one)


def sorted_sum(t: torch.Tensor) -> torch.Tensor:
    """SORTEDSUM over the last dimension: ascending order, added left to right from +0.0."""
    s, _ = torch.sort(t, dim=-1)
    total = torch.zeros(t.shape[:-1], dtype=t.dtype, device=t.device)
    for k in range(t.shape[-1]):
        total = total + s[..., k]
    return total


def _masked_max(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Max over the last dimension of the entries of x (> 0) where mask holds; 1 where none does."""
    m = torch.where(mask, x, torch.zeros_like(x)).amax(dim=-1)
    return torch.where(m > 0, m, torch.ones_like(m))


def _eps_over(eps: float | torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """eps / scale, correctly rounded (a number divided by a tensor is computed as a reciprocal times the
    number, which overflows for a subnormal scale); 0 when eps == 0 (also when the scale underflowed). eps may be
    a tensor that broadcasts against scale (eps + std_floor per objective)."""
    num = torch.full_like(scale, eps) if not isinstance(eps, torch.Tensor) else eps.to(scale.dtype).expand_as(scale)
    return torch.where(num > 0, num / scale, torch.zeros_like(scale))


def objective_eps(o: AdvantageSpec, device: torch.device) -> float | torch.Tensor:
    """What the z-score of each objective adds to its standard deviation: eps, plus std_floor when given (a number,
    K numbers or a [K] tensor: a constant, detached)."""
    if o.std_floor is None:
        return o.eps
    return o.eps + torch.as_tensor(o.std_floor, dtype=F64, device=device).detach()


def _apply_scale(v: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """v * scale where v != 0; a zero stays zero (also when the scale overflowed)."""
    nz = v != 0
    return torch.where(nz, v * torch.where(nz, scale, torch.ones_like(scale)), v)


class Stats(NamedTuple):
    """Scaled statistics of a column per group ([G] or [G, K] each); see 2. of the module docstring."""

    count: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    varies: torch.Tensor
    big: torch.Tensor  # max |x| (0 without entries)
    scale: torch.Tensor  # c
    mean_u: torch.Tensor
    std_u: torch.Tensor
    mean: torch.Tensor  # clamp(c * mean_u, lo, hi)
    std: torch.Tensor  # c * std_u
    m2: torch.Tensor  # M2 of u


def group_stats(
    x: torch.Tensor,
    take: torch.Tensor,
    index: torch.Tensor,
    num_groups: int,
    unbiased: bool,
    weight: torch.Tensor | None = None,
) -> tuple[Stats, torch.Tensor]:
    """Scaled two-pass statistics of x over the entries where take is true, and u = x / c (0 where take
    is false). x and take are [N] or [N, K]; x is finite where take holds. weight ([N], >= 0): weighted
    statistics (count = sum of the weights; entries of weight 0 do not take part)."""
    zeros_g = torch.zeros((num_groups,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    if weight is not None:
        weight = weight.to(x.dtype).view((-1,) + (1,) * (x.dim() - 1))
        take = take & (weight > 0)
    wt = take.to(x.dtype) if weight is None else torch.where(take, weight, torch.zeros_like(x))
    n = _segment_sum(wt, index, num_groups)
    lo = _segment_extreme(x, take, index, num_groups, "amin")
    hi = _segment_extreme(x, take, index, num_groups, "amax")
    some = n > 0
    varies = hi > lo
    big = torch.where(some, torch.maximum(lo.abs(), hi.abs()), zeros_g)
    c = pow2_floor(big)
    cj = c[index]
    u = torch.where(take, x / cj, torch.zeros_like(x))
    mean_u = _segment_sum(u * wt, index, num_groups) / torch.where(n > 0, n, torch.ones_like(n))
    # Value exactly the common (scaled) value when nothing varies; gradient still that of the mean.
    exact = torch.where(some, hi / c, zeros_g)
    mean_u = torch.where(varies, mean_u, mean_u + (exact - mean_u).detach())
    dev = torch.where(take, u - mean_u[index], torch.zeros_like(u))
    m2 = _segment_sum(dev * dev * wt, index, num_groups)
    denom = n - 1 if unbiased else n
    var_u = torch.where(varies & (denom > 0), m2 / torch.where(denom > 0, denom, torch.ones_like(denom)), zeros_g)
    std_u = _safe_sqrt(var_u)
    mean = c * mean_u
    clamped = torch.where(some, torch.minimum(torch.maximum(mean, lo), hi), mean)
    mean = mean + (clamped - mean).detach()
    return Stats(n, lo, hi, varies, big, c, mean_u, std_u, mean, c * std_u, m2), u


def normalize_scaled(
    u: torch.Tensor,
    take: torch.Tensor,
    count: torch.Tensor,
    mean_u: torch.Tensor,
    std_u: torch.Tensor,
    varies: torch.Tensor,
    eps_u: torch.Tensor,
    normalize: str,
) -> torch.Tensor:
    """The scaled normalised value a of 3. (statistics already gathered per entry); 0 where take is false.

    zscore of a column that does not vary is 0 (value and gradient), not (u - mean_u) / eps_u.
    """
    zero = torch.zeros_like(u)
    if normalize == "zscore":
        den = std_u + eps_u
        ok = varies & (den > 0)
        out = torch.where(ok, (u - mean_u) / torch.where(ok, den, torch.ones_like(den)), zero)
    elif normalize == "center":
        out = u - mean_u
    elif normalize == "rloo":
        many = count > 1
        out = torch.where(many, (u - mean_u) * count / torch.where(many, count - 1, torch.ones_like(count)), zero)
    elif normalize == "none":
        out = u
    else:
        raise ValueError(f"unknown normalize {normalize!r}")
    return torch.where(take, out, zero)


UNITLESS = ("zscore", "passk", "loo_std")  # columns whose value a is a pure number (e = 1)
LOO_TINY = 2.0**-40  # loo_std: a leave-one-out M2 at most this fraction of the group's M2 counts as 0


def _count_equal(x, take, edge, gi, num_groups):
    """Which entries equal their group's edge value (lo or hi), and how many per group."""
    at = take & (x == edge[gi])
    return at, _segment_sum(at.to(F64), gi, num_groups)


def column_scaled(
    column: str,
    x: torch.Tensor,
    u: torch.Tensor,
    take: torch.Tensor,
    gi: torch.Tensor,
    num_groups: int,
    st: Stats,
    eps_u: torch.Tensor,
    unit: torch.Tensor,
    lengths: torch.Tensor | None,
    unbiased: bool,
) -> torch.Tensor:
    """The scaled value a of 3. for a column ([N] or [N, K]): x the values (finite where take), u = x / c,
    st their group statistics, eps_u the z-score's eps over the scale per group, unit the column's scale per
    group (loo_std's unnormalised values are in its units). 0 where take is false."""
    if column in ("zscore", "center", "rloo", "none"):
        return normalize_scaled(u, take, st.count[gi], st.mean_u[gi], st.std_u[gi], st.varies[gi], eps_u[gi], column)
    zero = torch.zeros_like(u)
    if column in ("passk", "passk_unscaled"):
        winner, _, _, margin = passk_parts(x, u, take, gi, num_groups, st)
        if column == "passk_unscaled":
            return torch.where(winner, margin, zero)
        den = st.std_u[gi] + eps_u[gi]
        ok = winner & (den > 0)
        return torch.where(ok, margin / torch.where(ok, den, torch.ones_like(den)), zero)
    if column == "opo":
        length = lengths.to(F64).view((-1,) + (1,) * (u.dim() - 1))
        lw = torch.where(take, length, zero)
        total = _segment_sum(lw, gi, num_groups)
        some = total > 0
        base = torch.where(
            some, _segment_sum(lw * u, gi, num_groups) / torch.where(some, total, torch.ones_like(total)), st.mean_u
        )
        base = torch.where(st.varies, base, base + (st.mean_u - base).detach())  # exactly the common value
        return torch.where(take, u - base[gi], zero)
    if column == "loo_std":
        diff, sd, live = loo_parts(x, u, take, gi, num_groups, st, unbiased)
        den = sd + eps_u[gi]
        norm = sd > 0
        raw = (diff * unit[gi]).clamp(-MAX_F64, MAX_F64)
        value = torch.where(norm, diff / torch.where(norm, den, torch.ones_like(den)), raw)
        return torch.where(live, value, zero)
    raise ValueError(f"unknown column {column!r}")


def passk_parts(x, u, take, gi, num_groups, st):
    """grpo_passk: (winner: the one entry at the top of its group, at_second: the entries holding the second best,
    how many per group, the scaled margin u - second / c)."""
    zero = torch.zeros_like(u)
    at_hi, n_hi = _count_equal(x, take, st.hi, gi, num_groups)
    below = take & ~at_hi
    second = _segment_extreme(x, below, gi, num_groups, "amax")  # -inf without an entry below hi
    at_second, n_second = _count_equal(x, below, second, gi, num_groups)
    # the second best: its exact scaled value, with the gradient of the mean of the entries holding it
    held = _segment_sum(torch.where(at_second, u, zero), gi, num_groups) / n_second.clamp(min=1)
    exact = torch.where(n_second > 0, second / st.scale, torch.zeros_like(second))
    second_u = held + (exact - held).detach()
    winner = at_hi & (n_hi[gi] == 1) & (st.count[gi] >= 2)
    return winner, at_second, n_second, u - second_u[gi]


def loo_parts(x, u, take, gi, num_groups, st, unbiased):
    """loo_std, scaled: (D_j = u_j minus the mean of the others, sd_j = the others' std, the entries with a
    value: taking part, n >= 2, the column varies)."""
    zero = torch.zeros_like(u)
    n = st.count[gi]
    many = n >= 2
    f = torch.where(many, n / torch.where(many, n - 1, torch.ones_like(n)), zero)
    dev = u - st.mean_u[gi]
    at_lo, n_lo = _count_equal(x, take, st.lo, gi, num_groups)
    at_hi, n_hi = _count_equal(x, take, st.hi, gi, num_groups)
    n_lo, n_hi = n_lo[gi], n_hi[gi]
    others_equal = (at_lo & (n_lo == 1) & (n_hi == n - 1)) | (at_hi & (n_hi == 1) & (n_lo == n - 1))
    m2 = st.m2[gi]
    m2_loo = (m2 - f * dev * dev).clamp(min=0)
    m2_loo = torch.where(others_equal | (m2_loo <= m2 * LOO_TINY), zero, m2_loo)
    d = n - 2 if unbiased else n - 1
    sd = _safe_sqrt(torch.where(d > 0, m2_loo / torch.where(d > 0, d, torch.ones_like(d)), zero))
    return dev * f, sd, take & many & st.varies[gi]


class Forward(NamedTuple):
    """Forward intermediates up to the combined advantage (before batch_normalize), shared with the
    analytic backward so that both take the same decisions."""

    r: torch.Tensor  # [N, K] rewards after reward gates
    finite: torch.Tensor  # [N, K]
    feasible: torch.Tensor  # [N]
    take: torch.Tensor  # [N, K]
    r0: torch.Tensor  # [N, K] r with non-finite entries as 0
    stats: Stats  # per objective, [G, K]
    a: torch.Tensor | None  # [N, K] per-objective normalised values a * e (not for scalarize)
    s: torch.Tensor | None  # [N] combined reward s = d * C_g * cw (scalarize, drop_zero_variance, batch steps)
    d: torch.Tensor | None  # [N] its scaled form d
    s_stats: Stats | None  # statistics of d, with mean / std of s
    s_scale: torch.Tensor | None  # [G] P_g = (C_g * cw) * c_d
    weights: torch.Tensor  # [G, K] weights of the combination (w~ for "variance", w otherwise)
    adv: torch.Tensor  # [N] combined advantage
    accept: torch.Tensor  # [G]


def forward_state(
    rewards: torch.Tensor, group_index: torch.Tensor, num_groups: int, o: AdvantageSpec, check_finite: bool
) -> Forward:
    """Steps 0-7 of the module docstring (o: the options; check_finite: raise on a non-finite reward)."""
    column, batch = resolve(o)
    r = rewards.to(F64)
    w = o.weights.to(F64)
    n_samples, k = r.shape
    G = num_groups
    gi = group_index.long()
    unbiased = o.std == "unbiased"
    ones = torch.ones(n_samples, dtype=torch.bool, device=r.device)
    # 0. nonzero bytes are True (a bool tensor may hold bytes other than 0 and 1)
    valid = ones if o.valid is None else o.valid != 0
    if o.reward_gates is not None:
        r = torch.where(o.reward_gates != 0, r, torch.full_like(r, o.gated_value))
    finite = torch.isfinite(r)
    if check_finite:
        bad = valid[:, None] & ~finite
        if bool(bad.any()):
            j, kk = (int(v) for v in bad.nonzero()[0])
            raise ValueError(
                f"rewards[{j}, {kk}] is {r[j, kk].item()} (sample {j}, objective {kk}); "
                "pass nan_policy='ignore' to leave non-finite rewards out"
            )
    feasible = valid & ((o.gates != 0).all(dim=1) if o.gates is not None else ones)
    take = feasible[:, None] & finite
    r0 = torch.where(finite, r, torch.zeros_like(r))
    x = torch.where(take, r0, torch.zeros_like(r0))

    # 2. per-objective statistics
    st, u = group_stats(x, take, gi, G, unbiased)
    cw = pow2_floor(w.detach().max())
    wp = w / cw

    # 5. combined reward
    s = d = s_stats = s_scale = None
    if o.weighting == "scalarize" or o.drop_zero_variance or batch in ("scale", "gpg"):
        col_c = _masked_max(st.scale, (wp.detach() > 0) & (st.big > 0))  # C_g
        fits = st.scale <= col_c[:, None]
        q = torch.where(fits[gi], x / col_c[gi][:, None], torch.zeros_like(x))
        d = sorted_sum(wp * q)
        s_stats, u_d = group_stats(d, feasible, gi, G, unbiased)
        s_scale = (col_c * cw) * s_stats.scale
        s = d * (col_c * cw)[gi]
        s_stats = s_stats._replace(mean=s_stats.mean_u * s_scale, std=s_stats.std_u * s_scale)

    # 6. normalise and combine
    a = None
    if o.weighting == "scalarize":
        eps_u = _eps_over(o.eps, s_scale)
        out = column_scaled(column, d, u_d, feasible, gi, G, s_stats, eps_u, s_scale, o.lengths, unbiased)
        adv = out if column in UNITLESS else _apply_scale(out, s_scale[gi])
        weff = w.expand(G, -1)
    else:
        eps_c = _eps_over(objective_eps(o, r.device), st.scale)
        a_u = column_scaled(column, x, u, take, gi, G, st, eps_c, st.scale, o.lengths, unbiased)
        e = torch.ones_like(st.scale) if column in UNITLESS else st.scale
        live = st.big > 0 if column == "none" else st.varies
        if o.weighting == "fixed":
            W = wp.expand(G, -1)
            factor = cw
            weff = w.expand(G, -1)
        elif o.weighting == "variance":
            sel = (wp.detach() > 0) & (st.std_u > 0)
            vmax = _masked_max(st.scale, sel)
            ratio = torch.where(sel, st.scale / vmax[:, None], torch.zeros_like(st.scale))
            t = (wp * st.std_u) * ratio
            tot = sorted_sum(t)[:, None]
            W = torch.where(tot > 0, t / torch.where(tot > 0, tot, torch.ones_like(tot)), torch.zeros_like(t))
            factor = torch.ones((), dtype=F64, device=r.device)
            weff = W
        else:
            raise ValueError(f"unknown weighting {o.weighting!r}")
        use = (W.detach() > 0) & live
        emax = _masked_max(e, use)
        b = W * torch.where(use, e / emax[:, None], torch.zeros_like(e))
        adv = _apply_scale(sorted_sum(a_u * b[gi]), (emax * factor)[gi])
        a = a_u * e[gi]
    adv = adv.clamp(-MAX_F64, MAX_F64)

    # 7. group acceptance
    accept = _segment_sum(feasible.to(F64), gi, G) >= o.min_feasible
    if o.drop_zero_variance:
        accept = accept & s_stats.varies
    return Forward(r, finite, feasible, take, r0, st, a, s, d, s_stats, s_scale, weff, adv, accept)


def batch_whiten(
    adv: torch.Tensor, contrib: torch.Tensor, eps: float, unbiased: bool, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, Stats]:
    """8. "whiten": whitened advantages of the contributing samples (others unchanged) and the batch statistics
    (weighted by lengths when given)."""
    zeros = torch.zeros(adv.shape[0], dtype=torch.long, device=adv.device)
    st, _ = group_stats(adv, contrib, zeros, 1, unbiased, weight)
    u = torch.where(contrib, adv / st.scale[zeros], torch.zeros_like(adv))  # also samples of length 0
    eps_u = _eps_over(eps, st.scale)
    white = normalize_scaled(u, contrib, st.count[zeros], st.mean_u[zeros], st.std_u[zeros], st.varies[zeros],
                             eps_u[zeros], "zscore")  # fmt: skip
    return torch.where(contrib, white, adv), st


def batch_scale_stats(f: Forward, contrib: torch.Tensor, o: AdvantageSpec) -> Stats:
    """The batch statistics of the combined reward (saturated) over the contributing samples, for scale="batch"."""
    zeros = torch.zeros(contrib.shape[0], dtype=torch.long, device=contrib.device)
    s = f.s.clamp(-MAX_F64, MAX_F64)
    return group_stats(s, contrib, zeros, 1, o.std == "unbiased", o.lengths)[0]


def gpg_factor(f: Forward, contrib: torch.Tensor) -> torch.Tensor:
    """GPG's n_c / max(m, 1): contributing samples over those with a nonzero combined reward (a constant)."""
    n_c = contrib.sum().to(F64)
    m = (contrib & (f.d != 0)).sum().to(F64)
    return n_c / m.clamp(min=1)


def batch_step(adv: torch.Tensor, f: Forward, contrib: torch.Tensor, o: AdvantageSpec) -> torch.Tensor:
    """8. of the module docstring."""
    batch = resolve(o)[1]
    if batch == "whiten":
        return batch_whiten(adv, contrib, o.eps, o.std == "unbiased", o.lengths)[0]
    if batch == "scale":
        st = batch_scale_stats(f, contrib, o)
        den = st.std_u + _eps_over(o.eps, st.scale)
        ok = den > 0
        return torch.where(ok, (adv / st.scale) / torch.where(ok, den, torch.ones_like(den)), adv)
    if batch == "gpg":
        return (adv * gpg_factor(f, contrib)).clamp(-MAX_F64, MAX_F64)
    return adv


def advantages_reference(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    num_groups: int,
    weights: torch.Tensor,
    valid: torch.Tensor | None = None,
    reward_gates: torch.Tensor | None = None,
    gates: torch.Tensor | None = None,
    **options,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canonical inputs: rewards [N, K], group_index [N] int64 in [0, G), weights [K],
    valid [N] bool, reward_gates [N, K] bool, gates [N, M] bool (None means all true); the other options
    of AdvantageSpec by keyword (their defaults when absent; group_size / group_ids are not read).

    Returns float64 (advantages [N], group_mask [G], sample_mask [N], weights [G, K],
    mean [G, K], std [G, K]).
    """
    o = AdvantageSpec(weights=weights, valid=valid, reward_gates=reward_gates, gates=gates, **options)
    return reference(rewards, group_index, num_groups, o)


def reference(
    rewards: torch.Tensor, group_index: torch.Tensor, num_groups: int, o: AdvantageSpec
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """advantages_reference with its options as a spec."""
    f = forward_state(rewards, group_index, num_groups, o, o.nan_policy == "raise")
    gi = group_index.long()
    adv = f.adv
    contrib = f.feasible & f.accept[gi]

    # 8. the batch step over the contributing samples
    adv = batch_step(adv, f, contrib, o)

    # 9-10. sign shaping and clipping
    adv = adv * torch.where(adv > 0, torch.full_like(adv, o.positive_scale), torch.full_like(adv, o.negative_scale))
    if o.clip is not None:
        adv = adv.clamp(-o.clip, o.clip)

    # 11. infeasible, rejected and invalid samples
    valid = torch.ones_like(f.feasible) if o.valid is None else o.valid != 0
    infeasible = valid & ~f.feasible & f.accept[gi]
    fixed = o.infeasible_advantage
    adv = torch.where(contrib, adv, torch.where(infeasible, torch.full_like(adv, fixed), torch.zeros_like(adv)))
    sample_mask = contrib | (infeasible & (fixed != 0.0))
    return adv, f.accept, sample_mask, f.weights, f.stats.mean, f.stats.std
