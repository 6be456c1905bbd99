"""Numerics of policy_loss, token_logprobs and policy_loss_from_logits: one right answer on every backend
(the float64 reference, C++, Triton) for inputs at the edges.

- Masked positions influence nothing: NaN / inf in any input at masked tokens (or in the logits of masked
  rows) leave the loss, the metrics and the gradient as they are on clean inputs, and the gradient is
  exactly 0 there.
- An infinite log-prob at an active token gives the limits of the formulas (on-policy ratio 1, no KL
  without ref_logp, no dual clip counted without dual_clip, off-policy f = 0).
- Bool masks count any nonzero byte as 1; float masks may be negative, subnormal or huge.
- Log-probs and entropies keep their digits at large |logits / temperature|; tiny valid temperatures give
  finite results; rows without a finite logit have log-prob -inf, entropy 0, gradient 0; bad temperatures
  raise.
- inplace_backward refuses overlapping logits and makes autograd refuse a backward through an op that
  saved them.
"""

import math

import pytest
import torch
from conftest import targets

import moo_kernels as mk
from moo_kernels._codes import METRICS
from moo_kernels.ops.logits.reference import (
    policy_loss_from_logits_reference,
    token_logprobs_grad_reference,
    token_logprobs_reference,
)
from moo_kernels.ops.logits.spec import RECIPROCAL_LIMIT
from moo_kernels.ops.loss.reference import policy_loss_grad_reference, policy_loss_reference

BACKENDS = [("reference", "cpu"), *targets()]
F64 = torch.float64
NAN, INF = float("nan"), float("inf")
B, T, V = 3, 8, 40
TOL = dict(atol=2e-6, rtol=2e-5)  # float32 kernels against the float64 reference


def to(device, x):
    return x.to(device) if isinstance(x, torch.Tensor) else x


def assert_same(actual, expected, msg="", **tol):
    tol = tol or TOL
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), equal_nan=True, msg=msg, **tol)


# ---- policy_loss -----------------------------------------------------------------------------------------


def loss_inputs(seed=0):
    """(logp, {name: [B, T] tensor}, bool mask); every row has an active token."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 2 - 0.05

    def noise(scale):
        return scale * torch.randn(B, T, generator=g)

    tensors = dict(
        advantages=noise(1.0),
        token_advantages=noise(0.3),
        is_weights=torch.rand(B, T, generator=g) + 0.5,
        old_logp=logp + noise(0.3),
        ref_logp=logp + noise(0.3),
    )
    mask = torch.rand(B, T, generator=g) > 0.4
    mask[:, 0] = True
    mask[:, -1] = False
    return logp, tensors, mask


# mode -> options; each also gets every tensor of loss_inputs (garbage can sit in any of them)
LOSS_MODES = {
    "clip": dict(mode="clip", dual_clip=3.0, ratio_cap=2.5, clip_high=0.28, beta=0.05, kl="k3"),
    "gspo": dict(mode="gspo", beta=0.05, kl="k1", agg="seq-mean-token-mean"),
    "cispo": dict(mode="cispo", clip_high=0.4, beta=0.05, kl="k2"),
    "reinforce": dict(mode="reinforce", beta=0.05, kl="k3", agg="seq-mean-token-sum"),
    "offpolicy": dict(mode="clip", offpolicy=torch.tensor([True, False, True]), beta=0.05, kl="k3"),
    "sapo": dict(mode="sapo", beta=0.05, kl="low_var_kl", kl_bias_correction=True),
    "gmpo": dict(mode="gmpo", beta=0.05, kl="k3", agg="seq-mean-token-mean"),
    "vespo": dict(mode="vespo", beta=0.05, kl="abs"),
    "policy_mask": dict(
        mode="clip",
        policy_mask=torch.rand(B, T, generator=torch.Generator().manual_seed(9)) > 0.3,
        offpolicy_mask_threshold=0.0,
        beta=0.05,
        kl="k3",
    ),  # fmt: skip
}


def run_loss(backend, device, logp, adv, mask, kw):
    """(loss, {metric: value}, d loss / d logp) on a backend, all float64 on the CPU."""
    x = logp.detach().to(device).requires_grad_()
    with mk.use_backend(backend):
        loss, metrics = mk.policy_loss(
            x, to(device, adv), to(device, mask), **{k: to(device, v) for k, v in kw.items()}
        )
    loss.backward()
    out = {n: getattr(metrics, n).detach().double().cpu() for n in METRICS}
    return loss.detach().double().cpu(), out, x.grad.double().cpu()


def expected_loss(logp, adv, mask, kw):
    """The reference's (loss, metrics, closed-form gradient)."""
    loss, metrics = policy_loss_reference(logp, adv, mask, **kw)
    return loss, metrics, policy_loss_grad_reference(logp, adv, mask, **kw)


def assert_loss_matches(got, want, **tol):
    loss, metrics, grad = got
    rloss, rmetrics, rgrad = want
    assert_same(loss, rloss, "loss", **tol)
    for n in METRICS:  # float32 metrics: a sum of weights beyond float32's range is inf there
        assert_same(metrics[n], rmetrics[n].float(), n, **tol)
    assert_same(grad, rgrad, "grad", **(tol or dict(atol=2e-7, rtol=2e-5)))


def split(tensors, kw):
    kw = {**kw, **tensors}
    return kw.pop("advantages"), kw


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", list(LOSS_MODES))
def test_masked_garbage_policy_loss(backend, device, mode):
    """NaN / inf / -inf at masked tokens of any input, bool and float masks: the clean answer, and a gradient
    of exactly 0 at masked tokens (the reference's autograd gradient too)."""
    logp, tensors, bmask = loss_inputs(1)
    g = torch.Generator().manual_seed(2)
    fmask = (torch.rand(B, T, generator=g) + 0.1) * bmask
    for which in ("advantages", "token_advantages", "is_weights", "logp", "old_logp", "ref_logp"):
        for value in (NAN, INF, -INF):
            for mask in (bmask, fmask):
                masked = mask == 0
                clean_adv, clean_kw = split(tensors, LOSS_MODES[mode])
                want = expected_loss(logp, clean_adv, mask, clean_kw)
                dirty = dict(tensors, logp=logp.clone())
                dirty[which] = dirty[which].clone().masked_fill(masked, value)
                dirty_logp = dirty.pop("logp")
                adv, kw = split(dirty, LOSS_MODES[mode])
                got = run_loss(backend, device, dirty_logp, adv, mask, kw)
                label = f"{which}={value} {'float' if mask.is_floating_point() else 'bool'} mask"
                assert torch.equal(got[2][masked], torch.zeros_like(got[2][masked])), label
                assert got[2].isfinite().all() and got[0].isfinite(), label
                assert_loss_matches(got, want)
    # the reference's forward: autograd through it is 0, not NaN, at masked tokens
    dirty_logp = logp.clone().masked_fill(bmask == 0, NAN).double().requires_grad_()
    dirty = {k: v.masked_fill(bmask == 0, INF) for k, v in tensors.items()}
    adv, kw = split(dirty, LOSS_MODES[mode])
    policy_loss_reference(dirty_logp, adv, bmask, **kw)[0].backward()
    assert torch.equal(dirty_logp.grad[~bmask], torch.zeros(int((~bmask).sum()), dtype=F64))
    clean_adv, clean_kw = split(tensors, LOSS_MODES[mode])
    assert_same(dirty_logp.grad, policy_loss_grad_reference(logp, clean_adv, bmask, **clean_kw), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", list(LOSS_MODES))
@pytest.mark.parametrize("old,ref", [(False, False), (True, False), (False, True), (True, True)])
def test_infinite_logp_at_active_tokens(backend, device, mode, old, ref):
    logp, tensors, mask = loss_inputs(3)
    logp[0, 0] = -INF
    logp[2, 0] = -INF
    mask[0, 0] = mask[2, 0] = True
    kw = dict(LOSS_MODES[mode], kl="k3")  # k1 and k2 are infinite at logp = -inf
    kw.pop("dual_clip", None)
    if not ref:
        kw.pop("beta", None)
    tensors = dict(tensors)
    if not old:
        tensors.pop("old_logp")
    if not ref:
        tensors.pop("ref_logp")
    adv, kw = split(tensors, kw)
    want = expected_loss(logp, adv, mask, kw)
    rloss, rmetrics, rgrad = want
    # the reference is finite where the formulas are
    assert rgrad.isfinite().all()
    assert rmetrics["dual_clip_frac"] == 0 and all(rmetrics[n].isfinite() for n in METRICS if n != "pg_loss")
    if not ref:
        assert rmetrics["kl_mean"] == 0
    if not old:  # the ratio is 1; "vespo" reports its sequence weight w, here the product of the IS weights
        w = torch.ones(B, T, dtype=F64)
        if mode == "vespo":
            isw = tensors["is_weights"].double()
            w = torch.where(mask, isw.log(), 0.0).sum(dim=1, keepdim=True).exp().expand(B, T)
        assert_same(rmetrics["ratio_min"], w[mask].min(), atol=0, rtol=1e-12)
        assert_same(rmetrics["ratio_max"], w[mask].max(), atol=0, rtol=1e-12)
        assert_same(rmetrics["ratio_mean"], w[mask].mean(), atol=0, rtol=1e-12)
    if mode in ("clip", "gspo", "offpolicy"):
        assert rloss.isfinite()  # the ratio (or f(p) = 0) keeps the clipped losses finite
    # autograd through the reference agrees with its closed form
    y = logp.double().requires_grad_()
    policy_loss_reference(y, adv, mask, **kw)[0].backward()
    assert_same(y.grad, rgrad, atol=1e-12, rtol=1e-12)
    assert_loss_matches(run_loss(backend, device, logp, adv, mask, kw), want)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("kl", ["k1", "k2"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("mask_sign", [1.0, -1.0])
def test_infinite_kl_estimates(backend, device, kl, beta, mask_sign):
    """logp = -inf at an active token makes k1 / k2 infinite: with beta = 0 the estimate is reported but not
    added (the loss stays finite: no 0 * inf), and when sum(m) <= 0 every mean is 0 (not 0 * inf)."""
    logp, tensors, mask = loss_inputs(8)
    logp[1, 2] = -INF
    mask[1, 2] = True
    adv, kw = split(tensors, dict(kl=kl, beta=beta))
    kw.pop("old_logp", None)
    m = mask.float() * mask_sign
    want = expected_loss(logp, adv, m, kw)
    if beta == 0:
        assert want[0].isfinite()
    if mask_sign < 0:
        assert want[1]["kl_mean"] == 0
    assert_loss_matches(run_loss(backend, device, logp, adv, m, kw), want)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_offpolicy_shaping_at_extreme_logp(backend, device):
    """f = 1 / (1 + gamma e^-logp), df / dlogp = f (1 - f): finite for logp = -inf and +inf."""
    logp, tensors, mask = loss_inputs(4)
    logp[0, :6] = torch.tensor([-INF, -300.0, -60.0, 5.0, 80.0, INF])
    mask[0, :6] = True
    adv, kw = split(tensors, dict(offpolicy=torch.tensor([True, False, True]), offpolicy_gamma=0.3))
    want = expected_loss(logp, adv, mask, kw)
    assert want[0].isfinite() and want[2].isfinite().all()
    assert want[2][0, 0] == 0 and want[2][0, 5] == 0  # f'(logp) -> 0 at both ends
    got = run_loss(backend, device, logp, adv, mask, kw)
    assert_loss_matches(got, want)


def byte_bool(x: torch.Tensor, value: int = 2) -> torch.Tensor:
    """x (bool) as bool bytes holding value instead of 1."""
    return (x.to(torch.uint8) * value).view(torch.bool)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_bool_bytes_other_than_one(backend, device):
    """A bool mask or offpolicy flag holding a byte 2 means True, weight 1: the same bits as 0 / 1 bytes."""
    logp, tensors, mask = loss_inputs(5)
    off = torch.tensor([True, False, True])
    adv, kw = split(tensors, dict(LOSS_MODES["clip"], offpolicy=off))
    clean = run_loss(backend, device, logp, adv, mask, kw)
    odd = run_loss(backend, device, logp, adv, byte_bool(mask), dict(kw, offpolicy=byte_bool(off, 7)))
    assert torch.equal(odd[0], clean[0]) and torch.equal(odd[2], clean[2])
    assert all(torch.equal(odd[1][n], clean[1][n]) for n in METRICS)
    assert clean[1]["active_tokens"] == mask.sum()
    assert_loss_matches(clean, expected_loss(logp, adv, mask, kw))
    # from logits too
    logits, tokens = logits_inputs(5)
    a = run_logits_loss(backend, device, logits, tokens, adv, mask, kw)
    b = run_logits_loss(backend, device, logits, tokens, adv, byte_bool(mask), dict(kw, offpolicy=byte_bool(off, 7)))
    assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[3])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_negative_float_mask(backend, device):
    """Active means m != 0; ratio_min / ratio_max over active tokens; means divide by sum(m) when > 0."""
    logp, tensors, bmask = loss_inputs(6)
    g = torch.Generator().manual_seed(7)
    signed = torch.where(torch.rand(B, T, generator=g) < 0.3, -0.5, 1.0) * bmask
    adv, kw = split(tensors, dict(LOSS_MODES["clip"]))
    for mask in (signed, -bmask.float(), signed.masked_fill(torch.arange(B)[:, None] == 1, -0.25)):
        for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
            want = expected_loss(logp, adv, mask, dict(kw, agg=agg))
            got = run_loss(backend, device, logp, adv, mask, dict(kw, agg=agg))
            assert_loss_matches(got, want)
            assert got[1]["ratio_min"] > 0 and got[1]["ratio_max"] >= got[1]["ratio_min"]  # active tokens exist
            if mask.sum() <= 0:
                assert got[1]["clip_frac"] == 0 and got[1]["ratio_mean"] == 0


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("scale", [1e-40, 1e-44, 1e38])
def test_subnormal_and_huge_float_masks(backend, device, scale):
    """A float32 mask of subnormal (or huge) weights: its sum and the scale leave float32's range; every
    backend still matches the reference (a weighted mean does not depend on the scale of the weights)."""
    logp, tensors, bmask = loss_inputs(8)
    g = torch.Generator().manual_seed(9)
    weights = (torch.rand(B, T, generator=g) + 0.5) * bmask
    mask = (weights.double() * scale).float()
    assert (mask[bmask] != 0).all()
    adv, kw = split(tensors, dict(LOSS_MODES["clip"]))
    for agg in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum"):
        want = expected_loss(logp, adv, mask, dict(kw, agg=agg))
        got = run_loss(backend, device, logp, adv, mask, dict(kw, agg=agg))
        assert_loss_matches(got, want, atol=2e-6, rtol=5e-5)
        assert got[1]["clip_frac"] > 0
        if agg != "seq-mean-token-sum":  # a mean: the scale of the weights drops out
            assert want[0].abs() > 1e-3


# ---- policy_loss_from_logits -------------------------------------------------------------------------------


def logits_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=g) * 2, torch.randint(0, V, (B, T), generator=g)


def run_logits_loss(backend, device, logits, tokens, adv, mask, kw, inplace=False, entropy=False):
    """(loss, {metric}, entropy or None, d loss / d logits), float64 on the CPU."""
    leaf = logits.detach().to(device).requires_grad_()
    x = leaf * 1.0 if inplace else leaf
    with mk.use_backend(backend):
        out = mk.policy_loss_from_logits(
            x, tokens.to(device), to(device, adv), to(device, mask), inplace_backward=inplace,
            return_entropy=entropy, **{k: to(device, v) for k, v in kw.items()},
        )  # fmt: skip
        out[0].backward()
    metrics = {n: getattr(out[1], n).detach().double().cpu() for n in METRICS}
    ent = out[2].double().cpu() if entropy else None
    return out[0].detach().double().cpu(), metrics, ent, leaf.grad.double().cpu()


LOGITS_CASES = [  # (mode, input holding garbage at masked tokens, garbage, return_entropy, in place)
    ("clip", "logits", NAN, True, False),
    ("clip", "logits", INF, False, True),
    ("clip", "logits", -INF, True, True),
    ("clip", "old_logp", NAN, True, False),
    ("gspo", "logits", NAN, True, True),
    ("gspo", "advantages", INF, False, False),
    ("cispo", "logits", INF, True, False),
    ("cispo", "ref_logp", -INF, False, True),
    ("reinforce", "logits", NAN, False, False),
    ("offpolicy", "logits", -INF, True, False),
    ("offpolicy", "is_weights", NAN, True, True),
]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode,which,value,entropy,inplace", LOGITS_CASES)
def test_masked_garbage_policy_loss_from_logits(backend, device, mode, which, value, entropy, inplace):
    logits, tokens = logits_inputs(10)
    logp, tensors, mask = loss_inputs(10)
    adv, kw = split(tensors, LOSS_MODES[mode])
    rloss, rmetrics, rent, rgrad = policy_loss_from_logits_reference(logits, tokens, adv, mask, **kw)
    dirty_logits = logits.clone()
    dirty = dict(tensors)
    if which == "logits":
        rows = dirty_logits[~mask]
        rows[:, ::3] = value
        rows.scatter_(-1, tokens[~mask][:, None], value)
        dirty_logits[~mask] = rows
    else:
        dirty[which] = dirty[which].masked_fill(~mask, value)
    adv, kw = split(dirty, LOSS_MODES[mode])
    loss, metrics, ent, grad = run_logits_loss(backend, device, dirty_logits, tokens, adv, mask, kw, inplace, entropy)
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    assert grad.isfinite().all()
    assert_same(loss, rloss, "loss")
    for n in METRICS:
        assert_same(metrics[n], rmetrics[n], n)
    assert_same(grad, rgrad, "grad", atol=2e-7, rtol=2e-5)
    if entropy:
        assert_same(ent[mask], rent[mask], "entropy", atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("mode", ["clip", "gspo", "cispo"])
def test_logits_rows_without_a_finite_logit_in_the_loss(backend, device, mode):
    """An active row of -inf logits: log-prob -inf (the limits of test_infinite_logp_at_active_tokens) and
    gradient 0 in that row."""
    logits, tokens = logits_inputs(11)
    _, tensors, mask = loss_inputs(11)
    logits[0, 0] = -INF
    adv, kw = split(tensors, dict(LOSS_MODES[mode], beta=0.0))
    kw.pop("ref_logp")
    kw.pop("old_logp")
    rloss, rmetrics, _, rgrad = policy_loss_from_logits_reference(logits, tokens, adv, mask, **kw)
    assert rgrad.isfinite().all() and torch.equal(rgrad[0, 0], torch.zeros(V, dtype=F64))
    loss, metrics, _, grad = run_logits_loss(backend, device, logits, tokens, adv, mask, kw)
    assert_same(loss, rloss, "loss")
    for n in METRICS:
        assert_same(metrics[n], rmetrics[n], n)
    assert torch.equal(grad[0, 0], torch.zeros(V, dtype=F64))
    assert_same(grad, rgrad, "grad", atol=2e-7, rtol=2e-5)


# ---- token_logprobs ----------------------------------------------------------------------------------------


def logprobs(backend, device, logits, tokens, temperature, g_logp=None, g_ent=None):
    """(logp, entropy, d (sum g_logp logp + sum g_ent H) / d logits), float64 on the CPU."""
    x = logits.detach().to(device).requires_grad_()
    with mk.use_backend(backend):  # the backward is a kernel of the backend too
        logp, ent = mk.token_logprobs(x, tokens.to(device), temperature=temperature, return_entropy=True)
        g_logp = torch.ones_like(logp) if g_logp is None else g_logp.to(device)
        g_ent = torch.zeros_like(ent) if g_ent is None else g_ent.to(device)
        torch.autograd.backward([logp, ent], [g_logp.to(logp.dtype), g_ent.to(ent.dtype)])
    return logp.detach().double().cpu(), ent.detach().double().cpu(), x.grad.double().cpu()


PRECISION = {  # dtype: (logits of one row, chosen token) with |z / tau| large against the log-prob
    torch.float32: ([1e5 + 0.5, 1e5], 1),
    torch.bfloat16: ([258.0, 256.0], 1),
    torch.float16: ([2050.0, 2048.0], 1),
}


def smallest_temperature() -> float:
    t = 1.0 / RECIPROCAL_LIMIT
    while not 1.0 / t < RECIPROCAL_LIMIT:
        t = math.nextafter(t, 1.0)
    return t


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", list(PRECISION))
def test_logprob_digits_at_large_logits(backend, device, dtype):
    """logp = (z_y - max z) / tau - log l keeps the digits that s_y - lse loses at |s| >> |logp|."""
    row, tok = PRECISION[dtype]
    logits = torch.tensor([[row]], dtype=dtype)
    tokens = torch.tensor([[tok]])
    for tau in (1.0, 0.5, 3.0):
        rlogp, rent = token_logprobs_reference(logits, tokens, tau)
        rgrad = token_logprobs_grad_reference(logits, tokens, torch.ones(1, 1), torch.ones(1, 1), tau)
        logp, ent, grad = logprobs(backend, device, logits, tokens, tau, torch.ones(1, 1), torch.ones(1, 1))
        assert_same(logp, rlogp, f"logp at tau {tau}", atol=1e-6, rtol=1e-6)
        assert_same(ent, rent, f"entropy at tau {tau}", atol=1e-6, rtol=1e-6)
        assert_same(grad, rgrad, f"grad at tau {tau}", atol=2e-6, rtol=1e-2 if dtype != torch.float32 else 1e-5)
        # the fused loss: REINFORCE with A = 1 on the one token is -logp
        kw = dict(mode="reinforce", temperature=tau)
        loss, _, _, _ = run_logits_loss(backend, device, logits, tokens, torch.ones(1), torch.ones(1, 1) > 0, kw)
        assert_same(loss, -rlogp[0, 0], f"loss at tau {tau}", atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_temperatures(backend, device):
    """Temperatures 1e-3 .. 1e3 and the smallest valid one: the reference's answer, finite where it is."""
    logits = torch.tensor([[[1e5 + 0.5, 1e5, 1e5 - 3.0, -INF], [2.0, -1.0, 0.5, 7.0]]])
    tokens = torch.tensor([[1, 0]])
    tau_min = smallest_temperature()
    for tau in (1e-3, 0.1, 1.0, 10.0, 1e3, 1e-30, tau_min):
        rlogp, rent = token_logprobs_reference(logits, tokens, tau)
        g = torch.tensor([[0.7, -1.3]])
        rgrad = token_logprobs_grad_reference(logits, tokens, g, g, tau)
        logp, ent, grad = logprobs(backend, device, logits, tokens, tau, g, g)
        assert_same(logp, rlogp.float(), f"logp at tau {tau}", atol=1e-6, rtol=1e-6)
        assert_same(ent, rent, f"entropy at tau {tau}", atol=1e-6, rtol=1e-5)
        assert_same(grad, rgrad.float(), f"grad at tau {tau}", atol=1e-6, rtol=2e-5)
        assert ent.isfinite().all() and not logp.isnan().any() and not grad.isnan().any()
    # the smallest valid temperature, chosen token the maximum: log-prob 0, entropy 0, gradient 0
    logp, ent, grad = logprobs(backend, device, logits, torch.tensor([[0, 3]]), tau_min)
    assert (logp == 0).all() and (ent == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_entropy_at_large_logits(backend, device):
    """H = log l - q / l with q accumulated relative to the running maximum: no cancellation at |s| ~ 2e4,
    in one chunk and across chunks."""
    g = torch.Generator().manual_seed(12)
    logits = torch.randn(2, 3, 700, generator=g) * 3 + 1e4
    logits[1] -= 2e4
    tokens = torch.randint(0, 700, (2, 3), generator=g)
    rlogp, rent = token_logprobs_reference(logits, tokens, 0.5)
    logp, ent, _ = logprobs(backend, device, logits, tokens, 0.5)
    assert_same(ent, rent, "entropy", atol=2e-5, rtol=2e-5)
    assert_same(logp, rlogp, "logp", atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend,device", [t for t in BACKENDS if t[0] == "triton"])
def test_entropy_at_large_logits_across_chunks(monkeypatch, backend, device):
    from moo_kernels.ops.logits import triton_launch as logits_cuda

    monkeypatch.setattr(logits_cuda, "CHUNK_V", 128)
    monkeypatch.setattr(logits_cuda, "BLOCK_V", 64)
    g = torch.Generator().manual_seed(13)
    logits = torch.randn(2, 3, 500, generator=g) * 3 + 1e4
    logits[0, 1, 300:] += 40.0  # the maximum moves between chunks
    tokens = torch.randint(0, 500, (2, 3), generator=g)
    mask = torch.ones(2, 3, dtype=torch.bool)
    _, _, rent, rgrad = policy_loss_from_logits_reference(logits, tokens, torch.ones(2), mask, temperature=0.5)
    kw = dict(temperature=0.5)
    _, _, ent, grad = run_logits_loss(backend, device, logits, tokens, torch.ones(2), mask, kw, entropy=True)
    assert_same(ent, rent, "entropy", atol=2e-5, rtol=2e-5)
    assert_same(grad, rgrad, "grad", atol=2e-7, rtol=2e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_rows_without_a_finite_logit_and_nan_rows(backend, device):
    """All -inf: log-prob -inf, entropy 0, gradient 0. +inf or NaN in a row: NaN log-prob and entropy."""
    logits, tokens = logits_inputs(14)
    logits[0, 1] = -INF
    logits[1, 2, 5] = INF
    logits[2, 3, 7] = NAN
    logits[2, 4, :] = -INF
    logits[2, 4, 9] = NAN  # NaN among -inf only: NaN too
    g = torch.randn(B, T, generator=torch.Generator().manual_seed(15))
    logp, ent, grad = logprobs(backend, device, logits, tokens, 0.8, g, g)
    assert logp[0, 1] == -INF and ent[0, 1] == 0 and torch.equal(grad[0, 1], torch.zeros(V, dtype=F64))
    for b, t in ((1, 2), (2, 3), (2, 4)):
        assert logp[b, t].isnan() and ent[b, t].isnan(), (b, t)
    rlogp, rent = token_logprobs_reference(logits, tokens, 0.8)
    rgrad = token_logprobs_grad_reference(logits, tokens, g, g, 0.8)
    assert_same(logp, rlogp, "logp", atol=2e-5, rtol=2e-5)
    assert_same(ent, rent, "entropy", atol=2e-5, rtol=2e-5)
    clean = torch.ones(B, T, dtype=torch.bool)
    clean[1, 2] = clean[2, 3] = clean[2, 4] = False
    assert_same(grad[clean], rgrad[clean], "grad", atol=2e-6, rtol=2e-5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_zero_incoming_gradient_rows_are_zero(backend, device):
    """A row whose g_logp and g_entropy are 0 gets exactly 0, whatever its logits hold."""
    logits, tokens = logits_inputs(16)
    logits[0, 2, ::4] = NAN
    logits[1, 5, 3] = INF
    logits[2, 0] = -INF
    g = torch.randn(B, T, generator=torch.Generator().manual_seed(17))
    dead = torch.zeros(B, T, dtype=torch.bool)
    dead[0, 2] = dead[1, 5] = dead[2, 0] = True
    dead[1, 1] = True  # a clean row too
    g = g.masked_fill(dead, 0.0)
    _, _, grad = logprobs(backend, device, logits, tokens, 0.9, g, g)
    assert torch.equal(grad[dead], torch.zeros_like(grad[dead]))
    assert grad[~dead].isfinite().all()
    assert_same(grad[~dead], token_logprobs_grad_reference(logits, tokens, g, g, 0.9)[~dead], atol=2e-6, rtol=2e-5)


BAD_TEMPERATURES = [0.0, -1.0, INF, NAN, 1e-39, 1.0 / RECIPROCAL_LIMIT * 0.999]


@pytest.mark.parametrize("temperature", BAD_TEMPERATURES)
def test_bad_temperatures_raise(temperature):
    logits, tokens = logits_inputs(18)
    with pytest.raises(ValueError, match="temperature"):
        mk.token_logprobs(logits, tokens, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        mk.policy_loss_from_logits(logits, tokens, torch.ones(B), torch.ones(B, T) > 0, temperature=temperature)


# ---- inplace_backward ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_inplace_backward_refuses_overlapping_logits(backend, device):
    logits, tokens = logits_inputs(19)
    base = logits[:1].clone().to(device).requires_grad_()
    x = (base * 1).expand(B, T, V)
    with mk.use_backend(backend), pytest.raises(ValueError, match="logits"):
        mask = torch.ones(B, T, dtype=torch.bool, device=device)
        mk.policy_loss_from_logits(x, tokens.to(device), torch.ones(B, device=device), mask, inplace_backward=True)
    # positions that do not overlap, in layouts torch cannot decide alone: accepted
    views = {  # torch cannot decide the first and the last: the strides do
        (B, T + 1, V): lambda x: x[:, :-1],
        (T, B, V): lambda x: x.transpose(0, 1),
        (B, 2 * T, V): lambda x: x[:, ::2],
    }
    for shape, view in views.items():
        leaf = torch.zeros(shape, device=device, requires_grad=True)
        y = view(leaf * 1)
        with mk.use_backend(backend):
            loss, _ = mk.policy_loss_from_logits(y, tokens.to(device), torch.ones(B, device=device),
                                                 torch.ones(B, T, dtype=torch.bool, device=device),
                                                 inplace_backward=True)  # fmt: skip
        loss.backward()
        assert leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_inplace_backward_and_other_users_of_the_logits(backend, device):
    logits, tokens = logits_inputs(20)
    _, tensors, mask = loss_inputs(20)
    adv, kw = split(tensors, LOSS_MODES["clip"])
    kw = {k: to(device, v) for k, v in kw.items()}
    args = (tokens.to(device), adv.to(device), mask.to(device))
    # another op saved the logits for its backward: autograd's in-place error, not a silently wrong gradient
    w = logits.clone().to(device).requires_grad_()
    x = w * 1.0
    aux = (x**2).mean()
    with mk.use_backend(backend):
        loss, _ = mk.policy_loss_from_logits(x, *args, inplace_backward=True, **kw)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + aux).backward()
    # nothing else saved them: the same gradient, bit for bit, as out of place
    grads = []
    for inplace in (False, True):
        w = logits.clone().to(device).requires_grad_()
        x = w * 1.0
        with mk.use_backend(backend):
            loss, _ = mk.policy_loss_from_logits(x, *args, inplace_backward=inplace, **kw)
        (loss + (w**2).mean()).backward()  # an op on the leaf, not on the overwritten logits: fine
        grads.append(w.grad)
    assert torch.equal(grads[0], grads[1])
