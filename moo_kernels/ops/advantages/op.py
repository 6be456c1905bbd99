"""torch.library registration of the advantage op: implementation (dispatching to a backend),
fake implementation for torch.compile, and autograd."""

from __future__ import annotations

import torch
from torch import Tensor

from moo_kernels._backend import implementation
from moo_kernels.ops.advantages.backward import advantages_backward
from moo_kernels.ops.advantages.problem import AdvantageProblem, raise_bad_values
from moo_kernels.ops.advantages.reference import advantages_reference

Outputs = tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def run_reference(p: AdvantageProblem) -> Outputs:
    if not p.weights_checked:
        bad = (~((p.weights >= 0) & torch.isfinite(p.weights))).nonzero()
        raise_bad_values(p.rewards, p.weights, -1, int(bad[0]) if bad.numel() else -1)
    out = advantages_reference(
        p.rewards, p.sample_groups(), p.num_groups, p.weights, p.valid, p.reward_gates, p.gates, **p.options()
    )
    dt = p.out_dtype
    adv, gmask, smask, weff, mean, std = out
    # clone: an expanded view of the weights must not alias the input of a custom op
    return adv.to(dt), gmask, smask, weff.to(dt).clone(), mean.to(dt), std.to(dt)


def run(p: AdvantageProblem) -> Outputs:
    """Run the forward on the implementation chosen for p's device (see moo_kernels._backend)."""
    impl = implementation(p.rewards.device)
    if impl == "reference":
        return run_reference(p)
    if impl == "triton":
        from moo_kernels.ops.advantages.cuda import advantages_triton

        return advantages_triton(p)
    from moo_kernels.ops.advantages.cpu import advantages_cpp

    return advantages_cpp(p)


def problem_from_args(*args) -> AdvantageProblem:
    return AdvantageProblem(*args)


@torch.library.custom_op("moo_kernels::multi_objective_advantages", mutates_args=())
def advantages_op(
    rewards: Tensor,
    weights: Tensor,
    group_index: Tensor | None,
    order: Tensor | None,
    offsets: Tensor | None,
    valid: Tensor | None,
    reward_gates: Tensor | None,
    gates: Tensor | None,
    group_size: int,
    num_groups: int,
    max_count: int,
    normalize: str,
    std: str,
    weighting: str,
    batch_normalize: bool,
    eps: float,
    gated_value: float,
    infeasible_advantage: float,
    min_feasible: int,
    drop_zero_variance: bool,
    positive_scale: float,
    negative_scale: float,
    clip: float | None,
    nan_policy: str,
    weights_checked: bool,
) -> Outputs:
    p = problem_from_args(
        rewards,
        weights,
        group_index,
        order,
        offsets,
        valid,
        reward_gates,
        gates,
        group_size,
        num_groups,
        max_count,
        normalize,
        std,
        weighting,
        batch_normalize,
        eps,
        gated_value,
        infeasible_advantage,
        min_feasible,
        drop_zero_variance,
        positive_scale,
        negative_scale,
        clip,
        nan_policy,
        weights_checked,
    )
    return run(p)


@advantages_op.register_fake
def _(
    rewards, weights, group_index, order, offsets, valid, reward_gates, gates, group_size, num_groups, *rest
) -> Outputs:
    n, k = rewards.shape
    dt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    new = rewards.new_empty
    return (
        new((n,), dtype=dt),
        new((num_groups,), dtype=torch.bool),
        new((n,), dtype=torch.bool),
        new((num_groups, k), dtype=dt),
        new((num_groups, k), dtype=dt),
        new((num_groups, k), dtype=dt),
    )


def _setup_context(ctx, inputs, output) -> None:
    ctx.problem_args = inputs
    adv, gmask, smask, weff, mean, std = output
    ctx.save_for_backward(inputs[0], inputs[1], gmask, mean, std, weff)
    ctx.mark_non_differentiable(gmask, smask)


def _backward(ctx, g_adv, g_gmask, g_smask, g_weff, g_mean, g_std):
    rewards, weights, gmask, mean, std, weff = ctx.saved_tensors
    args = list(ctx.problem_args)
    args[0], args[1] = rewards, weights
    p = problem_from_args(*args)
    need_r, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_r, grad_w = advantages_backward(p, gmask, mean, std, weff, g_adv, g_weff, g_mean, g_std, need_r, need_w)
    return (grad_r, grad_w) + (None,) * (len(args) - 2)


advantages_op.register_autograd(_backward, setup_context=_setup_context)


class AdvantagesFunction(torch.autograd.Function):
    """The same forward / backward as the registered op, without the torch.library dispatcher.

    Eager calls that need a gradient take this path (the dispatcher costs about 10 us a call, as much
    as the whole fused kernel); eager calls without a gradient call run() directly, and traced code
    (torch.compile) calls the registered op, which the compiler sees through its fake implementation.
    """

    @staticmethod
    def forward(*args):
        return run(problem_from_args(*args))

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_backward)
