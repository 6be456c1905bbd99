"""The advantage op: the implementation on each backend, the torch.library registration (schema from the spec,
fake for torch.compile and meta tensors) and the one backward; the public function multi_objective_advantages.

The op takes (rewards, *AdvantageSpec.flat(), *Derived.flat()). As for the loss ops (policy_loss/op.py) there is
one implementation and one backward, and three entries to them: under torch.compile (and for meta tensors) the
registered op, which carries the backward; in eager mode, when a gradient is needed, an autograd.Function with
that same backward, taking the spec and the derived grouping as two objects; otherwise the implementation alone.
bench/call_overhead.py measures what each entry costs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from moo_kernels import _options as O
from moo_kernels._backend import implementation
from moo_kernels._codes import out_dtype
from moo_kernels._spec import Context, with_spec
from moo_kernels.ops.advantages.backward import advantages_backward
from moo_kernels.ops.advantages.reference import reference
from moo_kernels.ops.advantages.spec import AdvantageSpec, Derived, raise_bad_values

Outputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]

SPEC_NAMES = tuple(name for name, _ in AdvantageSpec.args())
_END = 1 + len(SPEC_NAMES)  # (rewards, *spec, *derived)
_WEIGHTS = 1 + SPEC_NAMES.index("weights")  # the position of the weights among the op's arguments
# positions of the op's tensor arguments (the backward keeps them with save_for_backward)
_TENSORS = (0,) + tuple(
    i for i, (_, arg) in enumerate(AdvantageSpec.args() + Derived.args(), start=1) if arg.kind == "tensor"
)


def split(args) -> tuple[Tensor, AdvantageSpec, Derived]:
    """(rewards, spec, derived) from the op's flat arguments."""
    return args[0], AdvantageSpec.unflat(args[1:_END]), Derived.unflat(args[_END:])


def run_reference(rewards: Tensor, o: AdvantageSpec, derived: Derived) -> Outputs:
    if derived.check_weights:
        w = o.weights
        bad = (~((w >= 0) & torch.isfinite(w))).nonzero()
        raise_bad_values(rewards, w, -1, int(bad[0]) if bad.numel() else -1)
    adv, gmask, smask, weff, mean, std = reference(rewards, derived.sample_groups(o, rewards), derived.num_groups, o)
    dt = out_dtype(rewards)
    # clone: an expanded view of the weights must not alias the input of a custom op
    return adv.to(dt), gmask, smask, weff.to(dt).clone(), mean.to(dt), std.to(dt)


def run(rewards: Tensor, o: AdvantageSpec, derived: Derived) -> Outputs:
    """The forward on the implementation chosen for the rewards' device (see moo_kernels._backend)."""
    impl = implementation(rewards.device)
    if impl == "reference":
        return run_reference(rewards, o, derived)
    if impl == "triton":
        from moo_kernels.ops.advantages.triton_launch import advantages_triton

        return advantages_triton(rewards, o, derived)
    from moo_kernels.ops.advantages.cpp_launch import advantages_cpp

    return advantages_cpp(rewards, o, derived)


def _impl(*args) -> Outputs:
    return run(*split(args))


advantages_op = torch.library.custom_op(
    "moo_kernels::multi_objective_advantages",
    _impl,
    mutates_args=(),
    schema=f"(Tensor rewards, {AdvantageSpec.schema()}, {Derived.schema()}) -> "
    "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)


@advantages_op.register_fake
def _(*args) -> Outputs:
    rewards, _, derived = split(args)
    n, k = rewards.shape
    g = derived.num_groups
    dt = out_dtype(rewards)
    new = rewards.new_empty
    return (
        new((n,), dtype=dt),
        new((g,), dtype=torch.bool),
        new((n,), dtype=torch.bool),
        new((g, k), dtype=dt),
        new((g, k), dtype=dt),
        new((g, k), dtype=dt),
    )


def _backward(
    rewards: Tensor, o: AdvantageSpec, derived: Derived, saved, grads, needs_rewards: bool, needs_weights: bool
) -> tuple[Tensor | None, Tensor | None]:
    """(grad of rewards, grad of the float64 weights) from the saved outputs (gmask, mean, std, weff) and the
    incoming gradients of (advantages, group_mask, sample_mask, weights, mean, std)."""
    gmask, mean, std, weff = saved
    g_adv, _, _, g_weff, g_mean, g_std = grads
    return advantages_backward(rewards, o, derived, gmask, mean, std, weff, g_adv, g_weff, g_mean, g_std,
                               needs_rewards, needs_weights)  # fmt: skip


def _op_setup_context(ctx, inputs, output) -> None:
    adv, gmask, smask, weff, mean, std = output
    ctx.args = tuple(None if i in _TENSORS else x for i, x in enumerate(inputs))
    ctx.save_for_backward(*(inputs[i] for i in _TENSORS), gmask, mean, std, weff)
    ctx.mark_non_differentiable(gmask, smask)


def _op_backward(ctx, *grads):
    saved = ctx.saved_tensors
    args = list(ctx.args)
    for i, x in zip(_TENSORS, saved, strict=False):
        args[i] = x
    rewards, o, derived = split(args)
    grad_r, grad_w = _backward(rewards, o, derived, saved[len(_TENSORS) :], grads, ctx.needs_input_grad[0],
                               ctx.needs_input_grad[_WEIGHTS])  # fmt: skip
    out = [None] * len(args)
    out[0], out[_WEIGHTS] = grad_r, grad_w
    return tuple(out)


advantages_op.register_autograd(_op_backward, setup_context=_op_setup_context)


class Advantages(torch.autograd.Function):
    """The eager path with a gradient: apply(rewards, weights, spec, derived), weights being spec.weights (the one
    differentiable tensor of the spec, passed on its own for autograd to see). forward sets ctx up itself (with a
    separate setup_context, apply binds its arguments to forward's signature through inspect on every call)."""

    @staticmethod
    def forward(ctx, rewards, weights, o, derived) -> Outputs:
        out = run(rewards, o, derived)
        adv, gmask, smask, weff, mean, std = out
        ctx.spec, ctx.derived = o, derived
        ctx.save_for_backward(rewards, gmask, mean, std, weff)
        ctx.mark_non_differentiable(gmask, smask)
        return out

    @staticmethod
    def backward(ctx, *grads):
        rewards, *saved = ctx.saved_tensors
        grad_r, grad_w = _backward(rewards, ctx.spec, ctx.derived, saved, grads, ctx.needs_input_grad[0],
                                   ctx.needs_input_grad[1])  # fmt: skip
        return grad_r, grad_w, None, None


def advantages(rewards: Tensor, o: AdvantageSpec, derived: Derived) -> Outputs:
    """The op's outputs through the entry that fits the call (module docstring)."""
    if torch.compiler.is_compiling() or rewards.is_meta:  # the registered op (meta tensors: its fake)
        return advantages_op(rewards, *o.flat(), *derived.flat())
    if torch.is_grad_enabled() and (rewards.requires_grad or o.weights.requires_grad):
        return Advantages.apply(rewards, o.weights, o, derived)
    return run(rewards, o, derived)


class AdvantageResult(NamedTuple):
    """Output of multi_objective_advantages.

    advantages:  [N] float32 (float64 for float64 rewards), the advantage of each sample.
    group_mask:  [G] bool, groups that were accepted (not rejected for too few feasible samples or a combined
                 reward that does not vary).
    sample_mask: [N] bool, samples that carry signal: valid, in an accepted group, and feasible
                 (or infeasible with a non-zero fixed advantage).
    weights:     [G, K] the per-group weights the combination used (w~ for "variance", w otherwise).
    mean:        [G, K] per-objective group mean over the samples that take part.
    std:         [G, K] per-objective group standard deviation (the std option's estimator).
    """

    advantages: torch.Tensor
    group_mask: torch.Tensor
    sample_mask: torch.Tensor
    weights: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor


@with_spec(AdvantageSpec)
def multi_objective_advantages(rewards: torch.Tensor, **options) -> AdvantageResult:
    """Group-normalised advantages of several reward objectives, in one fused kernel.

    Args:
        rewards: [N, K] (or [N] for one objective) float16/bfloat16/float32/float64, CPU or CUDA,
            any strides.
        {options}

    Order: gates and non-finite handling, group statistics, normalise and combine, batch_normalize,
    sign scaling, clip, infeasible samples, rejected groups and invalid samples.

    Returns:
        AdvantageResult(advantages, group_mask, sample_mask, weights, mean, std).

    Example:
        >>> r = torch.tensor([[1., 0.2], [0., 0.9], [1., 0.5], [0., 0.1]])
        >>> out = multi_objective_advantages(r, group_size=2, weights=[1.0, 0.5])
        >>> out.advantages.shape
        torch.Size([4])
    """
    O.check_float_tensor("rewards", rewards)
    if rewards.dim() == 1:  # one objective: [N] is [N, 1], and so are its [N] reward gates
        rewards = rewards.unsqueeze(1)
        gates = options.get("reward_gates")
        if isinstance(gates, torch.Tensor) and gates.dim() == 1:
            options["reward_gates"] = gates.unsqueeze(1)
    elif rewards.dim() != 2:
        raise ValueError(f"rewards must be [N] or [N, K], got shape {tuple(rewards.shape)}")
    n, k = rewards.shape
    if n == 0:
        raise ValueError("rewards is an empty batch (N = 0)")
    if k == 0:
        raise ValueError("rewards has no objective (K = 0)")
    spec, derived = AdvantageSpec.prepare(Context({"N": n, "K": k}, rewards.device, "rewards"), **options)
    return AdvantageResult(*advantages(rewards, spec, derived))
