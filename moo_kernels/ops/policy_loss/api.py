"""Public function of the token-level policy loss: validates once, calls the registered op."""

from __future__ import annotations

from typing import NamedTuple

import torch

from moo_kernels import _options as O
from moo_kernels.ops.policy_loss.op import PolicyLossFunction, policy_loss_op, problem_from_args, run
from moo_kernels.ops.policy_loss.problem import AGG_CODES, KL_CODES, MODE_CODES


class PolicyLossMetrics(NamedTuple):
    """0-dim tensors computed inside the kernel (no host synchronisation), over active tokens (mask != 0),
    weighted by the mask; a mean is 0 unless the mask's sum is > 0.

    pg_loss: the aggregated policy term (the loss without the KL term).
    kl_mean: mean KL estimate to the reference (0 without ref_logp).
    clip_frac: share of tokens where the clipped term was strictly the larger loss (its gradient is cut);
        for "cispo", where the ratio weight was clipped.
    clip_frac_low / clip_frac_high: ratio below 1 - clip_low with A < 0 / above 1 + clip_high with A > 0.
    dual_clip_frac: share of tokens (A < 0) bounded by the dual clip.
    ratio_mean, ratio_min, ratio_max: importance ratio statistics (the sequence ratio for "gspo"); min and
        max over the active tokens, 0 when there is none.
    ppo_kl: mean of old_logp - logp.
    active_tokens: sum of the mask.
    """

    pg_loss: torch.Tensor
    kl_mean: torch.Tensor
    clip_frac: torch.Tensor
    clip_frac_low: torch.Tensor
    clip_frac_high: torch.Tensor
    dual_clip_frac: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor
    ppo_kl: torch.Tensor
    active_tokens: torch.Tensor


def _float_bt(name: str, x, shape, device, other: str, allow_row: bool = False) -> torch.Tensor | None:
    if x is None:
        return None
    O.check_float_tensor(name, x)
    O.check_same_device(name, x, device, other=other)
    ok = tuple(x.shape) == tuple(shape) or (allow_row and tuple(x.shape) == (shape[0],))
    if not ok:
        extra = f" or ({shape[0]},)" if allow_row else ""
        raise ValueError(f"{name} must have shape {tuple(shape)}{extra}, got {tuple(x.shape)}")
    return x


def check_loss_args(
    shape: tuple[int, int],
    device: torch.device,
    other: str,
    advantages,
    mask,
    old_logp,
    ref_logp,
    token_advantages,
    is_weights,
    offpolicy,
    beta,
    kl,
    clip_low,
    clip_high,
    dual_clip,
    ratio_cap,
    mode,
    offpolicy_gamma,
    agg,
    max_len,
    num_tokens,
) -> tuple:
    """Validates the loss options of policy_loss / policy_loss_from_logits for a [B, T] = shape batch
    on device (other: the name of the tensor they must match); returns them in the op's argument order,
    from advantages to num_tokens, canonicalised."""
    B, T = shape
    advantages = _float_bt("advantages", advantages, shape, device, other, allow_row=True)
    if advantages is None:
        raise TypeError("advantages must be a torch.Tensor, got None")
    O.check_tensor("mask", mask)
    O.check_same_device("mask", mask, device, other=other)
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask must have shape {shape}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool and mask.dtype not in O.FLOAT_DTYPES:
        raise TypeError(f"mask must be bool or float, got {mask.dtype}")
    old_logp = _float_bt("old_logp", old_logp, shape, device, other)
    ref_logp = _float_bt("ref_logp", ref_logp, shape, device, other)
    token_advantages = _float_bt("token_advantages", token_advantages, shape, device, other)
    is_weights = _float_bt("is_weights", is_weights, shape, device, other, allow_row=True)
    if offpolicy is not None:
        offpolicy = O.check_bool_tensor("offpolicy", offpolicy, (B,), device, other=other).contiguous()

    O.choice("mode", mode, MODE_CODES)
    O.choice("agg", agg, AGG_CODES)
    O.choice("kl", kl, KL_CODES)
    beta = O.check_number("beta", beta, low=0.0)
    if beta > 0 and ref_logp is None:
        raise ValueError("beta > 0 needs ref_logp (the reference policy's log-probs)")
    clip_low = O.check_number("clip_low", clip_low, low=0.0)
    if clip_low >= 1.0:
        raise ValueError(f"clip_low must be < 1 (the ratio is clipped to [1 - clip_low, ...]), got {clip_low}")
    clip_high = clip_low if clip_high is None else O.check_number("clip_high", clip_high, low=0.0)
    if dual_clip is not None:
        dual_clip = O.check_number("dual_clip", dual_clip, low=1.0, low_inclusive=False)
    if ratio_cap is not None:
        ratio_cap = O.check_number("ratio_cap", ratio_cap, low=1.0 + clip_high, low_inclusive=False)
    offpolicy_gamma = O.check_number("offpolicy_gamma", offpolicy_gamma, low=0.0, low_inclusive=False)
    if agg == "seq-mean-token-sum-norm":
        if max_len is None:
            raise ValueError("agg='seq-mean-token-sum-norm' needs max_len (the constant length to divide by)")
        max_len = O.check_int("max_len", max_len, low=1)
    elif max_len is not None:
        max_len = O.check_int("max_len", max_len, low=1)
    if num_tokens is not None:
        if isinstance(num_tokens, torch.Tensor):
            raise TypeError("num_tokens must be a Python number (the global active-token count)")
        num_tokens = O.check_number("num_tokens", num_tokens, low=0.0, low_inclusive=False)

    return (
        advantages, mask, old_logp, ref_logp, token_advantages, is_weights, offpolicy, beta, kl, clip_low,
        clip_high, dual_clip, ratio_cap, mode, offpolicy_gamma, agg, max_len, num_tokens,
    )  # fmt: skip


def policy_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
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
) -> tuple[torch.Tensor, PolicyLossMetrics]:
    """Token-level GRPO / PPO policy loss from log-probs, forward and backward in one fused kernel.

    Args:
        logp: [B, T] log-probs of the sampled tokens under the current policy (requires grad; any float
            dtype; math in float32; the gradient has logp's dtype).
        advantages: [B] (broadcast over tokens) or [B, T].
        mask: [B, T] bool (any nonzero byte is True), or float (a per-token weight, active where != 0);
            masked tokens contribute nothing, whatever NaN or inf their inputs hold, and get a 0 gradient.
        old_logp: [B, T] log-probs of the policy that sampled (None: on-policy, ratio 1 with gradient 1
            whatever logp holds).
        ref_logp: [B, T] reference log-probs; with beta > 0 the loss adds beta * KL (estimator kl).
        kl: "k1" logp - ref, "k2" (logp - ref)^2 / 2, "k3" exp(ref - logp) - (ref - logp) - 1.
        clip_low, clip_high: ratio clipped to [1 - clip_low, 1 + clip_high] (clip_high defaults to
            clip_low; larger is DAPO clip-higher).
        dual_clip: c > 1 bounds the loss of negative-advantage tokens by -c A.
        ratio_cap: delta, clamps the ratio from above before the min (two-sided clipping).
        mode: "clip" (PPO / GRPO), "cispo" (-sg(clamp(ratio)) A logp), "gspo" (sequence-level ratio
            exp(mean of logp - old_logp over the sequence's active tokens)), "reinforce" (-A logp).
        is_weights: [B] or [B, T] behaviour-policy importance weights, multiplied into the policy term.
        offpolicy: [B] bool, sequences generated off-policy: -A f(p), f(p) = p / (p + offpolicy_gamma).
        token_advantages: [B, T] added to the (broadcast) sequence advantage.
        agg: "token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm".
        max_len: the constant length of "seq-mean-token-sum-norm" (Dr. GRPO).
        num_tokens: the global active-token count for "token-mean", so that data-parallel ranks and
            gradient-accumulation micro-batches agree.

    Log-ratios are clamped to [-20, 20] before exp (the GSPO sequence log-ratio too, and the k3 log-ratio).

    Returns:
        (loss, PolicyLossMetrics): loss is a 0-dim float32 tensor (float64 for float64 logp).

    Example:
        >>> logp = torch.randn(4, 16).clamp(max=0).requires_grad_()
        >>> loss, m = policy_loss(logp, torch.randn(4), torch.ones(4, 16, dtype=torch.bool),
        ...                       old_logp=logp.detach() + 0.01, clip_high=0.28)
        >>> loss.backward()
    """
    O.check_float_tensor("logp", logp)
    if logp.dim() != 2:
        raise ValueError(f"logp must be [B, T], got shape {tuple(logp.shape)}")
    if logp.numel() == 0:
        raise ValueError(f"logp is empty (shape {tuple(logp.shape)})")
    loss_args = check_loss_args(
        tuple(logp.shape), logp.device, "logp", advantages, mask, old_logp, ref_logp, token_advantages, is_weights,
        offpolicy, beta, kl, clip_low, clip_high, dual_clip, ratio_cap, mode, offpolicy_gamma, agg, max_len,
        num_tokens,
    )  # fmt: skip
    write_grad = torch.is_grad_enabled() and logp.requires_grad
    args = (logp, *loss_args, write_grad)
    if torch.compiler.is_compiling() or logp.is_meta:  # the registered op (meta tensors: its fake)
        loss, metrics, _ = policy_loss_op(*args)
    elif write_grad:
        loss, metrics, _ = PolicyLossFunction.apply(*args)
    else:
        loss, metrics, _ = run(problem_from_args(*args))
    return loss, PolicyLossMetrics(*metrics.unbind(0))
