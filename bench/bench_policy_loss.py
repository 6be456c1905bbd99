"""Benchmark of the token-level policy loss from log-probs (moo_kernels.policy_loss), forward + backward.

The computation, the same in every implementation: mode "clip" with clip-higher (ratio clipped to
[1 - 0.2, 1 + 0.28]), old_logp given, k3 KL to ref_logp with beta 0.04, token-mean over a bool mask,
advantages [B] broadcast over the tokens; float32 inputs; the loss and d loss / d logp (loss.backward()).

What is compared, on the same random inputs in one run:

- moo_kernels: the public op. On CPU the default backend runs the C++ kernel; on CUDA the Triton kernels.
- eager: the formula written plainly with torch ops (ratio, clamp, min, k3 KL, masked mean), then
  loss.backward(); on CUDA also torch.compile of that function (AOTAutograd compiles the backward).
- Liger-Kernel's triton_grpo_loss is not timed: it computes the loss from logits and completion ids
  (its log-probs come from a fused log-softmax), so it has no entry point for a loss from log-probs.
  Whether liger_kernel is importable is recorded.

Inputs are realistic, never zeros: token log-probs negative with a long tail, old_logp and ref_logp
close to logp, advantages of both signs, a bool mask from a random length per sequence (about 80% of
the tokens active, one sequence in six runs to the end).

Correctness comes before timing: each implementation's loss and gradient must agree with
moo_kernels' float64 reference (policy_loss_reference, gradient by autograd) on the benchmarked
inputs, or the benchmark names the ones that disagree and exits non-zero. The loss within 1e-5
relative (to the larger of |loss| and the mean |advantage| over the active tokens, the size of one
token's term); the gradient within 1e-5 of max |gradient| (its entries are of order 1 / active tokens).
At a token whose ratio sits on a clip bound (within 1e-5) float32 and float64 may take different,
equally valid sides of the kink: there the gradient may match either one-sided value.

Timing (see bench/_timing.py): CPU, the median of individually perf_counter-timed calls after a
warm-up, one implementation after the other (--interleave: one call of each per repetition, so that
load from elsewhere on a small shared machine falls on all of them alike; each call then also finds
the caches disturbed by the other implementation, which costs the fused kernel relatively more,
about 0.9 -> 1.5 ms at B=64, T=4096 on 2 cores). CUDA, the median of individually
event-timed calls (L2 flushed and device idle before each, so the figure includes the host-side
cost of the Python calls and autograd), back-to-back calls / count, and the device time alone by
CUDA-graph replay of one forward + backward. Effective bandwidth counts the minimal traffic,
B*T*(4+4+4+1+4) + B*4 bytes (logp, old_logp, ref_logp, mask and the advantages read, the gradient
written), against a measured device-to-device copy.

Usage: python bench/bench_policy_loss.py [--device cpu|cuda] [--json PATH] [--plot PATH] [--quick]
       [--no-compile] [--no-sweep] [--keep-going] [--allow-fallback] [--budget-s S] [--interleave]

Exit status: 0; 1 when an implementation disagrees with the reference; 3 on CPU when the C++ kernel
is missing and the reference backend was timed in its place (0 with --allow-fallback).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
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

from moo_kernels.ops.policy_loss.reference import (  # noqa: E402
    LOG_RATIO_MAX,
    policy_loss_grad_reference,
    policy_loss_reference,
)

Tensor = torch.Tensor

CLIP_LOW = 0.2
CLIP_HIGH = 0.28
BETA = 0.04
KL = "k3"

LOSS_RTOL = 1e-5  # of max(|loss|, mean |advantage| over the active tokens)
GRAD_RTOL = 1e-5  # of max |gradient|
BOUNDARY_EPS = 1e-5  # a ratio this close to a clip bound may take either side of the kink

OLD_NOISE = 0.15  # std of old_logp - logp: a few percent of the ratios leave the clip range
REF_NOISE = 0.2  # std of ref_logp - logp

CPU_SIZE = {"b": 64, "t": 4096}
CPU_SWEEP_T = (1024, 2048, 4096)
CUDA_SIZE = {"b": 512, "t": 8192}
CUDA_SWEEP_T = (1024, 4096, 8192, 16384)
QUICK_CPU_SIZE = {"b": 8, "t": 512}
QUICK_CPU_SWEEP_T = (128, 512)
QUICK_CUDA_SIZE = {"b": 32, "t": 1024}
QUICK_CUDA_SWEEP_T = (256, 1024)

CPU_SPEEDUP_TARGET = 3.0  # C++ against eager PyTorch, forward + backward
CUDA_GBPS_TARGET = 2000.0  # effective GB/s of moo_kernels over the minimal traffic

LIGER_NOTE = (
    "not timed: liger_kernel's triton_grpo_loss takes logits and completion ids (it computes the "
    "log-probs itself), so it cannot run the loss from log-probs measured here"
)


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Inputs:
    logp: Tensor  # [B, T] float32 leaf that requires grad
    old_logp: Tensor  # [B, T] float32
    ref_logp: Tensor  # [B, T] float32
    mask: Tensor  # [B, T] bool
    advantages: Tensor  # [B] float32
    lengths: list[int]  # active tokens of each sequence (a prefix of the row)

    @property
    def b(self) -> int:
        return self.logp.shape[0]

    @property
    def t(self) -> int:
        return self.logp.shape[1]

    @property
    def active(self) -> int:
        return sum(self.lengths)


def make_inputs(b: int, t: int, device: str, seed: int = 0) -> Inputs:
    """Random log-probs of sampled tokens, close old / reference log-probs, a length-based mask.

    logp = -exp(N(-1.5, 1.5)) (median about -0.22, a long tail of unlikely tokens), clamped to
    [-25, -1e-6]; old_logp and ref_logp add N(0, 0.15) and N(0, 0.2) noise and stay <= 0; advantages
    N(0, 1) per sequence; sequence lengths uniform in [0.5 T, 1.1 T] capped at T (about 79% active).
    """
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.exp(-1.5 + 1.5 * torch.randn(b, t, generator=gen))
    logp = logp.clamp(-25.0, -1e-6)
    old = (logp + OLD_NOISE * torch.randn(b, t, generator=gen)).clamp(max=0.0)
    ref = (logp + REF_NOISE * torch.randn(b, t, generator=gen)).clamp(max=0.0)
    adv = torch.randn(b, generator=gen)
    lengths = (t * (0.5 + 0.6 * torch.rand(b, generator=gen))).long().clamp(1, t)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return Inputs(
        logp=logp.to(device).requires_grad_(),
        old_logp=old.to(device),
        ref_logp=ref.to(device),
        mask=mask.to(device),
        advantages=adv.to(device),
        lengths=lengths.tolist(),
    )


def moo_bytes(b: int, t: int) -> int:
    """Minimal traffic of one forward + backward, for the effective bandwidth.

    Read logp, old_logp, ref_logp (4 bytes each), the mask (1 byte), advantages (B * 4); write the
    gradient (4 bytes): B*T*(4+4+4+1+4) + B*4.
    """
    return b * t * (4 + 4 + 4 + 1 + 4) + b * 4


# --------------------------------------------------------------------------------------------
# Reference


@dataclass
class Reference:
    loss: float
    loss_scale: float  # max(|loss|, mean |A| over the active tokens): what the loss error is relative to
    grad: Tensor  # float64 autograd gradient, on the CPU
    grad_alts: tuple[Tensor, Tensor]  # clip bounds moved out / in by BOUNDARY_EPS: the other side of a kink
    grad_scale: float  # max |grad|
    boundary_tokens: int  # tokens whose gradient differs between the two alternatives (ratio on a clip bound)
    metrics: dict[str, float]


def reference(inp: Inputs) -> Reference:
    """float64 loss and autograd gradient of moo_kernels' reference, computed on the CPU.

    The two alternatives (clip bounds moved outward and inward by BOUNDARY_EPS) give, at a token whose
    ratio sits on a bound, the gradient on either side of the kink; elsewhere they equal the gradient.
    They come from the closed-form gradient (policy_loss_grad_reference, which the tests check against
    autograd), a cheaper pass than autograd.
    """
    lp = inp.logp.detach().cpu().double()
    adv, mask = inp.advantages.cpu(), inp.mask.cpu()
    kw = dict(old_logp=inp.old_logp.cpu(), ref_logp=inp.ref_logp.cpu(), beta=BETA, kl=KL, mode="clip")
    x = lp.clone().requires_grad_()
    loss, metrics = policy_loss_reference(x, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    loss = loss.detach()
    grad_out = policy_loss_grad_reference(
        lp, adv, mask, clip_low=CLIP_LOW + BOUNDARY_EPS, clip_high=CLIP_HIGH + BOUNDARY_EPS, **kw
    )
    grad_in = policy_loss_grad_reference(
        lp, adv, mask, clip_low=CLIP_LOW - BOUNDARY_EPS, clip_high=CLIP_HIGH - BOUNDARY_EPS, **kw
    )
    m = mask.double()
    mean_abs_adv = float((adv.double().abs()[:, None] * m).sum() / m.sum().clamp(min=1))
    return Reference(
        loss=float(loss),
        loss_scale=max(abs(float(loss)), mean_abs_adv),
        grad=grad,
        grad_alts=(grad_out, grad_in),
        grad_scale=float(grad.abs().max()),
        boundary_tokens=int((grad_out != grad_in).sum()),
        metrics={k: float(v) for k, v in metrics.items()},
    )


# --------------------------------------------------------------------------------------------
# Implementations: each runs one forward + backward and returns (loss, d loss / d logp)


def moo_step(inp: Inputs) -> tuple[Tensor, Tensor]:
    """The public op, called as a trainer would, then loss.backward()."""
    inp.logp.grad = None
    loss, _ = moo_kernels.policy_loss(
        inp.logp,
        inp.advantages,
        inp.mask,
        old_logp=inp.old_logp,
        ref_logp=inp.ref_logp,
        beta=BETA,
        kl=KL,
        clip_low=CLIP_LOW,
        clip_high=CLIP_HIGH,
        mode="clip",
    )
    loss.backward()
    return loss, inp.logp.grad


def eager_policy_loss(logp: Tensor, old_logp: Tensor, ref_logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """The loss written plainly with torch ops, with the op's clamps of the log-ratios."""
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX))
    adv = advantages.unsqueeze(1)
    surrogate = torch.min(ratio * adv, ratio.clamp(1.0 - CLIP_LOW, 1.0 + CLIP_HIGH) * adv)
    log_ref_ratio = (ref_logp - logp).clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0
    per_token = -surrogate + BETA * kl
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def make_torch_step(fn: Callable[..., Tensor], inp: Inputs) -> Callable[[], tuple[Tensor, Tensor]]:
    """One forward of fn (eager_policy_loss or its torch.compile) and loss.backward()."""

    def step() -> tuple[Tensor, Tensor]:
        inp.logp.grad = None
        loss = fn(inp.logp, inp.old_logp, inp.ref_logp, inp.advantages, inp.mask)
        loss.backward()
        return loss, inp.logp.grad

    return step


def liger_status() -> dict[str, Any]:
    """Whether liger_kernel is importable (and its version); it is never timed here, see LIGER_NOTE."""
    found = importlib.util.find_spec("liger_kernel") is not None
    version = None
    if found:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version("liger-kernel")
        except Exception:  # noqa: BLE001 - a version we can do without
            version = None
    return {"importable": found, "version": version, "timed": False, "why": LIGER_NOTE}


# --------------------------------------------------------------------------------------------
# Running and checking


@dataclass
class Impl:
    name: str
    fn: Callable[[], tuple[Tensor, Tensor]]  # forward + backward: (loss, gradient)
    timer: dict[str, Any]  # keyword arguments of the timer
    optional: bool = False  # a failure to run (e.g. torch.compile) is reported, not fatal
    graph: bool = False  # CUDA: also time the device work alone, by CUDA-graph replay


def compare(loss: Tensor, grad: Tensor | None, ref: Reference) -> dict[str, Any]:
    """Errors of one (loss, gradient) against the reference; "ok" when within the tolerances."""
    if grad is None or tuple(grad.shape) != tuple(ref.grad.shape):
        return {"ok": False, "why": "no gradient or wrong shape"}
    got_loss = float(loss.detach())
    g = grad.detach().cpu().double()
    if not (torch.isfinite(torch.tensor(got_loss)) and bool(torch.isfinite(g).all())):
        return {"ok": False, "why": "non-finite loss or gradient"}
    loss_abs = abs(got_loss - ref.loss)
    diff = (g - ref.grad).abs()
    for alt in ref.grad_alts:
        diff = torch.minimum(diff, (g - alt).abs())
    grad_abs = float(diff.max())
    out = {
        "loss": got_loss,
        "loss_abs_err": loss_abs,
        "loss_rel_err": loss_abs / ref.loss_scale,
        "grad_max_abs_err": grad_abs,
        "grad_rel_err": grad_abs / ref.grad_scale if ref.grad_scale > 0 else grad_abs,
        "boundary_tokens": ref.boundary_tokens,
    }
    out["ok"] = out["loss_rel_err"] <= LOSS_RTOL and out["grad_rel_err"] <= GRAD_RTOL
    return out


def check_all(impls: list[Impl], ref: Reference) -> tuple[dict[str, Any], list[str], list[Impl]]:
    """Run every implementation once and compare with the float64 reference.

    Returns ({name: errors or error text}, names that disagree or crashed, impls to time).
    """
    report: dict[str, Any] = {}
    bad: list[str] = []
    ok: list[Impl] = []
    for impl in impls:
        try:
            loss, grad = impl.fn()
            if loss.device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - report and decide below
            report[impl.name] = f"error: {type(e).__name__}: {e}"
            print(f"  {impl.name}: FAILED to run: {type(e).__name__}: {e}", file=sys.stderr)
            if not impl.optional:
                bad.append(impl.name)
            continue
        errs = compare(loss, grad, ref)
        report[impl.name] = errs
        if errs["ok"]:
            ok.append(impl)
        else:
            bad.append(impl.name)
            detail = errs.get("why") or (
                f"loss rel err {errs['loss_rel_err']:.3g} (tol {LOSS_RTOL}), "
                f"grad err / max|grad| {errs['grad_rel_err']:.3g} (tol {GRAD_RTOL})"
            )
            print(f"  {impl.name}: DISAGREES with the float64 reference: {detail}", file=sys.stderr)
    return report, bad, ok


def measure(
    impls: list[Impl], ref: Reference, device: str, keep_going: bool, interleave: bool = False
) -> dict[str, Any]:
    report, bad, ok = check_all(impls, ref)
    result: dict[str, Any] = {
        "errors": report,
        "disagree": bad,
        "correct": not bad,
        "timings": {},
        "device_timings": {},
    }
    if bad and not keep_going:
        return result
    # With keep_going, implementations that disagree are timed too (but still reported).
    to_time = ok if not keep_going else [i for i in impls if not str(report.get(i.name, "")).startswith("error")]
    if device == "cpu" and interleave and to_time:
        # On a small shared machine, load from elsewhere then falls on every implementation alike.
        timer = dict(to_time[0].timer, budget_s=to_time[0].timer["budget_s"] * len(to_time))
        tms = timing.time_cpu_interleaved({impl.name: impl.fn for impl in to_time}, **timer)
        result["timings"] = {name: tm.as_dict() for name, tm in tms.items()}
    for impl in [] if device == "cpu" and interleave else to_time:
        try:
            result["timings"][impl.name] = timing.time_on(device, impl.fn, impl.timer).as_dict()
        except Exception as e:  # noqa: BLE001 - keep the other figures
            result["timings"][impl.name] = None
            print(f"  {impl.name}: timing failed: {type(e).__name__}: {e}", file=sys.stderr)
    # Graph captures last: a capture that fails cannot disturb the figures above.
    for impl in to_time:
        if device == "cuda" and impl.graph:
            try:
                graph_timer = {key: impl.timer[key] for key in ("reps", "batch")}
                result["device_timings"][impl.name] = timing.time_cuda_graph(impl.fn, **graph_timer).as_dict()
            except Exception as e:  # noqa: BLE001 - a figure we can do without
                result["device_timings"][impl.name] = f"error: {type(e).__name__}: {e}"
                print(f"  {impl.name}: CUDA graph timing failed: {type(e).__name__}: {e}", file=sys.stderr)
    result["timings"] = {k: v for k, v in result["timings"].items() if v is not None}
    return result


def bandwidth(res: dict[str, Any], nbytes: int, copy_gbps: float | None) -> dict[str, Any]:
    """Effective GB/s (moo_bytes / time) of every implementation from each of its timings."""
    out: dict[str, Any] = {"bytes": nbytes, "copy_gbps": copy_gbps}
    for name, tm in res["timings"].items():
        figures = [("latency", tm["median_us"]), ("batch", tm.get("batch_us"))]
        dev = res["device_timings"].get(name)
        if isinstance(dev, dict):
            figures += [("device", dev["median_us"]), ("device_batch", dev["batch_us"])]
        entry = {}
        for label, us in figures:
            if not us:
                continue
            g = timing.gbps(nbytes, us)
            entry[label] = {"us": us, "gbps": g, "fraction_of_copy": g / copy_gbps if copy_gbps else None}
        out[name] = entry
    return out


def _point_summary(inp: Inputs, ref: Reference) -> dict[str, Any]:
    return {
        "b": inp.b,
        "t": inp.t,
        "tokens": inp.b * inp.t,
        "active_tokens": inp.active,
        "reference_loss": ref.loss,
        "boundary_tokens": ref.boundary_tokens,
    }


def _budget_left(t0: float, budget_s: float | None) -> float:
    return float("inf") if budget_s is None else budget_s - (time.monotonic() - t0)


# --------------------------------------------------------------------------------------------
# CPU


def _cpu_moo_backend(inp: Inputs) -> tuple[str, str | None]:
    """The backend that runs the op on CPU: the current one, or the reference when the C++ kernel is missing."""
    backend = moo_kernels.get_backend()
    if backend == "reference":
        return backend, "the backend is forced to 'reference' (MOO_KERNELS_BACKEND or set_backend)"
    try:
        moo_step(inp)
    except ImportError as e:  # no moo_kernels._C, or no cpu.py
        return "reference", f"{type(e).__name__}: {e}"
    except AttributeError as e:  # an extension built before the policy loss was added to it
        if "policy_loss" in str(e):
            return "reference", f"{type(e).__name__}: {e}"
    except Exception:  # noqa: BLE001 - the kernel is there but fails: check_all reports it
        pass
    return backend, None


def _cpu_impls(inp: Inputs, names: dict[str, str], timer: dict[str, Any]) -> list[Impl]:
    return [
        Impl(names["moo"], lambda: moo_step(inp), timer),
        Impl(names["eager"], make_torch_step(eager_policy_loss, inp), timer),
    ]


def run_cpu(
    quick: bool = False,
    keep_going: bool = False,
    sweep: bool = True,
    budget_s: float | None = None,
    interleave: bool = False,
) -> dict[str, Any]:
    t0 = time.monotonic()
    size = QUICK_CPU_SIZE if quick else CPU_SIZE
    sweep_t = (QUICK_CPU_SWEEP_T if quick else CPU_SWEEP_T) if sweep else ()
    timer = {"warmup": 1, "reps": 10, "budget_s": 0.3} if quick else {"warmup": 5, "reps": 400, "budget_s": 4.0}
    sweep_timer = timer if quick else {"warmup": 3, "reps": 200, "budget_s": 2.0}

    inp = make_inputs(size["b"], size["t"], "cpu")
    backend, fallback_reason = _cpu_moo_backend(inp)
    if fallback_reason is not None:
        print(
            f"WARNING: moo_kernels' C++ policy-loss kernel is not available ({fallback_reason}); timing the "
            "float64 reference backend instead: its figures are NOT those of the C++ kernel.",
            file=sys.stderr,
        )
    moo_label = "moo_kernels (C++)" if backend in ("auto", "cpp") else f"moo_kernels ({backend} backend)"
    names = {"moo": moo_label, "eager": "eager PyTorch"}

    print(f"main size B={inp.b} T={inp.t}: checking and timing", file=sys.stderr)
    ref = reference(inp)
    with moo_kernels.use_backend(backend):
        res = measure(_cpu_impls(inp, names, timer), ref, "cpu", keep_going, interleave)
        t = res["timings"]
        res["speedup_of_moo"] = timing.speedups(t, names["moo"], [names["eager"]])
        res["bandwidth"] = bandwidth(res, moo_bytes(inp.b, inp.t), None)
        res.update(
            device="cpu",
            moo_backend=backend,
            moo_fallback_reason=fallback_reason,
            names=names,
            config=_config(inp, ref),
            num_threads=torch.get_num_threads(),
            interleaved=interleave,
        )
        sp = res["speedup_of_moo"].get(names["eager"])
        res["targets"] = {
            "cpu_speedup_vs_eager": {
                "target": CPU_SPEEDUP_TARGET,
                "value": sp,
                "met": bool(sp is not None and sp >= CPU_SPEEDUP_TARGET and fallback_reason is None),
            }
        }
        main_point = dict(_point_summary(inp, ref), timings=t, speedup_of_moo=res["speedup_of_moo"])
        make_impls = lambda s_inp: _cpu_impls(s_inp, names, sweep_timer)
        res["sweep"] = _sweep(
            sweep_t, size["b"], names, res, main_point, keep_going, t0, budget_s, make_impls, "cpu", None, interleave
        )
    return res


# --------------------------------------------------------------------------------------------
# CUDA


def _cuda_impls(
    inp: Inputs, compiled: Callable | None, names: dict[str, str], timer: dict[str, Any], with_compiled: bool = True
) -> list[Impl]:
    impls = [
        Impl(names["moo"], lambda: moo_step(inp), timer, graph=True),
        Impl(names["eager"], make_torch_step(eager_policy_loss, inp), timer, graph=True),
    ]
    if compiled is not None and with_compiled:
        impls.append(Impl(names["compiled"], make_torch_step(compiled, inp), timer, optional=True, graph=True))
    return impls


def run_cuda(
    quick: bool = False,
    keep_going: bool = False,
    use_compile: bool = True,
    sweep: bool = True,
    budget_s: float | None = None,
) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise RuntimeError("run_cuda needs a CUDA device")
    t0 = time.monotonic()
    timing.allow_recompiles()
    size = QUICK_CUDA_SIZE if quick else CUDA_SIZE
    sweep_t = (QUICK_CUDA_SWEEP_T if quick else CUDA_SWEEP_T) if sweep else ()
    timer = {"warmup": 3, "reps": 10, "batch": 10} if quick else {"warmup": 10, "reps": 100, "batch": 100}
    sweep_timer = timer if quick else {"warmup": 5, "reps": 50, "batch": 50}
    backend = moo_kernels.get_backend()
    moo_label = "moo_kernels (Triton)" if backend != "reference" else "moo_kernels (reference backend)"
    names = {"moo": moo_label, "eager": "eager PyTorch", "compiled": "torch.compile(eager)"}
    compiled = torch.compile(eager_policy_loss, dynamic=False) if use_compile else None

    copy = timing.cuda_copy_bandwidth((64 << 20) if quick else (1 << 30))
    print(f"device-to-device copy: {copy['gbps']:.0f} GB/s (read + write)", file=sys.stderr)

    inp = make_inputs(size["b"], size["t"], "cuda")
    print(f"main size B={inp.b} T={inp.t}: checking and timing", file=sys.stderr)
    ref = reference(inp)
    res = measure(_cuda_impls(inp, compiled, names, timer), ref, "cuda", keep_going)
    t, dt = res["timings"], res["device_timings"]
    baselines = [names["eager"], names["compiled"]]
    res["speedup_of_moo"] = timing.speedups(t, names["moo"], baselines)
    res["speedup_of_moo_device"] = timing.speedups(
        {k: v for k, v in dt.items() if isinstance(v, dict)}, names["moo"], baselines
    )
    res["bandwidth"] = bandwidth(res, moo_bytes(inp.b, inp.t), copy["gbps"])
    res.update(
        device="cuda",
        names=names,
        config=_config(inp, ref),
        copy_bandwidth=copy,
        liger=liger_status(),
    )
    moo_bw = res["bandwidth"].get(names["moo"], {})
    best = max((f["gbps"] for k, f in moo_bw.items() if k.startswith("device")), default=None)
    res["targets"] = {
        "cuda_effective_gbps": {
            "target": CUDA_GBPS_TARGET,
            "value": best,
            "figure": "best of the device-time figures (CUDA graph: one replay, back-to-back replays)",
            "met": bool(best is not None and best >= CUDA_GBPS_TARGET),
        }
    }
    main_point = dict(
        _point_summary(inp, ref),
        timings=t,
        device_timings=dt,
        speedup_of_moo=res["speedup_of_moo"],
        speedup_of_moo_device=res["speedup_of_moo_device"],
        bandwidth=res["bandwidth"],
    )
    del inp, ref
    torch.cuda.empty_cache()
    make_impls = lambda s_inp: _cuda_impls(s_inp, compiled, names, sweep_timer)
    res["sweep"] = _sweep(
        sweep_t, size["b"], names, res, main_point, keep_going, t0, budget_s, make_impls, "cuda", copy["gbps"]
    )
    return res


def _sweep(
    sweep_t: tuple[int, ...],
    b: int,
    names: dict[str, str],
    res: dict[str, Any],
    main_point: dict[str, Any],
    keep_going: bool,
    t0: float,
    budget_s: float | None,
    make_impls: Callable[[Inputs], list[Impl]],
    device: str,
    copy_gbps: float | None,
    interleave: bool = False,
) -> list[dict[str, Any]]:
    """Times over T at fixed B; the main size is reused, not timed again.

    The largest sizes go first: when budget_s is spent, the small sizes are the ones skipped.
    """
    points: list[dict[str, Any]] = []
    if not (res["correct"] or keep_going):
        return points
    res["sweep_skipped"] = []
    for t in sorted(sweep_t, reverse=True):
        if t == main_point["t"] and b == main_point["b"]:
            points.append(dict(main_point, main=True))
            continue
        left = _budget_left(t0, budget_s)
        if left <= 0:
            print(f"sweep T={t}: skipped, the time budget of {budget_s} s is spent", file=sys.stderr)
            res["sweep_skipped"].append(t)
            continue
        print(f"sweep B={b} T={t}: checking and timing", file=sys.stderr)
        try:
            s_inp = make_inputs(b, t, device, seed=t)
            s_ref = reference(s_inp)
            point = measure(make_impls(s_inp), s_ref, device, keep_going, interleave)
            point.update(_point_summary(s_inp, s_ref))
            st = point["timings"]
            others = [n for k, n in names.items() if k != "moo"]
            point["speedup_of_moo"] = timing.speedups(st, names["moo"], others)
            if device == "cuda":
                sd = {k: v for k, v in point["device_timings"].items() if isinstance(v, dict)}
                point["speedup_of_moo_device"] = timing.speedups(sd, names["moo"], others)
            point["bandwidth"] = bandwidth(point, moo_bytes(b, t), copy_gbps)
        except Exception as e:  # noqa: BLE001 - keep the figures gathered so far
            print(f"sweep T={t}: failed: {type(e).__name__}: {e}", file=sys.stderr)
            point = {"b": b, "t": t, "error": f"{type(e).__name__}: {e}", "correct": False, "disagree": []}
            res["correct"] = False
            res["disagree"].append(f"sweep T={t}: error")
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        points.append(point)
        if not point["correct"] and "error" not in point:
            res["correct"] = False
            res["disagree"] += [f"{name} (sweep T={t})" for name in point["disagree"]]
            if not keep_going:
                break
    points.sort(key=lambda p: p["t"])
    return points


# --------------------------------------------------------------------------------------------
# Report


def _config(inp: Inputs, ref: Reference) -> dict[str, Any]:
    return {
        "b": inp.b,
        "t": inp.t,
        "tokens": inp.b * inp.t,
        "active_tokens": inp.active,
        "active_fraction": inp.active / (inp.b * inp.t),
        "full_length_sequences": sum(n == inp.t for n in inp.lengths),
        "dtype": "float32",
        "mode": "clip",
        "clip_low": CLIP_LOW,
        "clip_high": CLIP_HIGH,
        "kl": KL,
        "beta": BETA,
        "agg": "token-mean",
        "advantages_shape": [inp.b],
        "mask": "bool, a random length per sequence (uniform in [0.5 T, 1.1 T], capped at T)",
        "inputs": (
            f"logp = -exp(N(-1.5, 1.5)) clamped to [-25, -1e-6]; old_logp = logp + N(0, {OLD_NOISE}), "
            f"ref_logp = logp + N(0, {REF_NOISE}), both <= 0; advantages N(0, 1)"
        ),
        "moo_bytes": moo_bytes(inp.b, inp.t),
        "loss_rtol": LOSS_RTOL,
        "grad_rtol": GRAD_RTOL,
        "boundary_eps": BOUNDARY_EPS,
        "boundary_tokens": ref.boundary_tokens,
        "reference_loss": ref.loss,
        "reference_metrics": ref.metrics,
    }


def run(
    device: str,
    quick: bool = False,
    *,
    keep_going: bool = False,
    use_compile: bool = True,
    sweep: bool = True,
    budget_s: float | None = None,
    interleave: bool = False,
) -> dict[str, Any]:
    """Run the benchmark on "cpu" or "cuda"; returns every figure as a JSON-serialisable dict.

    result["correct"] is False when an implementation disagreed with the reference (timing is then
    skipped unless keep_going). budget_s: once that many seconds have passed, the remaining sizes of
    the sweep are skipped (listed in result["sweep_skipped"]). interleave (CPU): time the
    implementations' calls interleaved, one of each per repetition, instead of one after the other.
    """
    load_before = _load_average()
    if device == "cuda":
        body = run_cuda(quick, keep_going, use_compile, sweep, budget_s)
    elif device == "cpu":
        body = run_cpu(quick, keep_going, sweep, budget_s, interleave)
    else:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    meta = timing.run_meta("policy_loss", device, quick, ROOT)
    # Other work on the machine distorts CPU figures (on 2 cores, markedly): keep the evidence.
    meta["load_average_1min"] = {"before": load_before, "after": _load_average(), "cpus": os.cpu_count()}
    return {"meta": meta, **body}


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _err(e: Any, key: str) -> str:
    if e is None:
        return "-"
    if isinstance(e, str):
        return "error"
    if key not in e:
        return e.get("why", "-")
    return f"{e[key]:.1e}"


def _timing_rows(result: dict[str, Any], cuda: bool) -> tuple[list[str], list[list[str]]]:
    names = result["names"]
    t, dev, errs = result["timings"], result["device_timings"], result["errors"]
    bw = result["bandwidth"]
    header = ["implementation", "median us", "min us"]
    if cuda:
        header += ["batch us/call", "device us", "vs moo", "vs moo (device)", "device GB/s"]
    else:
        header += ["moo speedup", "GB/s"]
    header += ["loss rel err", "grad err/max"]
    rows = []
    for name in names.values():
        tm = t.get(name)
        row = [name, timing.fmt_us(tm and tm["median_us"]), timing.fmt_us(tm and tm["min_us"])]
        b = bw.get(name, {})
        if cuda:
            d = dev.get(name)
            g = b.get("device") or b.get("latency")
            row += [
                timing.fmt_us(tm and tm["batch_us"]),
                timing.fmt_us(d["median_us"]) if isinstance(d, dict) else "-",
                timing.fmt_ratio(result["speedup_of_moo"].get(name)),
                timing.fmt_ratio(result["speedup_of_moo_device"].get(name)),
                f"{g['gbps']:.0f}" if g else "-",
            ]
        else:
            sp = result["speedup_of_moo"].get(name)
            g = b.get("latency")
            row += [f"{sp:.2f}x" if sp else "-", f"{g['gbps']:.1f}" if g else "-"]
        row += [_err(errs.get(name), "loss_rel_err"), _err(errs.get(name), "grad_rel_err")]
        rows.append(row)
    return header, rows


def _sweep_table(result: dict[str, Any], cuda: bool) -> str:
    names = result["names"]
    keys = [k for k in ("moo", "eager", "compiled") if k in names]
    header = ["B x T"] + [f"{names[k]} us" for k in keys]
    if cuda:
        header += ["moo device us", "moo device GB/s", "% copy"]
    header += [f"{names[k]} / moo" for k in keys if k != "moo"]
    rows = []
    for p in result["sweep"]:
        row = [f"{p['b']} x {p['t']}" + (" (main)" if p.get("main") else "")]
        st = p.get("timings", {})
        row += [timing.fmt_us(st[names[k]]["median_us"]) if names[k] in st else "-" for k in keys]
        if cuda:
            d = p.get("device_timings", {}).get(names["moo"])
            g = p.get("bandwidth", {}).get(names["moo"], {}).get("device")
            row += [
                timing.fmt_us(d["median_us"]) if isinstance(d, dict) else "-",
                f"{g['gbps']:.0f}" if g else "-",
                f"{g['fraction_of_copy']:.1%}" if g and g["fraction_of_copy"] else "-",
            ]
        sp = p.get("speedup_of_moo", {})
        row += [timing.fmt_ratio(sp.get(names[k])) for k in keys if k != "moo"]
        rows.append(row)
    return timing.format_table(header, rows)


def format_report(result: dict[str, Any]) -> str:
    meta, cfg = result["meta"], result["config"]
    cuda = meta["device"] == "cuda"
    out = [
        f"policy loss (fwd + bwd) on {meta['device']} ({meta['device_name']}), torch {meta['torch']}, "
        f"triton {meta['triton']}, commit {meta['git_commit']}",
        f"B={cfg['b']} T={cfg['t']} ({cfg['tokens']:,} tokens, {cfg['active_fraction']:.1%} active), mode clip "
        f"[{1 - CLIP_LOW:g}, {1 + CLIP_HIGH:g}], k3 KL beta {BETA}, token-mean, float32; "
        f"{cfg['boundary_tokens']} tokens on a clip bound",
    ]
    if not cuda:
        if result.get("moo_fallback_reason"):
            out.append(
                f"NOTE: moo_kernels ran on the {result['moo_backend']} backend ({result['moo_fallback_reason']}): "
                "these are not the C++ kernel's figures"
            )
        load = meta.get("load_average_1min", {})
        out.append(
            f"threads: {result['num_threads']}; {'interleaved' if result.get('interleaved') else 'sequential'} "
            f"timing; load average (1 min) {_num(load.get('before'))} before, "
            f"{_num(load.get('after'))} after, on {load.get('cpus')} CPUs"
        )
    header, rows = _timing_rows(result, cuda)
    out.append(timing.format_table(header, rows))
    if cuda:
        out.append(
            "median/min: one fwd+bwd, L2 flushed, device idle before it (includes the host-side cost); batch: "
            "back-to-back calls / count; device: CUDA-graph replay of one fwd+bwd (device work only)"
        )
        bw = result["bandwidth"]
        out.append(
            f"copy bandwidth {bw['copy_gbps']:.0f} GB/s; minimal bytes = {bw['bytes']:,} "
            "(logp, old_logp, ref_logp, mask, advantages read; gradient written)"
        )
        for label, b in bw.get(result["names"]["moo"], {}).items():
            out.append(
                f"  moo {label:<14} {b['us']:10.1f} us {b['gbps']:7.0f} GB/s ({b['fraction_of_copy']:.1%} of copy)"
            )
        out.append(f"Liger-Kernel: {'importable' if result['liger']['importable'] else 'not installed'}, {LIGER_NOTE}")
    else:
        out.append("moo speedup = time of the row / time of moo_kernels; GB/s: minimal bytes / median time")
    for name, tg in result.get("targets", {}).items():
        v = tg["value"]
        shown = "-" if v is None else f"{v:.2f}"
        out.append(f"target {name}: {shown} against {tg['target']:g}: {'met' if tg['met'] else 'NOT met'}")
    if result.get("sweep"):
        out.append("size sweep (median us per fwd+bwd; ratios: baseline / moo):")
        out.append(_sweep_table(result, cuda))
    if result.get("sweep_skipped"):
        out.append(f"sweep sizes skipped (time budget spent): T = {result['sweep_skipped']}")
    if not result["correct"]:
        out.append(f"DISAGREE WITH THE REFERENCE: {', '.join(result['disagree'])}")
    return "\n".join(out)


def plot_sweep(result: dict[str, Any], path: str) -> None:
    """Time per fwd+bwd against T (left); CUDA: moo's effective bandwidth, CPU: moo's speedup (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["names"]
    cuda = result["meta"]["device"] == "cuda"
    pts = [p for p in result["sweep"] if "timings" in p]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("moo", "eager", "compiled"):
        if key not in names:
            continue
        xy = [(p["t"], p["timings"][names[key]]["median_us"]) for p in pts if names[key] in p["timings"]]
        if xy:
            (line,) = ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=names[key])
            dev = [
                (p["t"], d["median_us"])
                for p in pts
                if isinstance(d := p.get("device_timings", {}).get(names[key]), dict)
            ]
            if dev:
                ax.plot(
                    [x for x, _ in dev],
                    [y for _, y in dev],
                    marker="s",
                    linestyle="--",
                    color=line.get_color(),
                    label=f"{names[key]}, device time (CUDA graph)",
                )
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel(f"T (tokens per sequence), B = {result['config']['b']}")
    ax.set_ylabel("median time per fwd+bwd (us)")
    ax.set_title(f"policy loss fwd+bwd, {result['meta']['device_name']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)

    if cuda:
        for label, style in (("device", "-"), ("latency", ":")):
            xy = [(p["t"], b["gbps"]) for p in pts if (b := p.get("bandwidth", {}).get(names["moo"], {}).get(label))]
            if xy:
                ax2.plot([x for x, _ in xy], [y for _, y in xy], marker="o", linestyle=style, label=f"moo, {label}")
        ax2.axhline(result["copy_bandwidth"]["gbps"], color="gray", linestyle="--", label="device copy")
        ax2.axhline(CUDA_GBPS_TARGET, color="red", linestyle=":", label="target")
        ax2.set_ylabel("effective GB/s (minimal bytes / time)")
    else:
        for key in ("eager",):
            xy = [(p["t"], s) for p in pts if (s := p.get("speedup_of_moo", {}).get(names[key]))]
            if xy:
                ax2.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=f"{names[key]} / moo")
        ax2.axhline(CPU_SPEEDUP_TARGET, color="red", linestyle=":", label="target")
        ax2.set_ylabel("speedup of moo_kernels")
        ax2.set_ylim(bottom=0)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("T (tokens per sequence)")
    ax2.grid(True, which="both", alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (CI)")
    parser.add_argument("--plot", metavar="PATH", help="save the size sweep as a PNG")
    parser.add_argument("--no-compile", action="store_true", help="CUDA: skip the torch.compile baseline")
    parser.add_argument("--no-sweep", action="store_true", help="skip the size sweep")
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="time even when an implementation disagrees with the reference (still exits 1)",
    )
    parser.add_argument(
        "--allow-fallback",
        action="store_true",
        help="CPU: exit 0 when the C++ kernel is missing and the reference backend was timed instead",
    )
    parser.add_argument(
        "--budget-s", type=float, metavar="S", help="skip the remaining sweep sizes once S seconds have passed"
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="CPU: interleave the implementations' timed calls (fairer on a busy shared machine; each call then "
        "runs with caches disturbed by the other implementation)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    result = run(
        args.device,
        args.quick,
        keep_going=args.keep_going,
        use_compile=not args.no_compile,
        sweep=not args.no_sweep,
        budget_s=args.budget_s,
        interleave=args.interleave,
    )
    print(format_report(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot and result.get("sweep"):
        plot_sweep(result, args.plot)
        print(f"wrote {args.plot}")
    if not result["correct"]:
        return 1
    if result.get("moo_fallback_reason") and not args.allow_fallback:
        print(
            "FAILED: the C++ policy-loss kernel is missing (build it: python setup.py build_ext --inplace); "
            "the figures above are the reference backend's",
            file=sys.stderr,
        )
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
