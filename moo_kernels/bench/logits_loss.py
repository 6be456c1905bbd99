"""Suite "logits_loss": the GRPO token loss straight from logits (moo_kernels.policy_loss_from_logits), fwd + bwd.

The computation: log-probs of the sampled tokens from log_softmax(logits / temperature), temperature 1,
then the policy_loss suite's loss (clip [0.8, 1.28], k3 KL beta 0.04, token-mean); the loss and
d loss / d logits. Logits bfloat16 on CUDA, float32 on the CPU by default (--dtype); math in float32.

Compared: moo_kernels, and the same with inplace_backward=True (the gradient overwrites the logits);
the loss as TRL's GRPOTrainer computes it (per sequence log_softmax(logits.float() / temperature) and a
gather, then the loss), written here independently; torch.compile of it where compiling is on;
Liger-Kernel's triton_grpo_loss (CUDA, when importable), in place (its default) and not, with the
options of LIGER_MAPPING (recorded in the JSON).

The oracle is float64, from moo_kernels' reference building blocks, over chunks of rows so that the
float64 [B, T, V] gradient is never held whole; every row of every gradient is compared. In-place
steps are checked on fresh logits, then timed on their overwritten buffer (the work does not depend on
the values).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

import moo_kernels
from moo_kernels.ops.logits.reference import token_logprobs_grad_reference, token_logprobs_reference

from .core import Case, Impl, Suite, moo_label, with_backend
from .policy_loss import (
    BETA,
    BOUNDARY_EPS,
    CLIP_HIGH,
    CLIP_LOW,
    LOSS_CONFIG,
    LOSS_OPTIONS,
    liger_status,
    loss_errors,
    make_step,
    reference_grads,
    sequence_inputs,
)

Tensor = torch.Tensor

TEMPERATURE = 1.0
# Per logits dtype: the loss error relative to max(|loss|, mean |A|), the gradient's max abs error
# relative to max |gradient| (bfloat16 gradients carry a rounding of 2^-8 of each entry).
TOLERANCE = {"float32": {"loss": 1e-5, "grad": 1e-5}, "bfloat16": {"loss": 1e-5, "grad": 1e-2}}
GRAD_ACCURACY_SLACK = 0.01  # moo's max abs gradient error may exceed Liger's by 1% (one bf16 rounding flip)
CUDA_SPEEDUP_VS_LIGER_TARGET = 1.0  # moo's device time against Liger's, best variant of each, main size
LOGIT_STD = 2.0  # logits N(0, LOGIT_STD^2)
PICK_MEAN, PICK_STD = 2.0, 2.0  # the sampled token's logit: log V + LOGIT_STD^2 / 2 + N(PICK_MEAN, PICK_STD^2)
REF_CHUNK_BYTES = 1 << 30  # float64 working set of one chunk of rows of the reference gradient

LIGER_VERSION = "0.8.5"
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


def row_chunks(b: int, t: int, v: int) -> Iterator[tuple[int, slice]]:
    """(sequence, token slice) chunks with a float64 working set of about REF_CHUNK_BYTES."""
    step = max(1, min(t, REF_CHUNK_BYTES // (4 * 8 * v)))
    for i in range(b):
        for t0 in range(0, t, step):
            yield i, slice(t0, min(t, t0 + step))


def make_inputs(b: int, t: int, v: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, Any]:
    """Random logits with a likely sampled token (median log-prob about -0.13, a long tail), close old /
    reference log-probs, a length-based mask. The logits are drawn on the device, the [B, T] inputs on
    the host (the same on every device for a seed)."""
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
    inp = sequence_inputs(b, t, logp64.float().cpu(), gen, device)
    return inp | {"logits": logits.requires_grad_(), "tokens": tokens, "logp64": logp64}


def own_buffer(logits: Tensor, extra_position: bool = False) -> tuple[Tensor, Callable[[], None]]:
    """A leaf copy of the logits of its own ([B, T+1, V] with extra_position), and a refresh() that copies the
    pristine logits into it again (after an in-place gradient overwrote it)."""
    b, t, v = logits.shape
    buf = torch.empty(b, t + int(extra_position), v, dtype=logits.dtype, device=logits.device)
    if extra_position:
        buf[:, t].normal_(0.0, LOGIT_STD)
    buf.requires_grad_()

    def refresh() -> None:
        buf.grad = None
        with torch.no_grad():
            buf[:, :t].copy_(logits)

    refresh()
    return buf, refresh


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


def moo_loss(inp: dict[str, Any], inplace: bool) -> Callable[[Tensor], Tensor]:
    """The public op, called as a trainer would (mode given only where the public function takes it)."""
    kw = dict(temperature=TEMPERATURE, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, **LOSS_OPTIONS)
    params = inspect.signature(moo_kernels.policy_loss_from_logits).parameters
    if "mode" not in params and not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        del kw["mode"]
    if inplace:
        kw["inplace_backward"] = True
    args = (inp["tokens"], inp["advantages"], inp["mask"])
    return lambda x: moo_kernels.policy_loss_from_logits(
        x, *args, old_logp=inp["old_logp"], ref_logp=inp["ref_logp"], **kw
    )[0]


def liger_step(inp: dict[str, Any], buf: Tensor, inplace: bool) -> Callable[[], tuple[Tensor, Tensor]]:
    """Liger-Kernel's triton_grpo_loss with the options of LIGER_MAPPING, then loss.backward()."""
    from liger_kernel.transformers.grpo_loss import triton_grpo_loss

    t = inp["tokens"].shape[1]
    liger_mask = inp["mask"].to(torch.int32)

    def step() -> tuple[Tensor, Tensor]:
        buf.grad = None
        loss, _ = triton_grpo_loss(
            buf, inp["old_logp"], inp["ref_logp"], inp["tokens"], inp["advantages"], liger_mask,
            temperature=TEMPERATURE, beta=BETA, eps_low=CLIP_LOW, eps_high=CLIP_HIGH, inplace=inplace,
            loss_type=LIGER_MAPPING["loss_type"], importance_sampling_level="token", reduce=True,
        )  # fmt: skip
        loss.backward()
        return loss, buf.grad[:, :t]

    return step


class LogitsLossSuite(Suite):
    name = "logits_loss"
    title = "GRPO loss from logits, fwd + bwd"
    x_label = "B x T x V (logits)"
    dims = ("b", "t", "v")
    presets = {
        "cpu": {
            "tiny": [(2, 16, 512), (1, 8, 1024)],
            "small": [(2, 64, 2048), (1, 64, 8192)],
            "default": [(2, 128, 4096), (4, 128, 1024), (1, 64, 16384)],
            "large": [(4, 256, 32000), (2, 128, 4096)],
        },
        "cuda": {
            "tiny": [(2, 512, 32000), (1, 256, 151936)],
            "small": [(2, 2048, 32000), (1, 1024, 151936)],
            "default": [(4, 4096, 151936), (8, 2048, 32000)],
            "large": [(8, 4096, 151936), (4, 4096, 151936), (8, 2048, 32000)],
        },
    }
    dtypes = {"cpu": "float32", "cuda": "bfloat16"}
    supported_dtypes = ("float32", "bfloat16")
    error_kind = "max of loss, grad rel"
    bytes_formula = "2 * B*T*V * element size (logits read once, gradient written once)"

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        cuda = ctx.device == "cuda"

        def probe() -> Callable[[], tuple[Tensor, Tensor]]:
            inp = make_inputs(1, 4, 64, self.dtype, "cpu")
            return make_step(moo_loss(inp, False), inp["logits"])

        self.choose_backend(probe, "logits")
        moo = moo_label(ctx.device, self.backend)
        self.names = {"moo": moo, "moo_inplace": f"{moo}, in place", "eager": "eager PyTorch (TRL style)"}
        self.compiled = None
        if ctx.use_compile:
            self.names["compiled"] = "torch.compile(eager)"
            self.compiled = torch.compile(eager_logits_loss, dynamic=False)
        liger = liger_status()
        self.use_liger = cuda and liger["importable"]
        why = "timed" if self.use_liger else ("not importable" if cuda else "its kernels run on CUDA only")
        self.info["liger"] = dict(liger, expected_version=LIGER_VERSION, timed=self.use_liger, why=why,
                                  mapping=LIGER_MAPPING)  # fmt: skip
        if self.use_liger:
            self.names |= {"liger": "Liger-Kernel", "liger_inplace": "Liger-Kernel, in place"}
        elif cuda:
            self.notes.append("liger_kernel is not importable: Liger-Kernel is not timed")
        self.speedup_of = {"moo": [k for k in self.names if not k.startswith("moo")]}

    def make_case(self, size: dict[str, int], seed: int, main: bool) -> Case:
        b, t, v = size["b"], size["t"], size["v"]
        inp = make_inputs(b, t, v, self.dtype, self.ctx.device, seed=seed)
        logits, tokens = inp["logits"], inp["tokens"]
        g, g_out, g_in, loss_scale, stats = reference_grads(inp["logp64"], inp)
        boundary = g_out != g_in
        grad_scale = 0.0
        for i, ts in row_chunks(b, t, v):
            grad = token_logprobs_grad_reference(logits[i, ts], tokens[i, ts], g[i, ts], None, TEMPERATURE)
            grad_scale = max(grad_scale, float(grad.abs().max()))
        del grad

        def release(x: Tensor) -> Callable[[], None]:
            return lambda: setattr(x, "grad", None)

        args = (tokens, inp["old_logp"], inp["ref_logp"], inp["advantages"], inp["mask"])
        buf, refresh = own_buffer(logits)
        impls = [
            Impl("moo", make_step(moo_loss(inp, False), logits), release=release(logits)),
            Impl("moo_inplace", make_step(moo_loss(inp, True), buf), prepare=refresh, release=release(buf)),
            Impl("eager", make_step(lambda x: eager_logits_loss(x, *args), logits), release=release(logits)),
        ]
        if self.compiled is not None:
            compiled = self.compiled
            step = make_step(lambda x: compiled(x, *args), logits)
            impls.append(Impl("compiled", step, optional=True, release=release(logits)))
        for key, inplace in (("liger", False), ("liger_inplace", True)) if self.use_liger else ():
            lbuf, lrefresh = own_buffer(logits, extra_position=True)
            step = liger_step(inp, lbuf, inplace)
            impls.append(Impl(key, step, optional=True, prepare=lrefresh, release=release(lbuf)))
        tol = TOLERANCE[str(self.dtype).removeprefix("torch.")]

        def check(impl: Impl, out: tuple[Tensor, Tensor]) -> dict[str, Any]:
            """Row chunk by row chunk; at a token on a clip bound the nearer of the two one-sided gradients."""
            loss, grad = out
            if grad is None or tuple(grad.shape) != (b, t, v):
                return {"ok": False, "why": "no gradient or wrong shape"}
            grad = grad.detach()
            max_err, sum_sq = 0.0, 0.0
            for i, ts in row_chunks(b, t, v):
                z, y, got = logits[i, ts], tokens[i, ts], grad[i, ts].double()
                diff = (got - token_logprobs_grad_reference(z, y, g[i, ts], None, TEMPERATURE)).abs()
                sum_sq += float((diff * diff).sum())
                row_err = diff.amax(-1)
                kink = boundary[i, ts].nonzero().flatten()
                if len(kink):
                    for alt in (g_out, g_in):
                        other = token_logprobs_grad_reference(z[kink], y[kink], alt[i, ts][kink], None, TEMPERATURE)
                        row_err[kink] = torch.minimum(row_err[kink], (got[kink] - other).abs().amax(-1))
                max_err = max(max_err, float(row_err.max()))
            return loss_errors(float(loss.detach()), stats["loss"], loss_scale, max_err, grad_scale, tol,
                               grad_rms_err=math.sqrt(sum_sq / (b * t * v)),
                               boundary_tokens=int(boundary.sum()))  # fmt: skip

        return Case(
            size=size,
            label=f"B={b} T={t} V={v}",
            x=b * t * v,
            impls=[with_backend(i, self.backend) for i in impls],
            check=check,
            nbytes=2 * b * t * v * logits.element_size(),
            summary={
                "tokens": b * t,
                "active_tokens": inp["active"],
                "boundary_tokens": int(boundary.sum()),
                "reference_loss": stats["loss"],
                "reference_grad_max_abs": grad_scale,
                "reference_metrics": stats,
            },  # fmt: skip
        )

    def config(self) -> dict[str, Any]:
        tol = TOLERANCE[str(self.dtype).removeprefix("torch.")]
        return {
            "temperature": TEMPERATURE,
            **LOSS_CONFIG,
            "inputs": f"logits N(0, {LOGIT_STD}^2), the sampled token's logit log V + {LOGIT_STD**2 / 2:g} + "
            f"N({PICK_MEAN}, {PICK_STD}^2); old_logp, ref_logp and mask as in the policy_loss suite",
            "loss_rtol": tol["loss"],
            "grad_rtol": tol["grad"],
            "boundary_eps": BOUNDARY_EPS,
            "in_place_timing": "in-place steps are checked on fresh logits, then timed on their overwritten buffer",
        }

    def config_line(self, main: dict[str, Any] | None) -> str:
        return (
            f"{str(self.dtype).removeprefix('torch.')} logits, temperature {TEMPERATURE:g}, mode clip "
            f"[{1 - CLIP_LOW:g}, {1 + CLIP_HIGH:g}], k3 KL beta {BETA}, token-mean; "
            f"Liger-Kernel: {self.info['liger']['why']}"
        )

    def targets(self, main: dict[str, Any] | None) -> dict[str, Any]:
        """CUDA with Liger: moo against Liger in device time (best variant of each), and gradient accuracy."""
        if main is None or not self.use_liger:
            return {}
        moo_keys, liger_keys = ("moo", "moo_inplace"), ("liger", "liger_inplace")
        dev = {k: x["median_us"] for k, x in main["device_timings"].items() if isinstance(x, dict)}
        moo_us = min((dev[k] for k in moo_keys if k in dev), default=None)
        liger_us = min((dev[k] for k in liger_keys if k in dev), default=None)
        sp = liger_us / moo_us if moo_us and liger_us else None
        errs = main["errors"]
        err = lambda k: errs[k].get("grad_max_abs_err") if isinstance(errs.get(k), dict) else None
        moo_err = max((e for k in moo_keys if (e := err(k)) is not None), default=None)
        liger_err = min((e for k in liger_keys if (e := err(k)) is not None), default=None)
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
                "figure": "moo's max abs logits-gradient error (worse variant) / Liger's (better), vs float64",
                "moo_grad_max_abs_err": moo_err,
                "liger_grad_max_abs_err": liger_err,
                "met": bool(both and moo_err <= liger_err * (1.0 + GRAD_ACCURACY_SLACK)),
            },
        }
