"""C++ launcher: allocates the outputs and calls the OpenMP kernel of csrc/advantages.cpp.

The kernel reads the spec's tensors and options by name (csrc/args.h), the tensors in place through their
addresses, dtypes and strides (the rewards keep their dtype, the bool masks are read as bytes: any nonzero byte
is true).
"""

from __future__ import annotations

import torch

from moo_kernels._backend import cpp
from moo_kernels._codes import out_dtype
from moo_kernels.ops.advantages.spec import AdvantageSpec, Derived, raise_bad_values

_C = cpp()


def advantages_cpp(rewards: torch.Tensor, o: AdvantageSpec, derived: Derived):
    """The six outputs of the advantage op for CPU tensors (see AdvantageResult)."""
    n, k = rewards.shape
    g = derived.num_groups
    dt = out_dtype(rewards)
    outputs = (
        torch.empty(n, dtype=dt),
        torch.empty(g, dtype=torch.bool),
        torch.empty(n, dtype=torch.bool),
        torch.empty(g, k, dtype=dt),
        torch.empty(g, k, dtype=dt),
        torch.empty(g, k, dtype=dt),
    )
    bad_reward, bad_weight = _C.advantages(rewards, o, derived, *outputs)
    if bad_reward >= 0 or bad_weight >= 0:
        raise_bad_values(rewards, o.weights, bad_reward, bad_weight)
    return outputs
