"""The KL estimators of the policy loss against verl's own kl_penalty (value and gradient, every backend), and
kl_bias_correction against TRL's use_bias_correction_kl formula."""

import pytest
import torch
from conftest import targets

import moo_kernels as mk

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

TARGETS = targets()

# ours -> verl's kl_penalty name. verl's "k3" is clamped to at most 10 (its "low_var_kl"): ours is not, so our
# "k3" / "k3+" are compared where k3 <= 10 only.
VERL_NAMES = {
    "k1": "k1",
    "k2": "k2",
    "abs": "abs",
    "low_var_kl": "low_var_kl",
    "k1+": "k1+",
    "low_var_kl+": "low_var_kl+",
    "abs+": "abs+",
    "k3": "k3",
    "k3+": "k3+",
}


def batch(seed=0, b=5, t=24, spread=6.0):
    """log-probs and reference log-probs with u = logp - ref over [-spread, spread] (k3 past 10 for u < -2.5)."""
    g = torch.Generator().manual_seed(seed)
    logp = -3 * torch.rand(b, t, generator=g, dtype=torch.float64)
    ref = logp - spread * (2 * torch.rand(b, t, generator=g, dtype=torch.float64) - 1)
    ref[0, :3] = logp[0, :3]  # u = 0 exactly: abs's gradient is 0 there
    mask = torch.rand(b, t, generator=g) > 0.2
    return logp, ref, mask


def kl_loss(backend, device, logp, ref, mask, **kw):
    """sum over active tokens of the KL term alone (A = 0: no policy term), and its gradient."""
    x = logp.to(device).requires_grad_()
    adv = torch.zeros(logp.shape[0], dtype=logp.dtype, device=device)
    with mk.use_backend(backend):
        loss, metrics = mk.policy_loss(x, adv, mask.to(device), ref_logp=ref.to(device), beta=1.0,
                                       agg="token-sum", **kw)  # fmt: skip
    loss.backward()
    return loss.detach().cpu(), x.grad.cpu(), metrics


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("kl", sorted(VERL_NAMES))
def test_matches_verl_kl_penalty(backend, device, kl):
    logp, ref, mask = batch()
    x = logp.clone().requires_grad_()
    verl = core_algos.kl_penalty(x, ref, VERL_NAMES[kl])
    if kl in ("k3", "k3+"):  # verl's k3 is clamped to 10: compare where it is not
        u = (logp - ref).clamp(-20, 20)
        mask = mask & (torch.exp(-u) + u - 1 <= 10)
    torch.where(mask, verl, torch.zeros_like(verl)).sum().backward()
    loss, grad, metrics = kl_loss(backend, device, logp, ref, mask, mode="reinforce", kl=kl)
    expected = torch.where(mask, verl, torch.zeros_like(verl)).sum().detach()
    tol = 1e-10 if device == "cpu" and backend == "cpp" and logp.dtype == torch.float64 else 2e-5
    torch.testing.assert_close(loss, expected, rtol=tol, atol=tol)
    torch.testing.assert_close(grad, torch.where(mask, x.grad, torch.zeros_like(grad)), rtol=tol, atol=tol)
    assert metrics.kl_mean.item() == pytest.approx(expected.item() / mask.sum().item(), rel=1e-5)


def test_low_var_kl_clamps_and_stops_the_gradient():
    logp = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[0.5, 4.0]], dtype=torch.float64)  # k3 = 0.149 and e^4 - 5 = 49.6
    loss, m = mk.policy_loss(logp, torch.zeros(1, dtype=torch.float64), torch.ones(1, 2, dtype=torch.bool),
                             ref_logp=ref, beta=1.0, kl="low_var_kl", agg="token-sum", mode="reinforce")  # fmt: skip
    loss.backward()
    k3 = torch.exp(torch.tensor(0.5)) - 0.5 - 1
    assert loss.item() == pytest.approx(k3.item() + 10.0)
    assert logp.grad[0, 1] == 0 and logp.grad[0, 0] == pytest.approx(1 - torch.exp(torch.tensor(0.5)).item())


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("mode", ["clip", "cispo"])
def test_bias_correction_is_trl_formula(backend, device, mode):
    """TRL's use_bias_correction_kl at token level: per_token_kl * coef_1, coef_1 = exp(logp - old)."""
    logp, ref, mask = batch(1, spread=1.0)
    old = logp + 0.2 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    x = logp.clone().requires_grad_()
    k3 = torch.exp(ref - x) - (ref - x) - 1
    expected = torch.where(mask, k3 * torch.exp(x - old), torch.zeros_like(k3)).sum()
    expected.backward()
    loss, grad, _ = kl_loss(backend, device, logp, ref, mask, mode=mode, old_logp=old.to(device),
                            kl_bias_correction=True)  # fmt: skip
    torch.testing.assert_close(loss, expected.detach(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad, torch.where(mask, x.grad, torch.zeros_like(grad)), rtol=2e-5, atol=2e-5)


def test_bias_correction_refuses_gspo():
    logp, ref, mask = batch(1)
    with pytest.raises(ValueError, match='kl_bias_correction is not supported with mode="gspo"'):
        mk.policy_loss(logp, torch.zeros(5, dtype=torch.float64), mask, ref_logp=ref, beta=0.1, mode="gspo",
                       kl_bias_correction=True)  # fmt: skip


def test_bias_correction_on_policy_is_k_plus_its_gradient():
    """On-policy the ratio is 1 with gradient 1: the term is k, its gradient dk + k."""
    logp, ref, mask = batch(3, spread=1.0)
    loss, grad, _ = kl_loss("reference", "cpu", logp, ref, mask, kl="k2", kl_bias_correction=True)
    u = logp - ref
    expected = torch.where(mask, u + 0.5 * u * u, torch.zeros_like(u))
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(loss, torch.where(mask, 0.5 * u * u, torch.zeros_like(u)).sum())


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("taus", [(1.0, 1.05), (0.5, 2.0)])
def test_sapo_matches_verl(backend, device, taus):
    """mode "sapo" against verl's compute_policy_loss_sapo (its aggregation is seq-mean-token-mean)."""
    from omegaconf import OmegaConf
    from verl.workers.config import ActorConfig

    logp, _, mask = batch(4, spread=1.0)
    g = torch.Generator().manual_seed(5)
    old = logp + 0.3 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
    adv = torch.randn(logp.shape[0], generator=g, dtype=torch.float64)
    config = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, tau_pos=taus[0],
                         tau_neg=taus[1])  # fmt: skip
    config = OmegaConf.structured(config) if not hasattr(config, "global_batch_info") else config
    x = logp.clone().requires_grad_()
    verl_loss, _ = core_algos.compute_policy_loss_sapo(old, x, adv[:, None].expand_as(x), mask.double(),
                                                        config=config)  # fmt: skip
    verl_loss.backward()
    y = logp.to(device).requires_grad_()
    with mk.use_backend(backend):
        loss, _ = mk.policy_loss(y, adv.to(device), mask.to(device), old_logp=old.to(device), mode="sapo",
                                 sapo_tau_pos=taus[0], sapo_tau_neg=taus[1], agg="seq-mean-token-mean")  # fmt: skip
    loss.backward()
    torch.testing.assert_close(loss.detach().cpu(), verl_loss.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(y.grad.cpu(), torch.where(mask, x.grad, 0.0), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("source", ["sampling", "old"])
def test_offpolicy_mask_matches_trl(backend, device, source):
    """offpolicy_mask_threshold against TRL's GRPOTrainer.get_off_policy_mask (called as TRL calls it), on the
    clipped loss with token-mean aggregation: value and gradient; sampling_logp defaults to old_logp as in TRL."""
    from trl import GRPOTrainer

    logp, _, mask = batch(6, b=8, t=12, spread=1.0)
    g = torch.Generator().manual_seed(7)
    drift = torch.linspace(-0.4, 0.4, logp.shape[0], dtype=torch.float64)[:, None]  # some sequences drift
    old = logp + drift + 0.05 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
    sampling = old + 0.05 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
    sampling[0, 0] = float("nan")  # a token the sampler could not score counts 0
    adv = torch.randn(logp.shape[0], generator=g, dtype=torch.float64)
    threshold = 0.1
    src = sampling if source == "sampling" else old
    x = logp.clone().requires_grad_()
    keep = GRPOTrainer.get_off_policy_mask(adv[:, None], x, src, mask.double(), threshold)
    ratio = torch.exp(x - old)
    per_token = -torch.min(ratio * adv[:, None], ratio.clamp(0.8, 1.2) * adv[:, None]) * keep
    expected = (per_token * mask).sum() / mask.sum()
    expected.backward()
    assert 0 < keep.sum() < keep.numel()  # the mask drops some sequences' negative tokens, not all
    kw = dict(old_logp=old.to(device), offpolicy_mask_threshold=threshold)
    if source == "sampling":
        kw["sampling_logp"] = sampling.to(device)
    y = logp.to(device).requires_grad_()
    with mk.use_backend(backend):
        loss, _ = mk.policy_loss(y, adv.to(device), mask.to(device), **kw)
    loss.backward()
    torch.testing.assert_close(loss.detach().cpu(), expected.detach(), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(y.grad.cpu(), torch.where(mask, x.grad, 0.0), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_offpolicy_mask_from_logits_equals_from_logprobs(backend, device):
    """The logits entry takes the two-kernel path with the mask and gives the log-prob entry's loss."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(4, 6, 9, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 9, (4, 6), generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.2
    with torch.no_grad():
        logp = mk.token_logprobs(logits, tokens)
    old = logp + 0.05 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
    sampling = old + torch.linspace(-0.5, 0.5, 4, dtype=torch.float64)[:, None]
    adv = torch.tensor([1.0, -1.0, -0.5, 0.5], dtype=torch.float64)
    kw = dict(old_logp=old, sampling_logp=sampling, offpolicy_mask_threshold=0.1)
    z = logits.clone().to(device).requires_grad_()
    with mk.use_backend(backend):
        loss, _ = mk.policy_loss_from_logits(
            z,
            tokens.to(device),
            adv.to(device),
            mask.to(device),
            **{k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()},
        )
    loss.backward()
    lp = mk.token_logprobs(logits.clone().requires_grad_(), tokens)
    with mk.use_backend("reference"):
        ref_loss, _ = mk.policy_loss(lp, adv, mask, **kw)
    torch.testing.assert_close(loss.detach().cpu(), ref_loss.detach(), rtol=1e-6, atol=1e-8)


def test_sampling_logp_needs_the_threshold():
    logp, _, mask = batch(0)
    with pytest.raises(ValueError, match="sampling_logp is read by offpolicy_mask_threshold"):
        mk.policy_loss(logp, torch.zeros(5, dtype=torch.float64), mask, sampling_logp=logp)
