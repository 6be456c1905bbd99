"""C++ launchers of token_logprobs (csrc/logits.cpp): allocate the outputs and pass the tensors as they are (the
C++ side reads and checks them, csrc/args.h), so the logits keep their dtype and row strides (a view such as
full[:, :-1] of [B, T + 1, V] logits is read in place; only the vocabulary stride must be 1) and nothing is copied.
Token ids outside [0, V) raise ValueError before anything is computed. The loss from logits on the CPU is these two
around the C++ policy loss (moo_kernels/ops/logits/op.py)."""

from __future__ import annotations

import torch
from torch import Tensor

from moo_kernels._backend import cpp
from moo_kernels._codes import out_dtype


def _check_tokens(tokens: Tensor, V: int, bad: int) -> None:
    """Raises ValueError for the token id at flat index bad (b * T + t), when bad >= 0."""
    if bad >= 0:
        b, t = divmod(bad, tokens.shape[1])
        raise ValueError(f"tokens[{b}, {t}] = {int(tokens[b, t])} is outside [0, V) with V = {V}")


def token_logprobs_fwd_cpp(
    logits: Tensor, tokens: Tensor, temperature: float, want_entropy: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(logp [B, T], stats [B, T, 2] (each row's max logit and log sum exp((z - max) / tau), what the backward
    needs), entropy [B, T] or None), float64 for float64 logits, float32 otherwise."""
    B, T, V = logits.shape
    dt = out_dtype(logits)
    logp, stats = torch.empty((B, T), dtype=dt), torch.empty((B, T, 2), dtype=dt)
    entropy = torch.empty((B, T), dtype=dt) if want_entropy else None
    bad = cpp().token_logprobs_fwd(logits, tokens, float(temperature), logp, stats, entropy)
    _check_tokens(tokens, V, bad)
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
    """Writes d (sum g_logp logp + sum g_entropy entropy) / d logits into out and returns it (out may be logits
    itself: the gradient is computed element-wise from the saved statistics, each tile read before it is
    overwritten). g_logp / g_entropy: [B, T] with any strides, or None (zero); entropy is needed with g_entropy."""
    saved_entropy = entropy if g_entropy is not None else None
    bad = cpp().token_logprobs_bwd(logits, tokens, stats, saved_entropy, g_logp, g_entropy, out, float(temperature))
    _check_tokens(tokens, logits.shape[2], bad)
    return out
