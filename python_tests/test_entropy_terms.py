"""The entropy terms of policy_loss_from_logits (entropy_coef / entropy_agg, top_entropy_quantile, entropy_threshold):
every backend against float64 autograd through log_softmax with the formulas written here independently (TRL's
entropy bonus and high-entropy mask, verl's agg_loss), the sync-free quantile against torch.quantile, errors,
torch.compile."""

import pytest
import torch
from conftest import targets

import moo_kernels as mk
from moo_kernels._codes import METRICS
from moo_kernels.ops.logits.entropy import masked_quantile
from moo_kernels.ops.loss.reference import policy_loss_reference

TARGETS = [*targets(), ("reference", "cpu")]
B, T, V = 4, 9, 37


def make(seed=0, garbage=True):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64) * 2
    logits[0, :, :5] += 3.0  # a spread of entropies
    tokens = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[2] = False  # a sequence without active tokens
    if garbage:
        logits[~mask] = float("nan")  # masked positions influence nothing
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    old = torch.log_softmax(torch.nan_to_num(logits), -1).gather(-1, tokens[..., None])[..., 0]
    old = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    pmask = torch.rand(B, T, generator=g) > 0.3
    return logits.float(), tokens, adv.float(), mask, old.float(), pmask


def oracle(logits, tokens, adv, mask, kw, coef=0.0, entropy_agg="mean", rho=1.0, threshold=None, grad_out=1.0):
    """float64 loss and d loss / d logits by autograd, the entropy terms written as TRL / verl write them."""
    z = torch.where(mask[..., None], logits.double(), 0.0).requires_grad_()
    logsm = torch.log_softmax(z, -1)
    lp = logsm.gather(-1, tokens[..., None])[..., 0]
    H = -(logsm.exp() * logsm).sum(-1)
    keep = None
    if rho < 1.0:
        threshold = torch.quantile(H.detach()[mask], 1.0 - rho)  # TRL's get_high_entropy_mask
    if threshold is not None:
        keep = H.detach() >= threshold
    kw = dict(kw)
    if keep is not None:
        kw["policy_mask"] = keep if "policy_mask" not in kw else keep & kw["policy_mask"]
    loss, metrics = policy_loss_reference(lp, adv, mask, **kw)
    if coef != 0.0:
        eff = mask & keep if keep is not None else mask
        m = eff.double()
        if entropy_agg == "mean":  # TRL: (H * m').sum() / m'.sum().clamp(min=1)
            bonus = (H * m).sum() / m.sum().clamp(min=1.0)
        else:  # verl's agg_loss, seq-mean-token-mean over the sequences with an active token of the loss mask
            n = mask.double().sum(-1)
            per = (H * m).sum(-1) / n.clamp(min=1.0)
            bonus = per.sum() / (n > 0).sum()
        loss = loss - coef * bonus
    (loss * grad_out).backward()
    return loss.detach(), metrics, z.grad


CASES = {
    "coef_mean": dict(coef=0.01),
    "coef_mean_negative": dict(coef=-0.3),
    "coef_loss_seq_mean": dict(coef=0.05, entropy_agg="loss", kw=dict(agg="seq-mean-token-mean")),
    "quantile": dict(rho=0.4),
    "quantile_coef_k3": dict(rho=0.3, coef=0.02, kw=dict(beta=0.04, kl="k3", ref=True)),
    "threshold_policy_mask": dict(threshold=2.5, kw=dict(pmask=True)),
    "quantile_gspo_coef": dict(rho=0.5, coef=0.1, kw=dict(mode="gspo", agg="seq-mean-token-mean")),
    "quantile_most": dict(rho=0.9, coef=0.0),
    "quantile_none": dict(rho=0.0),
}


def build(case):
    logits, tokens, adv, mask, old, pmask = make()
    c = dict(CASES[case])
    kw = dict(c.pop("kw", {}), old_logp=old)
    if kw.pop("ref", False):
        kw["ref_logp"] = old + 0.1
    if kw.pop("pmask", False):
        kw["policy_mask"] = pmask
    return logits, tokens, adv, mask, kw, c


def on(device, kw):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def ours(c):
    out = {}
    if c.get("coef"):
        out["entropy_coef"] = c["coef"]
    if "entropy_agg" in c:
        out["entropy_agg"] = c["entropy_agg"]
    if c.get("rho", 1.0) < 1.0:
        out["top_entropy_quantile"] = c["rho"]
    if c.get("threshold") is not None:
        out["entropy_threshold"] = c["threshold"]
    return out


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_autograd(backend, device, case):
    logits, tokens, adv, mask, kw, c = build(case)
    rloss, rmetrics, rgrad = oracle(logits, tokens, adv, mask, kw, grad_out=-1.3, **c)
    x = logits.to(device).clone().requires_grad_()
    with mk.use_backend(backend):
        loss, metrics = mk.policy_loss_from_logits(
            x, tokens.to(device), adv.to(device), mask.to(device), **on(device, kw), **ours(c)
        )
    (loss * -1.3).backward()
    torch.testing.assert_close(loss.double().cpu(), rloss, atol=2e-6, rtol=2e-5)
    g = x.grad.double().cpu()
    assert torch.equal(g[~mask], torch.zeros_like(g[~mask]))
    torch.testing.assert_close(g[mask], rgrad[mask], atol=2e-7, rtol=2e-4)
    for name in METRICS:
        torch.testing.assert_close(
            getattr(metrics, name).double().cpu(), rmetrics[name], atol=2e-6, rtol=2e-5, msg=name
        )


@pytest.mark.parametrize("backend,device", TARGETS)
def test_inplace_backward_and_returned_entropy(backend, device):
    """inplace_backward writes the same gradient; the returned entropy still carries its own gradient."""
    logits, tokens, adv, mask, kw, c = build("quantile_coef_k3")
    kw = on(device, kw)
    args = (tokens.to(device), adv.to(device), mask.to(device))
    with mk.use_backend(backend):
        x = logits.to(device).clone().requires_grad_()
        loss, _ = mk.policy_loss_from_logits(x, *args, **kw, **ours(c))
        loss.backward()
        y = logits.to(device).clone().requires_grad_()
        y2 = y * 1.0
        loss2, _ = mk.policy_loss_from_logits(y2, *args, inplace_backward=True, **kw, **ours(c))
        loss2.backward()
        w = logits.to(device).clone().requires_grad_()
        loss3, _, ent = mk.policy_loss_from_logits(w, *args, return_entropy=True, **kw, **ours(c))
        (loss3 + 0.5 * torch.where(mask.to(device), ent, 0.0).sum()).backward()
    assert torch.equal(loss, loss2) and torch.equal(x.grad, y.grad)
    z = torch.where(mask[..., None], logits.double(), 0.0).requires_grad_()
    logsm = torch.log_softmax(z, -1)
    H = -(logsm.exp() * logsm).sum(-1)
    (gh,) = torch.autograd.grad(0.5 * H[mask].sum(), z)
    torch.testing.assert_close((w.grad - x.grad).double().cpu()[mask], gh[mask], atol=2e-6, rtol=1e-4)


def test_masked_quantile_is_torch_quantile():
    g = torch.Generator().manual_seed(3)
    for n in (1, 2, 7, 64):
        x = torch.randn(n + 5, generator=g)
        x[::3] = x[0]  # ties
        active = torch.rand(n + 5, generator=g) > 0.3
        active[0] = True
        for q in (0.0, 0.2, 0.5, 0.8, 1.0):
            assert torch.equal(masked_quantile(x, active, q), torch.quantile(x[active], q)), (n, q)
    empty = torch.zeros(4, dtype=torch.bool)
    assert masked_quantile(torch.randn(4), empty, 0.5) == float("inf")


def test_threshold_is_the_distributed_one():
    """Single process, the op's top_entropy_quantile equals entropy_threshold=distributed.entropy_quantile (which
    test_distributed checks against TRL's get_high_entropy_mask over two ranks)."""
    logits, tokens, adv, mask, kw, _ = build("quantile")
    _, _, ent = mk.policy_loss_from_logits(logits, tokens, adv, mask, return_entropy=True, **kw)
    threshold = float(mk.distributed.entropy_quantile(ent, mask, 0.4))
    a = mk.policy_loss_from_logits(logits, tokens, adv, mask, top_entropy_quantile=0.4, **kw)
    b = mk.policy_loss_from_logits(logits, tokens, adv, mask, entropy_threshold=threshold, **kw)
    assert torch.equal(a[0], b[0]) and a[1].masked_frac > 0.5


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(top_entropy_quantile=1.5), ValueError, "top_entropy_quantile must be in"),
        (dict(top_entropy_quantile=-0.1), ValueError, "top_entropy_quantile"),
        (dict(top_entropy_quantile=0.2, entropy_threshold=1.0), ValueError, "not both"),
        (dict(entropy_agg="sum"), ValueError, "entropy_agg"),
        (dict(entropy_coef=float("nan")), ValueError, "entropy_coef must be finite"),
        (dict(entropy_threshold="high"), TypeError, "entropy_threshold"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    logits, tokens, adv, mask, _, _ = make()
    with pytest.raises(error, match=match):
        mk.policy_loss_from_logits(logits, tokens, adv, mask, **kwargs)


def test_torch_compile_fullgraph():
    logits, tokens, adv, mask, kw, c = build("quantile_coef_k3")
    opts = dict(kw, **ours(c))

    def f(x):
        return mk.policy_loss_from_logits(x, tokens, adv, mask, **opts)[0]

    x = logits.clone().requires_grad_()
    y = logits.clone().requires_grad_()
    f(x).backward()
    torch.compile(f, fullgraph=True, backend="aot_eager")(y).backward()
    torch.testing.assert_close(x.grad, y.grad)
