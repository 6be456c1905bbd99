"""C++ launcher of the policy loss from log-probs: allocates the outputs and calls csrc/policy_loss.cpp with the
loss's spec, whose tensors and options it reads by name (every input keeps its dtype and strides; nothing is
copied). Returns (loss, metrics [len(METRICS)], grad) like the Triton launcher."""

from __future__ import annotations

import torch

from moo_kernels._backend import cpp
from moo_kernels._codes import METRICS, out_dtype
from moo_kernels.ops.loss.spec import LossSpec


def policy_loss_cpp(logp: torch.Tensor, spec: LossSpec, write_grad: bool):
    dt = out_dtype(logp)
    loss = torch.empty((), dtype=dt)
    metrics = torch.empty(len(METRICS), dtype=dt)
    grad = torch.empty(logp.shape, dtype=logp.dtype) if write_grad else None
    cpp().policy_loss(logp, grad, spec, loss, metrics)
    return loss, metrics, grad
