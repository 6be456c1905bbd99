"""The policy loss from log-probs as an op: the implementation on each backend, the torch.library registration
(schema from the loss's spec, fake), the one backward, and the public function.

The op returns (loss, metrics [len(METRICS)], grad): grad is d loss / d logp for an incoming gradient of 1, computed by
the forward kernel itself; the backward only rescales it. There is one implementation and one backward, and
three entries to them: under torch.compile (and for meta tensors) the registered op, which the compiler sees
through its fake and which carries the backward; in eager mode, when a gradient is needed, an
autograd.Function with that same backward around the implementation; otherwise the implementation alone. The
eager entries skip the dispatcher and the autograd machinery they do not need: bench/call_overhead.py measures
what each costs. The Function is not used under torch.compile: dynamo cannot pass a float option that changes
between calls (a symbolic float) through an autograd.Function.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moo_kernels import _options as O
from moo_kernels._backend import implementation, tracing
from moo_kernels._codes import METRICS, out_dtype
from moo_kernels._spec import with_spec
from moo_kernels.ops.loss.reference import loss_grad_reference, loss_reference
from moo_kernels.ops.loss.spec import LossSpec, PolicyLossMetrics, loss_spec


def run(logp: Tensor, spec: LossSpec, write_grad: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(loss, metrics, grad or None) on the implementation for logp's device."""
    impl = implementation(logp.device)
    if impl == "triton":
        from moo_kernels.ops.policy_loss.triton_launch import policy_loss_triton

        return policy_loss_triton(logp, spec, write_grad)
    if impl == "cpp":
        from moo_kernels.ops.policy_loss.cpp_launch import policy_loss_cpp

        return policy_loss_cpp(logp, spec, write_grad)
    # the reference runs below autograd here: its gradient comes in closed form
    loss, metrics = loss_reference(logp.detach(), spec)
    grad = loss_grad_reference(logp, spec).to(logp.dtype) if write_grad else None
    dt = out_dtype(logp)
    return loss.detach().to(dt), torch.stack([metrics[k] for k in METRICS]).to(dt), grad


def _impl(logp: Tensor, *args) -> tuple[Tensor, Tensor, Tensor]:
    *flat, write_grad = args
    loss, metrics, grad = run(logp, LossSpec.unflat(flat), write_grad)
    return loss, metrics, grad if grad is not None else logp.new_empty(0)


policy_loss_op = torch.library.custom_op(
    "moo_kernels::policy_loss", _impl, mutates_args=(),
    schema=f"(Tensor logp, {LossSpec.schema()}, bool write_grad) -> (Tensor, Tensor, Tensor)",
)  # fmt: skip


@policy_loss_op.register_fake
def _(logp, *args):
    dt = out_dtype(logp)
    grad = torch.empty_like(logp) if args[-1] else logp.new_empty(0)
    return logp.new_empty((), dtype=dt), logp.new_empty((len(METRICS),), dtype=dt), grad


def scaled_grad(grad: Tensor, g_loss: Tensor) -> Tensor:
    """The forward's gradient times the incoming one; in eager mode on the CPU an incoming 1 hands the gradient
    over as it is (no pass over it)."""
    if not tracing(g_loss) and not grad.is_cuda and float(g_loss) == 1.0:
        return grad
    return grad * g_loss.to(grad.dtype)


def _op_setup_context(ctx, inputs, output) -> None:
    _, metrics, grad = output
    ctx.save_for_backward(grad)
    ctx.mark_non_differentiable(metrics, grad)


def _op_backward(ctx, g_loss, g_metrics, g_grad):
    (grad,) = ctx.saved_tensors
    return (scaled_grad(grad, g_loss),) + (None,) * (LossSpec.count() + 1)


policy_loss_op.register_autograd(_op_backward, setup_context=_op_setup_context)


class PolicyLoss(torch.autograd.Function):
    """The eager path: apply(logp, write_grad, spec); the implementation without the dispatcher, with the
    registered op's backward. The spec travels as one object (an argument list of the spec's length costs the
    autograd machinery tens of microseconds a call) and forward sets ctx up itself (with a separate
    setup_context, apply binds its arguments to forward's signature through inspect on every call)."""

    @staticmethod
    def forward(ctx, logp, write_grad, spec):
        loss, metrics, grad = run(logp, spec, write_grad)
        out = loss, metrics, grad if grad is not None else logp.new_empty(0)
        _op_setup_context(ctx, None, out)
        return out

    @staticmethod
    def backward(ctx, g_loss, g_metrics, g_grad):
        (grad,) = ctx.saved_tensors
        return scaled_grad(grad, g_loss), None, None


@with_spec(LossSpec, positional=("advantages", "mask"))
def policy_loss(
    logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, **options
) -> tuple[torch.Tensor, PolicyLossMetrics]:
    """Token-level GRPO / PPO policy loss from log-probs, forward and backward in one fused kernel.

    Args:
        logp: [B, T] log-probs of the sampled tokens under the current policy (requires grad; any float
            dtype; math in float32, float64 for float64 log-probs on the CPU; the gradient has logp's dtype).
        advantages: [B] (broadcast over tokens) or [B, T].
        mask: [B, T] bool, or float (a per-token weight).
        {options}

    Log-ratios are clamped to [-20, 20] before exp (the GSPO sequence log-ratio too, and the k3 log-ratio).

    Returns:
        (loss, PolicyLossMetrics): loss is a 0-dim float32 tensor (float64 for float64 logp).

    Example:
        >>> logp = torch.randn(4, 16).clamp(max=0).requires_grad_()
        >>> loss, m = policy_loss(logp, torch.randn(4), torch.ones(4, 16, dtype=torch.bool),
        ...                       old_logp=logp.detach() + 0.01)
        >>> loss.backward()
    """
    O.check_float_tensor("logp", logp)
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    if logp.numel() == 0:
        raise ValueError(f"logp is empty (shape {tuple(logp.shape)})")
    spec = loss_spec(tuple(logp.shape), logp.device, "logp", advantages=advantages, mask=mask, **options)
    write_grad = torch.is_grad_enabled() and logp.requires_grad
    if torch.compiler.is_compiling() or logp.is_meta:  # the registered op (meta tensors: its fake)
        loss, metrics, _ = policy_loss_op(logp, *spec.flat(), write_grad)
    elif write_grad:
        loss, metrics, _ = PolicyLoss.apply(logp, write_grad, spec)
    else:  # nothing to differentiate: the implementation alone
        loss, metrics, _ = run(logp, spec, False)
    return loss, PolicyLossMetrics(*metrics.unbind(0))
