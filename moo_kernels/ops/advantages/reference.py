"""Float64 PyTorch reference of the multi-objective advantage step.

This file is the semantics: the Triton and C++ kernels must agree with it, the tests use it as
the oracle, and devices without a kernel run it. It is written for clarity (segment reductions
with index_add / scatter_reduce), is differentiable by autograd, and never produces NaN.

Notation: sample j, objective k, group g = group_index[j], weights w_k >= 0.

1. Gates and bad values. reward_gates[j, k] false replaces r_jk by gated_value. A sample is
   *feasible* when valid and every gate in gates[j, :] passes. An entry takes part in the
   statistics of objective k when its sample is feasible and r_jk is finite. A non-finite entry
   (read from a valid sample with an open reward gate) raises under nan_policy="raise"; under
   "ignore" it is left out of the statistics and contributes 0.
2. Per-group statistics of each objective over the entries that take part: count n_gk, mean mu_gk,
   std sigma_gk (unbiased: n-1, needs n >= 2; population: n). A group whose entries are all equal
   has mu exactly equal to them and sigma exactly 0 (no rounding residue).
3. Normalise and combine (weighting):
   - "scalarize": s_j = sum_k w_k r_jk, then s is normalised inside the group.
   - "fixed":     A_j = sum_k w_k A_jk with A_jk the per-objective normalisation.
   - "variance":  A_j = sum_k w~_gk A_jk, w~_gk = w_k sigma_gk / sum_l w_l sigma_gl (0 when the sum is 0).
   normalize: "zscore" (r - mu) / (sigma + eps) (0 when sigma + eps == 0); "center" r - mu;
   "rloo" n / (n - 1) (r - mu) (0 when n < 2); "none" r. zscore of a group whose values do not
   vary is 0 (so its gradient is 0 too, rather than 1 / eps).
4. Groups: rejected when fewer than min_feasible samples are feasible, or (drop_zero_variance)
   when the combined reward s_j does not vary over the feasible samples (fewer than two, or all
   equal). A sample *contributes* when it is feasible and its group is accepted.
5. batch_normalize: A <- (A - m) / (sd + eps) with m, sd over the contributing samples (sd by the
   std option; all equal gives 0).
6. Sign shaping: A <- positive_scale * A where A > 0, negative_scale * A where A < 0.
7. clip: A <- clamp(A, -clip, clip).
8. Valid but infeasible samples of accepted groups take infeasible_advantage; samples of rejected
   groups and invalid samples take 0.
"""

from __future__ import annotations

import torch

F64 = torch.float64


def _segment_sum(x: torch.Tensor, index: torch.Tensor, num_groups: int) -> torch.Tensor:
    if torch.compiler.is_compiling() and type(num_groups) is int and num_groups == 1:
        # One segment is a plain sum; traced (the backward under torch.compile) it has to be one:
        # inductor's C++ backend (torch 2.13) cannot generate an index_add into a dimension of size 1.
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


def group_stats(
    x: torch.Tensor, take: torch.Tensor, index: torch.Tensor, num_groups: int, unbiased: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two-pass group statistics of x over the entries where take is true.

    x and take are [N] or [N, K]; returns (count, mean, std, varies), each [G] or [G, K].
    A group whose entries are all equal gets exactly their value as mean and exactly 0 as std.
    """
    t = take.to(x.dtype)
    n = _segment_sum(t, index, num_groups)
    s = _segment_sum(torch.where(take, x, torch.zeros_like(x)), index, num_groups)
    mean = s / n.clamp(min=1)
    lo = _segment_extreme(x, take, index, num_groups, "amin")
    hi = _segment_extreme(x, take, index, num_groups, "amax")
    varies = hi > lo
    exact = torch.where(n > 0, hi, torch.zeros_like(hi))
    # Value exactly the common reward when nothing varies; gradient still that of the mean.
    mean = torch.where(varies, mean, mean + (exact - mean).detach())
    dev = torch.where(take, x - mean[index], torch.zeros_like(x))
    m2 = _segment_sum(dev * dev, index, num_groups)
    denom = n - 1 if unbiased else n
    var = torch.where(varies & (denom > 0), m2 / denom.clamp(min=1), torch.zeros_like(m2))
    return n, mean, _safe_sqrt(var), varies


def normalize_in_group(
    x: torch.Tensor,
    take: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    count: torch.Tensor,
    varies: torch.Tensor,
    normalize: str,
    eps: float,
) -> torch.Tensor:
    """Per-sample normalisation of x given its group's (already gathered) statistics.

    zscore of a group that does not vary is 0 (value and gradient), not (x - mu) / eps.
    """
    zero = torch.zeros_like(x)
    if normalize == "zscore":
        ok = varies & (std + eps > 0)
        out = torch.where(ok, (x - mean) / torch.where(ok, std + eps, torch.ones_like(std)), zero)
    elif normalize == "center":
        out = x - mean
    elif normalize == "rloo":
        many = count > 1
        out = torch.where(many, (x - mean) * count / torch.where(many, count - 1, torch.ones_like(count)), zero)
    elif normalize == "none":
        out = x
    else:
        raise ValueError(f"unknown normalize {normalize!r}")
    return torch.where(take, out, zero)


def advantages_reference(
    rewards: torch.Tensor,
    group_index: torch.Tensor,
    num_groups: int,
    weights: torch.Tensor,
    valid: torch.Tensor | None = None,
    reward_gates: torch.Tensor | None = None,
    gates: torch.Tensor | None = None,
    *,
    normalize: str = "zscore",
    std: str = "unbiased",
    weighting: str = "variance",
    batch_normalize: bool = False,
    eps: float = 1e-6,
    gated_value: float = 0.0,
    infeasible_advantage: float = 0.0,
    min_feasible: int = 0,
    drop_zero_variance: bool = False,
    positive_scale: float = 1.0,
    negative_scale: float = 1.0,
    clip: float | None = None,
    nan_policy: str = "raise",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Canonical inputs: rewards [N, K], group_index [N] int64 in [0, G), weights [K],
    valid [N] bool, reward_gates [N, K] bool, gates [N, M] bool (None means all true).

    Returns float64 (advantages [N], group_mask [G], sample_mask [N], weights [G, K],
    mean [G, K], std [G, K]).
    """
    r = rewards.to(F64)
    w = weights.to(F64)
    n_samples, _ = r.shape
    G = num_groups
    gi = group_index.long()
    unbiased = std == "unbiased"
    ones = torch.ones(n_samples, dtype=torch.bool, device=r.device)
    valid = ones if valid is None else valid
    if reward_gates is not None:
        r = torch.where(reward_gates, r, torch.full_like(r, gated_value))
    finite = torch.isfinite(r)
    if nan_policy == "raise":
        bad = valid[:, None] & ~finite
        if bool(bad.any()):
            j, k = (int(v) for v in bad.nonzero()[0])
            raise ValueError(
                f"rewards[{j}, {k}] is {r[j, k].item()} (sample {j}, objective {k}); "
                "pass nan_policy='ignore' to leave non-finite rewards out"
            )
    feasible = valid & (gates.all(dim=1) if gates is not None else ones)
    take = feasible[:, None] & finite
    r0 = torch.where(finite, r, torch.zeros_like(r))

    # 2. per-objective statistics
    count, mean, sd, varies = group_stats(r0, take, gi, G, unbiased)

    # combined reward (scalarize, drop_zero_variance)
    s = (r0 * w).sum(dim=1)
    s_count, s_mean, s_sd, s_varies = group_stats(s, feasible, gi, G, unbiased)

    # 3. normalise and combine
    if weighting == "scalarize":
        adv = normalize_in_group(s, feasible, s_mean[gi], s_sd[gi], s_count[gi], s_varies[gi], normalize, eps)
        weff = w.expand(G, -1)
    else:
        a = normalize_in_group(r0, take, mean[gi], sd[gi], count[gi], varies[gi], normalize, eps)
        if weighting == "fixed":
            weff = w.expand(G, -1)
        elif weighting == "variance":
            ws = w * sd
            tot = ws.sum(dim=1, keepdim=True)
            weff = torch.where(tot > 0, ws / torch.where(tot > 0, tot, torch.ones_like(tot)), torch.zeros_like(ws))
        else:
            raise ValueError(f"unknown weighting {weighting!r}")
        adv = (a * weff[gi]).sum(dim=1)

    # 4. group acceptance
    accept = s_count >= min_feasible
    if drop_zero_variance:
        accept = accept & s_varies
    contrib = feasible & accept[gi]

    # 5. batch whitening over contributing samples
    if batch_normalize:
        zeros = torch.zeros(n_samples, dtype=torch.long, device=r.device)
        bn, bm, bsd, bvar = group_stats(adv, contrib, zeros, 1, unbiased)
        white = normalize_in_group(adv, contrib, bm[zeros], bsd[zeros], bn[zeros], bvar[zeros], "zscore", eps)
        adv = torch.where(contrib, white, adv)

    # 6-7. sign shaping and clipping
    adv = adv * torch.where(adv > 0, torch.full_like(adv, positive_scale), torch.full_like(adv, negative_scale))
    if clip is not None:
        adv = adv.clamp(-clip, clip)

    # 8. infeasible, rejected and invalid samples
    infeasible = valid & ~feasible & accept[gi]
    adv = torch.where(
        contrib, adv, torch.where(infeasible, torch.full_like(adv, infeasible_advantage), torch.zeros_like(adv))
    )
    sample_mask = contrib | (infeasible & (infeasible_advantage != 0.0))
    return adv, accept, sample_mask, weff, mean, sd
