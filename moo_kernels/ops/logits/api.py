"""Public functions of the logits ops: validate once, call the registered op."""

from __future__ import annotations

import torch

from moo_kernels import _options as O
from moo_kernels.ops.logits.op import (
    LogitsLossFunction,
    TokenLogprobsFunction,
    policy_loss_from_logits_op,
    problem_from_args,
    run_logits_loss,
    run_token_logprobs,
    token_logprobs_op,
)
from moo_kernels.ops.policy_loss.api import PolicyLossMetrics, check_loss_args

LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# 1 / temperature is finite in float32 (the kernels multiply by it) iff it is below this: float32's largest
# value plus half its last unit, 2^128 - 2^103, rounds to inf.
RECIPROCAL_LIMIT = 2.0**128 - 2.0**103


def check_temperature(temperature) -> float:
    t = O.check_number("temperature", temperature, low=0.0, low_inclusive=False)
    if not 1.0 / t < RECIPROCAL_LIMIT:
        raise ValueError(
            f"temperature must be at least {1.0 / RECIPROCAL_LIMIT:.3e} (its reciprocal must be finite in float32), "
            f"got {temperature!r}"
        )
    return t


def may_overlap(x: torch.Tensor) -> bool:
    """Whether two positions (b, t) of x [B, T, V] (unit stride on V) may share memory: torch's answer when
    it has one, else whether the two position dimensions, innermost first, fail to nest (conservative)."""
    answer = torch._debug_has_internal_overlap(x)  # 0: no, 1: yes, 2: too hard to tell
    if answer != 2:
        return answer == 1
    extent = x.size(2)  # elements spanned by one position, then by every position of the dimensions seen
    for stride, size in sorted((x.stride(i), x.size(i)) for i in range(2) if x.size(i) > 1):
        if stride < extent:
            return True
        extent += stride * (size - 1)
    return False


def _check_logits(logits, tokens, temperature) -> float:
    O.check_tensor("logits", logits)
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise ValueError(f"logits is empty (shape {tuple(logits.shape)})")
    if logits.stride(2) != 1:
        raise ValueError(
            f"logits must have unit stride on the vocabulary (last) dimension, got strides {tuple(logits.stride())}; "
            "views that slice B or T (such as full_logits[:, :-1]) are fine"
        )
    O.check_tensor("tokens", tokens)
    O.check_same_device("tokens", tokens, logits.device, other="logits")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"tokens must be int64 or int32, got {tokens.dtype}")
    if tuple(tokens.shape) != tuple(logits.shape[:2]):
        raise ValueError(
            f"tokens must have shape {tuple(logits.shape[:2])} (logits' [B, T]), got {tuple(tokens.shape)}"
        )
    V = logits.shape[2]
    if tokens.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= V:
            bad = int(((tokens < 0) | (tokens >= V)).flatten().nonzero()[0])
            b, t = divmod(bad, tokens.shape[1])
            raise ValueError(
                f"tokens must be in [0, {V}) (the vocabulary of logits); tokens[{b}, {t}] = {int(tokens[b, t])}"
            )
    return check_temperature(temperature)


def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0, return_entropy: bool = False
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each chosen token, log_softmax(logits / temperature).gather(tokens), without
    materialising the log-softmax; optionally the entropy of each position.

    Args:
        logits: [B, T, V] float32 / bfloat16 / float16 (float64 for checks), unit stride on V (any strides
            on B and T: full_logits[:, :-1] is read in place).
        tokens: [B, T] int64 or int32 ids in [0, V). On CPU an id out of range raises; on CUDA it is not
            checked (that would need a host synchronisation): its log-prob is NaN and nothing outside the
            row is read.
        temperature: logits are divided by it first (> 0, with 1 / temperature finite in float32).
        return_entropy: also return H = -sum p log p per position.

    Returns:
        logp [B, T] float32 (float64 for float64 logits), and entropy [B, T] with return_entropy. Both are
        differentiable; the backward is one fused kernel writing d / d logits (no [B, T, V] intermediate).
        Under torch.no_grad (old / reference log-probs) only the forward kernel runs.

    Example:
        >>> logits = torch.randn(2, 8, 100, requires_grad=True)
        >>> logp = token_logprobs(logits, torch.randint(0, 100, (2, 8)), temperature=0.9)
        >>> logp.sum().backward()
    """
    temperature = _check_logits(logits, tokens, temperature)
    return_entropy = O.check_bool("return_entropy", return_entropy)
    if torch.compiler.is_compiling() or logits.is_meta:  # the registered op (meta tensors: its fake)
        logp, ent, _ = token_logprobs_op(logits, tokens, temperature, return_entropy)
    elif torch.is_grad_enabled() and logits.requires_grad:
        logp, ent, _ = TokenLogprobsFunction.apply(logits, tokens, temperature, return_entropy)
    else:
        logp, _, ent = run_token_logprobs(logits, tokens, temperature, return_entropy)
    return (logp, ent) if return_entropy else logp


def policy_loss_from_logits(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    inplace_backward: bool = False,
    return_entropy: bool = False,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    beta: float = 0.0,
    kl: str = "k3",
    clip_low: float = 0.2,
    clip_high: float | None = None,
    dual_clip: float | None = None,
    ratio_cap: float | None = None,
    mode: str = "clip",
    is_weights: torch.Tensor | None = None,
    offpolicy: torch.Tensor | None = None,
    offpolicy_gamma: float = 0.1,
    token_advantages: torch.Tensor | None = None,
    agg: str = "token-mean",
    max_len: int | None = None,
    num_tokens: float | int | None = None,
):
    """policy_loss(token_logprobs(logits, tokens, temperature=...), advantages, mask, ...) in one pass.

    Every loss option means what it means in moo_kernels.policy_loss. The loss's normaliser depends on
    the mask only, so the forward computes d loss / d logits together with the loss: on a GPU one kernel
    reads each vocabulary row once from HBM and writes its gradient once (mode "gspo" takes two kernels:
    its sequence ratio needs every log-prob first). The backward only rescales the gradient by the
    incoming one, and does nothing when that is 1.

    Args:
        logits, tokens, temperature: as in token_logprobs.
        advantages, mask, old_logp, ...: as in policy_loss ([B] or [B, T] advantages, [B, T] mask, ...).
        inplace_backward: write the gradient into the logits' storage: peak memory beyond the logits is
            O(B T). The logits hold the gradient once the call returns, so they must not be used again:
            their version counter is bumped, so a backward through an op that saved them raises autograd's
            in-place error. Logits whose positions overlap in memory (an expanded view) raise ValueError.
            Eager mode only: under torch.compile the gradient gets its own buffer.
        return_entropy: also return the entropy [B, T] of each position (float32, no gradient).

    Returns:
        (loss, PolicyLossMetrics), or (loss, PolicyLossMetrics, entropy) with return_entropy. loss is a
        0-dim float32 tensor (float64 for float64 logits); the gradient of logits has logits' dtype.

    Example:
        >>> logits = torch.randn(2, 8, 100, requires_grad=True)
        >>> tokens = torch.randint(0, 100, (2, 8))
        >>> loss, m = policy_loss_from_logits(logits, tokens, torch.randn(2), torch.ones(2, 8, dtype=torch.bool))
        >>> loss.backward()
    """
    temperature = _check_logits(logits, tokens, temperature)
    inplace_backward = O.check_bool("inplace_backward", inplace_backward)
    return_entropy = O.check_bool("return_entropy", return_entropy)
    B, T, _ = logits.shape
    loss_args = check_loss_args(
        (B, T), logits.device, "logits", advantages, mask, old_logp, ref_logp, token_advantages, is_weights,
        offpolicy, beta, kl, clip_low, clip_high, dual_clip, ratio_cap, mode, offpolicy_gamma, agg, max_len,
        num_tokens,
    )  # fmt: skip
    write_grad = torch.is_grad_enabled() and logits.requires_grad
    if inplace_backward and write_grad and not torch.compiler.is_compiling() and may_overlap(logits):
        raise ValueError(
            f"logits overlap in memory (shape {tuple(logits.shape)}, strides {tuple(logits.stride())}: an expanded "
            "view?), so inplace_backward=True cannot write a gradient per position into them; pass "
            "inplace_backward=False or contiguous logits"
        )
    if torch.compiler.is_compiling() or logits.is_meta:  # the registered op (meta tensors: its fake)
        loss, metrics, ent, _ = policy_loss_from_logits_op(logits, tokens, temperature, return_entropy, *loss_args,
                                                           write_grad)  # fmt: skip
    elif write_grad:
        loss, metrics, ent = LogitsLossFunction.apply(
            logits, tokens, temperature, return_entropy, inplace_backward, *loss_args, write_grad
        )
    else:
        p = problem_from_args((*loss_args, False))
        loss, metrics, ent = run_logits_loss(logits, tokens, temperature, return_entropy, None, p)
    metrics = PolicyLossMetrics(*metrics.unbind(0))
    return (loss, metrics, ent) if return_entropy else (loss, metrics)
