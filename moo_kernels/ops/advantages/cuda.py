"""Triton launcher: allocates the outputs, picks block sizes, launches the kernels.

Used for CUDA tensors, and for CPU tensors under TRITON_INTERPRET=1 when the backend is forced to
"triton" (that is how CI exercises the kernels without a GPU).
"""

from __future__ import annotations

import os

import torch
import triton

from moo_kernels._options import NORMALIZE, WEIGHTING
from moo_kernels.ops.advantages import triton_kernels as tk
from moo_kernels.ops.advantages.problem import AdvantageProblem, raise_bad_values

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
NO_ERROR = 2**62
PARTIAL = 6  # values per program of the batch partials (triton_kernels.PARTIAL)
# The forward kernel's register cap: without one, ptxas caps its float64 tiles at 128-168 registers and
# spills; at 200 it does not (checked ahead of time for every configuration, python_tests/aot_compile.py).
FWD_MAXNREG = 200
# Elements of one [BLOCK_G, BLOCK_J, BLOCK_K] float64 chunk: large enough to keep loads in flight,
# small enough to stay in registers (checked by the ahead-of-time compile test).
TILE_ELEMENTS = 256


def block_sizes(num_groups: int, max_count: int, k: int, m: int) -> dict[str, int]:
    budget = TILE_ELEMENTS
    block_k = triton.next_power_of_2(k)
    block_m = triton.next_power_of_2(max(m, 1))
    # The gates tile [BLOCK_G, BLOCK_J, BLOCK_M] also lives in registers: wide gates shorten the chunk.
    block_j = max(
        1, min(triton.next_power_of_2(max(max_count, 1)), budget // block_k, max(32, budget // (block_k * block_m)))
    )
    block_g = max(1, min(budget // (block_j * block_k), triton.next_power_of_2(num_groups)))
    tile = block_g * block_j * block_k
    num_warps = 4 if tile >= 256 else (2 if tile >= 64 else 1)
    return dict(BLOCK_G=block_g, BLOCK_J=block_j, BLOCK_K=block_k, BLOCK_M=block_m, num_warps=num_warps)


def _u8(x: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    return dummy if x is None else x.view(torch.uint8)


def advantages_triton(p: AdvantageProblem):
    r = p.rewards
    n, k = r.shape
    device = r.device
    cdt = p.out_dtype
    g = p.num_groups
    adv = torch.empty(n, dtype=cdt, device=device)
    gmask = torch.empty(g, dtype=torch.bool, device=device)
    smask = torch.empty(n, dtype=torch.bool, device=device)
    weff = torch.empty(g, k, dtype=cdt, device=device)
    mean = torch.empty(g, k, dtype=cdt, device=device)
    std = torch.empty(g, k, dtype=cdt, device=device)
    check = p.nan_policy == "raise" or not p.weights_checked
    # [first non-finite reward (flat index), first bad weight]; only allocated when something is checked
    status = torch.full((2,), NO_ERROR, dtype=torch.int64, device=device) if check else None
    # The kernel reads the weights as a contiguous float64 [K] (weights given as numbers come cached so).
    w = p.weights
    if w.dtype != torch.float64 or not w.is_contiguous():
        w = w.detach().to(torch.float64).contiguous()

    m = p.gates.shape[1] if p.gates is not None else 1
    meta = block_sizes(g, p.max_count, k, m)
    num_parts = triton.cdiv(g, meta["BLOCK_G"])
    if p.batch_normalize:
        # the raw float64 advantages between the kernels (in place for float64 outputs)
        raw = adv if cdt == torch.float64 else torch.empty(n, dtype=torch.float64, device=device)
        code = torch.empty(n, dtype=torch.uint8, device=device)
        parts = torch.empty(num_parts * PARTIAL, dtype=torch.float64, device=device)
    else:
        raw, code, parts = adv, adv, adv
    rg = p.reward_gates
    gates = p.gates
    dummy = adv
    clip = p.clip if p.clip is not None else 0.0
    tk._advantages_fwd_kernel[(num_parts,)](
        r,
        r.stride(0),
        r.stride(1),
        p.order if p.order is not None else dummy,
        p.offsets if p.offsets is not None else dummy,
        p.group_size,
        g,
        p.max_count,
        w,
        _u8(p.valid, dummy),
        _u8(rg, dummy),
        rg.stride(0) if rg is not None else 0,
        rg.stride(1) if rg is not None else 0,
        _u8(gates, dummy),
        gates.stride(0) if gates is not None else 0,
        gates.stride(1) if gates is not None else 0,
        m,
        adv,
        gmask.view(torch.uint8),
        smask.view(torch.uint8),
        weff,
        mean,
        std,
        raw,
        code,
        parts,
        status if check else dummy,
        k,
        p.eps,
        p.gated_value,
        p.infeasible_advantage,
        p.min_feasible,
        p.positive_scale,
        p.negative_scale,
        clip,
        CONTIGUOUS=p.group_size > 0,
        HAS_VALID=p.valid is not None,
        HAS_RGATES=rg is not None,
        HAS_GATES=gates is not None,
        NORMALIZE=NORMALIZE[p.normalize],
        UNBIASED=p.std == "unbiased",
        WEIGHTING=WEIGHTING[p.weighting],
        DROP_ZERO_VAR=p.drop_zero_variance,
        BATCH_NORM=p.batch_normalize,
        CHECK_FINITE=p.nan_policy == "raise",
        CHECK_WEIGHTS=not p.weights_checked,
        HAS_CLIP=p.clip is not None,
        **meta,
        **({} if INTERPRETED else {"maxnreg": FWD_MAXNREG}),
    )
    if p.batch_normalize:
        block_n = 1024
        tk._advantages_batchnorm_kernel[(triton.cdiv(n, block_n),)](
            adv,
            raw,
            code,
            smask.view(torch.uint8),
            parts,
            num_parts,
            n,
            p.eps,
            p.infeasible_advantage,
            p.positive_scale,
            p.negative_scale,
            clip,
            BLOCK_N=block_n,
            BLOCK_P=min(triton.next_power_of_2(num_parts), 1024),
            UNBIASED=p.std == "unbiased",
            HAS_CLIP=p.clip is not None,
            num_warps=4,
        )
    if check:
        bad_reward, bad_weight = status.tolist()
        raise_bad_values(r, p.weights, bad_reward, bad_weight)
    return adv, gmask, smask, weff, mean, std
