"""Float64 reference of the logits ops: the semantics, the oracle, the fallback.

For a position (b, t) with logits z [V], chosen token y and temperature tau, s = z / tau:

- log-prob     logp = s_y - lse(s),                  lse(s) = log sum_v exp(s_v)
- entropy      H = lse(s) - sum_v p_v s_v,           p = softmax(s)
- gradients    d logp / d z_v = (1[v = y] - p_v) / tau
               d H / d z_v    = -p_v (s_v - sum_u p_u s_u) / tau

policy_loss_from_logits(logits, tokens, ...) is policy_loss(token_logprobs(logits, tokens), ...): its
gradient with respect to the logits is g_bt (1[v = y_bt] - p_btv) / tau, where g_bt = d loss / d logp_bt
is the closed-form gradient of the policy loss (zero at masked tokens). The entropy it returns is a
diagnostic and carries no gradient.

Nothing here uses autograd: the op's reference backend runs below it, so the gradients are closed forms
(the tests check them against autograd through torch.log_softmax).
"""

from __future__ import annotations

import torch

from moo_kernels.ops.policy_loss.reference import policy_loss_grad_reference, policy_loss_reference

F64 = torch.float64


def _softmax_parts(logits: torch.Tensor, temperature: float):
    s = logits.detach().to(F64) / temperature
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse[..., None])
    return s, lse, p


def _p_times(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """p x with the limit 0 where p = 0 (a logit of -inf: x is -inf there)."""
    return torch.where(p > 0, p * x, torch.zeros_like(p))


def token_logprobs_reference(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy), both [B, T] float64."""
    s, lse, p = _softmax_parts(logits, temperature)
    logp = s.gather(-1, tokens.long()[..., None])[..., 0] - lse
    entropy = lse - _p_times(p, s).sum(-1)
    return logp, entropy


def token_logprobs_grad_reference(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    g_logp: torch.Tensor | None,
    g_entropy: torch.Tensor | None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """d (sum g_logp logp + sum g_entropy H) / d logits, float64 [B, T, V]."""
    s, lse, p = _softmax_parts(logits, temperature)
    grad = torch.zeros_like(s)
    if g_logp is not None:
        g = g_logp.to(F64)[..., None]
        grad -= g * p
        grad.scatter_add_(-1, tokens.long()[..., None], g)
    if g_entropy is not None:
        mean_s = _p_times(p, s).sum(-1, keepdim=True)
        grad -= g_entropy.to(F64)[..., None] * _p_times(p, s - mean_s)
    return grad / temperature


def policy_loss_from_logits_reference(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    **kw,
):
    """(loss, metrics dict, entropy [B, T], grad [B, T, V]), all float64; grad is d loss / d logits."""
    logp, entropy = token_logprobs_reference(logits, tokens, temperature)
    loss, metrics = policy_loss_reference(logp, advantages, mask, **kw)
    g = policy_loss_grad_reference(logp, advantages, mask, **kw)
    grad = token_logprobs_grad_reference(logits, tokens, g, None, temperature)
    return loss, metrics, entropy, grad
