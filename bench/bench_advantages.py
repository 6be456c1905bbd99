"""Benchmark of the multi-objective advantage step (moo_kernels.multi_objective_advantages).

What is compared, on the same random inputs in one run:

- moo_kernels: the public op, weighting="variance" (DVAO) with zscore per objective, unbiased std and
  feasibility gates [N, 2]. On CPU the default backend runs the C++ extension; on CUDA the Triton
  kernel, both with nan_policy="raise" (one host synchronisation to report a non-finite reward) and
  nan_policy="ignore" (fully asynchronous).
- eager: the same computation written as vectorised float32 PyTorch (groups are contiguous, so the
  group statistics come from a reshape to [N / G, G, K]); on CUDA also torch.compile of it.
- loop (CPU only): a per-sample Python loop in the style of verl's default GRPO outcome-advantage
  estimator (dict of per-group score lists, torch.mean / torch.std per group, a loop normalising
  each sample), extended to K objectives, variance weighting and gates.
- scalarize: the single-objective baseline as TRL and verl compute it (weighted sum of the
  objectives, then group z-score, vectorised), eager and on CUDA compiled; and moo_kernels with
  weighting="scalarize" for the like-for-like figure.

Correctness comes before timing: every implementation must agree with moo_kernels' float64
reference on the benchmarked inputs (advantages within 1e-4 absolute), or the benchmark names the
ones that disagree and exits non-zero.

Timing (see bench/_timing.py): CPU, the median of individually perf_counter-timed calls after a
warm-up. CUDA, the median of individually event-timed calls (L2 flushed and device idle before each,
so the figure includes the host-side cost of the Python call), plus back-to-back calls / count for
throughput. Achieved bandwidth of moo_kernels is reported against a measured device-to-device copy.

Usage: python bench/bench_advantages.py [--device cpu|cuda] [--json PATH] [--quick] [--plot PATH]
       [--no-compile] [--no-sweep] [--keep-going]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
try:
    import moo_kernels
except ImportError:  # run from a checkout without installing or PYTHONPATH
    sys.path.insert(0, str(ROOT))
    import moo_kernels
try:
    from bench import _timing as timing
except ImportError:  # run as a script without the repository root on sys.path
    import _timing as timing  # type: ignore[no-redef]

from moo_kernels.ops.advantages.reference import advantages_reference  # noqa: E402

Tensor = torch.Tensor

EPS = 1e-6  # the op's default eps, also verl's epsilon
ATOL = 1e-4  # float32 advantages against the float64 reference
GATE_PASS = 0.95  # probability that one feasibility check passes; two checks: ~90% of samples feasible
WEIGHT_CYCLE = (1.0, 0.5, 0.25, 0.75)

CPU_SIZE = {"n": 16384, "k": 4, "group_size": 16, "checks": 2}
CUDA_SIZE = {"n": 131072, "k": 8, "group_size": 16, "checks": 2}
CUDA_SWEEP_N = (4096, 32768, 131072, 1048576)
QUICK_N = 512
QUICK_SWEEP_N = (512, 2048)


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Inputs:
    rewards: Tensor  # [N, K] float32, contiguous
    gates: Tensor  # [N, M] bool feasibility checks
    weights: list[float]  # [K] objective weights, as a user passes them to the op
    weights_t: Tensor  # the same as a float32 tensor on the device, for the eager implementations
    group_size: int

    @property
    def n(self) -> int:
        return self.rewards.shape[0]

    @property
    def k(self) -> int:
        return self.rewards.shape[1]

    @property
    def m(self) -> int:
        return self.gates.shape[1]

    @property
    def num_groups(self) -> int:
        return self.n // self.group_size


def make_inputs(n: int, k: int, group_size: int, checks: int, device: str, seed: int = 0) -> Inputs:
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
    rewards = torch.stack(cols, dim=1).contiguous()
    gates = torch.rand(n, checks, generator=gen) < GATE_PASS
    weights = [WEIGHT_CYCLE[j % len(WEIGHT_CYCLE)] for j in range(k)]
    return Inputs(
        rewards=rewards.to(device),
        gates=gates.to(device),
        weights=weights,
        weights_t=torch.tensor(weights, dtype=torch.float32, device=device),
        group_size=group_size,
    )


def reference(inp: Inputs, weighting: str, with_gates: bool) -> Tensor:
    """float64 advantages of moo_kernels' reference implementation, on the CPU."""
    n = inp.n
    out = advantages_reference(
        inp.rewards.detach().cpu().double(),
        torch.arange(n) // inp.group_size,
        inp.num_groups,
        torch.tensor(inp.weights, dtype=torch.float64),
        gates=inp.gates.cpu() if with_gates else None,
        weighting=weighting,
        eps=EPS,
    )
    return out[0]


# --------------------------------------------------------------------------------------------
# Implementations


def moo_advantages(inp: Inputs, nan_policy: str = "raise", weighting: str = "variance") -> Tensor:
    """The public op, called as a trainer would (weights as a list: no host synchronisation)."""
    gates = inp.gates if weighting != "scalarize" else None
    out = moo_kernels.multi_objective_advantages(
        inp.rewards,
        group_size=inp.group_size,
        weights=inp.weights,
        weighting=weighting,
        gates=gates,
        eps=EPS,
        nan_policy=nan_policy,
    )
    return out.advantages


def make_eager_variance(group_size: int, eps: float = EPS) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """Vectorised float32 PyTorch of the variance-weighted (DVAO) advantage with feasibility gates.

    Same semantics as the reference for these options: statistics over the feasible samples of the
    group, unbiased std, an objective that does not vary in the group (max == min over its feasible
    samples) has std 0 and z-score 0, w~_gk = w_k sigma_gk / sum_l w_l sigma_gl (0 when the sum is
    0), infeasible samples get 0.
    """

    def eager_variance(rewards: Tensor, gates: Tensor, weights: Tensor) -> Tensor:
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
        ws = weights * std  # [B, 1, K]
        total = ws.sum(dim=2, keepdim=True)
        w_eff = ws / torch.where(total > 0, total, torch.ones_like(total))
        return (z * w_eff).sum(dim=2).reshape(n)

    return eager_variance


def make_eager_scalarize(group_size: int, eps: float = EPS) -> Callable[[Tensor, Tensor], Tensor]:
    """The TRL / verl baseline: weighted sum of the objectives, then the group z-score (vectorised)."""

    def eager_scalarize(rewards: Tensor, weights: Tensor) -> Tensor:
        s = (rewards * weights).sum(dim=1)
        g = s.view(-1, group_size)
        mean = g.mean(dim=1, keepdim=True)
        std = g.std(dim=1, keepdim=True)
        return ((g - mean) / (std + eps)).reshape(-1)

    return eager_scalarize


def loop_variance(rewards: Tensor, gates: Tensor, weights: Tensor, uids: list[str], eps: float = EPS) -> Tensor:
    """Per-sample Python loop in the style of verl's GRPO outcome-advantage estimator, for K objectives.

    Collect each feasible sample's reward row under its prompt uid, compute per-group mean / std /
    variance weights with torch ops, then normalise sample by sample.
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
        ws = weights * std
        total = ws.sum()
        w_eff = ws / total if total > 0 else zeros
        id2stats[uid] = (mean, std, w_eff, varies)
    scores = torch.zeros(n, dtype=rewards.dtype)
    for i in range(n):
        if feasible[i]:
            mean, std, w_eff, varies = id2stats[uids[i]]
            z = torch.where(varies, (rewards[i] - mean) / (std + eps), 0.0)
            scores[i] = (w_eff * z).sum()
    return scores


# --------------------------------------------------------------------------------------------
# Running and checking


@dataclass
class Impl:
    name: str
    fn: Callable[[], Tensor]  # returns the [N] advantages
    checks_against: str  # "variance" (with gates) or "scalarize" (no gates): which reference
    timer: dict[str, Any]  # keyword arguments of the timer
    optional: bool = False  # a failure to run (e.g. torch.compile) is reported, not fatal
    graph: bool = False  # CUDA: also time the device work alone, by CUDA-graph replay (no host sync in fn)


def moo_bytes(n: int, k: int, m: int, num_groups: int) -> int:
    """Bytes the op must move at least, counted for its achieved bandwidth.

    rewards read (N*K*4, float32) + gates read (N*M*1, bool)
    + outputs written: advantages (N*4) + sample_mask (N*1) + group_mask (G*1)
      + weights, mean, std (3*G*K*4).
    """
    return n * k * 4 + n * m + n * 4 + n + num_groups + 3 * num_groups * k * 4


def check_all(impls: list[Impl], refs: dict[str, Tensor]) -> tuple[dict[str, Any], list[str], list[Impl]]:
    """Run every implementation once and compare with the float64 reference.

    Returns ({name: max abs error or error text}, names that disagree or crashed, impls to time).
    """
    report: dict[str, Any] = {}
    bad: list[str] = []
    ok: list[Impl] = []
    for impl in impls:
        try:
            out = impl.fn()
            if out.device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - report and decide below
            report[impl.name] = f"error: {type(e).__name__}: {e}"
            print(f"  {impl.name}: FAILED to run: {type(e).__name__}: {e}", file=sys.stderr)
            if not impl.optional:
                bad.append(impl.name)
            continue
        ref = refs[impl.checks_against]
        got = out.detach().cpu().double()
        if got.shape != ref.shape or not bool(torch.isfinite(got).all()):
            err = float("inf")
        else:
            err = float((got - ref).abs().max())
        report[impl.name] = err if err < float("inf") else "non-finite output or wrong shape"
        if err <= ATOL:
            ok.append(impl)
        else:
            bad.append(impl.name)
            print(
                f"  {impl.name}: DISAGREES with the float64 reference: max |diff| = {err:.3g} > {ATOL}", file=sys.stderr
            )
    return report, bad, ok


def measure(impls: list[Impl], refs: dict[str, Tensor], device: str, keep_going: bool) -> dict[str, Any]:
    report, bad, ok = check_all(impls, refs)
    result: dict[str, Any] = {
        "max_abs_err": report,
        "disagree": bad,
        "correct": not bad,
        "timings": {},
        "device_timings": {},
    }
    if bad and not keep_going:
        return result
    for impl in ok:
        result["timings"][impl.name] = timing.time_on(device, impl.fn, impl.timer).as_dict()
    # Graph captures last: a capture that fails cannot disturb the figures above.
    for impl in ok:
        if device == "cuda" and impl.graph:
            try:
                graph_timer = {key: impl.timer[key] for key in ("reps", "batch")}
                result["device_timings"][impl.name] = timing.time_cuda_graph(impl.fn, **graph_timer).as_dict()
            except Exception as e:  # noqa: BLE001 - a figure we can do without
                result["device_timings"][impl.name] = f"error: {type(e).__name__}: {e}"
                print(f"  {impl.name}: CUDA graph timing failed: {type(e).__name__}: {e}", file=sys.stderr)
    return result


# --------------------------------------------------------------------------------------------
# CPU


def _cpu_moo_backend(inp: Inputs) -> tuple[str, str | None]:
    """The backend that runs the op on CPU: the current one, or the reference when _C is not built."""
    backend = moo_kernels.get_backend()
    try:
        moo_advantages(inp)
        return backend, None
    except ImportError as e:
        return "reference", f"{type(e).__name__}: {e}"


def run_cpu(quick: bool = False, keep_going: bool = False) -> dict[str, Any]:
    size = dict(CPU_SIZE, n=QUICK_N) if quick else dict(CPU_SIZE)
    inp = make_inputs(size["n"], size["k"], size["group_size"], size["checks"], "cpu")
    uids = [f"prompt-{i // inp.group_size}" for i in range(inp.n)]
    backend, fallback_reason = _cpu_moo_backend(inp)
    if fallback_reason is not None:
        print(
            f"WARNING: moo_kernels' C++ extension is not available ({fallback_reason}); timing the "
            "float64 reference backend instead: its figures are NOT those of the C++ kernel.",
            file=sys.stderr,
        )
    moo_label = "moo_kernels (C++)" if backend in ("auto", "cpp") else f"moo_kernels ({backend} backend)"

    fast = {"warmup": 2, "reps": 20, "budget_s": 1.0} if quick else {"warmup": 10, "reps": 300, "budget_s": 3.0}
    slow = {"warmup": 0, "reps": 2, "budget_s": 1.0} if quick else {"warmup": 1, "reps": 5, "budget_s": 8.0}
    eager_variance = make_eager_variance(inp.group_size)
    eager_scalarize = make_eager_scalarize(inp.group_size)
    names = {
        "moo": moo_label,
        "eager": "eager PyTorch (vectorised)",
        "loop": "per-sample loop (verl style)",
        "moo_scalarize": f"{moo_label}, scalarize",
        "scalarize": "scalarize baseline (TRL/verl, eager)",
    }
    impls = [
        Impl(names["moo"], lambda: moo_advantages(inp), "variance", fast),
        Impl(names["eager"], lambda: eager_variance(inp.rewards, inp.gates, inp.weights_t), "variance", fast),
        Impl(names["loop"], lambda: loop_variance(inp.rewards, inp.gates, inp.weights_t, uids), "variance", slow),
        Impl(names["moo_scalarize"], lambda: moo_advantages(inp, weighting="scalarize"), "scalarize", fast),
        Impl(names["scalarize"], lambda: eager_scalarize(inp.rewards, inp.weights_t), "scalarize", fast),
    ]
    refs = {"variance": reference(inp, "variance", True), "scalarize": reference(inp, "scalarize", False)}
    with moo_kernels.use_backend(backend):
        res = measure(impls, refs, "cpu", keep_going)
    t = res["timings"]
    res["speedup_of_moo"] = timing.speedups(t, names["moo"], [names["eager"], names["loop"], names["scalarize"]])
    res["speedup_of_moo_scalarize"] = timing.speedups(t, names["moo_scalarize"], [names["scalarize"]])
    res.update(
        device="cpu",
        moo_backend=backend,
        moo_fallback_reason=fallback_reason,
        names=names,
        config=_config(inp, "variance"),
        num_threads=torch.get_num_threads(),
    )
    return res


# --------------------------------------------------------------------------------------------
# CUDA


def _cuda_impls(
    inp: Inputs,
    compiled: dict[str, Callable] | None,
    names: dict[str, str],
    timer: dict[str, Any],
    with_scalarize: bool,
) -> list[Impl]:
    eager_variance = make_eager_variance(inp.group_size)
    impls = [
        Impl(names["moo_raise"], lambda: moo_advantages(inp, "raise"), "variance", timer),
        Impl(names["moo_ignore"], lambda: moo_advantages(inp, "ignore"), "variance", timer, graph=True),
        Impl(
            names["eager"], lambda: eager_variance(inp.rewards, inp.gates, inp.weights_t), "variance", timer, graph=True
        ),
    ]
    if compiled is not None:
        cv = compiled["variance"]
        impls.append(
            Impl(
                names["compiled"],
                lambda: cv(inp.rewards, inp.gates, inp.weights_t),
                "variance",
                timer,
                optional=True,
                graph=True,
            )
        )
    if with_scalarize:
        eager_scalarize = make_eager_scalarize(inp.group_size)
        impls += [
            Impl(
                names["moo_scalarize"],
                lambda: moo_advantages(inp, "ignore", weighting="scalarize"),
                "scalarize",
                timer,
                graph=True,
            ),
            Impl(
                names["scalarize"], lambda: eager_scalarize(inp.rewards, inp.weights_t), "scalarize", timer, graph=True
            ),
        ]
        if compiled is not None:
            cs = compiled["scalarize"]
            impls.append(
                Impl(
                    names["scalarize_compiled"],
                    lambda: cs(inp.rewards, inp.weights_t),
                    "scalarize",
                    timer,
                    optional=True,
                    graph=True,
                )
            )
    return impls


def run_cuda(
    quick: bool = False, keep_going: bool = False, use_compile: bool = True, sweep: bool = True
) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise RuntimeError("run_cuda needs a CUDA device")
    timing.allow_recompiles()
    size = dict(CUDA_SIZE, n=QUICK_N) if quick else dict(CUDA_SIZE)
    sweep_n = QUICK_SWEEP_N if quick else CUDA_SWEEP_N
    timer = {"warmup": 5, "reps": 20, "batch": 20} if quick else {"warmup": 20, "reps": 200, "batch": 200}
    names = {
        "moo_raise": "moo_kernels (nan_policy=raise)",
        "moo_ignore": "moo_kernels (nan_policy=ignore)",
        "eager": "eager PyTorch",
        "compiled": "torch.compile(eager)",
        "moo_scalarize": "moo_kernels scalarize (ignore)",
        "scalarize": "scalarize baseline (TRL/verl, eager)",
        "scalarize_compiled": "scalarize baseline, torch.compile",
    }
    gs = size["group_size"]
    compiled = None
    if use_compile:
        compiled = {
            "variance": torch.compile(make_eager_variance(gs), dynamic=False),
            "scalarize": torch.compile(make_eager_scalarize(gs), dynamic=False),
        }

    copy = timing.cuda_copy_bandwidth((64 << 20) if quick else (1 << 30))
    print(f"device-to-device copy: {copy['gbps']:.0f} GB/s (read + write)", file=sys.stderr)

    inp = make_inputs(size["n"], size["k"], gs, size["checks"], "cuda")
    refs = {"variance": reference(inp, "variance", True), "scalarize": reference(inp, "scalarize", False)}
    print(f"main size N={inp.n} K={inp.k}: checking and timing", file=sys.stderr)
    res = measure(_cuda_impls(inp, compiled, names, timer, True), refs, "cuda", keep_going)
    t = res["timings"]
    baselines = [names[x] for x in ("eager", "compiled", "scalarize", "scalarize_compiled")]
    res["speedup_of_moo_raise"] = timing.speedups(t, names["moo_raise"], baselines)
    res["speedup_of_moo_ignore"] = timing.speedups(t, names["moo_ignore"], baselines)
    res["speedup_of_moo_scalarize"] = timing.speedups(t, names["moo_scalarize"], baselines[2:])
    nbytes = moo_bytes(inp.n, inp.k, inp.m, inp.num_groups)
    res["bandwidth"] = _bandwidth(res, names, nbytes, copy["gbps"])
    res.update(device="cuda", names=names, config=_config(inp, "variance"), copy_bandwidth=copy)

    res["sweep"] = []
    if sweep and (res["correct"] or keep_going):
        for n in sweep_n:
            print(f"sweep N={n}: checking and timing", file=sys.stderr)
            s_inp = make_inputs(n, size["k"], gs, size["checks"], "cuda", seed=n)
            s_refs = {"variance": reference(s_inp, "variance", True)}
            point = measure(_cuda_impls(s_inp, compiled, names, timer, False), s_refs, "cuda", keep_going)
            st = point["timings"]
            point["n"] = n
            point["speedup_of_moo_raise"] = timing.speedups(st, names["moo_raise"], baselines[:2])
            point["speedup_of_moo_ignore"] = timing.speedups(st, names["moo_ignore"], baselines[:2])
            nbytes = moo_bytes(n, s_inp.k, s_inp.m, s_inp.num_groups)
            point["bandwidth"] = _bandwidth(point, names, nbytes, copy["gbps"])
            res["sweep"].append(point)
            if not point["correct"]:
                res["correct"] = False
                res["disagree"] += [f"{name} (sweep N={n})" for name in point["disagree"]]
                if not keep_going:
                    break
    return res


def _bandwidth(res: dict[str, Any], names: dict[str, str], nbytes: int, copy_gbps: float) -> dict[str, Any]:
    """Achieved GB/s of moo_kernels (moo_bytes / time) from each of its timings, and as a fraction of copy."""
    out: dict[str, Any] = {"bytes": nbytes, "copy_gbps": copy_gbps}
    figures = []
    for key in ("moo_raise", "moo_ignore"):
        tm = res["timings"].get(names[key])
        if tm:
            figures += [(f"{key}_latency", tm["median_us"]), (f"{key}_batch", tm["batch_us"])]
        dev = res["device_timings"].get(names[key])
        if isinstance(dev, dict):
            figures += [(f"{key}_device", dev["median_us"]), (f"{key}_device_batch", dev["batch_us"])]
    for label, us in figures:
        if not us:
            continue
        g = timing.gbps(nbytes, us)
        out[label] = {"us": us, "gbps": g, "fraction_of_copy": g / copy_gbps}
    return out


# --------------------------------------------------------------------------------------------
# Report


def _config(inp: Inputs, weighting: str) -> dict[str, Any]:
    feasible = inp.gates.all(dim=1).float().mean().item()
    return {
        "n": inp.n,
        "k": inp.k,
        "group_size": inp.group_size,
        "num_groups": inp.num_groups,
        "gates_shape": [inp.n, inp.m],
        "feasible_fraction": feasible,
        "weighting": weighting,
        "normalize": "zscore",
        "std": "unbiased",
        "eps": EPS,
        "weights": inp.weights,
        "atol": ATOL,
        "reward_kinds": "0/1 correctness, uniform, normal, discrete quarters (cycled)",
    }


def run(
    device: str, quick: bool = False, *, keep_going: bool = False, use_compile: bool = True, sweep: bool = True
) -> dict[str, Any]:
    """Run the benchmark on "cpu" or "cuda"; returns every figure as a JSON-serialisable dict.

    result["correct"] is False when an implementation disagreed with the reference (timing is then
    skipped unless keep_going).
    """
    if device == "cuda":
        body = run_cuda(quick, keep_going, use_compile, sweep)
    elif device == "cpu":
        body = run_cpu(quick, keep_going)
    else:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return {"meta": timing.run_meta("advantages", device, quick, ROOT), **body}


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))
        return "  ".join(padded)

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _err(x: Any) -> str:
    if x is None:
        return "-"
    return f"{x:.1e}" if isinstance(x, float) else ("error" if str(x).startswith("error") else "non-finite")


def _cuda_report(result: dict[str, Any]) -> list[str]:
    names = result["names"]
    t, dev, errs = result["timings"], result["device_timings"], result["max_abs_err"]
    header = [
        "implementation",
        "median us",
        "min us",
        "batch us/call",
        "device us",
        "vs moo raise",
        "vs moo ignore",
        "max |err|",
    ]
    rows = []
    for name in names.values():
        tm = t.get(name)
        d = dev.get(name)
        rows.append(
            [
                name,
                timing.fmt_us(tm and tm["median_us"]),
                timing.fmt_us(tm and tm["min_us"]),
                timing.fmt_us(tm and tm["batch_us"]),
                timing.fmt_us(d["median_us"]) if isinstance(d, dict) else "-",
                timing.fmt_ratio(result["speedup_of_moo_raise"].get(name)),
                timing.fmt_ratio(result["speedup_of_moo_ignore"].get(name)),
                _err(errs.get(name)),
            ]
        )
    out = [_table(header, rows)]
    sc = result["speedup_of_moo_scalarize"]
    if sc:
        out.append(
            f"{names['moo_scalarize']} vs scalarize baselines: "
            + ", ".join(f"{name} {timing.fmt_ratio(v)}" for name, v in sc.items())
        )
    out.append(
        "median/min: one call, L2 flushed, device idle before it (includes the host-side cost); batch: "
        "back-to-back calls / count; device: CUDA-graph replay of one call (device work only)"
    )
    bw = result["bandwidth"]
    out.append(
        f"copy bandwidth {bw['copy_gbps']:.0f} GB/s; moo bytes = {bw['bytes']:,} "
        "(rewards + gates read, all outputs written)"
    )
    for label, b in bw.items():
        if isinstance(b, dict):
            out.append(f"  {label:<24} {b['us']:10.1f} us {b['gbps']:7.0f} GB/s ({b['fraction_of_copy']:.1%} of copy)")
    if result.get("sweep"):
        header = [
            "N",
            "moo raise",
            "moo ignore",
            "eager",
            "compiled",
            "ign device",
            "eager/ign",
            "comp/ign",
            "ign dev GB/s",
            "% copy",
        ]
        rows = []
        for p in result["sweep"]:
            st, sd = p["timings"], p["device_timings"]
            sp = p["speedup_of_moo_ignore"]
            b = p["bandwidth"].get("moo_ignore_device")
            d = sd.get(names["moo_ignore"])
            rows.append(
                [
                    f"{p['n']:,}",
                    *(
                        timing.fmt_us(st[names[k]]["median_us"]) if names[k] in st else "-"
                        for k in ("moo_raise", "moo_ignore", "eager", "compiled")
                    ),
                    timing.fmt_us(d["median_us"]) if isinstance(d, dict) else "-",
                    timing.fmt_ratio(sp.get(names["eager"])),
                    timing.fmt_ratio(sp.get(names["compiled"])),
                    f"{b['gbps']:.0f}" if b else "-",
                    f"{b['fraction_of_copy']:.1%}" if b else "-",
                ]
            )
        out.append("size sweep (median us per call; ratios: baseline / moo ignore):")
        out.append(_table(header, rows))
    return out


def format_report(result: dict[str, Any]) -> str:
    meta = result["meta"]
    cfg = result["config"]
    out = [
        f"advantage step on {meta['device']} ({meta['device_name']}), torch {meta['torch']}, triton {meta['triton']}",
        f"N={cfg['n']} K={cfg['k']} group_size={cfg['group_size']} weighting={cfg['weighting']} "
        f"gates={cfg['gates_shape']} (feasible {cfg['feasible_fraction']:.1%}), commit {meta['git_commit']}",
    ]
    t = result["timings"]
    errs = result["max_abs_err"]
    if meta["device"] == "cpu":
        if result.get("moo_fallback_reason"):
            out.append(f"NOTE: moo_kernels ran on the {result['moo_backend']} backend (C++ extension not built)")
        names = result["names"]
        header = ["implementation", "median us", "min us", "moo speedup", "max |err|"]
        rows = []
        for name in names.values():
            tm = t.get(name)
            sp = result["speedup_of_moo"].get(name) or result["speedup_of_moo_scalarize"].get(name)
            rows.append(
                [
                    name,
                    timing.fmt_us(tm and tm["median_us"]),
                    timing.fmt_us(tm and tm["min_us"]),
                    f"{sp:.1f}x" if sp else "-",
                    _err(errs.get(name)),
                ]
            )
        out.append(f"threads: {result['num_threads']}")
        out.append(_table(header, rows))
        out.append(
            "moo speedup = time of the row / time of moo_kernels (variance rows) or of moo_kernels "
            "scalarize (scalarize row)"
        )
    else:
        out += _cuda_report(result)
    if not result["correct"]:
        out.append(f"DISAGREE WITH THE REFERENCE: {', '.join(result['disagree'])}")
    return "\n".join(out)


def plot_sweep(result: dict[str, Any], path: str) -> None:
    """Latency against N of the sweep (CUDA), log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["names"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("moo_raise", "moo_ignore", "eager", "compiled"):
        pts = [(p["n"], p["timings"][names[key]]["median_us"]) for p in result["sweep"] if names[key] in p["timings"]]
        if pts:
            ax.plot([n for n, _ in pts], [us for _, us in pts], marker="o", label=names[key])
    dev = [
        (p["n"], d["median_us"])
        for p in result["sweep"]
        if isinstance(d := p["device_timings"].get(names["moo_ignore"]), dict)
    ]
    if dev:
        ax.plot(
            [n for n, _ in dev],
            [us for _, us in dev],
            marker="s",
            linestyle="--",
            label=f"{names['moo_ignore']}, device time (CUDA graph)",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N (samples)")
    ax.set_ylabel("median time per call (us)")
    cfg = result["config"]
    ax.set_title(f"advantage step, K={cfg['k']}, G={cfg['group_size']}, {result['meta']['device_name']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (CI)")
    parser.add_argument("--plot", metavar="PATH", help="CUDA: save the size sweep as a PNG")
    parser.add_argument("--no-compile", action="store_true", help="CUDA: skip the torch.compile baselines")
    parser.add_argument("--no-sweep", action="store_true", help="CUDA: skip the size sweep")
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="time even when an implementation disagrees with the reference (still exits 1)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    result = run(
        args.device, args.quick, keep_going=args.keep_going, use_compile=not args.no_compile, sweep=not args.no_sweep
    )
    print(format_report(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot and result.get("sweep"):
        plot_sweep(result, args.plot)
        print(f"wrote {args.plot}")
    return 0 if result["correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
