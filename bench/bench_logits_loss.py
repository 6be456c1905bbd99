"""Benchmark of the GRPO token loss straight from logits (moo_kernels.policy_loss_from_logits), forward + backward.

The computation, the same in every implementation: log-probs of the sampled tokens from
log_softmax(logits / temperature) with temperature 1.0, then mode "clip" with clip-higher (ratio clipped
to [1 - 0.2, 1 + 0.28]), old_logp given, k3 KL to ref_logp with beta 0.04, token-mean over a bool mask,
advantages [B] broadcast over the tokens; the loss and d loss / d logits (loss.backward()). Logits are
bfloat16 on CUDA, float32 on the CPU; the math is float32 everywhere.

What is compared, on the same random inputs in one run:

- moo_kernels: the public op, and the same with inplace_backward=True (the gradient overwrites the logits).
- eager: the way TRL's GRPOTrainer computes it, written here independently: per sequence
  log_softmax(logits.float() / temperature) and a gather of the sampled tokens (the row loop keeps one
  sequence's float32 copy alive at a time), then the clipped surrogate with the k3 KL and a masked
  token mean; also torch.compile of that function (--no-compile skips it: compiling is slow on CPU).
- Liger-Kernel 0.8.5's triton_grpo_loss, when liger_kernel is importable, on CUDA only (its kernels are
  Triton GPU kernels), in place (its default) and not. Its options are mapped to compute the same loss
  (see LIGER_MAPPING, recorded in the JSON): it takes logits [B, T+1, V] and drops the last position
  (the next-token logits of a causal LM), so it gets its own buffer whose first T positions are the
  benchmarked logits, and its gradient [:, :T] is compared.

Inputs are realistic, never zeros: logits N(0, 2^2) with the sampled token's logit raised to
log V + 2 + N(2, 2^2) (the sampled token usually likely, median log-prob about -0.13, a long tail),
old_logp and ref_logp close to the float64 log-prob, advantages of both signs, a bool mask from a random
length per sequence (about 80% of the tokens active).

Correctness comes before timing: each implementation's loss and logits gradient must agree with
moo_kernels' float64 oracle on the benchmarked inputs, or the benchmark names the ones that disagree
and exits non-zero. The oracle is policy_loss_from_logits_reference, computed from its own building
blocks (token_logprobs_reference, policy_loss_reference, policy_loss_grad_reference,
token_logprobs_grad_reference) over chunks of rows on the benchmark's device, so that the float64
[B, T, V] gradient (20 GB at (4, 4096, 151936)) is never held whole: every row of every gradient is
compared. Tolerances per logits dtype (TOLERANCE): the loss relative to the larger of |loss| and the
mean |advantage|, the gradient's max abs error relative to max |gradient| (bfloat16 gradients carry a
rounding of 2^-8 of each entry). At a token whose ratio sits on a clip bound (within 1e-5) float32 and
float64 may take different, equally valid sides of the kink: there the gradient may match either side.
Each implementation's max abs and RMS gradient error is recorded (the bar: moo's gradient no less
accurate than Liger's).

Timing (see bench/_timing.py): CPU, the median of individually perf_counter-timed calls after a
warm-up. CUDA, the median of individually event-timed calls (L2 flushed and device idle before each, so
the figure includes the host-side cost), back-to-back calls / count, and the device time alone by
CUDA-graph replay of one forward + backward. The in-place implementations overwrite their own copy of
the logits with the gradient: they are checked on fresh logits and then timed on the overwritten
buffer (the kernels' work does not depend on the values). Peak memory (CUDA): the rise of
torch.cuda.max_memory_allocated over what was allocated before one forward + backward, the gradient
included. Effective bandwidth counts the minimal traffic, the logits read once and the gradient written
once, 2 * B*T*V * element size (the [B, T] inputs, under 0.01%, are left out), against a measured
device-to-device copy.

Usage: python bench/bench_logits_loss.py [--device cpu|cuda] [--json PATH] [--plot PATH] [--quick]
       [--no-compile] [--no-sweep] [--keep-going] [--allow-fallback] [--budget-s S]

Exit status: 0; 1 when an implementation disagrees with the reference or moo_kernels has no
policy_loss_from_logits yet; 3 on CPU when the C++ kernel is missing and the reference backend was
timed in its place (0 with --allow-fallback).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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

from moo_kernels.ops.logits.reference import (  # noqa: E402
    token_logprobs_grad_reference,
    token_logprobs_reference,
)
from moo_kernels.ops.policy_loss.reference import (  # noqa: E402
    policy_loss_grad_reference,
    policy_loss_reference,
)

Tensor = torch.Tensor

CLIP_LOW = 0.2
CLIP_HIGH = 0.28
BETA = 0.04
KL = "k3"
TEMPERATURE = 1.0

# Per logits dtype: the loss error relative to max(|loss|, mean |A|), the gradient's max abs error
# relative to max |gradient|.
TOLERANCE = {
    torch.float32: {"loss": 1e-5, "grad": 1e-5},
    torch.bfloat16: {"loss": 1e-5, "grad": 1e-2},
}
BOUNDARY_EPS = 1e-5  # a ratio this close to a clip bound may take either side of the kink
GRAD_ACCURACY_SLACK = 0.01  # moo's max abs gradient error may exceed Liger's by 1% (one bf16 rounding flip)

LOGIT_STD = 2.0  # logits N(0, LOGIT_STD^2)
PICK_MEAN, PICK_STD = 2.0, 2.0  # the sampled token's logit: log V + LOGIT_STD^2 / 2 + N(PICK_MEAN, PICK_STD^2)
OLD_NOISE = 0.15  # std of old_logp - logp: a few percent of the ratios leave the clip range
REF_NOISE = 0.2  # std of ref_logp - logp
REF_CHUNK_BYTES = 1 << 30  # float64 working set of one chunk of rows of the reference gradient (x4 arrays)

# (B, T, V); the first is the main size, the others form the sweep.
CPU_SHAPES = ((2, 128, 4096), (4, 128, 1024), (1, 64, 16384))
QUICK_CPU_SHAPES = ((2, 16, 512), (1, 8, 1024))
CUDA_SHAPES = ((4, 4096, 151936), (8, 2048, 32000))
QUICK_CUDA_SHAPES = ((2, 512, 32000), (1, 256, 151936))
CPU_DTYPE = torch.float32
CUDA_DTYPE = torch.bfloat16

CUDA_SPEEDUP_VS_LIGER_TARGET = 1.0  # moo's device time against Liger's, best variant of each, main size

LIGER_VERSION = "0.8.5"
# How triton_grpo_loss (liger_kernel/transformers/grpo_loss.py, Liger-Kernel 0.8.5) is called to compute
# the same loss; recorded in the results JSON.
LIGER_MAPPING = {
    "entry_point": "liger_kernel.transformers.grpo_loss.triton_grpo_loss",
    "source_read": "liger_kernel 0.8.5 wheel: liger_kernel/transformers/grpo_loss.py, liger_kernel/ops/grpo_loss.py",
    "logits": "[B, T+1, V] contiguous, first T positions = the benchmarked logits, the last random (Liger drops "
    "it and zeroes its gradient); its gradient [:, :T] is compared and credited with the same bytes",
    "old_logp": "old_logp (B, T) float32",
    "ref_logp": "ref_logp (B, T) float32",
    "completion_ids": "tokens (B, T) int64",
    "advantages": "advantages (B,) float32",
    "completion_mask": "mask (B, T) as int32 (as in Liger's tests), converted once, outside the timing",
    "temperature": TEMPERATURE,  # Liger's default is 0.9: given explicitly
    "beta": BETA,  # k3: exp(ref - logp) - (ref - logp) - 1, the only estimator Liger has
    "eps_low": CLIP_LOW,
    "eps_high": CLIP_HIGH,  # Liger's default is 0.4: given explicitly
    "loss_type": "bnpo",  # sum(l * m) / clamp(sum(m), 1): token-mean over the local batch
    "loss_type_note": "'dapo' (the default) divides by the mask sum all-reduced over ranks / world size (or "
    "num_items_in_batch): the same number in one process; 'grpo' is a per-sequence mean (seq-mean-token-mean)",
    "importance_sampling_level": "token",
    "reduce": True,  # the scalar loss (the default False returns per-token losses)
    "inplace": "True (its default: the gradient overwrites the logits) and False, two rows",
    "delta": None,
    "use_bias_correction_kl": False,
    "differences": "no clamp of the log-ratio to +-20 before exp (moo clamps; none of these inputs reaches it); "
    "on a clip bound the gradient takes the unclipped side (loss2 >= loss1)",
}


# --------------------------------------------------------------------------------------------
# Inputs


@dataclass
class Inputs:
    logits: Tensor  # [B, T, V] leaf that requires grad (pristine: never overwritten)
    tokens: Tensor  # [B, T] int64
    old_logp: Tensor  # [B, T] float32
    ref_logp: Tensor  # [B, T] float32
    mask: Tensor  # [B, T] bool
    advantages: Tensor  # [B] float32
    lengths: list[int]  # active tokens of each sequence (a prefix of the row)
    logp64: Tensor  # [B, T] float64 log-probs of the sampled tokens (the oracle's)
    scratch: dict[str, Tensor] = field(default_factory=dict)  # own logits buffers (in place, Liger)

    @property
    def b(self) -> int:
        return self.logits.shape[0]

    @property
    def t(self) -> int:
        return self.logits.shape[1]

    @property
    def v(self) -> int:
        return self.logits.shape[2]

    @property
    def active(self) -> int:
        return sum(self.lengths)

    def buffer(self, name: str, extra_position: bool = False) -> Tensor:
        """A leaf copy of the logits of its own ([B, T+1, V] with extra_position), made on first use."""
        if name not in self.scratch:
            b, t, v = self.logits.shape
            buf = torch.empty(b, t + int(extra_position), v, dtype=self.logits.dtype, device=self.logits.device)
            if extra_position:
                buf[:, t].normal_(0.0, LOGIT_STD)
            self.scratch[name] = buf.requires_grad_()
        self.refresh(name)
        return self.scratch[name]

    def refresh(self, name: str) -> None:
        """Copy the pristine logits into a buffer again (after an in-place gradient overwrote it)."""
        buf = self.scratch[name]
        buf.grad = None
        with torch.no_grad():
            buf[:, : self.t].copy_(self.logits)


def row_chunks(b: int, t: int, v: int) -> Iterator[tuple[int, slice]]:
    """(sequence, token slice) chunks with a float64 working set of about REF_CHUNK_BYTES."""
    step = max(1, min(t, REF_CHUNK_BYTES // (4 * 8 * v)))
    for i in range(b):
        for t0 in range(0, t, step):
            yield i, slice(t0, min(t, t0 + step))


def make_inputs(b: int, t: int, v: int, dtype: torch.dtype, device: str, seed: int = 0) -> Inputs:
    """Random logits with a likely sampled token, close old / reference log-probs, a length-based mask.

    The logits are drawn on the device (a [4, 4096, 151936] draw on the host would take minutes); the
    [B, T] inputs on the host, so they are the same on every device for a seed.
    """
    gen = torch.Generator().manual_seed(seed)
    dev_gen = torch.Generator(device=device).manual_seed(seed)
    logits = torch.randn(b, t, v, generator=dev_gen, device=device, dtype=dtype).mul_(LOGIT_STD)
    tokens = torch.randint(0, v, (b, t), generator=gen)
    pick = math.log(v) + LOGIT_STD**2 / 2 + PICK_MEAN + PICK_STD * torch.randn(b, t, generator=gen)
    tokens, pick = tokens.to(device), pick.to(device)
    logits.scatter_(-1, tokens[..., None], pick[..., None].to(dtype))
    logp64 = torch.empty(b, t, dtype=torch.float64, device=device)
    for i, ts in row_chunks(b, t, v):
        logp64[i, ts] = token_logprobs_reference(logits[i, ts], tokens[i, ts], TEMPERATURE)[0]
    lp = logp64.float().cpu()
    old = (lp + OLD_NOISE * torch.randn(b, t, generator=gen)).clamp(max=0.0)
    ref = (lp + REF_NOISE * torch.randn(b, t, generator=gen)).clamp(max=0.0)
    adv = torch.randn(b, generator=gen)
    lengths = (t * (0.5 + 0.6 * torch.rand(b, generator=gen))).long().clamp(1, t)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return Inputs(
        logits=logits.requires_grad_(),
        tokens=tokens,
        old_logp=old.to(device),
        ref_logp=ref.to(device),
        mask=mask.to(device),
        advantages=adv.to(device),
        lengths=lengths.tolist(),
        logp64=logp64,
    )


def logits_bytes(b: int, t: int, v: int, dtype: torch.dtype) -> int:
    """Minimal traffic of one forward + backward: the logits read once, the gradient written once."""
    return 2 * b * t * v * torch.empty((), dtype=dtype).element_size()


# --------------------------------------------------------------------------------------------
# Reference


@dataclass
class Reference:
    loss: float
    loss_scale: float  # max(|loss|, mean |A| over the active tokens): what the loss error is relative to
    g: Tensor  # [B, T] float64 d loss / d logp, on the inputs' device
    g_alts: tuple[Tensor, Tensor]  # clip bounds moved out / in by BOUNDARY_EPS: the other side of a kink
    boundary: Tensor  # [B, T] bool: tokens whose g differs between the alternatives (ratio on a clip bound)
    grad_scale: float  # max |d loss / d logits|
    metrics: dict[str, float]

    @property
    def boundary_tokens(self) -> int:
        return int(self.boundary.sum())


def _loss_kwargs() -> dict[str, Any]:
    return dict(beta=BETA, kl=KL, mode="clip", agg="token-mean")


def reference(inp: Inputs) -> Reference:
    """float64 loss and d loss / d logp of moo_kernels' oracle; the logits gradient follows row by row.

    d loss / d logits at (b, t) is g_bt (1[v = y] - p_v) / tau (token_logprobs_grad_reference): only g
    and the logits are kept, the gradient is recomputed in chunks wherever it is needed.
    """
    lp, adv, mask = inp.logp64, inp.advantages, inp.mask
    kw = dict(old_logp=inp.old_logp, ref_logp=inp.ref_logp, **_loss_kwargs())
    loss, metrics = policy_loss_reference(lp, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, **kw)
    g = policy_loss_grad_reference(lp, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, **kw)
    g_out = policy_loss_grad_reference(
        lp, adv, mask, clip_low=CLIP_LOW + BOUNDARY_EPS, clip_high=CLIP_HIGH + BOUNDARY_EPS, **kw
    )
    g_in = policy_loss_grad_reference(
        lp, adv, mask, clip_low=CLIP_LOW - BOUNDARY_EPS, clip_high=CLIP_HIGH - BOUNDARY_EPS, **kw
    )
    scale = 0.0
    for i, ts in row_chunks(inp.b, inp.t, inp.v):
        grad = token_logprobs_grad_reference(inp.logits[i, ts], inp.tokens[i, ts], g[i, ts], None, TEMPERATURE)
        scale = max(scale, float(grad.abs().max()))
    m = mask.double()
    mean_abs_adv = float((adv.double().abs()[:, None] * m).sum() / m.sum().clamp(min=1))
    return Reference(
        loss=float(loss),
        loss_scale=max(abs(float(loss)), mean_abs_adv),
        g=g,
        g_alts=(g_out, g_in),
        boundary=g_out != g_in,
        grad_scale=scale,
        metrics={k: float(v) for k, v in metrics.items()},
    )


# --------------------------------------------------------------------------------------------
# Implementations: each runs one forward + backward and returns (loss, d loss / d logits [B, T, V])


def moo_available() -> bool:
    return hasattr(moo_kernels, "policy_loss_from_logits")


def _moo_kwargs() -> dict[str, Any]:
    """The loss options, mode included only where the public function takes it (its default is "clip")."""
    kw = dict(
        temperature=TEMPERATURE,
        beta=BETA,
        kl=KL,
        clip_low=CLIP_LOW,
        clip_high=CLIP_HIGH,
        agg="token-mean",
    )
    params = inspect.signature(moo_kernels.policy_loss_from_logits).parameters
    if "mode" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kw["mode"] = "clip"
    return kw


def make_moo_step(inp: Inputs, inplace: bool) -> Callable[[], tuple[Tensor, Tensor]]:
    """The public op, called as a trainer would, then loss.backward(); in place on a buffer of its own."""
    kw = _moo_kwargs()
    if inplace:
        kw["inplace_backward"] = True

    def step() -> tuple[Tensor, Tensor]:
        logits = inp.scratch["moo_inplace"] if inplace else inp.logits
        logits.grad = None
        loss, _ = moo_kernels.policy_loss_from_logits(
            logits,
            inp.tokens,
            inp.advantages,
            inp.mask,
            old_logp=inp.old_logp,
            ref_logp=inp.ref_logp,
            **kw,
        )[:2]
        loss.backward()
        return loss, logits.grad

    return step


def eager_logits_loss(
    logits: Tensor, tokens: Tensor, old_logp: Tensor, ref_logp: Tensor, advantages: Tensor, mask: Tensor
) -> Tensor:
    """The loss as TRL's GRPOTrainer computes it, written plainly with torch ops.

    Log-probs: for each sequence, log_softmax of its logits in float32 divided by the temperature, and a
    gather of the sampled tokens (one sequence's float32 copy at a time, as TRL's selective log-softmax
    does for half-precision logits). Then ratio, clipped surrogate, k3 KL, masked token mean.
    """
    rows = []
    for i in range(logits.shape[0]):
        lsm = torch.log_softmax(logits[i].float() / TEMPERATURE, dim=-1)
        rows.append(lsm.gather(-1, tokens[i].unsqueeze(-1)).squeeze(-1))
    logp = torch.stack(rows)
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    surrogate = torch.min(ratio * adv, ratio.clamp(1.0 - CLIP_LOW, 1.0 + CLIP_HIGH) * adv)
    log_ref_ratio = ref_logp - logp
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1.0
    per_token = -surrogate + BETA * kl
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def make_torch_step(fn: Callable[..., Tensor], inp: Inputs) -> Callable[[], tuple[Tensor, Tensor]]:
    """One forward of fn (eager_logits_loss or its torch.compile) and loss.backward()."""

    def step() -> tuple[Tensor, Tensor]:
        inp.logits.grad = None
        loss = fn(inp.logits, inp.tokens, inp.old_logp, inp.ref_logp, inp.advantages, inp.mask)
        loss.backward()
        return loss, inp.logits.grad

    return step


def make_liger_step(inp: Inputs, inplace: bool) -> Callable[[], tuple[Tensor, Tensor]]:
    """Liger-Kernel's triton_grpo_loss with the options of LIGER_MAPPING, then loss.backward()."""
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    name = "liger_inplace" if inplace else "liger"
    liger_mask = inp.mask.to(torch.int32)

    def step() -> tuple[Tensor, Tensor]:
        logits = inp.scratch[name]
        logits.grad = None
        loss, _ = triton_grpo_loss(
            logits,
            inp.old_logp,
            inp.ref_logp,
            inp.tokens,
            inp.advantages,
            liger_mask,
            temperature=TEMPERATURE,
            beta=BETA,
            eps_low=CLIP_LOW,
            eps_high=CLIP_HIGH,
            inplace=inplace,
            loss_type=LIGER_MAPPING["loss_type"],
            importance_sampling_level="token",
            reduce=True,
        )
        loss.backward()
        return loss, logits.grad[:, : inp.t]

    return step


def liger_status() -> dict[str, Any]:
    """Whether liger_kernel is importable, its version, and how it is called."""
    found = importlib.util.find_spec("liger_kernel") is not None
    version = None
    if found:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version("liger-kernel")
        except Exception:  # noqa: BLE001 - a version we can do without
            version = None
    return {"importable": found, "version": version, "expected_version": LIGER_VERSION, "mapping": LIGER_MAPPING}


# --------------------------------------------------------------------------------------------
# Running and checking


@dataclass
class Impl:
    name: str
    fn: Callable[[], tuple[Tensor, Tensor]]  # forward + backward: (loss, gradient)
    timer: dict[str, Any]  # keyword arguments of the timer
    leaf: Callable[[], Tensor]  # the logits tensor whose .grad the step fills
    prepare: Callable[[], None] | None = None  # before the correctness call: fresh logits for in-place steps
    optional: bool = False  # a failure to run (e.g. torch.compile, Liger) is reported, not fatal
    graph: bool = False  # CUDA: also time the device work alone, by CUDA-graph replay


def compare(loss: Tensor, grad: Tensor | None, inp: Inputs, ref: Reference) -> dict[str, Any]:
    """Errors of one (loss, gradient) against the reference, row chunk by row chunk; "ok" within tolerance."""
    if grad is None or tuple(grad.shape) != tuple(inp.logits.shape):
        return {"ok": False, "why": "no gradient or wrong shape"}
    tol = TOLERANCE[inp.logits.dtype]
    got_loss = float(loss.detach())
    if not math.isfinite(got_loss):
        return {"ok": False, "why": "non-finite loss"}
    grad = grad.detach()
    max_err, sum_sq, finite = 0.0, 0.0, True
    for i, ts in row_chunks(inp.b, inp.t, inp.v):
        z, y = inp.logits[i, ts], inp.tokens[i, ts]
        got = grad[i, ts].double()
        finite = finite and bool(torch.isfinite(got).all())
        diff = (got - token_logprobs_grad_reference(z, y, ref.g[i, ts], None, TEMPERATURE)).abs()
        sum_sq += float((diff * diff).sum())
        row_err = diff.amax(-1)
        kink = ref.boundary[i, ts].nonzero().flatten()
        if len(kink):  # a token on a clip bound: the nearer of the two one-sided gradients
            zk, yk, gk = z[kink], y[kink], got[kink]
            for alt in ref.g_alts:
                other = token_logprobs_grad_reference(zk, yk, alt[i, ts][kink], None, TEMPERATURE)
                row_err[kink] = torch.minimum(row_err[kink], (gk - other).abs().amax(-1))
        max_err = max(max_err, float(row_err.max()))
    if not finite:
        return {"ok": False, "why": "non-finite gradient"}
    loss_abs = abs(got_loss - ref.loss)
    out = {
        "loss": got_loss,
        "loss_abs_err": loss_abs,
        "loss_rel_err": loss_abs / ref.loss_scale,
        "grad_max_abs_err": max_err,
        "grad_rms_err": math.sqrt(sum_sq / inp.logits.numel()),
        "grad_rel_err": max_err / ref.grad_scale if ref.grad_scale > 0 else max_err,
        "boundary_tokens": ref.boundary_tokens,
    }
    out["ok"] = out["loss_rel_err"] <= tol["loss"] and out["grad_rel_err"] <= tol["grad"]
    return out


def check_all(impls: list[Impl], inp: Inputs, ref: Reference) -> tuple[dict[str, Any], list[str], list[Impl]]:
    """Run every implementation once (on fresh logits) and compare with the float64 reference.

    Returns ({name: errors or error text}, names that disagree or crashed, impls to time).
    """
    report: dict[str, Any] = {}
    bad: list[str] = []
    ok: list[Impl] = []
    tol = TOLERANCE[inp.logits.dtype]
    for impl in impls:
        try:
            if impl.prepare is not None:
                impl.prepare()
            loss, grad = impl.fn()
            if loss.device.type == "cuda":
                torch.cuda.synchronize()
            errs = compare(loss, grad, inp, ref)
        except Exception as e:  # noqa: BLE001 - report and decide below
            report[impl.name] = f"error: {type(e).__name__}: {e}"
            print(f"  {impl.name}: FAILED to run: {type(e).__name__}: {e}", file=sys.stderr)
            if not impl.optional:
                bad.append(impl.name)
            continue
        finally:
            loss = grad = None
        report[impl.name] = errs
        if errs["ok"]:
            ok.append(impl)
        else:
            bad.append(impl.name)
            detail = errs.get("why") or (
                f"loss rel err {errs['loss_rel_err']:.3g} (tol {tol['loss']}), "
                f"grad err / max|grad| {errs['grad_rel_err']:.3g} (tol {tol['grad']})"
            )
            print(f"  {impl.name}: DISAGREES with the float64 reference: {detail}", file=sys.stderr)
    return report, bad, ok


def peak_memory(impl: Impl) -> dict[str, float]:
    """CUDA: bytes allocated by one forward + backward at its peak, and still held after (the gradient)."""
    impl.leaf().grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    impl.fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    held = torch.cuda.memory_allocated() - base
    return {"peak_bytes": float(peak), "peak_gb": peak / 1e9, "held_after_bytes": float(held)}


def measure(
    impls: list[Impl], inp: Inputs, ref: Reference, device: str, keep_going: bool, missing: list[str]
) -> dict[str, Any]:
    report, bad, ok = check_all(impls, inp, ref)
    bad = missing + bad
    result: dict[str, Any] = {
        "errors": report,
        "disagree": bad,
        "correct": not bad,
        "timings": {},
        "device_timings": {},
        "memory": {},
    }
    # A missing moo_kernels API does not stop the baselines: they are checked and timed all the same.
    if [b for b in bad if b not in missing] and not keep_going:
        return result
    # With keep_going, implementations that disagree are timed too (but still reported).
    to_time = ok if not keep_going else [i for i in impls if not str(report.get(i.name, "")).startswith("error")]
    for impl in to_time:
        if device == "cuda":
            try:
                result["memory"][impl.name] = peak_memory(impl)
            except Exception as e:  # noqa: BLE001 - a figure we can do without
                result["memory"][impl.name] = f"error: {type(e).__name__}: {e}"
        try:
            result["timings"][impl.name] = timing.time_on(device, impl.fn, impl.timer).as_dict()
        except Exception as e:  # noqa: BLE001 - keep the other figures
            result["timings"][impl.name] = None
            print(f"  {impl.name}: timing failed: {type(e).__name__}: {e}", file=sys.stderr)
        impl.leaf().grad = None  # one implementation's gradient at a time on the device
    # Graph captures last: a capture that fails cannot disturb the figures above.
    for impl in to_time:
        if device == "cuda" and impl.graph:
            try:
                graph_timer = {key: impl.timer[key] for key in ("reps", "batch")}
                result["device_timings"][impl.name] = timing.time_cuda_graph(impl.fn, **graph_timer).as_dict()
            except Exception as e:  # noqa: BLE001 - a figure we can do without
                result["device_timings"][impl.name] = f"error: {type(e).__name__}: {e}"
                print(f"  {impl.name}: CUDA graph timing failed: {type(e).__name__}: {e}", file=sys.stderr)
            finally:
                impl.leaf().grad = None
                torch.cuda.empty_cache()
    result["timings"] = {k: v for k, v in result["timings"].items() if v is not None}
    return result


def bandwidth(res: dict[str, Any], nbytes: int, copy_gbps: float | None) -> dict[str, Any]:
    """Effective GB/s (logits_bytes / time) of every implementation from each of its timings."""
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
        "v": inp.v,
        "tokens": inp.b * inp.t,
        "active_tokens": inp.active,
        "reference_loss": ref.loss,
        "boundary_tokens": ref.boundary_tokens,
    }


def _budget_left(t0: float, budget_s: float | None) -> float:
    return float("inf") if budget_s is None else budget_s - (time.monotonic() - t0)


def _impls(
    inp: Inputs,
    names: dict[str, str],
    timer: dict[str, Any],
    device: str,
    compiled: Callable | None,
    use_liger: bool,
) -> list[Impl]:
    """The implementations to compare on one set of inputs; Liger only on CUDA where importable."""
    cuda = device == "cuda"
    pristine = lambda: inp.logits
    impls = []
    if moo_available():
        inp.buffer("moo_inplace")
        impls += [
            Impl(names["moo"], make_moo_step(inp, False), timer, pristine, graph=cuda),
            Impl(
                names["moo_inplace"],
                make_moo_step(inp, True),
                timer,
                lambda: inp.scratch["moo_inplace"],
                prepare=lambda: inp.refresh("moo_inplace"),
                graph=cuda,
            ),
        ]
    impls.append(Impl(names["eager"], make_torch_step(eager_logits_loss, inp), timer, pristine, graph=cuda))
    if compiled is not None:
        impls.append(
            Impl(names["compiled"], make_torch_step(compiled, inp), timer, pristine, optional=True, graph=cuda)
        )
    if use_liger:
        for key, inplace in (("liger", False), ("liger_inplace", True)):
            inp.buffer(key, extra_position=True)
            impls.append(
                Impl(
                    names[key],
                    make_liger_step(inp, inplace),
                    timer,
                    lambda key=key: inp.scratch[key],
                    prepare=lambda key=key: inp.refresh(key),
                    optional=True,
                    graph=True,
                )
            )
    return impls


# --------------------------------------------------------------------------------------------
# CPU


def _cpu_moo_backend(inp: Inputs) -> tuple[str, str | None]:
    """The backend that runs the op on CPU: the current one, or the reference when the C++ kernel is missing."""
    backend = moo_kernels.get_backend()
    if backend == "reference":
        return backend, "the backend is forced to 'reference' (MOO_KERNELS_BACKEND or set_backend)"
    if not moo_available():
        return backend, None
    try:
        make_moo_step(inp, False)()
    except ImportError as e:  # no moo_kernels._C, or no cpu.py
        return "reference", f"{type(e).__name__}: {e}"
    except AttributeError as e:  # an extension built before the logits kernel was added to it
        if "logits" in str(e):
            return "reference", f"{type(e).__name__}: {e}"
    except Exception:  # noqa: BLE001 - the kernel is there but fails: check_all reports it
        pass
    finally:
        inp.logits.grad = None
    return backend, None


def _names(device: str, backend: str) -> dict[str, str]:
    if device == "cuda":
        moo = "moo_kernels (Triton)" if backend != "reference" else "moo_kernels (reference backend)"
    else:
        moo = "moo_kernels (C++)" if backend in ("auto", "cpp") else f"moo_kernels ({backend} backend)"
    names = {
        "moo": moo,
        "moo_inplace": f"{moo}, in place",
        "eager": "eager PyTorch (TRL-style)",
        "compiled": "torch.compile(eager)",
    }
    if device == "cuda":
        names |= {"liger": "Liger-Kernel", "liger_inplace": "Liger-Kernel, in place"}
    return names


def _missing() -> list[str]:
    if moo_available():
        return []
    print(
        "moo_kernels.policy_loss_from_logits does not exist yet: only the baselines are checked and timed",
        file=sys.stderr,
    )
    return ["moo_kernels (policy_loss_from_logits missing)"]


def run_cpu(
    quick: bool = False,
    keep_going: bool = False,
    use_compile: bool = True,
    sweep: bool = True,
    budget_s: float | None = None,
) -> dict[str, Any]:
    t0 = time.monotonic()
    timing.allow_recompiles()
    shapes = QUICK_CPU_SHAPES if quick else CPU_SHAPES
    shapes = shapes if sweep else shapes[:1]
    timer = {"warmup": 1, "reps": 10, "budget_s": 0.3} if quick else {"warmup": 3, "reps": 100, "budget_s": 1.5}
    sweep_timer = timer if quick else {"warmup": 2, "reps": 50, "budget_s": 0.8}
    compiled = torch.compile(eager_logits_loss, dynamic=False) if use_compile else None

    b, t, v = shapes[0]
    inp = make_inputs(b, t, v, CPU_DTYPE, "cpu")
    backend, fallback_reason = _cpu_moo_backend(inp)
    if fallback_reason is not None:
        print(
            f"WARNING: moo_kernels' C++ logits kernel is not available ({fallback_reason}); timing the "
            "float64 reference backend instead: its figures are NOT those of the C++ kernel.",
            file=sys.stderr,
        )
    names = _names("cpu", backend)
    missing = _missing()

    print(f"main size B={b} T={t} V={v}: checking and timing", file=sys.stderr)
    ref = reference(inp)
    with moo_kernels.use_backend(backend):
        res = measure(_impls(inp, names, timer, "cpu", compiled, False), inp, ref, "cpu", keep_going, missing)
        tm = res["timings"]
        baselines = [names["eager"], names["compiled"]]
        res["speedup_of_moo"] = timing.speedups(tm, names["moo"], baselines)
        res["bandwidth"] = bandwidth(res, logits_bytes(b, t, v, CPU_DTYPE), None)
        res.update(
            device="cpu",
            moo_backend=backend,
            moo_fallback_reason=fallback_reason,
            moo_available=moo_available(),
            names=names,
            config=_config(inp, ref),
            num_threads=torch.get_num_threads(),
            liger=dict(liger_status(), timed=False, why="Liger-Kernel's triton_grpo_loss runs on CUDA only"),
            targets={},
        )
        main_point = dict(_point_summary(inp, ref), timings=tm, speedup_of_moo=res["speedup_of_moo"])
        del inp, ref
        make_impls = lambda s_inp: _impls(s_inp, names, sweep_timer, "cpu", compiled, False)
        res["sweep"] = _sweep(
            shapes, CPU_DTYPE, names, res, main_point, keep_going, t0, budget_s, make_impls, "cpu", None, missing
        )
    return res


# --------------------------------------------------------------------------------------------
# CUDA


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
    shapes = QUICK_CUDA_SHAPES if quick else CUDA_SHAPES
    shapes = shapes if sweep else shapes[:1]
    timer = {"warmup": 2, "reps": 5, "batch": 5} if quick else {"warmup": 3, "reps": 20, "batch": 10}
    sweep_timer = timer
    backend = moo_kernels.get_backend()
    names = _names("cuda", backend)
    missing = _missing()
    liger = liger_status()
    use_liger = liger["importable"]
    if not use_liger:
        print("liger_kernel is not importable: Liger-Kernel is not timed", file=sys.stderr)
    compiled = torch.compile(eager_logits_loss, dynamic=False) if use_compile else None

    copy = timing.cuda_copy_bandwidth((64 << 20) if quick else (1 << 30))
    print(f"device-to-device copy: {copy['gbps']:.0f} GB/s (read + write)", file=sys.stderr)

    b, t, v = shapes[0]
    inp = make_inputs(b, t, v, CUDA_DTYPE, "cuda")
    print(f"main size B={b} T={t} V={v}: checking and timing", file=sys.stderr)
    ref = reference(inp)
    res = measure(_impls(inp, names, timer, "cuda", compiled, use_liger), inp, ref, "cuda", keep_going, missing)
    tm, dt = res["timings"], res["device_timings"]
    moo_names = [names["moo"], names["moo_inplace"]]
    baselines = [n for k, n in names.items() if not k.startswith("moo")]
    res["speedup_of_moo"] = timing.speedups(tm, names["moo"], baselines)
    dev_ok = {k: x for k, x in dt.items() if isinstance(x, dict)}
    res["speedup_of_moo_device"] = timing.speedups(dev_ok, names["moo"], baselines)
    res["bandwidth"] = bandwidth(res, logits_bytes(b, t, v, CUDA_DTYPE), copy["gbps"])
    res.update(
        device="cuda",
        moo_backend=backend,
        moo_available=moo_available(),
        names=names,
        config=_config(inp, ref),
        copy_bandwidth=copy,
        liger=dict(liger, timed=use_liger),
    )
    res["targets"] = _cuda_targets(res, moo_names, [names["liger"], names["liger_inplace"]])
    main_point = dict(
        _point_summary(inp, ref),
        timings=tm,
        device_timings=dt,
        memory=res["memory"],
        speedup_of_moo=res["speedup_of_moo"],
        speedup_of_moo_device=res["speedup_of_moo_device"],
        bandwidth=res["bandwidth"],
    )
    del inp, ref
    torch.cuda.empty_cache()
    make_impls = lambda s_inp: _impls(s_inp, names, sweep_timer, "cuda", compiled, use_liger)
    res["sweep"] = _sweep(
        shapes, CUDA_DTYPE, names, res, main_point, keep_going, t0, budget_s, make_impls, "cuda", copy["gbps"], missing
    )
    return res


def _cuda_targets(res: dict[str, Any], moo_names: list[str], liger_names: list[str]) -> dict[str, Any]:
    """moo against Liger: device time (best variant of each), and the accuracy of the logits gradient."""
    dev = {k: x["median_us"] for k, x in res["device_timings"].items() if isinstance(x, dict)}
    moo_us = min((dev[n] for n in moo_names if n in dev), default=None)
    liger_us = min((dev[n] for n in liger_names if n in dev), default=None)
    sp = liger_us / moo_us if moo_us and liger_us else None
    errs = res["errors"]
    err = lambda n: errs[n].get("grad_max_abs_err") if isinstance(errs.get(n), dict) else None
    moo_err = max((e for n in moo_names if (e := err(n)) is not None), default=None)
    liger_err = min((e for n in liger_names if (e := err(n)) is not None), default=None)
    both = moo_err is not None and liger_err is not None
    return {
        "cuda_speedup_vs_liger": {
            "target": CUDA_SPEEDUP_VS_LIGER_TARGET,
            "value": sp,
            "figure": "Liger's best device time (CUDA graph) / moo's best, in place or not",
            "met": bool(sp is not None and sp >= CUDA_SPEEDUP_VS_LIGER_TARGET),
        },
        "grad_no_less_accurate_than_liger": {
            "target": 1.0 + GRAD_ACCURACY_SLACK,
            "value": moo_err / liger_err if both and liger_err > 0 else None,
            "figure": "moo's max abs logits-gradient error (worse variant) / Liger's (better variant), vs float64",
            "moo_grad_max_abs_err": moo_err,
            "liger_grad_max_abs_err": liger_err,
            "met": bool(both and moo_err <= liger_err * (1.0 + GRAD_ACCURACY_SLACK)),
        },
    }


def _sweep(
    shapes: tuple[tuple[int, int, int], ...],
    dtype: torch.dtype,
    names: dict[str, str],
    res: dict[str, Any],
    main_point: dict[str, Any],
    keep_going: bool,
    t0: float,
    budget_s: float | None,
    make_impls: Callable[[Inputs], list[Impl]],
    device: str,
    copy_gbps: float | None,
    missing: list[str],
) -> list[dict[str, Any]]:
    """Figures at every shape; the main size (the first) is reused, not timed again.

    The shapes go in the order given: when budget_s is spent, the later ones are skipped.
    """
    points: list[dict[str, Any]] = [dict(main_point, main=True)]
    if not (res["correct"] or keep_going or res["disagree"] == missing):
        return points
    res["sweep_skipped"] = []
    for b, t, v in shapes[1:]:
        label = f"{b}x{t}x{v}"
        if _budget_left(t0, budget_s) <= 0:
            print(f"sweep {label}: skipped, the time budget of {budget_s} s is spent", file=sys.stderr)
            res["sweep_skipped"].append(label)
            continue
        print(f"sweep B={b} T={t} V={v}: checking and timing", file=sys.stderr)
        try:
            s_inp = make_inputs(b, t, v, dtype, device, seed=t + v)
            s_ref = reference(s_inp)
            point = measure(make_impls(s_inp), s_inp, s_ref, device, keep_going, missing)
            point.update(_point_summary(s_inp, s_ref))
            st = point["timings"]
            others = [n for k, n in names.items() if not k.startswith("moo")]
            point["speedup_of_moo"] = timing.speedups(st, names["moo"], others)
            if device == "cuda":
                sd = {k: x for k, x in point["device_timings"].items() if isinstance(x, dict)}
                point["speedup_of_moo_device"] = timing.speedups(sd, names["moo"], others)
            point["bandwidth"] = bandwidth(point, logits_bytes(b, t, v, dtype), copy_gbps)
            del s_inp, s_ref
        except Exception as e:  # noqa: BLE001 - keep the figures gathered so far
            print(f"sweep {label}: failed: {type(e).__name__}: {e}", file=sys.stderr)
            point = {"b": b, "t": t, "v": v, "error": f"{type(e).__name__}: {e}", "correct": False, "disagree": []}
            res["correct"] = False
            res["disagree"].append(f"sweep {label}: error")
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        points.append(point)
        new_bad = [n for n in point["disagree"] if n not in missing]
        if not point["correct"] and "error" not in point and new_bad:
            res["correct"] = False
            res["disagree"] += [f"{name} (sweep {label})" for name in new_bad]
            if not keep_going:
                break
    return points


# --------------------------------------------------------------------------------------------
# Report


def _config(inp: Inputs, ref: Reference) -> dict[str, Any]:
    tol = TOLERANCE[inp.logits.dtype]
    return {
        "b": inp.b,
        "t": inp.t,
        "v": inp.v,
        "tokens": inp.b * inp.t,
        "active_tokens": inp.active,
        "active_fraction": inp.active / (inp.b * inp.t),
        "full_length_sequences": sum(n == inp.t for n in inp.lengths),
        "dtype": str(inp.logits.dtype).removeprefix("torch."),
        "temperature": TEMPERATURE,
        "mode": "clip",
        "clip_low": CLIP_LOW,
        "clip_high": CLIP_HIGH,
        "kl": KL,
        "beta": BETA,
        "agg": "token-mean",
        "advantages_shape": [inp.b],
        "mask": "bool, a random length per sequence (uniform in [0.5 T, 1.1 T], capped at T)",
        "inputs": (
            f"logits N(0, {LOGIT_STD}^2), the sampled token's logit log V + {LOGIT_STD**2 / 2:g} + "
            f"N({PICK_MEAN}, {PICK_STD}^2); old_logp = logp + N(0, {OLD_NOISE}), ref_logp = logp + "
            f"N(0, {REF_NOISE}), both <= 0; advantages N(0, 1)"
        ),
        "reference": (
            "float64 policy_loss_from_logits_reference from its building blocks, over chunks of rows on the "
            "device; every row of every gradient compared"
        ),
        "logits_bytes": logits_bytes(inp.b, inp.t, inp.v, inp.logits.dtype),
        "bytes_formula": "2 * B * T * V * element size (logits read once, gradient written once)",
        "loss_rtol": tol["loss"],
        "grad_rtol": tol["grad"],
        "boundary_eps": BOUNDARY_EPS,
        "boundary_tokens": ref.boundary_tokens,
        "reference_loss": ref.loss,
        "reference_grad_max_abs": ref.grad_scale,
        "reference_metrics": ref.metrics,
        "in_place_timing": "in-place steps are checked on fresh logits, then timed on their overwritten buffer",
    }


def run(
    device: str,
    quick: bool = False,
    *,
    keep_going: bool = False,
    use_compile: bool = True,
    sweep: bool = True,
    budget_s: float | None = None,
) -> dict[str, Any]:
    """Run the benchmark on "cpu" or "cuda"; returns every figure as a JSON-serialisable dict.

    result["correct"] is False when an implementation disagreed with the reference (timing is then
    skipped unless keep_going) or moo_kernels has no policy_loss_from_logits (the baselines are then
    still checked and timed). budget_s: once that many seconds have passed, the remaining shapes of the
    sweep are skipped (listed in result["sweep_skipped"]).
    """
    load_before = _load_average()
    if device == "cuda":
        body = run_cuda(quick, keep_going, use_compile, sweep, budget_s)
    elif device == "cpu":
        body = run_cpu(quick, keep_going, use_compile, sweep, budget_s)
    else:
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    meta = timing.run_meta("logits_loss", device, quick, ROOT)
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
    t, dev, errs, mem = result["timings"], result["device_timings"], result["errors"], result["memory"]
    bw = result["bandwidth"]
    header = ["implementation", "median us", "min us"]
    if cuda:
        header += ["batch us/call", "device us", "vs moo", "vs moo (device)", "device GB/s", "peak GB"]
    else:
        header += ["moo speedup", "GB/s"]
    header += ["loss rel err", "grad err/max", "grad max abs err"]
    rows = []
    for name in names.values():
        if name not in t and name not in errs:
            continue
        tm = t.get(name)
        row = [name, timing.fmt_us(tm and tm["median_us"]), timing.fmt_us(tm and tm["min_us"])]
        b = bw.get(name, {})
        if cuda:
            d = dev.get(name)
            g = b.get("device") or b.get("latency")
            m = mem.get(name)
            row += [
                timing.fmt_us(tm and tm["batch_us"]),
                timing.fmt_us(d["median_us"]) if isinstance(d, dict) else "-",
                timing.fmt_ratio(result["speedup_of_moo"].get(name)),
                timing.fmt_ratio(result["speedup_of_moo_device"].get(name)),
                f"{g['gbps']:.0f}" if g else "-",
                f"{m['peak_gb']:.2f}" if isinstance(m, dict) else "-",
            ]
        else:
            sp = result["speedup_of_moo"].get(name)
            g = b.get("latency")
            row += [f"{sp:.2f}x" if sp else "-", f"{g['gbps']:.1f}" if g else "-"]
        e = errs.get(name)
        row += [_err(e, "loss_rel_err"), _err(e, "grad_rel_err"), _err(e, "grad_max_abs_err")]
        rows.append(row)
    return header, rows


def _shape_label(p: dict[str, Any]) -> str:
    return f"{p['b']} x {p['t']} x {p['v']}"


def _sweep_table(result: dict[str, Any], cuda: bool) -> str:
    names = result["names"]
    present = {n for p in result["sweep"] for n in p.get("timings", {})}
    keys = [k for k, n in names.items() if n in present or k == "moo"]
    header = ["B x T x V"] + [f"{names[k]} us" for k in keys]
    if cuda:
        header += ["moo device GB/s", "% copy"]
    header += [f"{names[k]} / moo" for k in keys if not k.startswith("moo")]
    rows = []
    for p in result["sweep"]:
        row = [_shape_label(p) + (" (main)" if p.get("main") else "")]
        st = p.get("timings", {})
        # CUDA: the device time (CUDA graph) where there is one, else the latency.
        dev = {k: x for k, x in p.get("device_timings", {}).items() if isinstance(x, dict)}
        row += [timing.fmt_us((dev.get(names[k]) or st.get(names[k]) or {}).get("median_us")) for k in keys]
        if cuda:
            g = p.get("bandwidth", {}).get(names["moo"], {}).get("device")
            row += [
                f"{g['gbps']:.0f}" if g else "-",
                f"{g['fraction_of_copy']:.1%}" if g and g["fraction_of_copy"] else "-",
            ]
        sp = p.get("speedup_of_moo_device" if cuda else "speedup_of_moo", {})
        row += [timing.fmt_ratio(sp.get(names[k])) for k in keys if not k.startswith("moo")]
        rows.append(row)
    return timing.format_table(header, rows)


def format_report(result: dict[str, Any]) -> str:
    meta, cfg = result["meta"], result["config"]
    cuda = meta["device"] == "cuda"
    out = [
        f"policy loss from logits (fwd + bwd) on {meta['device']} ({meta['device_name']}), torch {meta['torch']}, "
        f"triton {meta['triton']}, commit {meta['git_commit']}",
        f"B={cfg['b']} T={cfg['t']} V={cfg['v']} {cfg['dtype']} ({cfg['tokens']:,} tokens, "
        f"{cfg['active_fraction']:.1%} active), temperature {TEMPERATURE:g}, mode clip "
        f"[{1 - CLIP_LOW:g}, {1 + CLIP_HIGH:g}], k3 KL beta {BETA}, token-mean; "
        f"{cfg['boundary_tokens']} tokens on a clip bound",
    ]
    if not result.get("moo_available", True):
        out.append("NOTE: moo_kernels.policy_loss_from_logits does not exist yet: baselines only")
    if not cuda:
        if result.get("moo_fallback_reason"):
            out.append(
                f"NOTE: moo_kernels ran on the {result['moo_backend']} backend ({result['moo_fallback_reason']}): "
                "these are not the C++ kernel's figures"
            )
        load = meta.get("load_average_1min", {})
        out.append(
            f"threads: {result['num_threads']}; load average (1 min) {_num(load.get('before'))} before, "
            f"{_num(load.get('after'))} after, on {load.get('cpus')} CPUs"
        )
    header, rows = _timing_rows(result, cuda)
    out.append(timing.format_table(header, rows))
    if cuda:
        out.append(
            "median/min: one fwd+bwd, L2 flushed, device idle before it (includes the host-side cost); batch: "
            "back-to-back calls / count; device: CUDA-graph replay of one fwd+bwd (device work only); "
            "peak: max_memory_allocated rise over one fwd+bwd, gradient included"
        )
        bw = result["bandwidth"]
        out.append(
            f"copy bandwidth {bw['copy_gbps']:.0f} GB/s; minimal bytes = {bw['bytes']:,} "
            "(logits read once, gradient written once)"
        )
        moo_names = (result["names"]["moo"], result["names"]["moo_inplace"])
        width = max(len(n) for n in moo_names)
        for name in moo_names:
            for label, b in bw.get(name, {}).items():
                out.append(
                    f"  {name:<{width}} {label:<12} {b['us']:10.1f} us {b['gbps']:7.0f} GB/s "
                    f"({b['fraction_of_copy']:.1%} of copy)"
                )
        lg = result["liger"]
        out.append(
            f"Liger-Kernel: {'version ' + str(lg['version']) if lg['importable'] else 'not installed'}; "
            f"loss_type {LIGER_MAPPING['loss_type']!r}, reduce=True, temperature {TEMPERATURE:g}, "
            f"eps_low {CLIP_LOW}, eps_high {CLIP_HIGH}, beta {BETA}, logits [B, T+1, V]"
        )
    else:
        out.append("moo speedup = time of the row / time of moo_kernels; GB/s: minimal bytes / median time")
    for name, tg in result.get("targets", {}).items():
        v = tg["value"]
        shown = "-" if v is None else f"{v:.3f}"
        out.append(f"target {name}: {shown} against {tg['target']:g}: {'met' if tg['met'] else 'NOT met'}")
    if result.get("sweep"):
        out.append(
            "shapes (median us per fwd+bwd" + (", device time where measured" if cuda else "") + "; ratios: x / moo):"
        )
        out.append(_sweep_table(result, cuda))
    if result.get("sweep_skipped"):
        out.append(f"shapes skipped (time budget spent): {result['sweep_skipped']}")
    if not result["correct"]:
        out.append(f"DISAGREE WITH THE REFERENCE OR MISSING: {', '.join(result['disagree'])}")
    return "\n".join(out)


def plot_sweep(result: dict[str, Any], path: str) -> None:
    """Time per fwd+bwd at each shape (left); CUDA: effective bandwidth, CPU: moo's speedup (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = result["names"]
    cuda = result["meta"]["device"] == "cuda"
    pts = [p for p in result["sweep"] if "timings" in p]
    labels = [_shape_label(p).replace(" x ", "x") for p in pts]
    xs = list(range(len(pts)))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name in names.values():
        xy = [(x, p["timings"][name]["median_us"]) for x, p in zip(xs, pts, strict=True) if name in p["timings"]]
        if not xy:
            continue
        (line,) = ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=name)
        dev = [
            (x, d["median_us"])
            for x, p in zip(xs, pts, strict=True)
            if isinstance(d := p.get("device_timings", {}).get(name), dict)
        ]
        if dev:
            ax.plot(
                [x for x, _ in dev],
                [y for _, y in dev],
                marker="s",
                linestyle="--",
                color=line.get_color(),
                label=f"{name}, device time",
            )
    ax.set_yscale("log")
    ax.set_xticks(xs, labels, fontsize=7)
    ax.set_xlabel(f"B x T x V, {result['config']['dtype']} logits")
    ax.set_ylabel("median time per fwd+bwd (us)")
    ax.set_title(f"GRPO loss from logits, fwd+bwd, {result['meta']['device_name']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=6)

    if cuda:
        for name in names.values():
            xy = [
                (x, b["gbps"])
                for x, p in zip(xs, pts, strict=True)
                if (b := p.get("bandwidth", {}).get(name, {}).get("device"))
            ]
            if xy:
                ax2.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=name)
        ax2.axhline(result["copy_bandwidth"]["gbps"], color="gray", linestyle="--", label="device copy")
        ax2.set_ylabel("effective GB/s, device time (logits read + gradient written)")
    else:
        for key in ("eager", "compiled"):
            xy = [(x, s) for x, p in zip(xs, pts, strict=True) if (s := p.get("speedup_of_moo", {}).get(names[key]))]
            if xy:
                ax2.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=f"{names[key]} / moo")
        ax2.axhline(1.0, color="gray", linestyle=":")
        ax2.set_ylabel("speedup of moo_kernels")
        ax2.set_ylim(bottom=0)
    ax2.set_xticks(xs, labels, fontsize=7)
    ax2.set_xlabel("B x T x V")
    ax2.grid(True, which="both", alpha=0.3)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", metavar="PATH", help="write every figure to this JSON file")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (CI)")
    parser.add_argument("--plot", metavar="PATH", help="save the figures at every shape as a PNG")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline (slow on CPU)")
    parser.add_argument("--no-sweep", action="store_true", help="only the main shape")
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
        "--budget-s", type=float, metavar="S", help="skip the remaining shapes once S seconds have passed"
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
            "FAILED: the C++ logits kernel is missing (build it: python setup.py build_ext --inplace); "
            "the figures above are the reference backend's",
            file=sys.stderr,
        )
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
