"""Suite "linear_loss": the GRPO loss from hidden states through the lm_head (moo_kernels.policy_loss_from_hidden),
forward + backward, with the peak memory of each implementation.

The computation: logits z = hidden @ weight.T ([B, T, D] hidden, [V, D] weight, no bias), log-probs of the sampled
tokens from log_softmax(z / temperature), temperature 1, then the policy_loss suite's loss (clip [0.8, 1.28], k3 KL
beta 0.04, token-mean over a bool mask); the loss and its gradients with respect to hidden and weight. float32 on
the CPU, bfloat16 on CUDA.

Compared: moo_kernels (its default tiles); the three GEMMs alone, z = h W^T, d h = z W, d W = z^T h (the floor of
the time: every implementation does them); eager PyTorch (the logits materialised, log_softmax in float32 and a
gather, the loss as TRL writes it, autograd); Liger-Kernel's LigerFusedLinearGRPOLoss (plain PyTorch, chunked, run
with compiled=False on the CPU and its default torch.compile on CUDA unless the run skips torch.compile; its
default chunking), when importable; on CUDA, Cut Cross-Entropy's linear_cross_entropy for the log-probs (it has
no policy loss: the loss on them is eager's), when importable.

Peak memory, per implementation, beyond the inputs: on CUDA the rise of max_memory_allocated over one call (the
framework's figure); on the CPU the rise of the peak resident set of a fresh subprocess that builds the inputs
(same seed), resets its peak (/proc/self/clear_refs), runs one call and reads its peak (VmHWM): every
implementation starts from the same state, with glibc's mmap threshold fixed (freed large blocks are returned, so
the resident set counts live memory, not the allocator's cache).

Correct means: the loss within 1e-5 relative (to the larger of |loss| and the mean |advantage| over the active
tokens) and the gradients of hidden and weight within GRAD_RTOL of their max |value|, against float64 autograd
through the materialised logits and moo_kernels' float64 reference loss.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch

import moo_kernels
from moo_kernels._codes import LOG_RATIO_MAX
from moo_kernels.ops.loss.reference import policy_loss_reference

from .core import Case, Impl, Suite, moo_label, with_backend
from .policy_loss import BETA, CLIP_HIGH, CLIP_LOW, LOSS_CONFIG, LOSS_OPTIONS, liger_status, loss_errors, package_status

Tensor = torch.Tensor

TEMPERATURE = 1.0
HIDDEN_STD = 1.0
WEIGHT_STD = 0.05  # logits of std about 0.05 sqrt(D): a realistic spread of log-probs
TOLERANCE = {"float32": {"loss": 1e-5, "grad": 1e-4}, "bfloat16": {"loss": 2e-3, "grad": 3e-2}}
CPU_TARGETS = {"vs_gemms_max": 1.10}  # moo's time at most 1.10x the three GEMMs', main size


def make_inputs(b: int, t: int, d: int, v: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict[str, Any]:
    """hidden N(0, 1), weight N(0, WEIGHT_STD^2), tokens uniform, advantages N(0, 1) [B], a bool mask from a
    random length per sequence (uniform in [0.5 T, 1.1 T] capped at T), old / ref log-probs the head's log-probs
    (float64) plus N(0, 0.15^2) / N(0, 0.2^2)."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, d, generator=gen) * HIDDEN_STD
    weight = torch.randn(v, d, generator=gen) * WEIGHT_STD
    tokens = torch.randint(0, v, (b, t), generator=gen)
    adv = torch.randn(b, generator=gen)
    lengths = (t * (0.5 + 0.6 * torch.rand(b, generator=gen))).long().clamp(1, t)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    h, w = hidden.to(dtype), weight.to(dtype)
    with torch.no_grad():
        lp = torch.log_softmax((h.double() @ w.double().T) / TEMPERATURE, -1).gather(-1, tokens[..., None])[..., 0]
    old = (lp + 0.15 * torch.randn(b, t, generator=gen, dtype=torch.float64)).clamp(max=0.0).float()
    ref = (lp + 0.2 * torch.randn(b, t, generator=gen, dtype=torch.float64)).clamp(max=0.0).float()
    return {
        "hidden": h.to(device).requires_grad_(),
        "weight": w.to(device).requires_grad_(),
        "tokens": tokens.to(device),
        "advantages": adv.to(device),
        "mask": mask.to(device),
        "old_logp": old.to(device),
        "ref_logp": ref.to(device),
        "active": int(lengths.sum()),
    }


def eager_linear_loss(hidden: Tensor, weight: Tensor, inp: dict[str, Any]) -> Tensor:
    """The loss as TRL's GRPOTrainer computes it from materialised logits."""
    z = hidden @ weight.T
    logp = torch.log_softmax(z.float() / TEMPERATURE, dim=-1).gather(-1, inp["tokens"][..., None])[..., 0]
    return loss_on_logp(logp, inp)


def cce_linear_loss(hidden: Tensor, weight: Tensor, inp: dict[str, Any]) -> Tensor:
    """Cut Cross-Entropy's log-probs (linear_cross_entropy, reduction "none", its default kernel and gradient
    filter; the temperature as hidden / temperature), then the loss on them as eager_linear_loss."""
    from cut_cross_entropy import linear_cross_entropy

    e = hidden if TEMPERATURE == 1.0 else hidden / TEMPERATURE
    logp = -linear_cross_entropy(e, weight, inp["tokens"], reduction="none").float()
    return loss_on_logp(logp, inp)


def loss_on_logp(logp: Tensor, inp: dict[str, Any]) -> Tensor:
    """The policy loss on [B, T] log-probs as TRL writes it in torch ops (clip, k3 KL, token-mean)."""
    ratio = torch.exp((logp - inp["old_logp"]).clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX))
    adv = inp["advantages"].unsqueeze(1)
    surrogate = torch.min(ratio * adv, ratio.clamp(1.0 - CLIP_LOW, 1.0 + CLIP_HIGH) * adv)
    log_ref_ratio = (inp["ref_logp"] - logp).clamp(-LOG_RATIO_MAX, LOG_RATIO_MAX)
    per_token = -surrogate + BETA * (torch.exp(log_ref_ratio) - log_ref_ratio - 1.0)
    m = inp["mask"].to(per_token.dtype)
    return (per_token * m).sum() / m.sum().clamp(min=1.0)


def moo_linear_loss(hidden: Tensor, weight: Tensor, inp: dict[str, Any]) -> Tensor:
    kw = dict(LOSS_OPTIONS, clip_low=CLIP_LOW, clip_high=CLIP_HIGH, old_logp=inp["old_logp"], ref_logp=inp["ref_logp"])
    return moo_kernels.policy_loss_from_hidden(
        hidden, weight, inp["tokens"], inp["advantages"], inp["mask"], temperature=TEMPERATURE, **kw
    )[0]


def liger_loss_fn(compiled: bool) -> Callable[[Tensor, Tensor, dict[str, Any]], Tensor]:
    """LigerFusedLinearGRPOLoss with this computation's options (loss_type "bnpo": token-mean over the local
    batch), its default chunking; compiled (its torch.compile) on CUDA unless the run skips torch.compile."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss

    loss = LigerFusedLinearGRPOLoss(beta=BETA, compiled=compiled, use_ref_model=True, epsilon_low=CLIP_LOW,
                                    epsilon_high=CLIP_HIGH, loss_type="bnpo", temperature=TEMPERATURE)  # fmt: skip

    def fn(hidden: Tensor, weight: Tensor, inp: dict[str, Any]) -> Tensor:
        out = loss(hidden, weight, inp["tokens"], inp["mask"].long(), inp["advantages"],
                   ref_per_token_logps=inp["ref_logp"], old_per_token_logps=inp["old_logp"])  # fmt: skip
        return out[0] if isinstance(out, tuple) else out

    return fn


def gemms(hidden: Tensor, weight: Tensor, inp: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
    """The three GEMMs of the loss alone (z stands in for its own gradient)."""
    with torch.no_grad():
        h = hidden.reshape(-1, hidden.shape[-1])
        z = h @ weight.T
        return z[0, 0], z @ weight, z.T @ h


def step_of(loss_fn: Callable, inp: dict[str, Any]) -> Callable[[], tuple[Tensor, tuple]]:
    hidden, weight = inp["hidden"], inp["weight"]

    def step() -> tuple[Tensor, tuple]:
        hidden.grad = weight.grad = None
        loss = loss_fn(hidden, weight, inp)
        loss.backward()
        return loss, (hidden.grad, weight.grad)

    return step


def gemm_step(inp: dict[str, Any]) -> Callable[[], tuple[Tensor, tuple]]:
    def step() -> tuple[Tensor, tuple]:
        z00, gh, gw = gemms(inp["hidden"], inp["weight"], inp)
        return z00, (gh, gw)

    return step


def reference(inp: dict[str, Any]) -> tuple[float, float, Tensor, Tensor]:
    """(loss, loss scale, d hidden, d weight) in float64 by autograd through the materialised logits."""
    h = inp["hidden"].detach().double().requires_grad_()
    w = inp["weight"].detach().double().requires_grad_()
    logp = torch.log_softmax((h @ w.T) / TEMPERATURE, -1).gather(-1, inp["tokens"][..., None])[..., 0]
    kw = dict(LOSS_OPTIONS, clip_low=CLIP_LOW, clip_high=CLIP_HIGH)
    loss, _ = policy_loss_reference(logp, inp["advantages"], inp["mask"], old_logp=inp["old_logp"],
                                    ref_logp=inp["ref_logp"], **kw)  # fmt: skip
    loss.backward()
    m = inp["mask"].double()
    scale = max(
        abs(float(loss.detach())), float((inp["advantages"].double().abs()[:, None] * m).sum() / m.sum().clamp(min=1))
    )
    return float(loss), scale, h.grad, w.grad


IMPLS = ("moo", "gemms", "eager", "liger")


def peak_rss_of(impl: str, size: dict[str, int], dtype: str) -> dict[str, float] | str:
    """The rise of a fresh subprocess's peak resident set over one call of impl (see the top), or why not."""
    args = [sys.executable, "-m", "moo_kernels.bench.linear_loss", "--peak", impl, *map(str, size.values()), dtype]
    # glibc's malloc keeps freed blocks of up to 32 MiB resident once it has raised its mmap threshold (its dynamic
    # threshold): fixed at its default, every large block is mapped and returned when freed, so the resident set
    # counts what is alive, whatever the implementation
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    try:
        res = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    except subprocess.TimeoutExpired:
        return "error: timed out"
    if res.returncode != 0:
        return f"error: {res.stderr.strip().splitlines()[-1] if res.stderr.strip() else res.returncode}"
    return json.loads(res.stdout.strip().splitlines()[-1])


def _status_bytes(field: str) -> float:
    """A size of /proc/self/status (VmRSS: the resident set; VmHWM: its peak), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_main(impl: str, b: int, t: int, d: int, v: int, dtype: str) -> None:
    """The subprocess: the inputs, then the peak resident set reset to the current one (clear_refs 5, Linux), one
    call, and the rise of the peak over the resident set before it."""
    inp = make_inputs(b, t, d, v, getattr(torch, dtype), "cpu")
    fn = {"moo": moo_linear_loss, "eager": eager_linear_loss}.get(impl)
    step = gemm_step(inp) if impl == "gemms" else step_of(fn or liger_loss_fn(False), inp)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_bytes("VmRSS")
    step()
    peak = _status_bytes("VmHWM")
    print(json.dumps({"peak_bytes": max(peak - base, 0.0), "base_rss_bytes": base}))


class LinearLossSuite(Suite):
    name = "linear_loss"
    title = "GRPO loss from hidden states (lm_head fused), fwd + bwd"
    x_label = "B x T x V (logits never materialised by moo)"
    dims = ("b", "t", "d", "v")
    presets = {
        "cpu": {
            "tiny": [(2, 16, 32, 1024), (1, 8, 16, 512)],
            "small": [(2, 64, 64, 8000), (1, 32, 64, 4096)],
            "default": [(4, 128, 256, 32000), (4, 128, 256, 128000), (2, 128, 256, 8000)],
            "large": [(4, 128, 256, 128000), (4, 128, 256, 32000)],
        },
        "cuda": {
            "tiny": [(2, 512, 1024, 32000), (1, 256, 1024, 151936)],
            "small": [(4, 1024, 2048, 151936), (2, 1024, 2048, 32000)],
            "default": [(8, 2048, 4096, 151936), (4, 2048, 4096, 151936)],
            "large": [(8, 4096, 4096, 151936), (8, 2048, 4096, 151936)],
        },
    }
    dtypes = {"cpu": "float32", "cuda": "bfloat16"}
    supported_dtypes = ("float32", "bfloat16")
    error_kind = "max of loss, grad rel"
    bytes_formula = "B*T*D + V*D read, B*T*D + V*D written, element size (the logits never leave the chip)"

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        cuda = ctx.device == "cuda"
        self.choose_backend(lambda: step_of(moo_linear_loss, make_inputs(1, 4, 8, 64, self.dtype, "cpu")), "logits")
        self.names = {"moo": moo_label(ctx.device, self.backend), "gemms": "the three GEMMs alone (floor)",
                      "eager": "eager PyTorch (logits materialised, TRL style)"}  # fmt: skip
        liger = liger_status()
        self.use_liger = liger["importable"]
        self.liger_compiled = cuda and ctx.use_compile  # its default on CUDA; plain PyTorch on the CPU
        entry = "liger_kernel.chunked_loss.LigerFusedLinearGRPOLoss"
        self.info["liger"] = dict(liger, timed=self.use_liger, entry_point=entry, compiled=self.liger_compiled,
                                  loss_type="bnpo")  # fmt: skip
        if self.use_liger:
            self.names["liger"] = "Liger-Kernel fused linear GRPO" + ("" if self.liger_compiled else
                                                                       " (compiled=False)")  # fmt: skip
        else:
            self.notes.append("liger_kernel is not importable: Liger-Kernel is not timed")
        # Cut Cross-Entropy gives log-probs only (its kernels are Triton for CUDA): its log-probs, the loss in torch
        cce = package_status("cut_cross_entropy", "cut-cross-entropy")
        self.use_cce = cuda and cce["importable"]
        self.info["cut_cross_entropy"] = dict(cce, timed=self.use_cce, entry_point="cut_cross_entropy."
                                              "linear_cross_entropy (log-probs), the loss as eager")  # fmt: skip
        if self.use_cce:
            self.names["cce"] = "Cut Cross-Entropy log-probs + eager loss"
        elif cuda:
            self.notes.append("cut_cross_entropy is not importable: Cut Cross-Entropy is not timed")
        self.speedup_of = {"moo": [k for k in self.names if k != "moo"]}

    def make_case(self, size: dict[str, int], seed: int, main: bool) -> Case:
        b, t, d, v = size["b"], size["t"], size["d"], size["v"]
        inp = make_inputs(b, t, d, v, self.dtype, self.ctx.device, seed=seed)
        ref_loss, loss_scale, ref_gh, ref_gw = reference(inp)
        tol = TOLERANCE[str(self.dtype).removeprefix("torch.")]
        release = lambda: (setattr(inp["hidden"], "grad", None), setattr(inp["weight"], "grad", None))  # noqa: E731
        impls = [
            Impl("moo", step_of(moo_linear_loss, inp), graph=False, release=release),
            Impl("gemms", gemm_step(inp), check="gemms", graph=False),
            Impl("eager", step_of(eager_linear_loss, inp), graph=False, release=release),
        ]
        if self.use_liger:
            impls.append(Impl("liger", step_of(liger_loss_fn(self.liger_compiled), inp), optional=True,
                              graph=False, release=release))  # fmt: skip
        if self.use_cce:
            impls.append(Impl("cce", step_of(cce_linear_loss, inp), optional=True, graph=False, release=release))

        def check(impl: Impl, out: tuple[Tensor, tuple]) -> dict[str, Any]:
            loss, (gh, gw) = out
            if impl.check == "gemms":  # nothing to compare: the shapes
                ok = tuple(gh.shape) == (b * t, d) and tuple(gw.shape) == (v, d)
                return {"ok": ok, "error": 0.0, "why": "the GEMMs' shapes"}
            if gh is None or gw is None:
                return {"ok": False, "why": "no gradient"}
            err_h = float((gh.double().cpu() - ref_gh.cpu()).abs().max()) / float(ref_gh.abs().max())
            err_w = float((gw.double().cpu() - ref_gw.cpu()).abs().max()) / float(ref_gw.abs().max())
            out = loss_errors(float(loss.detach()), ref_loss, loss_scale, max(err_h, err_w), 1.0, tol,
                              grad_hidden_rel_err=err_h, grad_weight_rel_err=err_w)  # fmt: skip
            return out

        summary = {"tokens": b * t, "active_tokens": inp["active"], "reference_loss": ref_loss,
                   "logits_bytes": b * t * v * torch.empty((), dtype=self.dtype).element_size()}  # fmt: skip
        if self.ctx.device == "cpu":
            dtype = str(self.dtype).removeprefix("torch.")
            keys = [i.key for i in impls]
            summary["cpu_peak_rss"] = {k: peak_rss_of(k, size, dtype) for k in keys}
        elem = torch.empty((), dtype=self.dtype).element_size()
        return Case(
            size=size,
            label=f"B={b} T={t} D={d} V={v}",
            x=b * t * v,
            impls=[with_backend(i, self.backend) for i in impls],
            check=check,
            nbytes=2 * (b * t * d + v * d) * elem,
            summary=summary,
        )

    def config(self) -> dict[str, Any]:
        return {
            "temperature": TEMPERATURE,
            **LOSS_CONFIG,
            "inputs": f"hidden N(0, {HIDDEN_STD}^2), weight N(0, {WEIGHT_STD}^2), no bias; old_logp / ref_logp the "
            "head's float64 log-probs + N(0, 0.15^2) / N(0, 0.2^2); mask and advantages as the policy_loss suite's",
            "tolerance": TOLERANCE[str(self.dtype).removeprefix("torch.")],
            "peak_memory": "CUDA: max_memory_allocated's rise over one call; CPU: a fresh subprocess per "
            "implementation, the rise of its peak resident set over one call",
        }

    def config_line(self, main: dict[str, Any] | None) -> str:
        return (
            f"{str(self.dtype).removeprefix('torch.')} hidden and weight, temperature {TEMPERATURE:g}, mode clip "
            f"[{1 - CLIP_LOW:g}, {1 + CLIP_HIGH:g}], k3 KL beta {BETA}, token-mean"
        )

    def targets(self, main: dict[str, Any] | None) -> dict[str, Any]:
        if main is None:
            return {}
        tm = {k: x["median_us"] for k, x in main["timings"].items()}
        out: dict[str, Any] = {}
        if "moo" in tm and "gemms" in tm:
            ratio = tm["moo"] / tm["gemms"]
            out["time_vs_gemms"] = {"target": CPU_TARGETS["vs_gemms_max"], "value": ratio,
                                    "met": bool(ratio <= CPU_TARGETS["vs_gemms_max"])}  # fmt: skip
        if "moo" in tm and "liger" in tm:
            out["faster_than_liger"] = {"target": 1.0, "value": tm["liger"] / tm["moo"],
                                        "met": bool(tm["liger"] > tm["moo"])}  # fmt: skip
        peaks = main.get("cpu_peak_rss") or main.get("memory", {})
        mem = {k: p["peak_bytes"] for k, p in peaks.items() if isinstance(p, dict)}
        for other in ("eager", "liger"):
            if "moo" in mem and other in mem and mem[other] > 0:
                out[f"peak_memory_vs_{other}"] = {"target": 1.0, "value": mem["moo"] / mem[other],
                                                  "figure": "moo's peak / theirs (below 1: lower)",
                                                  "met": bool(mem["moo"] < mem[other])}  # fmt: skip
        if "moo" in mem and "eager" in mem:
            saved = (mem["eager"] - mem["moo"]) / main["logits_bytes"]
            out["memory_saved_in_logits"] = {"target": 1.0, "value": saved,
                                             "figure": "(eager's peak - moo's) / the logits' bytes",
                                             "met": bool(saved >= 1.0)}  # fmt: skip
        return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="one call of one implementation in a fresh process: its peak memory")
    ap.add_argument("--peak", choices=IMPLS, required=True)
    ap.add_argument("sizes", nargs=4, type=int)
    ap.add_argument("dtype")
    a = ap.parse_args()
    _peak_main(a.peak, *a.sizes, a.dtype)
