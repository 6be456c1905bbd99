"""Triton launcher of rollout_correction: the kernel writes the weights, the mask and each row's partial metrics;
the metrics are their sums over the rows (torch, in a fixed order), and batch_normalize divides the weights."""

from __future__ import annotations

import torch
import triton

from moo_kernels._codes import ROLLOUT_METRICS, out_dtype
from moo_kernels.ops.rollout import triton_kernels as tk
from moo_kernels.ops.rollout.reference import ESS_EPS, NORM_MIN
from moo_kernels.ops.rollout.spec import RolloutSpec

# the partial metrics of a row, as the kernel stores them
PARTIALS = ("n", "w_sum", "w_max", "w_min", "wc_sum", "wc2_sum", "truncated", "masked", "rejected", "row_rejected",
            "k1_sum", "k3_sum", "row_weight")  # fmt: skip
assert len(PARTIALS) == tk.PARTS.value
BLOCK_T = 512  # tokens per tile: four float64 values per thread at 4 warps, every accumulator in registers


def rollout_triton(old_logp: torch.Tensor, o: RolloutSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, T = old_logp.shape
    device = old_logp.device
    weights = torch.empty(B, T, dtype=out_dtype(old_logp), device=device)
    mask = torch.empty(B, T, dtype=torch.bool, device=device)
    parts = torch.empty(B, tk.PARTS.value, dtype=torch.float64, device=device)
    kernel = tk.rollout_kernel
    kernel[(B,)](
        **o.kernel_kwargs(
            kernel,
            old_logp=old_logp,
            old_logp_strides=tuple(old_logp.stride()),
            out_weights=weights,
            out_mask=mask.view(torch.uint8),
            parts=parts,
            T=T,
            BLOCK_T=min(triton.next_power_of_2(T), BLOCK_T),
        )
    )
    p = dict(zip(PARTIALS, parts.unbind(1), strict=True))
    n = p["n"].sum()
    n1 = n.clamp(min=1)
    has = p["n"] > 0
    rows = has.sum().to(torch.float64)
    some = n > 0
    wc_mean = p["wc_sum"].sum() / n1
    wc2_mean = p["wc2_sum"].sum() / n1
    metrics = {
        "weight_mean": p["w_sum"].sum() / n1,
        "weight_max": torch.where(some, torch.where(has, p["w_max"], -torch.inf).amax(), 0.0),
        "weight_min": torch.where(some, torch.where(has, p["w_min"], torch.inf).amin(), 0.0),
        "ess": torch.where(some & (wc2_mean > 0), (wc_mean + ESS_EPS) ** 2 / wc2_mean, 0.0),
        "truncated_frac": p["truncated"].sum() / n1,
        "masked_frac": p["masked"].sum() / n1,
        "rejected_token_frac": p["rejected"].sum() / n1,
        "rejected_seq_frac": p["row_rejected"].sum() / rows.clamp(min=1),
        "kl_k1": p["k1_sum"].sum() / n1,
        "kl_k3": p["k3_sum"].sum() / n1,
        "active_tokens": n,
    }
    factor = torch.ones((), dtype=torch.float64, device=device)
    if o.batch_normalize:
        m = metrics["weight_mean"] if o.level == "token" else p["row_weight"].sum() / rows.clamp(min=1)
        factor = torch.where(m > NORM_MIN, m, factor)
        weights = (weights.double() / factor).to(weights.dtype)
    metrics["batch_norm_factor"] = factor
    return weights, mask, torch.stack([metrics[k] for k in ROLLOUT_METRICS]).to(weights.dtype)
