"""Modes "gmpo" and "vespo", policy_mask and the masked_frac metric against the peers' real code: verl's
compute_policy_loss_geo_mean (loss, gradient by autograd, with and without rollout IS weights) and TRL's
GRPOTrainer.get_gamma_weights inside TRL's vespo loss (token- and sequence-level vLLM ratios), on every backend;
the options' errors."""

import pytest
import torch
from conftest import targets

import moo_kernels as mk

verl_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

TARGETS = targets()
B, T = 6, 23


def batch(seed=0, garbage=True):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 2 - 0.05
    old = logp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.rand(B, T, generator=g) > 0.2
    mask[1, 12:] = False
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[4] = 0.0  # sign 0: GMPO's clip gives d' = 0
    isw = torch.rand(B, T, generator=g, dtype=torch.float64) + 0.5
    if garbage:
        for x in (logp, old, isw):
            x[~mask] = float("nan")
    return logp, old, mask, adv, isw


def ours(backend, device, logp, adv, mask, **kw):
    x = logp.float().to(device).requires_grad_()
    kw = {
        k: v.float().to(device) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()
    }
    with mk.use_backend(backend):
        loss, metrics = mk.policy_loss(x, adv.float().to(device), mask.to(device), **kw)
    loss.backward()
    return loss.double().cpu(), metrics, x.grad.double().cpu()


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("with_is", [False, True])
@pytest.mark.parametrize("clip", [(0.2, 0.2), (0.1, 0.4)])
def test_gmpo_matches_verl(backend, device, with_is, clip):
    logp, old, mask, adv, isw = batch()
    config = type("Cfg", (), dict(clip_ratio=clip[0], clip_ratio_low=clip[0], clip_ratio_high=clip[1]))()
    z = torch.where(mask, logp, -1.0).requires_grad_()
    theirs, metrics = verl_algos.compute_policy_loss_geo_mean(
        torch.where(mask, old, -1.0), z, adv[:, None].expand(B, T), mask.double(), config=config,
        rollout_is_weights=torch.where(mask, isw, 1.0) if with_is else None,
    )  # fmt: skip
    theirs.backward()
    loss, m, grad = ours(backend, device, logp, adv, mask, old_logp=old, mode="gmpo", clip_low=clip[0],
                         clip_high=clip[1], agg="seq-mean-token-mean", num_sequences=float(B),
                         is_weights=isw if with_is else None)  # fmt: skip
    torch.testing.assert_close(loss, theirs.detach(), rtol=1e-5, atol=1e-6)  # verl divides by n + 1e-8
    torch.testing.assert_close(grad[mask], z.grad[mask], rtol=1e-4, atol=1e-6)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    assert m.clip_frac > 0
    torch.testing.assert_close(float(m.ppo_kl), metrics["actor/ppo_kl"], rtol=1e-5, atol=1e-6)


def trl_vespo(logp, old, mask, adv, is_ratio, **params):
    """TRL's vespo loss on its "dapo" normaliser (here the batch's token count): -phi A logp, phi from TRL's
    own get_gamma_weights."""
    z = torch.where(mask, logp, -1.0).requires_grad_()
    log_ratio = z.detach() - torch.where(mask, old, -1.0)
    phi = trl_grpo.GRPOTrainer.get_gamma_weights(adv[:, None], log_ratio, mask.double(), is_ratio, **params)
    loss = ((-phi * adv[:, None] * z) * mask).sum() / mask.sum()
    loss.backward()
    return loss.detach(), z.grad


VESPO_PARAMS = [{}, dict(k_pos=1.0, lambda_pos=0.5, k_neg=4.0, lambda_neg=1.5)]


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("is_level", [None, "token", "sequence"])
@pytest.mark.parametrize("params", range(len(VESPO_PARAMS)))
def test_vespo_matches_trl(backend, device, is_level, params):
    logp, old, mask, adv, isw = batch(1)
    p = VESPO_PARAMS[params]
    logp = logp * 0.05  # small sequence log-ratios: phi away from 0
    old = logp + 0.02 * torch.nan_to_num(old)
    if is_level == "token":  # TRL's token ratio: 1 at padding (exp of a masked difference)
        trl_is, is_weights = torch.where(mask, isw, 1.0), isw
    elif is_level == "sequence":  # TRL's (B, 1) sequence ratio; ours the [B] weight
        is_weights = torch.rand(B, generator=torch.Generator().manual_seed(2), dtype=torch.float64) + 0.5
        trl_is = is_weights[:, None]
    else:
        trl_is = is_weights = None
    theirs, tgrad = trl_vespo(logp, old, mask, adv, trl_is, **p)
    opts = {f"vespo_{k}": v for k, v in p.items()}
    loss, m, grad = ours(backend, device, logp, adv, mask, old_logp=old, mode="vespo", is_weights=is_weights, **opts)
    torch.testing.assert_close(loss, theirs, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad[mask], tgrad[mask], rtol=2e-5, atol=1e-7)
    assert float(m.ratio_min) > 0


@pytest.mark.parametrize("backend,device", TARGETS)
def test_policy_mask_is_trl_entropy_mask(backend, device):
    """policy_mask multiplies the policy term as TRL's entropy mask does (before the KL term is added), and
    masked_frac reports the share of active tokens it dropped."""
    logp, old, mask, adv, _ = batch(3, garbage=False)
    keep = torch.rand(B, T, generator=torch.Generator().manual_seed(5)) > 0.3
    ref = logp + 0.1
    z = logp.clone().requires_grad_()
    ratio = torch.exp(z - old)
    pg = -torch.min(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None]) * keep
    kl = torch.exp(ref - z) - (ref - z) - 1
    theirs = ((pg + 0.04 * kl) * mask).sum() / mask.sum()
    theirs.backward()
    loss, m, grad = ours(backend, device, logp, adv, mask, old_logp=old, ref_logp=ref, beta=0.04, policy_mask=keep)
    torch.testing.assert_close(loss, theirs.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad[mask], z.grad[mask], rtol=1e-4, atol=1e-7)
    dropped = (mask & ~keep).sum() / mask.sum()
    torch.testing.assert_close(m.masked_frac.double().cpu(), dropped.double(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(mode="gmpo2"), ValueError, "mode"),
        (dict(mode="vespo", vespo_k_pos=-1.0), ValueError, "vespo_k_pos"),
        (dict(mode="vespo", vespo_lambda_neg=float("inf")), ValueError, "vespo_lambda_neg"),
        (dict(policy_mask=torch.ones(B, T)), TypeError, "policy_mask must be"),
        (dict(policy_mask=torch.ones(B, T - 1, dtype=torch.bool)), ValueError, "policy_mask must have shape"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    logp, _, mask, adv, _ = batch(garbage=False)
    with pytest.raises(error, match=match):
        mk.policy_loss(logp.float(), adv.float(), mask, **kwargs)
