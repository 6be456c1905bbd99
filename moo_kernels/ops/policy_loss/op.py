"""torch.library registration of the policy loss: implementation, fake, autograd.

The op returns (loss, metrics[11], grad): grad is d loss / d logp for an incoming gradient of 1,
computed by the forward kernel itself; the backward only rescales it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moo_kernels._backend import implementation
from moo_kernels.ops.policy_loss.problem import PolicyLossProblem
from moo_kernels.ops.policy_loss.reference import METRICS, policy_loss_grad_reference, policy_loss_reference


def run_reference(p: PolicyLossProblem):
    # An op implementation runs below autograd: the gradient comes in closed form, not by autograd.
    kw = p.reference_kwargs()
    loss, metrics = policy_loss_reference(p.logp.detach(), p.advantages, p.mask, **kw)
    grad = policy_loss_grad_reference(p.logp, p.advantages, p.mask, **kw).to(p.logp.dtype) if p.write_grad else None
    dt = torch.float64 if p.logp.dtype == torch.float64 else torch.float32
    return loss.detach().to(dt), torch.stack([metrics[k] for k in METRICS]).to(dt), grad


def run(p: PolicyLossProblem):
    impl = implementation(p.logp.device)
    if impl == "reference":
        return run_reference(p)
    if impl == "triton":
        from moo_kernels.ops.policy_loss.cuda import policy_loss_triton

        return policy_loss_triton(p)
    from moo_kernels.ops.policy_loss.cpu import policy_loss_cpp

    return policy_loss_cpp(p)


def problem_from_args(*args) -> PolicyLossProblem:
    return PolicyLossProblem(*args)


@torch.library.custom_op("moo_kernels::policy_loss", mutates_args=())
def policy_loss_op(
    logp: Tensor,
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
) -> tuple[Tensor, Tensor, Tensor]:
    p = problem_from_args(
        logp,
        advantages,
        mask,
        old_logp,
        ref_logp,
        token_advantages,
        is_weights,
        offpolicy,
        beta,
        kl,
        clip_low,
        clip_high,
        dual_clip,
        ratio_cap,
        mode,
        offpolicy_gamma,
        agg,
        max_len,
        num_tokens,
        write_grad,
    )
    loss, metrics, grad = run(p)
    return loss, metrics, grad if grad is not None else logp.new_empty(0)


@policy_loss_op.register_fake
def _(logp, *args):
    write_grad = args[-1]
    dt = torch.float64 if logp.dtype == torch.float64 else torch.float32
    grad = torch.empty_like(logp) if write_grad else logp.new_empty(0)
    return logp.new_empty((), dtype=dt), logp.new_empty((len(METRICS),), dtype=dt), grad


def _setup_context(ctx, inputs, output) -> None:
    loss, metrics, grad = output
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(metrics, grad)


def _backward(ctx, g_loss, g_metrics, g_grad):
    (grad,) = ctx.saved_tensors
    return (grad * g_loss.to(grad.dtype),) + (None,) * 19


policy_loss_op.register_autograd(_backward, setup_context=_setup_context)


class PolicyLossFunction(torch.autograd.Function):
    """The registered op's forward / backward without the torch.library dispatcher (eager calls)."""

    @staticmethod
    def forward(*args):
        loss, metrics, grad = run(problem_from_args(*args))
        return loss, metrics, grad if grad is not None else args[0].new_empty(0)

    setup_context = staticmethod(_setup_context)

    @staticmethod
    def backward(ctx, g_loss, g_metrics, g_grad):
        # Eager only (the registered backward is traced, where g_loss has no value to test): on the CPU,
        # loss.backward() gets the forward's gradient as it is, with no pass over it.
        (grad,) = ctx.saved_tensors
        if not grad.is_cuda and float(g_loss) == 1.0:
            return (grad,) + (None,) * 19
        return _backward(ctx, g_loss, g_metrics, g_grad)
