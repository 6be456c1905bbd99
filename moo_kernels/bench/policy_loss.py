"""Suite "policy_loss": the token-level policy loss from log-probs (moo_kernels.policy_loss), forward + backward.

The computation, the same in every implementation: mode "clip" with clip-higher (ratio clipped to
[1 - 0.2, 1 + 0.28]), old_logp given, k3 KL to ref_logp with beta 0.04, token-mean over a bool mask,
advantages [B] broadcast over the tokens; float32 inputs; the loss and d loss / d logp.

Compared: moo_kernels (C++ on the CPU, Triton on CUDA); the loss written plainly with torch ops as
TRL's GRPOTrainer and verl's vanilla loss compute it, then loss.backward(); torch.compile of it where
compiling is on. A second pair of rows times TRL 1.16's default configuration with vLLM importance sampling and
a KL term: the sequence-level IS ratio exp(sum over the sequence of old_logp - sampling_logp), masked to 0
outside [0, 3] (vllm_importance_sampling_mode="sequence_mask", clip_max 3), multiplied into the policy term, and
the k3 KL term times the token ratio (use_bias_correction_kl), clip-higher [0.8, 1.28], token-mean:
moo_kernels.rollout_correction + policy_loss against the same written with torch ops as TRL writes it.
Liger-Kernel's triton_grpo_loss takes logits, not log-probs: it is compared in the logits_loss suite, and only its
presence is recorded here.

Correct means: the loss within 1e-5 relative (to the larger of |loss| and the mean |advantage| over
the active tokens), the gradient within 1e-5 of max |gradient|, against moo_kernels' float64 reference.
At a token whose ratio sits on a clip bound (within 1e-5), float32 and float64 may take different,
equally valid sides of the kink: there the gradient may match either one-sided value.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from typing import Any

import torch

import moo_kernels
from moo_kernels._codes import LOG_RATIO_MAX
from moo_kernels.ops.loss.reference import policy_loss_grad_reference, policy_loss_reference

from .core import Case, Impl, Suite, moo_label, with_backend

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
SAMPLING_NOISE = 0.002  # std of sampling_logp - old_logp: the sampler's small numerical mismatch
TRL_IS_HIGH = 3.0  # TRL's vllm_importance_sampling_clip_max default
CPU_SPEEDUP_TARGET = 3.0  # C++ against eager PyTorch, forward + backward
CUDA_GBPS_TARGET = 2000.0  # effective GB/s of moo_kernels over the minimal traffic
LOSS_OPTIONS = dict(beta=BETA, kl=KL, mode="clip", agg="token-mean")
LOSS_CONFIG = dict(LOSS_OPTIONS, clip_low=CLIP_LOW, clip_high=CLIP_HIGH)  # as recorded in the JSON
LIGER_NOTE = (
    "not timed here: triton_grpo_loss takes logits and completion ids (it computes the log-probs itself); "
    "see the logits_loss suite"
)


def package_status(module: str, distribution: str) -> dict[str, Any]:
    """Whether a peer's module is importable, and its distribution's version."""
    found = importlib.util.find_spec(module) is not None
    version = None
    if found:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version(distribution)
        except Exception:  # noqa: BLE001 - a version we can do without
            version = None
    return {"importable": found, "version": version}


def liger_status() -> dict[str, Any]:
    """Whether liger_kernel is importable, and its version."""
    return package_status("liger_kernel", "liger-kernel")


def sequence_inputs(b: int, t: int, logp: Tensor, gen: torch.Generator, device: str) -> dict[str, Any]:
    """old_logp, ref_logp close to logp (float32, [B, T], <= 0), advantages N(0, 1) [B], and a bool mask from
    a random length per sequence, uniform in [0.5 T, 1.1 T] capped at T (about 79% of the tokens active)."""
    old = (logp + OLD_NOISE * torch.randn(b, t, generator=gen)).clamp(max=0.0)
    ref = (logp + REF_NOISE * torch.randn(b, t, generator=gen)).clamp(max=0.0)
    adv = torch.randn(b, generator=gen)
    lengths = (t * (0.5 + 0.6 * torch.rand(b, generator=gen))).long().clamp(1, t)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    return {
        "old_logp": old.to(device),
        "ref_logp": ref.to(device),
        "advantages": adv.to(device),
        "mask": mask.to(device),
        "active": int(lengths.sum()),
    }


def reference_grads(
    lp: Tensor, inp: dict[str, Any], **extra: Any
) -> tuple[Tensor, Tensor, Tensor, float, dict[str, float]]:
    """float64 loss pieces of the reference at log-probs lp: (d loss / d logp, the two one-sided alternatives
    with the clip bounds moved out / in by BOUNDARY_EPS, the loss scale, the reference's metrics + loss); extra:
    more loss options."""
    adv, mask = inp["advantages"], inp["mask"]
    kw = dict(old_logp=inp["old_logp"], ref_logp=inp["ref_logp"], **LOSS_OPTIONS, **extra)
    loss, metrics = policy_loss_reference(lp, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, **kw)
    g = policy_loss_grad_reference(lp, adv, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, **kw)
    alts = [
        policy_loss_grad_reference(lp, adv, mask, clip_low=CLIP_LOW + s, clip_high=CLIP_HIGH + s, **kw)
        for s in (BOUNDARY_EPS, -BOUNDARY_EPS)
    ]
    m = mask.double()
    mean_abs_adv = float((adv.double().abs()[:, None] * m).sum() / m.sum().clamp(min=1))
    stats = {k: float(v) for k, v in metrics.items()} | {"loss": float(loss)}
    return g, alts[0], alts[1], max(abs(float(loss)), mean_abs_adv), stats


def loss_errors(got_loss: float, ref_loss: float, loss_scale: float, grad_err: float, grad_scale: float,
                tol: dict[str, float], **extra: Any) -> dict[str, Any]:  # fmt: skip
    """The errors of one (loss, gradient) and whether they are within tol {"loss": rtol, "grad": rtol}."""
    if not math.isfinite(got_loss) or not math.isfinite(grad_err):
        return {"ok": False, "why": "non-finite loss or gradient"}
    loss_abs = abs(got_loss - ref_loss)
    out = {
        "loss": got_loss,
        "loss_abs_err": loss_abs,
        "loss_rel_err": loss_abs / loss_scale,
        "grad_max_abs_err": grad_err,
        "grad_rel_err": grad_err / grad_scale if grad_scale > 0 else grad_err,
        **extra,
    }
    out["error"] = max(out["loss_rel_err"], out["grad_rel_err"])
    out["ok"] = out["loss_rel_err"] <= tol["loss"] and out["grad_rel_err"] <= tol["grad"]
    out["why"] = (
        f"loss rel err {out['loss_rel_err']:.3g} (tol {tol['loss']}), "
        f"grad err / max|grad| {out['grad_rel_err']:.3g} (tol {tol['grad']})"
    )
    return out


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


def trl_is_weights(old_logp: Tensor, sampling_logp: Tensor, mask: Tensor) -> Tensor:
    """TRL's vLLM importance-sampling ratio, mode sequence_mask (no gradient): [B, 1]."""
    with torch.no_grad():
        diff = torch.nan_to_num((old_logp - sampling_logp) * mask, nan=0.0).sum(dim=-1, keepdim=True)
        ratio = torch.exp(diff)
        return ratio.masked_fill(ratio > TRL_IS_HIGH, 0.0)


def eager_trl_default(logp: Tensor, old_logp: Tensor, sampling_logp: Tensor, ref_logp: Tensor,
                      advantages: Tensor, mask: Tensor) -> Tensor:  # fmt: skip
    """TRL's default loss with vLLM importance sampling and a KL term, written with torch ops as TRL writes it."""
    is_ratio = trl_is_weights(old_logp, sampling_logp, mask)
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX))
    adv = advantages.unsqueeze(1)
    surrogate = torch.min(ratio * adv, ratio.clamp(1.0 - CLIP_LOW, 1.0 + CLIP_HIGH) * adv)
    log_ref_ratio = (ref_logp - logp).clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)
    kl = (torch.exp(log_ref_ratio) - log_ref_ratio - 1.0) * ratio  # use_bias_correction_kl
    per_token = -surrogate * is_ratio + BETA * kl
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def moo_trl_default(logp: Tensor, inp: dict[str, Any]) -> Tensor:
    """The same with moo_kernels: rollout_correction's sequence mask, then policy_loss with its weights."""
    w = moo_kernels.rollout_correction(
        inp["old_logp"], inp["sampling_logp"], inp["mask"], level="sequence", mode="mask", high=TRL_IS_HIGH
    ).is_weights
    kw = dict(LOSS_OPTIONS, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, kl_bias_correction=True)
    return moo_kernels.policy_loss(
        logp, inp["advantages"], inp["mask"], old_logp=inp["old_logp"], ref_logp=inp["ref_logp"], is_weights=w, **kw
    )[0]


def make_step(loss_fn: Callable[[Tensor], Tensor], leaf: Tensor) -> Callable[[], tuple[Tensor, Tensor]]:
    """One forward of loss_fn(leaf), loss.backward(); returns (loss, leaf.grad)."""

    def step() -> tuple[Tensor, Tensor]:
        leaf.grad = None
        loss = loss_fn(leaf)
        loss.backward()
        return loss, leaf.grad

    return step


class PolicyLossSuite(Suite):
    name = "policy_loss"
    title = "policy loss from log-probs, fwd + bwd"
    x_label = "B x T (tokens)"
    dims = ("b", "t")
    presets = {
        "cpu": {
            "tiny": [(8, 512), (8, 128)],
            "small": [(16, 2048), (16, 512)],
            "default": [(64, 4096), (64, 1024), (64, 2048)],
            "large": [(256, 8192), (64, 4096)],
        },
        "cuda": {
            "tiny": [(32, 1024), (32, 256)],
            "small": [(128, 4096), (128, 1024)],
            "default": [(512, 8192), (512, 1024), (512, 4096), (512, 16384)],
            "large": [(1024, 16384), (512, 8192), (1024, 32768)],
        },
    }
    error_kind = "max of loss, grad rel"
    bytes_formula = "B*T*(4+4+4+1+4) + B*4 bytes (logp, old_logp, ref_logp, mask, advantages read; gradient written)"

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.choose_backend(lambda: self._moo_step(self._inputs(2, 16, 0)), "policy_loss")
        self.info["liger"] = dict(liger_status(), timed=False, why=LIGER_NOTE)
        label = moo_label(ctx.device, self.backend)
        self.names = {"moo": label, "eager": "eager PyTorch (TRL/verl style)", "moo_trl": f"{label}, TRL default + IS",
                      "eager_trl": "eager PyTorch, TRL default + IS"}  # fmt: skip
        self.compiled = None
        if ctx.use_compile:
            self.names["compiled"] = "torch.compile(eager)"
            self.compiled = torch.compile(eager_policy_loss, dynamic=False)
        self.speedup_of = {"moo": [k for k in self.names if k in ("eager", "compiled")], "moo_trl": ["eager_trl"]}

    def _inputs(self, b: int, t: int, seed: int) -> dict[str, Any]:
        """logp = -exp(N(-1.5, 1.5)) (median about -0.22, a long tail), clamped to [-25, -1e-6]."""
        gen = torch.Generator().manual_seed(seed)
        logp = (-torch.exp(-1.5 + 1.5 * torch.randn(b, t, generator=gen))).clamp(-25.0, -1e-6)
        inp = sequence_inputs(b, t, logp, gen, self.ctx.device)
        inp["logp"] = logp.to(self.ctx.device).requires_grad_()
        old = inp["old_logp"]
        noise = SAMPLING_NOISE * torch.randn(b, t, generator=gen).to(old.device)
        inp["sampling_logp"] = (old + noise).clamp(max=0.0)
        return inp

    def _moo_step(self, inp: dict[str, Any]) -> Callable[[], tuple[Tensor, Tensor]]:
        kw = dict(old_logp=inp["old_logp"], ref_logp=inp["ref_logp"], clip_low=CLIP_LOW, clip_high=CLIP_HIGH)
        kw |= LOSS_OPTIONS
        return make_step(lambda lp: moo_kernels.policy_loss(lp, inp["advantages"], inp["mask"], **kw)[0], inp["logp"])

    def make_case(self, size: dict[str, int], seed: int, main: bool) -> Case:
        b, t = size["b"], size["t"]
        inp = self._inputs(b, t, seed)
        lp = inp["logp"].detach().cpu().double()
        cpu_inp = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in inp.items()}
        g, g_out, g_in, loss_scale, stats = reference_grads(lp, cpu_inp)
        with moo_kernels.use_backend("reference"):
            w_ref = moo_kernels.rollout_correction(
                cpu_inp["old_logp"].double(), cpu_inp["sampling_logp"].double(), cpu_inp["mask"], level="sequence",
                mode="mask", high=TRL_IS_HIGH,
            ).is_weights  # fmt: skip
        trl = reference_grads(lp, cpu_inp, kl_bias_correction=True, is_weights=w_ref)
        references = {"main": (g, g_out, g_in, loss_scale, stats), "trl": trl}
        boundary = int((g_out != g_in).sum())
        args = (inp["old_logp"], inp["ref_logp"], inp["advantages"], inp["mask"])
        trl_args = (inp["old_logp"], inp["sampling_logp"], inp["ref_logp"], inp["advantages"], inp["mask"])
        impls = [
            Impl("moo", self._moo_step(inp)),
            Impl("eager", make_step(lambda x: eager_policy_loss(x, *args), inp["logp"])),
            Impl("moo_trl", make_step(lambda x: moo_trl_default(x, inp), inp["logp"]), check="trl"),
            Impl("eager_trl", make_step(lambda x: eager_trl_default(x, *trl_args), inp["logp"]), check="trl"),
        ]
        if self.compiled is not None:
            compiled = self.compiled
            impls.append(Impl("compiled", make_step(lambda x: compiled(x, *args), inp["logp"]), optional=True))

        def check(impl: Impl, out: tuple[Tensor, Tensor]) -> dict[str, Any]:
            loss, grad = out
            if grad is None or tuple(grad.shape) != (b, t):
                return {"ok": False, "why": "no gradient or wrong shape"}
            r, r_out, r_in, scale, ref_stats = references[impl.check]
            got = grad.detach().cpu().double()
            diff = torch.minimum(torch.minimum((got - r).abs(), (got - r_out).abs()), (got - r_in).abs())
            err = float(diff.max()) if bool(torch.isfinite(got).all()) else math.inf
            tol = {"loss": LOSS_RTOL, "grad": GRAD_RTOL}
            return loss_errors(float(loss.detach()), ref_stats["loss"], scale, err, float(r.abs().max()), tol,
                               boundary_tokens=int((r_out != r_in).sum()))  # fmt: skip

        return Case(
            size=size,
            label=f"B={b} T={t}",
            x=b * t,
            impls=[with_backend(i, self.backend) for i in impls],
            check=check,
            nbytes=b * t * (4 + 4 + 4 + 1 + 4) + b * 4,
            summary={
                "tokens": b * t,
                "active_tokens": inp["active"],
                "boundary_tokens": boundary,
                "reference_loss": stats["loss"],
                "reference_metrics": stats,
            },  # fmt: skip
        )

    def config(self) -> dict[str, Any]:
        return {
            **LOSS_CONFIG,
            "mask": "bool, a random length per sequence (uniform in [0.5 T, 1.1 T], capped at T)",
            "inputs": f"logp = -exp(N(-1.5, 1.5)) clamped to [-25, -1e-6]; old_logp = logp + N(0, {OLD_NOISE}), "
            f"ref_logp = logp + N(0, {REF_NOISE}), both <= 0; advantages N(0, 1)",
            "loss_rtol": LOSS_RTOL,
            "grad_rtol": GRAD_RTOL,
            "boundary_eps": BOUNDARY_EPS,
            "trl_default_rows": {
                "vllm_importance_sampling_mode": "sequence_mask",
                "vllm_importance_sampling_clip_max": TRL_IS_HIGH,
                "use_bias_correction_kl": True,
                "sampling_logp": f"old_logp + N(0, {SAMPLING_NOISE}), <= 0",
            },
        }

    def config_line(self, main: dict[str, Any] | None) -> str:
        active = f", {main['active_tokens'] / main['tokens']:.0%} of tokens active" if main else ""
        return (
            f"mode clip [{1 - CLIP_LOW:g}, {1 + CLIP_HIGH:g}], k3 KL beta {BETA}, token-mean, "
            f"{str(self.dtype).removeprefix('torch.')}{active}; Liger-Kernel: {LIGER_NOTE}"
        )

    def targets(self, main: dict[str, Any] | None) -> dict[str, Any]:
        if main is None:
            return {}
        if self.ctx.device == "cpu":
            sp = main["speedups"].get("moo", {}).get("eager")
            ok = sp is not None and sp >= CPU_SPEEDUP_TARGET and not self.info.get("moo_fallback_reason")
            return {"cpu_speedup_vs_eager": {"target": CPU_SPEEDUP_TARGET, "value": sp, "met": bool(ok)}}
        bw = main["bandwidth"].get("moo", {})
        best = max((f["gbps"] for k, f in bw.items() if k.startswith("device")), default=None)
        return {
            "cuda_effective_gbps": {
                "target": CUDA_GBPS_TARGET,
                "value": best,
                "figure": "best of the device-time figures (CUDA graph: one replay, back-to-back replays)",
                "met": bool(best is not None and best >= CUDA_GBPS_TARGET),
            }
        }
