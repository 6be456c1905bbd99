"""Suite "advantages": the multi-objective advantage step (moo_kernels.multi_objective_advantages).

Compared on the same random inputs:
- moo_kernels with the op's default weighting="fixed" (GDPO: z-score each objective, then the weighted sum),
  unbiased std, feasibility gates [N, 2]. CPU: the C++ kernel; CUDA: the Triton kernel with
  nan_policy="raise" (one host synchronisation) and "ignore" (fully asynchronous).
- eager PyTorch: the same computation vectorised in float32 (groups are contiguous: a reshape to
  [N / G, G, K]); with torch.compile of it where compiling is on.
- per-sample loop (CPU): verl's GRPO outcome-advantage estimator's style (a dict of per-prompt score lists,
  torch.mean / torch.std per group, a loop normalising each sample), for K objectives.
- the DVAO row: moo_kernels with weighting="variance" against the same computation in eager PyTorch.
- scalarize baseline: what TRL's GRPOTrainer and verl compute (weighted sum of the objectives, then the
  group z-score, vectorised), eager and compiled, against moo_kernels with weighting="scalarize".

Correct means within 1e-4 (absolute) of moo_kernels' float64 reference on the benchmarked inputs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

import moo_kernels
from moo_kernels.ops.advantages.reference import advantages_reference

from .core import Case, Impl, Suite, cpu_backend, moo_label, with_backend

Tensor = torch.Tensor

EPS = 1e-6  # the op's default eps, also verl's epsilon
ATOL = 1e-4  # float32 advantages against the float64 reference
GATE_PASS = 0.95  # probability that one feasibility check passes; two checks: ~90% of samples feasible
WEIGHT_CYCLE = (1.0, 0.5, 0.25, 0.75)
CHECKS = 2


def make_inputs(n: int, k: int, group_size: int, device: str, seed: int = 0) -> dict[str, Any]:
    """Random, non-zero rewards of four kinds, cycled over the K objectives.

    0/1 correctness (p = 0.6), a uniform score in [0, 1), a normal score, a discrete rubric score in
    {0, 0.25, ..., 1}; objectives past the first four are rescaled so that no two are alike.
    """
    gen = torch.Generator().manual_seed(seed)
    cols = []
    for j in range(k):
        kind = j % 4
        if kind == 0:
            col = (torch.rand(n, generator=gen) < 0.6).float()
        elif kind == 1:
            col = torch.rand(n, generator=gen)
        elif kind == 2:
            col = 0.2 + 0.5 * torch.randn(n, generator=gen)
        else:
            col = torch.randint(0, 5, (n,), generator=gen).float() / 4
        cols.append(col * (1 + j // 4))
    weights = [WEIGHT_CYCLE[j % len(WEIGHT_CYCLE)] for j in range(k)]
    return {
        "rewards": torch.stack(cols, dim=1).contiguous().to(device),
        "gates": (torch.rand(n, CHECKS, generator=gen) < GATE_PASS).to(device),
        "weights": weights,  # as a user passes them to the op (a list: no host synchronisation)
        "weights_t": torch.tensor(weights, dtype=torch.float32, device=device),  # for the eager code
        "group_size": group_size,
    }


def reference(inp: dict[str, Any], weighting: str) -> Tensor:
    """float64 advantages of moo_kernels' reference, on the CPU (gates but with "scalarize")."""
    rewards = inp["rewards"].cpu().double()
    n = rewards.shape[0]
    out = advantages_reference(
        rewards,
        torch.arange(n) // inp["group_size"],
        n // inp["group_size"],
        torch.tensor(inp["weights"], dtype=torch.float64),
        gates=inp["gates"].cpu() if weighting != "scalarize" else None,
        weighting=weighting,
        eps=EPS,
    )
    return out[0]


def moo_advantages(inp: dict[str, Any], nan_policy: str = "raise", weighting: str | None = None) -> Tensor:
    """The public op, called as a trainer would (weighting None: the op's default, "fixed")."""
    options = {} if weighting is None else {"weighting": weighting}
    out = moo_kernels.multi_objective_advantages(
        inp["rewards"],
        group_size=inp["group_size"],
        weights=inp["weights"],
        gates=inp["gates"] if weighting != "scalarize" else None,
        eps=EPS,
        nan_policy=nan_policy,
        **options,
    )
    return out.advantages


def make_eager(weighting: str, group_size: int, eps: float = EPS) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """Vectorised float32 PyTorch of the "fixed" (GDPO) or "variance" (DVAO) advantage with feasibility gates.

    Same semantics as the reference for these options: statistics over the feasible samples of the
    group, unbiased std, an objective that does not vary in the group (max == min over its feasible
    samples) has std 0 and z-score 0; "fixed" sums w_k z_jk, "variance" sums w~_gk z_jk with w~_gk =
    w_k sigma_gk / sum_l w_l sigma_gl (0 when the sum is 0); infeasible samples get 0.
    """

    def eager(rewards: Tensor, gates: Tensor, weights: Tensor) -> Tensor:
        n, k = rewards.shape
        r = rewards.view(-1, group_size, k)  # [B, G, K]
        feasible = gates.all(dim=1).view(-1, group_size, 1)  # [B, G, 1]
        f = feasible.to(r.dtype)
        count = f.sum(dim=1, keepdim=True)  # [B, 1, 1]
        mean = (r * f).sum(dim=1, keepdim=True) / count.clamp(min=1)  # [B, 1, K]
        dev = (r - mean) * f  # two-pass: deviations first
        var = (dev * dev).sum(dim=1, keepdim=True) / (count - 1).clamp(min=1)
        hi = r.masked_fill(~feasible, float("-inf")).amax(dim=1, keepdim=True)
        lo = r.masked_fill(~feasible, float("inf")).amin(dim=1, keepdim=True)
        varies = hi > lo  # false for groups of fewer than two feasible samples, too
        std = torch.where(varies, var.sqrt(), 0.0)
        z = torch.where(varies, dev / (std + eps), 0.0)  # [B, G, K]
        if weighting == "fixed":
            return (z * weights).sum(dim=2).reshape(n)
        ws = weights * std  # [B, 1, K]
        total = ws.sum(dim=2, keepdim=True)
        w_eff = ws / torch.where(total > 0, total, torch.ones_like(total))
        return (z * w_eff).sum(dim=2).reshape(n)

    return eager


def make_eager_scalarize(group_size: int, eps: float = EPS) -> Callable[[Tensor, Tensor], Tensor]:
    """The TRL / verl baseline: weighted sum of the objectives, then the group z-score (vectorised)."""

    def eager_scalarize(rewards: Tensor, weights: Tensor) -> Tensor:
        s = (rewards * weights).sum(dim=1)
        g = s.view(-1, group_size)
        mean = g.mean(dim=1, keepdim=True)
        std = g.std(dim=1, keepdim=True)
        return ((g - mean) / (std + eps)).reshape(-1)

    return eager_scalarize


def loop_fixed(rewards: Tensor, gates: Tensor, weights: Tensor, uids: list[str], eps: float = EPS) -> Tensor:
    """Per-sample Python loop in the style of verl's GRPO outcome-advantage estimator, for K objectives.

    Collect each feasible sample's reward row under its prompt uid, compute per-group mean / std with torch
    ops, then normalise sample by sample and sum the weighted z-scores ("fixed").
    """
    n, k = rewards.shape
    feasible = gates.all(dim=1)
    id2rows: dict[str, list[Tensor]] = defaultdict(list)
    for i in range(n):
        if feasible[i]:
            id2rows[uids[i]].append(rewards[i])
    id2stats: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
    zeros = torch.zeros(k, dtype=rewards.dtype)
    for uid, rows in id2rows.items():
        x = torch.stack(rows)
        mean = torch.mean(x, dim=0)
        if len(rows) > 1:
            varies = torch.amax(x, dim=0) > torch.amin(x, dim=0)
            std = torch.where(varies, torch.std(x, dim=0), 0.0)
        else:
            varies = torch.zeros(k, dtype=torch.bool)
            std = zeros
        id2stats[uid] = (mean, std, varies)
    scores = torch.zeros(n, dtype=rewards.dtype)
    for i in range(n):
        if feasible[i]:
            mean, std, varies = id2stats[uids[i]]
            z = torch.where(varies, (rewards[i] - mean) / (std + eps), 0.0)
            scores[i] = (weights * z).sum()
    return scores


def moo_bytes(n: int, k: int, group_size: int) -> int:
    """Bytes the op must move at least: rewards (N*K*4) and gates (N*2) read; advantages (N*4), sample_mask
    (N), group_mask (G) and weights, mean, std (3*G*K*4) written."""
    g = n // group_size
    return n * k * 4 + n * CHECKS + n * 4 + n + g + 3 * g * k * 4


class AdvantagesSuite(Suite):
    name = "advantages"
    title = "advantage step (GDPO, gates)"
    x_label = "N (samples)"
    dims = ("n", "k", "group_size")
    presets = {
        "cpu": {
            "tiny": [(512, 4, 16), (2048, 4, 16)],
            "small": [(4096, 4, 16), (1024, 4, 16)],
            "default": [(16384, 4, 16), (1024, 4, 16), (4096, 4, 16)],
            "large": [(65536, 4, 16), (4096, 4, 16), (16384, 4, 16)],
        },
        "cuda": {
            "tiny": [(512, 8, 16), (2048, 8, 16)],
            "small": [(32768, 8, 16), (4096, 8, 16)],
            "default": [(131072, 8, 16), (4096, 8, 16), (32768, 8, 16), (1048576, 8, 16)],
            "large": [(1048576, 8, 16), (131072, 8, 16), (8388608, 8, 16)],
        },
    }
    error_kind = "max abs, advantages"
    bytes_formula = "rewards + gates read, all outputs written"

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        cuda = ctx.device == "cuda"
        if cuda:
            backend = moo_kernels.get_backend()
        else:
            probe = make_inputs(64, 2, 8, "cpu")
            backend, reason = cpu_backend(lambda: moo_advantages(probe), "advantages")
            if reason:
                self.notes.append(f"moo_kernels ran on the {backend} backend ({reason}): not the C++ kernel's figures")
            self.info["moo_fallback_reason"] = reason
        self.backend = backend
        self.info["moo_backend"] = backend
        moo = moo_label(ctx.device, backend)
        if cuda:
            self.names = {"moo_raise": f"{moo}, nan_policy=raise", "moo": f"{moo}, nan_policy=ignore"}
        else:
            self.names = {"moo": moo}
        self.names |= {"eager": "eager PyTorch (vectorised)"}
        if ctx.use_compile:
            self.names["compiled"] = "torch.compile(eager)"
        if not cuda:
            self.names["loop"] = "per-sample loop (verl style)"
        self.names |= {"moo_variance": f"{moo}, variance (DVAO)", "variance": "variance (DVAO), eager"}
        self.names |= {"moo_scalarize": f"{moo}, scalarize", "scalarize": "scalarize baseline (TRL/verl, eager)"}
        if ctx.use_compile:
            self.names["scalarize_compiled"] = "scalarize baseline, torch.compile"
        baselines = [k for k in ("eager", "compiled", "loop") if k in self.names]
        self.speedup_of = {
            "moo": baselines,
            "moo_variance": ["variance"],
            "moo_scalarize": [k for k in ("scalarize", "scalarize_compiled") if k in self.names],
        }
        if cuda:
            self.speedup_of["moo_raise"] = baselines
        self.compiled = {}

    def _compiled(self, kind: str, group_size: int) -> Callable:
        """torch.compile of the eager function, once per group size (it recompiles per N itself)."""
        key = (kind, group_size)
        if key not in self.compiled:
            fn = make_eager_scalarize(group_size) if kind == "scalarize" else make_eager(kind, group_size)
            self.compiled[key] = torch.compile(fn, dynamic=False)
        return self.compiled[key]

    def make_case(self, size: dict[str, int], seed: int, main: bool) -> Case:
        n, k, gs = size["n"], size["k"], size["group_size"]
        if n % gs:
            raise ValueError(f"N={n} is not a multiple of the group size {gs}")
        inp = make_inputs(n, k, gs, self.ctx.device, seed=seed)
        r, gates, w = inp["rewards"], inp["gates"], inp["weights_t"]
        refs = {kind: reference(inp, kind) for kind in ("fixed", "variance", "scalarize")}
        eager_fixed, eager_variance = make_eager("fixed", gs), make_eager("variance", gs)
        eager_scalarize = make_eager_scalarize(gs)
        cuda = self.ctx.device == "cuda"
        nan_policy = "ignore" if cuda else "raise"
        impls = [
            Impl("moo", lambda: moo_advantages(inp, nan_policy), "fixed"),
            Impl("eager", lambda: eager_fixed(r, gates, w), "fixed"),
        ]
        if cuda:
            impls.insert(0, Impl("moo_raise", lambda: moo_advantages(inp, "raise"), "fixed", graph=False))
        if "compiled" in self.names:
            cf = self._compiled("fixed", gs)
            impls.append(Impl("compiled", lambda: cf(r, gates, w), "fixed", optional=True))
        if "loop" in self.names:
            uids = [f"prompt-{i // gs}" for i in range(n)]
            impls.append(Impl("loop", lambda: loop_fixed(r, gates, w, uids), "fixed", slow=True))
        impls += [
            Impl("moo_variance", lambda: moo_advantages(inp, nan_policy, "variance"), "variance"),
            Impl("variance", lambda: eager_variance(r, gates, w), "variance"),
        ]
        impls += [
            Impl("moo_scalarize", lambda: moo_advantages(inp, nan_policy, "scalarize"), "scalarize"),
            Impl("scalarize", lambda: eager_scalarize(r, w), "scalarize"),
        ]
        if "scalarize_compiled" in self.names and (main or not cuda):  # a compile per size costs seconds
            cs = self._compiled("scalarize", gs)
            impls.append(Impl("scalarize_compiled", lambda: cs(r, w), "scalarize", optional=True))

        def check(impl: Impl, out: Tensor) -> dict[str, Any]:
            ref = refs[impl.check]
            got = out.detach().cpu().double()
            if got.shape != ref.shape or not bool(torch.isfinite(got).all()):
                return {"ok": False, "why": "non-finite output or wrong shape"}
            err = float((got - ref).abs().max())
            return {"ok": err <= ATOL, "error": err, "why": f"max |diff| = {err:.3g} > {ATOL}"}

        feasible = float(gates.all(dim=1).float().mean())
        return Case(
            size=size,
            label=f"N={n} K={k} G={gs}",
            x=n,
            impls=[with_backend(i, self.backend) for i in impls],
            check=check,
            nbytes=moo_bytes(n, k, gs),
            summary={"feasible_fraction": feasible, "num_groups": n // gs},
        )

    def config(self) -> dict[str, Any]:
        return {
            "weighting": "fixed",
            "normalize": "zscore",
            "std": "unbiased",
            "eps": EPS,
            "weight_cycle": list(WEIGHT_CYCLE),
            "gates": f"[N, {CHECKS}] bool, each passing with p = {GATE_PASS}",
            "atol": ATOL,
            "reward_kinds": "0/1 correctness, uniform, normal, discrete quarters (cycled)",
        }

    def config_line(self, main: dict[str, Any] | None) -> str:
        feasible = f" (feasible {main['feasible_fraction']:.1%})" if main else ""
        return (
            f'weighting="fixed" (GDPO, the default), zscore, unbiased std, gates [N, {CHECKS}]{feasible}; variance '
            f"rows: the same with DVAO's weights; scalarize rows: weighted sum then group z-score, no gates; "
            f"atol {ATOL}"
        )
