"""Triton launches of the loss's shared stages: the row statistics before an entry point's kernel and the
reduction of its partial sums after it (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)."""

from __future__ import annotations

import torch
import triton

from moo_kernels._codes import out_dtype
from moo_kernels._spec import strides2
from moo_kernels.ops.loss import triton_kernels as lk
from moo_kernels.ops.loss.spec import LossSpec


def row_block(mode: str) -> int:
    """The row-statistics kernel's tile: GMPO and VESPO keep five float64 sums per token lane, which spill at 2048
    (4 warps; python_tests/test_aot.py checks it)."""
    return 512 if mode in ("gmpo", "vespo") else 2048


def row_statistics(spec: LossSpec, logp: torch.Tensor | None, B: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(stats [B, STATS], totals [3]), float64: per row sum(m) and the sums of the sequence-level modes and of
    offpolicy_mask_threshold (row_stats_kernel; they need logp), then
    M = sum(m), the number of rows with sum(m) > 0 and the aggregation's denominator (totals_kernel)."""
    f64 = dict(dtype=torch.float64, device=spec.mask.device)
    stats, totals = torch.empty(B, lk.STATS.value, **f64), torch.empty(3, **f64)
    k = lk.row_stats_kernel
    k[(B,)](**spec.kernel_kwargs(
        k, logp=logp, logp_strides=strides2(logp), stats=stats, T=T,
        BLOCK_T=min(triton.next_power_of_2(T), row_block(spec.mode)),
        IS_ROW=spec.is_weights is not None and spec.is_weights.dim() == 1, num_warps=4,
    ))  # fmt: skip
    k = lk.totals_kernel
    k[(1,)](**spec.kernel_kwargs(k, stats=stats, totals=totals, B=B, BLOCK_B=min(triton.next_power_of_2(B), 1024),
                                 num_warps=4))  # fmt: skip
    return stats, totals


def partials(rows: int, device: torch.device) -> torch.Tensor:
    """The buffer of partial sums: one row of NUM_PARTIALS float32 per program of an entry point's kernel."""
    return torch.empty(rows, lk.NUM_PARTIALS.value, dtype=torch.float32, device=device)


def reduce(parts: torch.Tensor, totals: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss 0-dim, metrics [len(METRICS)]) from the partial sums, in the output dtype of the input like."""
    out = torch.empty(lk.NUM_PARTIALS.value, dtype=torch.float64, device=parts.device)
    P = parts.shape[0]
    lk.reduce_partials_kernel[(1,)](parts, totals, out, P, BLOCK_P=min(triton.next_power_of_2(P), 256), num_warps=4)
    dt = out_dtype(like)
    return out[0].to(dt), out[1:].to(dt)
