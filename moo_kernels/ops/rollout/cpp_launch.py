"""C++ launcher of rollout_correction: allocates the outputs and calls csrc/rollout.cpp with the op's spec, whose
tensors and options it reads by name (every input keeps its dtype and strides; nothing is copied). Returns
(is_weights [B, T], mask [B, T] bool, metrics [len(ROLLOUT_METRICS)]) like the reference's path in op.run."""

from __future__ import annotations

import torch

from moo_kernels._backend import cpp
from moo_kernels._codes import ROLLOUT_METRICS, out_dtype
from moo_kernels.ops.rollout.spec import RolloutSpec


def rollout_cpp(old_logp: torch.Tensor, spec: RolloutSpec):
    dt = out_dtype(old_logp)
    weights = torch.empty(old_logp.shape, dtype=dt)
    mask = torch.empty(old_logp.shape, dtype=torch.bool)
    metrics = torch.empty(len(ROLLOUT_METRICS), dtype=dt)
    cpp().rollout_correction(old_logp, spec, weights, mask, metrics)
    return weights, mask, metrics
