"""C++ launcher: allocates the outputs and calls the OpenMP kernel of csrc/advantages.cpp.

The extension takes raw addresses, sizes and strides (in elements), so the rewards keep their dtype
and strides and the bool masks are read in place as bytes (any nonzero byte is true); only the weights
travel as a contiguous float64 copy when they are not one already (the kernel computes in double, like
the reference).
"""

from __future__ import annotations

import torch

from moo_kernels._backend import cpp
from moo_kernels._options import NORMALIZE, WEIGHTING
from moo_kernels.ops.advantages.problem import AdvantageProblem, raise_bad_values

_C = cpp()
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def _address(x: torch.Tensor | None) -> int:
    return 0 if x is None else x.data_ptr()


def _strides(x: torch.Tensor | None) -> tuple[int, int]:
    return (0, 0) if x is None else x.stride()


def advantages_cpp(p: AdvantageProblem):
    """The six outputs of the advantage op for CPU tensors (see AdvantageResult)."""
    r = p.rewards
    n, k = r.shape
    g = p.num_groups
    dt = p.out_dtype
    adv = torch.empty(n, dtype=dt)
    gmask = torch.empty(g, dtype=torch.bool)
    smask = torch.empty(n, dtype=torch.bool)
    weff = torch.empty(g, k, dtype=dt)
    mean = torch.empty(g, k, dtype=dt)
    std = torch.empty(g, k, dtype=dt)

    w = p.weights
    if w.dtype != torch.float64 or not w.is_contiguous():
        w = w.detach().to(torch.float64).contiguous()
    order = offsets = None
    if p.group_size == 0:
        order, offsets = p.order.contiguous(), p.offsets.contiguous()
    valid = p.valid.contiguous() if p.valid is not None else None
    rg, gates = p.reward_gates, p.gates
    m = gates.shape[1] if gates is not None else 0

    bad_reward, bad_weight = _C.advantages(
        # inputs
        r.data_ptr(),
        DTYPE_CODES[r.dtype],
        n,
        k,
        *r.stride(),
        p.group_size,
        g,
        _address(order),
        _address(offsets),
        w.data_ptr(),
        _address(valid),
        _address(rg),
        *_strides(rg),
        _address(gates),
        *_strides(gates),
        m,
        # outputs
        adv.data_ptr(),
        gmask.data_ptr(),
        smask.data_ptr(),
        weff.data_ptr(),
        mean.data_ptr(),
        std.data_ptr(),
        # options
        NORMALIZE[p.normalize],
        p.std == "unbiased",
        WEIGHTING[p.weighting],
        p.batch_normalize,
        p.eps,
        p.gated_value,
        p.infeasible_advantage,
        p.min_feasible,
        p.drop_zero_variance,
        p.positive_scale,
        p.negative_scale,
        p.clip is not None,
        p.clip if p.clip is not None else 0.0,
        p.nan_policy == "raise",
        not p.weights_checked,
    )
    if p.nan_policy == "raise" or not p.weights_checked:
        raise_bad_values(r, p.weights, bad_reward, bad_weight)
    return adv, gmask, smask, weff, mean, std
