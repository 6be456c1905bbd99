"""Triton launcher: allocates the outputs and scratch, picks block sizes, launches the kernels by keyword.

Used for CUDA tensors, and for CPU tensors under TRITON_INTERPRET=1 when the backend is forced to
"triton" (that is how CI exercises the kernels without a GPU).
"""

from __future__ import annotations

import os

import torch
import triton

from moo_kernels._codes import NO_ERROR, out_dtype
from moo_kernels.ops.advantages import triton_kernels as tk
from moo_kernels.ops.advantages.spec import AdvantageSpec, Derived, raise_bad_values

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
PARTIAL = tk.PARTIAL.value  # values per program of the batch partials
# The forward kernel's register cap: without one, ptxas caps its float64 tiles at 128-168 registers and
# spills; at 200 it does not (checked ahead of time for every configuration, python_tests/aot_compile.py).
FWD_MAXNREG = 200
# Elements of one [BLOCK_G, BLOCK_J, BLOCK_K] float64 chunk: large enough to keep loads in flight,
# small enough to stay in registers (checked by the ahead-of-time compile test).
TILE_ELEMENTS = 256
BATCH_BLOCK = 1024  # samples per program of the batch kernel


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


def advantages_triton(rewards: torch.Tensor, o: AdvantageSpec, derived: Derived):
    n, k = rewards.shape
    device = rewards.device
    cdt = out_dtype(rewards)
    g = derived.num_groups
    adv = torch.empty(n, dtype=cdt, device=device)
    gmask = torch.empty(g, dtype=torch.bool, device=device)
    smask = torch.empty(n, dtype=torch.bool, device=device)
    weff = torch.empty(g, k, dtype=cdt, device=device)
    mean = torch.empty(g, k, dtype=cdt, device=device)
    std = torch.empty(g, k, dtype=cdt, device=device)
    # [first non-finite reward (flat index), first bad weight]; only when the kernel checks values
    status = torch.full((2,), NO_ERROR, dtype=torch.int64, device=device) if o.checks_values(derived) else None

    m = o.gates.shape[1] if o.gates is not None else 1
    meta = block_sizes(g, derived.max_count, k, m)
    num_parts = triton.cdiv(g, meta["BLOCK_G"])
    scratch = dict(raw=None, code=None, parts=None)
    if derived.batch != "none":
        # the raw float64 advantages between the kernels (in place for float64 outputs)
        raw = adv if cdt == torch.float64 else torch.empty(n, dtype=torch.float64, device=device)
        code = torch.empty(n, dtype=torch.uint8, device=device)
        scratch = dict(raw=raw, code=code, parts=torch.empty(num_parts * PARTIAL, dtype=torch.float64, device=device))
    outputs = dict(out_advantages=adv, out_sample_mask=smask.view(torch.uint8))
    kernel = tk.advantages_fwd_kernel
    kernel[(num_parts,)](
        **o.kernel_kwargs(
            kernel,
            **derived.kernel_kwargs(kernel),
            **outputs,
            **scratch,
            rewards=rewards,
            rewards_strides=tuple(rewards.stride()),
            K=k,
            M=m,
            out_group_mask=gmask.view(torch.uint8),
            out_weights=weff,
            out_mean=mean,
            out_std=std,
            status=status,
            **meta,
            **({} if INTERPRETED else {"maxnreg": FWD_MAXNREG}),
        )
    )
    if derived.batch != "none":
        kernel = tk.advantages_batchnorm_kernel
        kernel[(triton.cdiv(n, BATCH_BLOCK),)](
            **o.kernel_kwargs(
                kernel,
                **derived.kernel_kwargs(kernel),
                **outputs,
                raw=scratch["raw"],
                code=scratch["code"],
                parts=scratch["parts"],
                num_parts=num_parts,
                N=n,
                BLOCK_N=BATCH_BLOCK,
                BLOCK_P=min(triton.next_power_of_2(num_parts), 1024),
                num_warps=4,
            )
        )
    if status is not None:
        bad_reward, bad_weight = status.tolist()
        raise_bad_values(rewards, o.weights, bad_reward, bad_weight)
    return adv, gmask, smask, weff, mean, std
