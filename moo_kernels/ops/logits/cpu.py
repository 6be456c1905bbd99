"""C++ launchers of token_logprobs: allocate the outputs and call the OpenMP kernels of csrc/logits.cpp.

The extension takes raw addresses, dtype codes and strides (in elements), so the logits keep their dtype and
row strides (a view such as full[:, :-1] of [B, T + 1, V] logits is read in place; only the vocabulary
stride must be 1) and nothing is copied. Token ids outside [0, V) raise ValueError before anything is
computed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moo_kernels._backend import cpp

DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
INDEX_CODES = {torch.int32: 0, torch.int64: 1}


def _operand(x: Tensor | None, codes: dict = DTYPE_CODES) -> tuple[int, int, int, int]:
    """(address, dtype code, stride of b, stride of t) of a [B, T] or [B, T, V] tensor; address 0 when absent."""
    if x is None:
        return 0, DTYPE_CODES[torch.float32], 0, 0
    if x.dtype not in codes:
        raise ValueError(f"unsupported dtype {x.dtype}: expected one of {sorted(map(str, codes))}")
    return x.data_ptr(), codes[x.dtype], x.stride(0), x.stride(1)


def _check_rows(name: str, x: Tensor) -> None:
    if x.dim() != 3 or (x.size(2) > 1 and x.stride(2) != 1):
        raise ValueError(
            f"{name} must be [B, T, V] with unit stride on V, got shape {tuple(x.shape)}, strides {x.stride()}"
        )


def _check_positions(shape: torch.Size, **tensors: Tensor | None) -> None:
    """Every given tensor must be [B, T] (the kernels read them through strides, without bounds)."""
    for name, x in tensors.items():
        if x is not None and x.shape != shape[:2]:
            raise ValueError(f"{name} must be {tuple(shape[:2])} like the logits' [B, T], got {tuple(x.shape)}")


def _check_tokens(tokens: Tensor, shape: torch.Size, bad: int) -> None:
    """Raises ValueError for the token id at flat index bad (b * T + t), when bad >= 0."""
    if bad < 0:
        return
    B, T, V = shape
    b, t = divmod(bad, T)
    raise ValueError(f"tokens[{b}, {t}] = {int(tokens[b, t])} is outside [0, V) with V = {V}")


def token_logprobs_fwd_cpp(
    logits: Tensor, tokens: Tensor, temperature: float, want_entropy: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logp [B, T], stats [B, T, 2], entropy [B, T] or None) of logits [B, T, V] at the chosen tokens [B, T].

    stats holds each row's maximum logit M and log l = log sum exp((z - M) / temperature), saved for the
    backward. The outputs are float64 for float64 logits, float32 otherwise. Raises ValueError naming the
    position (b, t), the id and V when a token id is outside [0, V).
    """
    _check_rows("logits", logits)
    _check_positions(logits.shape, tokens=tokens)
    B, T, V = logits.shape
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logp = torch.empty((B, T), dtype=dt)
    stats = torch.empty((B, T, 2), dtype=dt)
    entropy = torch.empty((B, T), dtype=dt) if want_entropy else None
    bad = cpp().token_logprobs_fwd(
        logits=_operand(logits),
        tokens=_operand(tokens, INDEX_CODES),
        B=B,
        T=T,
        V=V,
        temperature=float(temperature),
        logp_out=logp.data_ptr(),
        stats_out=stats.data_ptr(),
        entropy_out=entropy.data_ptr() if entropy is not None else 0,
    )
    _check_tokens(tokens, logits.shape, bad)
    return logp, stats, entropy


def token_logprobs_bwd_cpp(
    logits: Tensor,
    tokens: Tensor,
    stats: Tensor,
    entropy: Tensor | None,
    g_logp: Tensor | None,
    g_entropy: Tensor | None,
    temperature: float,
    out: Tensor,
) -> Tensor:
    """Writes d (sum g_logp logp + sum g_entropy entropy) / d logits into out and returns it.

    stats ([B, T, 2]) and entropy ([B, T]) are the forward's outputs; g_logp / g_entropy are [B, T] float32 /
    float64 with any strides, or None (zero). entropy is needed only with g_entropy. out is [B, T, V] in the
    logits' dtype with unit stride on V and any row strides; it may be logits itself (the gradient is computed
    element-wise from the saved statistics, each tile read before it is overwritten). A row whose g_logp and
    g_entropy are both 0 is written 0 whatever its logits hold.
    """
    _check_rows("logits", logits)
    _check_rows("out", out)
    if out.shape != logits.shape or out.dtype != logits.dtype:
        raise ValueError(f"out must be {tuple(logits.shape)} {logits.dtype}, got {tuple(out.shape)} {out.dtype}")
    if g_entropy is not None and entropy is None:
        raise ValueError("g_entropy needs the entropy saved by the forward")
    if stats.shape != (*logits.shape[:2], 2):
        want = (*logits.shape[:2], 2)
        raise ValueError(f"stats must be {want} (the forward's row statistics), got {tuple(stats.shape)}")
    _check_positions(logits.shape, tokens=tokens, entropy=entropy, g_logp=g_logp, g_entropy=g_entropy)
    B, T, V = logits.shape
    bad = cpp().token_logprobs_bwd(
        logits=_operand(logits),
        tokens=_operand(tokens, INDEX_CODES),
        max=_operand(stats[..., 0]),
        log_l=_operand(stats[..., 1]),
        entropy=_operand(entropy if g_entropy is not None else None),
        g_logp=_operand(g_logp),
        g_entropy=_operand(g_entropy),
        out=_operand(out),
        B=B,
        T=T,
        V=V,
        temperature=float(temperature),
    )
    _check_tokens(tokens, logits.shape, bad)
    return out
