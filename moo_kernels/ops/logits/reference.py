"""Float64 reference of the logits ops: the semantics, the oracle, the fallback.

For a position (b, t) with logits z [V], chosen token y and temperature tau, s = z / tau:

- log-prob     logp = s_y - lse(s),                  lse(s) = log sum_v exp(s_v)
- entropy      H = lse(s) - sum_v p_v s_v,           p = softmax(s)
- gradients    d logp / d z_v = (1[v = y] - p_v) / tau
               d H / d z_v    = -p_v (s_v - sum_u p_u s_u) / tau

Every statistic is taken relative to the row maximum, on x = (z - max z) / tau (so that a huge 1 / tau
never overflows s): with log l = log sum_v exp(x_v), logp = x_y - log l and H = log l - sum_v p_v x_v.
Logits of -inf are allowed (p = 0 there, with p x taken as 0). A row without a finite logit has log-prob
-inf, entropy 0 and gradient 0; a row holding +inf or NaN gives NaN. A row whose incoming gradients are
both 0 gets exactly 0 gradient, whatever its logits hold.

policy_loss_from_logits(logits, tokens, ...) is policy_loss(token_logprobs(logits, tokens), ...): its
gradient with respect to the logits is g_bt (1[v = y_bt] - p_btv) / tau, where g_bt = d loss / d logp_bt
is the closed-form gradient of the policy loss (zero at masked tokens).

The entropy terms (moo_kernels.ops.logits.spec.EntropySpec, computed by moo_kernels/ops/logits/entropy.py):
top_entropy_quantile / entropy_threshold give a threshold, and the active tokens whose entropy is below it lose
their policy term (they join policy_mask); entropy_coef subtracts entropy_coef * Hbar with Hbar = sum_bt
w_bt H_bt, w from entropy_agg, so the gradient gains -entropy_coef w_bt d H_bt / d z.

Nothing here uses autograd: the op's reference backend runs below it, so the gradients are closed forms
(the tests check them against autograd through torch.log_softmax).
"""

from __future__ import annotations

import torch

from moo_kernels.ops.logits.entropy import entropy_bonus, entropy_keep, with_policy_mask
from moo_kernels.ops.logits.spec import EntropySpec, entropy_spec
from moo_kernels.ops.loss.reference import loss_grad_reference, loss_reference
from moo_kernels.ops.loss.spec import LossSpec, loss_spec

F64 = torch.float64


def _softmax_parts(logits: torch.Tensor, temperature: float):
    """(x, log l, p, empty): x = (z - max z) / tau, log l = logsumexp(x), p = softmax, empty: rows without
    a finite logit (p = 0 there)."""
    z = logits.detach().to(F64)
    zmax = z.amax(dim=-1, keepdim=True)
    empty = zmax == float("-inf")
    x = (z - torch.where(empty, 0.0, zmax)) / temperature
    log_l = torch.logsumexp(x, dim=-1)
    p = torch.where(empty, 0.0, torch.exp(x - log_l[..., None]))
    return x, log_l, p, empty[..., 0]


def _p_times(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """p x with the limit 0 where p = 0 (a logit of -inf: x is -inf there); NaN stays NaN."""
    return torch.where(p == 0, torch.zeros_like(p), p * x)


def token_logprobs_reference(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp, entropy), both [B, T] float64."""
    x, log_l, p, empty = _softmax_parts(logits, temperature)
    logp = torch.where(empty, float("-inf"), x.gather(-1, tokens.long()[..., None])[..., 0] - log_l)
    entropy = torch.where(empty, 0.0, log_l - _p_times(p, x).sum(-1))
    return logp, entropy


def row_stats_reference(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """[B, T, 2] float64: each row's maximum logit M and log l = logsumexp((z - M) / tau) (-inf, -inf for a
    row without a finite logit), what the kernels save for the backward."""
    zmax = logits.detach().to(F64).amax(dim=-1)
    _, log_l, _, _ = _softmax_parts(logits, temperature)
    return torch.stack([zmax, log_l], dim=-1)


def token_logprobs_grad_reference(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    g_logp: torch.Tensor | None,
    g_entropy: torch.Tensor | None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """d (sum g_logp logp + sum g_entropy H) / d logits, float64 [B, T, V]; exactly 0 in rows whose
    incoming gradients are both 0 and in rows without a finite logit."""
    x, _, p, empty = _softmax_parts(logits, temperature)
    grad = torch.zeros_like(x)
    zero = torch.zeros(x.shape[:-1], dtype=F64)
    g = g_logp.to(F64) if g_logp is not None else zero
    h = g_entropy.to(F64) if g_entropy is not None else zero
    live = ~empty & ((g != 0) | (h != 0))
    if g_logp is not None:
        grad -= g[..., None] * p
        grad.scatter_add_(-1, tokens.long()[..., None], g[..., None])
    if g_entropy is not None:
        mean_x = _p_times(p, x).sum(-1, keepdim=True)
        grad -= h[..., None] * _p_times(p, x - mean_x)
    return torch.where(live[..., None], grad / temperature, 0.0)


def policy_loss_from_logits_reference(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    **options,
):
    """(loss, metrics dict, entropy [B, T], grad [B, T, V]), all float64; grad is d loss / d logits. options: the
    loss's arguments (moo_kernels.ops.loss.spec.LossSpec) and the entropy terms' (EntropySpec), by name."""
    es = entropy_spec(**{k: options.pop(k) for k in EntropySpec.names() if k in options})
    spec = loss_spec(tuple(tokens.shape), logits.device, "logits", advantages=advantages, mask=mask, **options)
    return logits_loss_reference(logits, tokens, temperature, spec, es)


def logits_loss_reference(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float, spec: LossSpec, es: EntropySpec | None = None
):
    """policy_loss_from_logits_reference of validated arguments."""
    logp, entropy = token_logprobs_reference(logits, tokens, temperature)
    keep = entropy_keep(entropy, spec, es) if es is not None else None
    spec = with_policy_mask(spec, keep)
    loss, metrics = loss_reference(logp, spec)
    g = loss_grad_reference(logp, spec)
    g_entropy = None
    if es is not None and es.entropy_coef != 0.0:
        hbar, weights = entropy_bonus(entropy, spec, es, keep)
        loss = loss - es.entropy_coef * hbar
        g_entropy = -es.entropy_coef * weights
    grad = token_logprobs_grad_reference(logits, tokens, g, g_entropy, temperature)
    return loss, metrics, entropy, grad
