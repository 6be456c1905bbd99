"""policy_loss: every backend against the float64 reference (loss, metrics, gradient), agreement with
independent implementations of the TRL and verl formulas, edge cases, errors, torch.library checks."""

import pytest
import torch
from conftest import HAS_CUDA, targets

import moo_kernels as mk
from moo_kernels._codes import METRICS
from moo_kernels.ops.loss.reference import policy_loss_grad_reference, policy_loss_reference

TARGETS = targets()
B, T = 5, 67


def make_inputs(seed=0, b=B, t=T, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(b, t, generator=g, dtype=torch.float64) * 3 - 0.01).to(dtype)
    old = (logp.double() + 0.4 * torch.randn(b, t, generator=g, dtype=torch.float64)).to(dtype)
    ref = (logp.double() + 0.4 * torch.randn(b, t, generator=g, dtype=torch.float64)).to(dtype)
    mask = torch.rand(b, t, generator=g) > 0.25
    mask[1] = False  # one sequence without active tokens
    mask[3, 40:] = False  # a shorter sequence
    adv = torch.randn(b, generator=g, dtype=torch.float64).to(dtype)
    extra = {
        "adv_bt": torch.randn(b, t, generator=g, dtype=torch.float64).to(dtype),
        "tok": 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64).to(dtype),
        "isw_b": (torch.rand(b, generator=g, dtype=torch.float64) + 0.5).to(dtype),
        "isw_bt": (torch.rand(b, t, generator=g, dtype=torch.float64) + 0.5).to(dtype),
        "off": torch.tensor([True, False, False, True, False] * (b // 5 + 1))[:b],
        "fmask": torch.rand(b, t, generator=g, dtype=torch.float64).to(dtype) * mask,
        "pmask": torch.rand(b, t, generator=g) > 0.4,
    }
    return logp, old, ref, mask, adv, extra


CASES = {
    "clip_token_mean": dict(),
    "clip_higher_dual_cap_k3": dict(clip_high=0.28, dual_clip=3.0, ratio_cap=2.5, beta=0.04, ref=True),
    "clip_k1_seq_mean_token_mean": dict(kl="k1", beta=0.1, ref=True, agg="seq-mean-token-mean"),
    "clip_k2_seq_mean_token_sum": dict(kl="k2", beta=0.1, ref=True, agg="seq-mean-token-sum"),
    "clip_sum_norm": dict(agg="seq-mean-token-sum-norm", max_len=80),
    "clip_num_tokens": dict(num_tokens=123),
    "clip_token_sum_k3": dict(agg="token-sum", beta=0.05, ref=True, clip_high=0.28),
    "seq_mean_token_mean_num_sequences": dict(agg="seq-mean-token-mean", num_sequences=7.0, dual_clip=3.0),
    "seq_mean_token_sum_num_sequences": dict(agg="seq-mean-token-sum", num_sequences=2.5, mode="cispo"),
    "sum_norm_num_sequences": dict(agg="seq-mean-token-sum-norm", max_len=80, num_sequences=3.0, mask="fmask"),
    "gspo_num_sequences": dict(mode="gspo", agg="seq-mean-token-mean", num_sequences=11.0),
    "on_policy": dict(old=False),
    "gspo": dict(mode="gspo", agg="seq-mean-token-mean"),
    "gspo_token_mean_dual": dict(mode="gspo", dual_clip=2.0, clip_high=0.3),
    "cispo": dict(mode="cispo", clip_high=0.5),
    "reinforce": dict(mode="reinforce", agg="seq-mean-token-sum"),
    "sapo": dict(mode="sapo", agg="seq-mean-token-mean"),
    "sapo_temperatures_k3": dict(mode="sapo", sapo_tau_pos=0.5, sapo_tau_neg=2.0, beta=0.04, ref=True),
    "sapo_on_policy": dict(mode="sapo", old=False, is_weights="isw_bt"),
    "token_advantages": dict(adv="adv_bt", token_advantages="tok"),
    "is_weights_row": dict(is_weights="isw_b"),
    "is_weights_token": dict(is_weights="isw_bt", beta=0.02, ref=True),
    "offpolicy": dict(offpolicy="off", offpolicy_gamma=0.1, clip_high=0.3),
    "float_mask": dict(mask="fmask", agg="seq-mean-token-mean"),
    "kl_abs": dict(kl="abs", beta=0.1, ref=True),
    "kl_low_var": dict(kl="low_var_kl", beta=0.1, ref=True, agg="seq-mean-token-mean"),
    "kl_k1_straight": dict(kl="k1+", beta=0.1, ref=True),
    "kl_k3_straight_bias": dict(kl="k3+", beta=0.1, ref=True, kl_bias_correction=True),
    "kl_low_var_straight": dict(kl="low_var_kl+", beta=0.05, ref=True, mode="cispo"),
    "kl_abs_straight_on_policy_bias": dict(kl="abs+", beta=0.1, ref=True, old=False, kl_bias_correction=True),
    "kl_bias_k3": dict(beta=0.04, ref=True, kl_bias_correction=True, clip_high=0.28),
    "kl_bias_reinforce_low_var": dict(mode="reinforce", kl="low_var_kl", beta=0.1, ref=True, kl_bias_correction=True),
    "gmpo": dict(mode="gmpo", agg="seq-mean-token-mean", clip_high=0.28),
    "gmpo_token_adv_isw_k3": dict(
        mode="gmpo", adv="adv_bt", is_weights="isw_bt", beta=0.04, ref=True, kl_bias_correction=True
    ),  # fmt: skip
    "gmpo_on_policy_float_mask": dict(mode="gmpo", old=False, mask="fmask", is_weights="isw_b"),
    "vespo": dict(mode="vespo", agg="seq-mean-token-mean"),
    "vespo_isw_k3_params": dict(
        mode="vespo",
        is_weights="isw_bt",
        adv="adv_bt",
        vespo_k_pos=1.5,
        vespo_lambda_pos=0.5,
        vespo_k_neg=4.0,
        vespo_lambda_neg=0.0,
        beta=0.04,
        ref=True,
    ),  # fmt: skip
    "vespo_on_policy_isw_row": dict(mode="vespo", old=False, is_weights="isw_b", agg="token-sum"),
    "policy_mask": dict(policy_mask="pmask", beta=0.04, ref=True),
    "policy_mask_offpolicy_threshold": dict(
        policy_mask="pmask", mode="sapo", offpolicy_mask_threshold=-0.02, agg="seq-mean-token-mean"
    ),  # fmt: skip
}


def build(case, seed=0, dtype=torch.float32):
    logp, old, ref, mask, adv, extra = make_inputs(seed, dtype=dtype)
    kw = dict(CASES[case])
    use_old = kw.pop("old", True)
    use_ref = kw.pop("ref", False)
    adv = extra[kw.pop("adv")] if "adv" in kw else adv
    mask = extra[kw.pop("mask")] if "mask" in kw else mask
    for key in ("token_advantages", "is_weights", "offpolicy", "policy_mask"):
        if key in kw:
            kw[key] = extra[kw[key]]
    if use_old:
        kw["old_logp"] = old
    if use_ref:
        kw["ref_logp"] = ref
    return logp, adv, mask, kw


def to(device, x):
    return x.to(device) if isinstance(x, torch.Tensor) else x


def run(backend, device, logp, adv, mask, kw, grad_out=1.0):
    x = logp.detach().to(device).requires_grad_()
    with mk.use_backend(backend):
        loss, metrics = mk.policy_loss(
            x, to(device, adv), to(device, mask), **{k: to(device, v) for k, v in kw.items()}
        )
    (loss * grad_out).backward()
    return loss, metrics, x.grad


def reference(logp, adv, mask, kw, grad_out=1.0):
    y = logp.detach().double().requires_grad_()
    loss, metrics = policy_loss_reference(y, adv, mask, **kw)
    (loss * grad_out).backward()
    return loss, metrics, y.grad


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference(backend, device, case):
    logp, adv, mask, kw = build(case)
    loss, metrics, grad = run(backend, device, logp, adv, mask, kw, grad_out=-1.7)
    rloss, rmetrics, rgrad = reference(logp, adv, mask, kw, grad_out=-1.7)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and grad.dtype == torch.float32
    torch.testing.assert_close(loss.double().cpu(), rloss.detach(), atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(grad.double().cpu(), rgrad, atol=2e-7, rtol=2e-5)
    for name in METRICS:
        torch.testing.assert_close(
            getattr(metrics, name).double().cpu(), rmetrics[name], atol=2e-6, rtol=2e-5, msg=name
        )
    assert torch.equal(
        grad.cpu()[~mask.bool()] if mask.dtype == torch.bool else grad.cpu()[mask == 0],
        torch.zeros_like(grad.cpu()[mask == 0]),
    )


@pytest.mark.parametrize("case", list(CASES))
def test_closed_form_gradient_matches_autograd(case):
    logp, adv, mask, kw = build(case, dtype=torch.float64)
    _, _, autograd_grad = reference(logp, adv, mask, kw)
    torch.testing.assert_close(policy_loss_grad_reference(logp, adv, mask, **kw), autograd_grad, atol=1e-14, rtol=1e-12)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(backend, device, dtype):
    logp, adv, mask, kw = build("clip_higher_dual_cap_k3", dtype=dtype)
    loss, metrics, grad = run(backend, device, logp, adv, mask, kw)
    rloss, _, rgrad = reference(logp, adv, mask, kw)
    assert grad.dtype == dtype
    tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 2e-5}[dtype]
    torch.testing.assert_close(loss.double().cpu(), rloss.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(grad.double().cpu(), rgrad, atol=tol * 1e-2, rtol=tol)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_all_masked_batch(backend, device):
    logp, adv, mask, kw = build("clip_higher_dual_cap_k3")
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        loss, metrics, grad = run(backend, device, logp, adv, torch.zeros_like(mask), dict(kw, agg=agg))
        assert loss.item() == 0.0 and torch.equal(grad.cpu(), torch.zeros_like(grad.cpu()))
        assert all(torch.isfinite(v).all() for v in metrics)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_non_contiguous_and_extreme_ratios(backend, device):
    logp, adv, mask, kw = build("clip_higher_dual_cap_k3")
    wide = torch.zeros(B, 2 * T)
    wide[:, ::2] = logp
    kw["old_logp"] = kw["old_logp"].clone()
    kw["old_logp"][0, :5] = torch.tensor([-80.0, 40.0, -30.0, 25.0, -1.0])  # |log-ratio| beyond the clamp
    kw["ref_logp"] = kw["ref_logp"].t().contiguous().t()
    loss, metrics, grad = run(backend, device, wide[:, ::2], adv, mask, kw)
    rloss, _, rgrad = reference(logp, adv, mask, kw)
    assert torch.isfinite(grad).all() and all(torch.isfinite(v) for v in metrics)
    torch.testing.assert_close(loss.double().cpu(), rloss.detach(), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(grad.double().cpu(), rgrad, atol=1e-6, rtol=2e-5)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_deterministic(backend, device):
    logp, adv, mask, kw = build("gspo_token_mean_dual")
    a = run(backend, device, logp, adv, mask, kw)
    b = run(backend, device, logp, adv, mask, kw)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("case", ["clip_higher_dual_cap_k3", "gspo", "reinforce", "offpolicy", "is_weights_token"])
def test_gradcheck(backend, case):
    # cispo is left out on purpose: its stop-gradient weight makes the gradient differ from the numerical
    # derivative by design (it is checked against autograd through the reference instead). gspo's token
    # form equals the true derivative under seq-mean-token-mean, the aggregation of this case.
    logp, adv, mask, kw = build(case, dtype=torch.float64)
    x = logp.clone().requires_grad_()

    def f(x):
        with mk.use_backend(backend):
            return mk.policy_loss(x, adv, mask, **kw)[0]

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


# ---- independent implementations of the TRL and verl formulas (written from their documentation) -----


def verl_vanilla(lp, old, A, m, eps_lo, eps_hi, c):
    d = (lp - old).clamp(-20.0, 20.0)
    r = torch.exp(d)
    l1 = -A * r
    l2 = -A * torch.clamp(r, 1 - eps_lo, 1 + eps_hi)
    lc = torch.maximum(l1, l2)
    l3 = -A * c
    pg = torch.where(A < 0, torch.minimum(l3, lc), lc)
    mm = lambda x: (x * m).sum() / (m.sum() + 1e-8)
    return pg, {
        "clip_frac": mm((l2 > l1).double()),
        "dual_clip_frac": mm(((lc > l3) & (A < 0)).double()),
        "ppo_kl": mm(-d),
    }


def verl_agg(loss, m, mode, max_len=None):
    if mode == "token-mean":
        return (loss * m).sum() / m.sum()
    seq_mask = (m.sum(-1) > 0).double()
    if mode == "seq-mean-token-sum":
        return ((loss * m).sum(-1) * seq_mask).sum() / seq_mask.sum()
    if mode == "seq-mean-token-mean":
        return ((loss * m).sum(-1) / (m.sum(-1) + 1e-8) * seq_mask).sum() / seq_mask.sum()
    return (loss * m).sum() / max_len  # seq-mean-token-sum-norm: no division by the batch


def verl_k3(lp, ref):
    k = (ref - lp).clamp(-20, 20)
    return (torch.exp(k) - k - 1).clamp(-10, 10)


def trl_per_token_loss(lp, old, A, eps_lo, eps_hi, delta, beta, ref):
    coef_1 = torch.exp(lp - old)
    coef_2 = torch.clamp(coef_1, 1 - eps_lo, 1 + eps_hi)
    if delta is not None:
        coef_1 = torch.clamp(coef_1, max=delta)
    loss = -torch.min(coef_1 * A, coef_2 * A)
    if beta:
        loss = loss + beta * (torch.exp(ref - lp) - (ref - lp) - 1)
    return loss, coef_1


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_agrees_with_verl(agg):
    logp, old, ref, mask, adv, _ = make_inputs(3, dtype=torch.float64)
    m = mask.double()
    A = adv[:, None].expand_as(logp)
    x = logp.clone().requires_grad_()
    loss, metrics = mk.policy_loss(
        x,
        adv,
        mask,
        old_logp=old,
        ref_logp=ref,
        beta=0.05,
        clip_low=0.2,
        clip_high=0.28,
        dual_clip=3.0,
        agg=agg,
        max_len=T,
    )
    loss.backward()
    y = logp.clone().requires_grad_()
    pg, vm = verl_vanilla(y, old, A, m, 0.2, 0.28, 3.0)
    expected = verl_agg(pg, m, agg, T) + 0.05 * verl_agg(verl_k3(y, ref), m, agg, T)
    if agg == "seq-mean-token-sum-norm":
        expected = expected / B  # ours is a mean over the B sequences, verl's a sum over them
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, atol=1e-9, rtol=1e-6)
    for name, value in vm.items():
        torch.testing.assert_close(getattr(metrics, name), value.detach(), atol=1e-7, rtol=1e-6)


# verl's agg_loss with its global normalisers: (our options, verl's keyword arguments), per aggregation
VERL_AGG_CASES = [
    ("token-mean", {}, {}),
    ("token-mean", dict(num_tokens=150.0), dict(batch_num_tokens=150)),
    ("token-sum", {}, {}),
    ("seq-mean-token-mean", {}, {}),
    ("seq-mean-token-mean", dict(num_sequences=9.0), dict(global_batch_size=9)),
    ("seq-mean-token-sum", {}, {}),
    ("seq-mean-token-sum", dict(num_sequences=6.0), dict(global_batch_size=6)),
    ("seq-mean-token-sum-norm", dict(max_len=40, num_sequences=6.0), dict(global_batch_size=6, loss_scale_factor=40)),
    # without num_sequences ours divides by B, verl's by the active sequences unless told B
    ("seq-mean-token-sum-norm", dict(max_len=40), dict(global_batch_size=B, loss_scale_factor=40)),
]


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("agg,ours,theirs", VERL_AGG_CASES)
def test_aggregations_match_verl_agg_loss(backend, device, agg, ours, theirs):
    """Every aggregation, with and without the global counts, against verl's own agg_loss on the REINFORCE
    per-token loss l = -A logp (loss and gradient; the batch has a sequence without an active token)."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    logp, _, _, mask, adv, _ = make_inputs(7, dtype=torch.float64)
    y = logp.clone().requires_grad_()
    expected = core_algos.agg_loss(-adv[:, None] * y, mask.double(), agg, **theirs)
    expected.backward()
    x = logp.to(device).requires_grad_()
    with mk.use_backend(backend):
        loss, _ = mk.policy_loss(x, adv.to(device), mask.to(device), mode="reinforce", agg=agg, **ours)
    loss.backward()
    # the Triton kernels compute in float32; verl's seq-mean-token-mean divides by (token count + 1e-8)
    tol = 1e-6 if backend == "triton" else 1e-9
    torch.testing.assert_close(loss.cpu(), expected.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(x.grad.cpu(), y.grad, atol=tol, rtol=tol)


def test_agrees_with_verl_gspo_and_cispo():
    logp, old, _, mask, adv, _ = make_inputs(4, dtype=torch.float64)
    m = mask.double()
    A = adv[:, None].expand_as(logp)
    # GSPO (verl forces seq-mean-token-mean)
    x = logp.clone().requires_grad_()
    loss, _ = mk.policy_loss(x, adv, mask, old_logp=old, mode="gspo", agg="seq-mean-token-mean")
    loss.backward()
    y = logp.clone().requires_grad_()
    dseq = ((y - old) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)
    s = torch.exp((y - y.detach() + dseq.detach()).clamp(max=10.0))
    pg = torch.maximum(-A * s, -A * torch.clamp(s, 0.8, 1.2))
    expected = verl_agg(pg, m, "seq-mean-token-mean")
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, atol=1e-9, rtol=1e-6)
    # CISPO (two-sided clip of the stop-gradient weight)
    x = logp.clone().requires_grad_()
    loss, _ = mk.policy_loss(x, adv, mask, old_logp=old, mode="cispo", clip_high=0.4)
    loss.backward()
    y = logp.clone().requires_grad_()
    w = torch.exp((y - old).clamp(-20, 20)).clamp(0.8, 1.4).detach()
    expected = verl_agg(-w * A * y, m, "token-mean")
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("loss_type", ["bnpo", "grpo", "dr_grpo"])
def test_agrees_with_trl(loss_type):
    logp, old, ref, mask, adv, _ = make_inputs(5, dtype=torch.float64)
    mask[1, :3] = True  # TRL's grpo counts every sequence: keep all of them non-empty
    m = mask.double()
    A = adv[:, None]
    agg = {"bnpo": "token-mean", "grpo": "seq-mean-token-mean", "dr_grpo": "seq-mean-token-sum-norm"}[loss_type]
    x = logp.clone().requires_grad_()
    loss, metrics = mk.policy_loss(
        x,
        adv,
        mask,
        old_logp=old,
        ref_logp=ref,
        beta=0.04,
        clip_low=0.2,
        clip_high=0.28,
        ratio_cap=3.0,
        agg=agg,
        max_len=T,
    )
    loss.backward()
    y = logp.clone().requires_grad_()
    per_token, coef_1 = trl_per_token_loss(y, old, A, 0.2, 0.28, 3.0, 0.04, ref)
    if loss_type == "bnpo":
        expected = (per_token * m).sum() / m.sum().clamp(min=1.0)
    elif loss_type == "grpo":
        expected = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)).mean()
    else:
        expected = (per_token * m).sum() / (B * T)
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(x.grad, y.grad, atol=1e-9, rtol=1e-6)
    r = torch.exp(logp - old)
    low = ((r < 0.8) & (A < 0)).double()
    high = ((r > 1.28) & (A > 0)).double()
    mm = lambda v: (v * m).sum() / m.sum()
    torch.testing.assert_close(metrics.clip_frac_low, mm(low))
    torch.testing.assert_close(metrics.clip_frac_high, mm(high))


# ---- errors, torch.library, torch.compile --------------------------------------------------------------

BAD = [
    (dict(logp=torch.zeros(4)), ValueError, r"logp must be \[B, T\]"),
    (dict(logp=torch.zeros(2, 3, dtype=torch.long)), TypeError, "logp must be float16"),
    (dict(advantages=torch.zeros(3)), ValueError, r"advantages must have shape \(2, 3\) or \(2,\)"),
    (dict(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, r"mask must have shape \(2, 3\)"),
    (dict(mask=torch.ones(2, 3, dtype=torch.long)), TypeError, "mask must be bool or float"),
    (dict(old_logp=torch.zeros(3, 2)), ValueError, r"old_logp must have shape"),
    (dict(mode="ppo"), ValueError, "mode must be one of"),
    (dict(agg="mean"), ValueError, "agg must be one of"),
    (dict(kl="k4", beta=0.1, ref_logp=torch.zeros(2, 3)), ValueError, "kl must be one of"),
    (dict(beta=0.1), ValueError, "beta > 0 needs ref_logp"),
    (dict(beta=-0.1), ValueError, "beta must be >= 0"),
    (dict(agg="seq-mean-token-sum-norm"), ValueError, "needs max_len"),
    (dict(clip_low=1.5), ValueError, "clip_low must be < 1"),
    (dict(clip_high=-0.1), ValueError, "clip_high must be >= 0"),
    (dict(dual_clip=1.0), ValueError, "dual_clip must be > 1"),
    (dict(ratio_cap=1.1), ValueError, "ratio_cap must be >"),
    (dict(offpolicy=torch.ones(2)), TypeError, "offpolicy must be a bool tensor"),
    (dict(offpolicy_gamma=0.0), ValueError, "offpolicy_gamma must be > 0"),
    (dict(num_tokens=0), ValueError, "num_tokens must be > 0"),
    (dict(num_tokens=10, agg="token-sum"), ValueError, "num_tokens is the normaliser of agg='token-mean'"),
    (dict(num_sequences=0.0, agg="seq-mean-token-mean"), ValueError, "num_sequences must be > 0"),
    (dict(num_sequences=4), ValueError, "num_sequences is the normaliser of the seq-mean aggregations"),
    (dict(num_sequences=4, agg="token-sum"), ValueError, "agg='token-sum' does not use it"),
    (dict(is_weights=torch.ones(3)), ValueError, "is_weights must have shape"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD)
def test_bad_inputs(kwargs, error, match):
    kw = dict(logp=torch.zeros(2, 3), advantages=torch.zeros(2), mask=torch.ones(2, 3, dtype=torch.bool))
    kw.update(kwargs)
    with pytest.raises(error, match=match):
        mk.policy_loss(kw.pop("logp"), kw.pop("advantages"), kw.pop("mask"), **kw)


@pytest.mark.skipif(not HAS_CUDA, reason="mixing devices needs a CUDA device")
def test_mixed_devices():
    with pytest.raises(ValueError, match="mask is on"):
        mk.policy_loss(torch.zeros(2, 3, device="cuda"), torch.zeros(2, device="cuda"), torch.ones(2, 3).bool())


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_opcheck(backend):
    """The registered op, its arguments in the order of the loss's spec (the schema comes from it)."""
    from moo_kernels.ops.loss.spec import loss_spec

    logp, adv, mask, kw = build("clip_higher_dual_cap_k3", dtype=torch.float64)
    spec = loss_spec(tuple(logp.shape), logp.device, "logp", advantages=adv, mask=mask, **kw)
    args = (logp.requires_grad_(), *spec.flat(), True)
    with mk.use_backend(backend):
        torch.library.opcheck(torch.ops.moo_kernels.policy_loss.default, args)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    logp, adv, mask, kw = build("clip_higher_dual_cap_k3")

    def step(x):
        loss, metrics = mk.policy_loss(x, adv, mask, **kw)
        return loss * 2.0, metrics.clip_frac

    x1 = logp.clone().requires_grad_()
    loss1, cf1 = torch.compile(step, fullgraph=True)(x1)
    loss1.backward()
    x2 = logp.clone().requires_grad_()
    loss2, cf2 = step(x2)
    loss2.backward()
    assert torch.equal(loss1, loss2) and torch.equal(cf1, cf2)
    torch.testing.assert_close(x1.grad, x2.grad)


@pytest.mark.gpu
def test_gpu_large():
    g = torch.Generator(device="cuda").manual_seed(0)
    b, t = 64, 8192
    logp = -torch.rand(b, t, device="cuda", generator=g) * 3
    old = logp + 0.1 * torch.randn(b, t, device="cuda", generator=g)
    ref = logp + 0.1 * torch.randn(b, t, device="cuda", generator=g)
    mask = torch.rand(b, t, device="cuda", generator=g) > 0.2
    adv = torch.randn(b, device="cuda", generator=g)
    kw = dict(old_logp=old, ref_logp=ref, beta=0.04, clip_high=0.28)
    x = logp.clone().requires_grad_()
    loss, _ = mk.policy_loss(x, adv, mask, **kw)
    loss.backward()
    y = logp.double().cpu().requires_grad_()
    rl, _ = policy_loss_reference(y, adv.cpu(), mask.cpu(), **{k: to("cpu", v) for k, v in kw.items()})
    rl.backward()
    torch.testing.assert_close(loss.double().cpu(), rl.detach(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad.double().cpu(), y.grad, atol=1e-9, rtol=1e-5)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_backward_twice_with_retained_graph(backend, device):
    """loss.backward() hands the forward's gradient over as it is (incoming gradient 1): a second backward
    through the retained graph must find it unchanged."""
    logp, adv, mask, kw = build("clip_higher_dual_cap_k3")
    x = logp.detach().to(device).requires_grad_()
    with mk.use_backend(backend):
        loss, _ = mk.policy_loss(x, to(device, adv), to(device, mask), **{k: to(device, v) for k, v in kw.items()})
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first, atol=0, rtol=0)
    _, _, rgrad = reference(logp, adv, mask, kw)
    torch.testing.assert_close(first.double().cpu(), rgrad, atol=2e-7, rtol=2e-5)
