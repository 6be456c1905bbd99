"""rollout_correction as an op: the implementation on each backend, the torch.library registration (schema from
the spec, fake), and the public function. No gradient: the weights and the mask are constants of the loss."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from moo_kernels._backend import implementation
from moo_kernels._codes import ROLLOUT_METRICS, out_dtype
from moo_kernels._spec import with_spec
from moo_kernels.ops.rollout.reference import rollout_reference
from moo_kernels.ops.rollout.spec import RolloutCorrection, RolloutMetrics, RolloutSpec, rollout_spec


def run(old_logp: Tensor, o: RolloutSpec) -> tuple[Tensor, Tensor, Tensor]:
    """(is_weights, mask, metrics [len(ROLLOUT_METRICS)]) on the implementation for old_logp's device."""
    impl = implementation(old_logp.device)
    if impl == "triton":
        from moo_kernels.ops.rollout.triton_launch import rollout_triton

        return rollout_triton(old_logp, o)
    if impl == "cpp":
        from moo_kernels.ops.rollout.cpp_launch import rollout_cpp

        return rollout_cpp(old_logp, o)
    w, mask, metrics = rollout_reference(old_logp, o)
    dt = out_dtype(old_logp)
    return w.to(dt), mask, torch.stack([metrics[k] for k in ROLLOUT_METRICS]).to(dt)


def _impl(old_logp: Tensor, *args) -> tuple[Tensor, Tensor, Tensor]:
    return run(old_logp, RolloutSpec.unflat(args))


rollout_op = torch.library.custom_op(
    "moo_kernels::rollout_correction", _impl, mutates_args=(),
    schema=f"(Tensor old_logp, {RolloutSpec.schema()}) -> (Tensor, Tensor, Tensor)",
)  # fmt: skip


@rollout_op.register_fake
def _(old_logp, *args):
    dt = out_dtype(old_logp)
    return (
        torch.empty_like(old_logp, dtype=dt),
        torch.empty_like(old_logp, dtype=torch.bool),
        old_logp.new_empty((len(ROLLOUT_METRICS),), dtype=dt),
    )


@with_spec(RolloutSpec, positional=("rollout_logp", "mask"))
def rollout_correction(
    old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, *, reject: Mapping | None = None, **options
) -> RolloutCorrection:
    """Importance weights and rejection for the training / inference mismatch, in one pass over [B, T].

    d = old_logp - rollout_logp (the trainer's log-probs of the sampled tokens against the sampler's), clamped to
    [-20, 20] as verl does. Equal to verl's compute_rollout_correction_and_rejection_mask for the same settings
    (rollout_is = level, rollout_is_threshold = high, or "low_high" with mode "mask"; rollout_rs / its thresholds
    = reject), and to TRL's vllm_importance_sampling_mode: "token_truncate" / "token_mask" / "sequence_truncate" /
    "sequence_mask" are level "token" / "sequence" with mode "truncate" / "mask", low / high =
    vllm_importance_sampling_clip_min / clip_max.

    Args:
        old_logp: [B, T] float log-probs of the sampled tokens under the training policy (no gradient taken).
        rollout_logp: [B, T] the sampler's log-probs of the same tokens.
        mask: [B, T] bool (or float: nonzero is active), the response tokens.
        {options}
        reject: verl's rejection criteria {option: threshold}, every one applied (AND) to the returned mask:
            token_k1/k2/k3, seq_sum_k1/k2/k3, seq_mean_k1/k2/k3, seq_max_k2/k3 (k1 = -d, k2 = d^2 / 2,
            k3 = exp(d) - 1 - d per token; per sequence their sum, mean or max). A k1 threshold is (lower, upper)
            ratio bounds (a number x: (1 / x, x)), kept where log(lower) <= statistic <= log(upper); the others an
            upper bound.

    Returns:
        RolloutCorrection(is_weights [B, T], mask [B, T] bool, metrics RolloutMetrics of 0-dim tensors, no host
        synchronisation). is_weights feeds policy_loss(..., is_weights=...), mask its mask.
    """
    if isinstance(mask, Tensor) and mask.dtype != torch.bool and mask.is_floating_point():
        mask = mask != 0
    o = rollout_spec(old_logp, reject, rollout_logp=rollout_logp, mask=mask, **options)
    old_logp = old_logp.detach()
    if torch.compiler.is_compiling() or old_logp.is_meta:
        w, out_mask, metrics = rollout_op(old_logp, *o.flat())
    else:
        w, out_mask, metrics = run(old_logp, o)
    return RolloutCorrection(w, out_mask, RolloutMetrics(*metrics.unbind(0)))
