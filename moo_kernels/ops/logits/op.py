"""torch.library registration of the logits ops: implementations, fakes, autograd.

- moo_kernels::token_logprobs (logp, entropy, stats) and its backward moo_kernels::token_logprobs_backward;
  stats [B, T, 2] holds each row's maximum logit and log l = log sum exp((z - max) / tau), what the
  backward needs.
- moo_kernels::policy_loss_from_logits (loss, metrics[11], entropy, grad): grad is d loss / d logits for
  an incoming gradient of 1, computed by the forward itself; the backward only rescales it.

Eager calls go through the autograd.Function classes below (no dispatcher); those also implement
inplace_backward, which writes the gradient into the logits' storage (and bumps the logits' version
counter, so that autograd refuses a backward that saved them before). Under torch.compile the registered
ops run, and the gradient always gets a buffer of its own.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moo_kernels._backend import implementation
from moo_kernels.ops.logits.reference import (
    policy_loss_from_logits_reference,
    row_stats_reference,
    token_logprobs_grad_reference,
    token_logprobs_reference,
)
from moo_kernels.ops.policy_loss.problem import PolicyLossProblem
from moo_kernels.ops.policy_loss.reference import METRICS

NUM_LOSS_ARGS = 19  # advantages .. write_grad: PolicyLossProblem without logp


def _out_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


# ---- token_logprobs ----------------------------------------------------------------------------------------


def run_token_logprobs(logits: Tensor, tokens: Tensor, temperature: float, want_entropy: bool):
    """(logp, stats [B, T, 2], entropy or None), in float32 (float64 for float64 logits)."""
    impl = implementation(logits.device)
    if impl == "triton":
        from moo_kernels.ops.logits.cuda import token_logprobs_fwd_triton

        return token_logprobs_fwd_triton(logits, tokens, temperature, want_entropy)
    if impl == "cpp":
        from moo_kernels.ops.logits.cpu import token_logprobs_fwd_cpp

        return token_logprobs_fwd_cpp(logits, tokens, temperature, want_entropy)
    logp, ent = token_logprobs_reference(logits, tokens, temperature)
    dt = _out_dtype(logits)
    stats = row_stats_reference(logits, temperature).to(dt)  # unused by its backward
    return logp.to(dt), stats, ent.to(dt) if want_entropy else None


def run_token_logprobs_backward(logits, tokens, stats, entropy, g_logp, g_entropy, temperature, out) -> Tensor:
    impl = implementation(logits.device)
    if impl == "triton":
        from moo_kernels.ops.logits.cuda import token_logprobs_bwd_triton

        return token_logprobs_bwd_triton(logits, tokens, stats, entropy, g_logp, g_entropy, temperature, out)
    if impl == "cpp":
        from moo_kernels.ops.logits.cpu import token_logprobs_bwd_cpp

        return token_logprobs_bwd_cpp(logits, tokens, stats, entropy, g_logp, g_entropy, temperature, out)
    return out.copy_(token_logprobs_grad_reference(logits, tokens, g_logp, g_entropy, temperature))


@torch.library.custom_op("moo_kernels::token_logprobs", mutates_args=())
def token_logprobs_op(
    logits: Tensor, tokens: Tensor, temperature: float, want_entropy: bool
) -> tuple[Tensor, Tensor, Tensor]:
    logp, stats, ent = run_token_logprobs(logits, tokens, temperature, want_entropy)
    return logp, ent if ent is not None else logp.new_empty(0), stats


@token_logprobs_op.register_fake
def _(logits, tokens, temperature, want_entropy):
    B, T, _ = logits.shape
    dt = _out_dtype(logits)
    ent = logits.new_empty((B, T), dtype=dt) if want_entropy else logits.new_empty(0, dtype=dt)
    return logits.new_empty((B, T), dtype=dt), ent, logits.new_empty((B, T, 2), dtype=dt)


@torch.library.custom_op("moo_kernels::token_logprobs_backward", mutates_args=())
def token_logprobs_backward_op(
    logits: Tensor,
    tokens: Tensor,
    stats: Tensor,
    entropy: Tensor | None,
    g_logp: Tensor | None,
    g_entropy: Tensor | None,
    temperature: float,
) -> Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return run_token_logprobs_backward(logits, tokens, stats, entropy, g_logp, g_entropy, temperature, out)


@token_logprobs_backward_op.register_fake
def _(logits, *args):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _logprobs_setup_context(ctx, inputs, output) -> None:
    logits, tokens, temperature, want_entropy = inputs
    _, ent, stats = output
    ctx.save_for_backward(logits, tokens, stats, ent)
    ctx.temperature = temperature
    ctx.want_entropy = want_entropy
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)


def _logprobs_grads(ctx, g_logp, g_ent):
    logits, tokens, stats, ent = ctx.saved_tensors
    entropy = ent if ctx.want_entropy else None
    g_ent = g_ent if ctx.want_entropy else None
    return logits, tokens, stats, entropy, g_logp, g_ent


def _logprobs_backward(ctx, g_logp, g_ent, g_stats):
    if g_logp is None and (g_ent is None or not ctx.want_entropy):
        return None, None, None, None
    args = _logprobs_grads(ctx, g_logp, g_ent)
    return token_logprobs_backward_op(*args, ctx.temperature), None, None, None


token_logprobs_op.register_autograd(_logprobs_backward, setup_context=_logprobs_setup_context)


class TokenLogprobsFunction(torch.autograd.Function):
    """The registered op's forward / backward without the dispatcher (eager calls)."""

    @staticmethod
    def forward(logits, tokens, temperature, want_entropy):
        logp, stats, ent = run_token_logprobs(logits, tokens, temperature, want_entropy)
        return logp, ent if ent is not None else logp.new_empty(0), stats

    setup_context = staticmethod(_logprobs_setup_context)

    @staticmethod
    def backward(ctx, g_logp, g_ent, g_stats):
        if g_logp is None and (g_ent is None or not ctx.want_entropy):
            return None, None, None, None
        logits, *rest = _logprobs_grads(ctx, g_logp, g_ent)
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        return run_token_logprobs_backward(logits, *rest, ctx.temperature, out), None, None, None


# ---- policy_loss_from_logits -------------------------------------------------------------------------------


def run_logits_loss(logits: Tensor, tokens: Tensor, temperature: float, want_entropy: bool, grad, p):
    """(loss, metrics[11], entropy or None) of the loss problem p (p.logp unused); the gradient for an
    incoming gradient of 1 is written into grad when it is not None (grad may be logits itself)."""
    impl = implementation(logits.device)
    if impl == "reference":
        loss, metrics, ent, g = policy_loss_from_logits_reference(
            logits, tokens, p.advantages, p.mask, temperature=temperature, **p.reference_kwargs()
        )
        if grad is not None:
            grad.copy_(g)
        dt = _out_dtype(logits)
        metrics = torch.stack([metrics[k] for k in METRICS]).to(dt)
        return loss.to(dt), metrics, ent.to(torch.float32) if want_entropy else None
    if impl == "triton" and p.mode != "gspo":
        from moo_kernels.ops.logits.cuda import logits_loss_triton

        return logits_loss_triton(logits, tokens, p, temperature, want_entropy, grad)
    # Two kernels: log-probs first, then the loss on them, then the gradient of the log-probs (the GSPO
    # sequence ratio needs every token's log-prob before any gradient is known; the CPU takes this path
    # for every mode).
    if impl == "triton":
        from moo_kernels.ops.policy_loss.cuda import policy_loss_triton as loss_fn
    else:
        from moo_kernels.ops.policy_loss.cpu import policy_loss_cpp as loss_fn
    logp, stats, ent = run_token_logprobs(logits, tokens, temperature, want_entropy)
    loss, metrics, g_logp = loss_fn(p._replace(logp=logp))
    if grad is not None:
        run_token_logprobs_backward(logits, tokens, stats, None, g_logp, None, temperature, grad)
    return loss, metrics, ent.to(torch.float32) if ent is not None else None


def problem_from_args(loss_args) -> PolicyLossProblem:
    return PolicyLossProblem(None, *loss_args)


@torch.library.custom_op("moo_kernels::policy_loss_from_logits", mutates_args=())
def policy_loss_from_logits_op(
    logits: Tensor,
    tokens: Tensor,
    temperature: float,
    want_entropy: bool,
    advantages: Tensor,
    mask: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    token_advantages: Tensor | None,
    is_weights: Tensor | None,
    offpolicy: Tensor | None,
    beta: float,
    kl: str,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    ratio_cap: float | None,
    mode: str,
    offpolicy_gamma: float,
    agg: str,
    max_len: int | None,
    num_tokens: float | None,
    write_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    p = problem_from_args((advantages, mask, old_logp, ref_logp, token_advantages, is_weights, offpolicy, beta, kl,
                           clip_low, clip_high, dual_clip, ratio_cap, mode, offpolicy_gamma, agg, max_len,
                           num_tokens, write_grad))  # fmt: skip
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if write_grad else None
    loss, metrics, ent = run_logits_loss(logits, tokens, temperature, want_entropy, grad, p)
    empty = logits.new_empty(0)
    return loss, metrics, ent if ent is not None else empty.float(), grad if grad is not None else empty


@policy_loss_from_logits_op.register_fake
def _(logits, tokens, temperature, want_entropy, *loss_args):
    B, T, _ = logits.shape
    write_grad = loss_args[-1]
    dt = _out_dtype(logits)
    ent = logits.new_empty((B, T) if want_entropy else (0,), dtype=torch.float32)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if write_grad else logits.new_empty(0)
    return logits.new_empty((), dtype=dt), logits.new_empty((len(METRICS),), dtype=dt), ent, grad


def _loss_setup_context(ctx, inputs, output) -> None:
    _, metrics, ent, grad = output
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(metrics, ent, grad)


def _loss_backward(ctx, g_loss, *unused):
    (grad,) = ctx.saved_tensors
    return (grad * g_loss.to(grad.dtype),) + (None,) * (3 + NUM_LOSS_ARGS)


policy_loss_from_logits_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)


def scale_grad_(grad: Tensor, g: Tensor) -> Tensor:
    """grad *= g in place, skipped when g == 1 (on a GPU decided on the device: no synchronisation)."""
    if grad.is_cuda:
        from moo_kernels.ops.logits.cuda import scale_

        return scale_(grad, g)
    if float(g) != 1.0:
        grad.mul_(g.to(grad.dtype))
    return grad


class LogitsLossFunction(torch.autograd.Function):
    """Eager form of the op, with inplace_backward: the gradient buffer is the logits' storage."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature, want_entropy, inplace, *loss_args):
        p = problem_from_args(loss_args)
        grad = None
        if p.write_grad:
            grad = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        loss, metrics, ent = run_logits_loss(logits, tokens, temperature, want_entropy, grad, p)
        if grad is logits:
            # the logits were overwritten in place: an op that saved them for its backward must see it
            torch.autograd.graph.increment_version(logits)
        ctx.grad = grad  # an attribute, not a saved tensor: with inplace it is the (overwritten) input
        ent = ent if ent is not None else logits.new_empty(0, dtype=torch.float32)
        ctx.mark_non_differentiable(metrics, ent)
        return loss, metrics, ent

    @staticmethod
    def backward(ctx, g_loss, *unused):
        if ctx.grad is None:  # handed over by an earlier backward
            raise RuntimeError(
                "policy_loss_from_logits: backward ran twice through the same call (retain_graph); its gradient "
                "buffer is rescaled in place, so call the loss again instead"
            )
        grad, ctx.grad = ctx.grad, None
        return (scale_grad_(grad, g_loss),) + (None,) * (4 + NUM_LOSS_ARGS)
