"""rollout_correction: every backend against the float64 reference, against verl's own
compute_rollout_correction_and_rejection_mask, and against TRL's vllm_importance_sampling_mode formulas."""

import itertools
import math

import pytest
import torch
from conftest import targets

import moo_kernels as mk
from moo_kernels.ops.rollout.spec import REJECT_OPTIONS

rollout_corr = pytest.importorskip("verl.trainer.ppo.rollout_corr_helper")

TARGETS = targets()


def batch(seed=0, b=7, t=13, dtype=torch.float64, empty_row=False, garbage=True):
    """(old_logp, rollout_logp, mask): a mismatch of about 0.3 nats, uneven lengths, garbage where masked."""
    g = torch.Generator().manual_seed(seed)
    old = -2 * torch.rand(b, t, generator=g, dtype=torch.float64)
    roll = old + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    if empty_row:
        lengths[2] = 0
    mask = torch.arange(t)[None] < lengths[:, None]
    if garbage:
        old = old.masked_fill(~mask, float("nan"))
        roll = roll.masked_fill(~mask, float("inf"))
    return old.to(dtype), roll.to(dtype), mask


def run(backend, device, old, roll, mask, **kw):
    with mk.use_backend(backend):
        return mk.rollout_correction(old.to(device), roll.to(device), mask.to(device), **kw)


def reference(old, roll, mask, **kw):
    return run("reference", "cpu", old, roll, mask, **kw)


# ---- against verl ------------------------------------------------------------------------------------------

# ours -> verl's arguments
VERL_CASES = {
    "token_tis": (dict(level="token", high=2.0), dict(rollout_is="token", rollout_is_threshold=2.0)),
    "sequence_tis": (dict(level="sequence", high=2.0), dict(rollout_is="sequence", rollout_is_threshold=2.0)),
    "token_icepop": (dict(level="token", mode="mask", low=0.8, high=1.25),
                     dict(rollout_is="token", rollout_is_threshold="0.8_1.25")),
    "sequence_icepop": (dict(level="sequence", mode="mask", low=0.5, high=2.0),
                        dict(rollout_is="sequence", rollout_is_threshold="0.5_2.0")),
    "token_norm": (dict(level="token", high=2.0, batch_normalize=True),
                   dict(rollout_is="token", rollout_is_threshold=2.0, rollout_is_batch_normalize=True)),
    "sequence_norm": (dict(level="sequence", high=5.0, batch_normalize=True),
                      dict(rollout_is="sequence", rollout_is_threshold=5.0, rollout_is_batch_normalize=True)),
    "reject_mixed": (dict(reject={"token_k1": (0.7, 1.4), "seq_mean_k3": 0.05, "seq_max_k2": 0.2}),
                     dict(rollout_is="token", rollout_is_threshold=2.0, rollout_rs="token_k1,seq_mean_k3,seq_max_k2",
                          rollout_rs_threshold="0.7_1.4,0.05,0.2")),
    "reject_many": (dict(reject={"seq_sum_k1": 2.0, "seq_sum_k2": 0.5, "token_k3": 0.1, "token_k2": 0.05,
                                 "seq_mean_k1": (0.9, 1.1), "seq_mean_k2": 0.02, "seq_max_k3": 0.3,
                                 "seq_sum_k3": 0.4}),
                    dict(rollout_is="token", rollout_is_threshold=2.0,
                         rollout_rs="seq_sum_k1,seq_sum_k2,token_k3,token_k2,seq_mean_k1,seq_mean_k2,seq_max_k3,"
                                    "seq_sum_k3",
                         rollout_rs_threshold="2.0,0.5,0.1,0.05,0.9_1.1,0.02,0.3,0.4")),
}  # fmt: skip
# our metric -> verl's (the ones both report with the same meaning; verl's token-level extremes and fractions)
SHARED = {
    "weight_mean": "rollout_is_mean",
    "ess": "rollout_is_eff_sample_size",
    "rejected_token_frac": "rollout_rs_masked_fraction",
    "rejected_seq_frac": "rollout_rs_seq_masked_fraction",
    "kl_k1": "kl",
    "kl_k3": "k3_kl",
    "batch_norm_factor": "rollout_is_batch_norm_factor",
}
TOKEN_SHARED = {"weight_max": "rollout_is_max", "weight_min": "rollout_is_min"}


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("name", sorted(VERL_CASES))
def test_matches_verl(backend, device, name):
    ours, theirs = VERL_CASES[name]
    old, roll, mask = batch(1, garbage=False)  # verl multiplies by the mask: no garbage for it
    out = run(backend, device, old, roll, mask, **ours)
    proto, verl_mask, metrics = rollout_corr.compute_rollout_correction_and_rejection_mask(
        old, roll, mask.double(), **theirs
    )
    verl_w = proto.batch["rollout_is_weights"]
    got = out.is_weights.cpu()
    # verl's masked means divide by count + 1e-8: agreement to ~1e-9 relative
    torch.testing.assert_close(torch.where(mask, got, 0.0), torch.where(mask, verl_w, 0.0), rtol=1e-7, atol=1e-9)
    assert torch.equal(out.mask.cpu(), verl_mask.bool())
    shared = dict(SHARED, **(TOKEN_SHARED if ours.get("level", "token") == "token" else {}))
    if ours.get("mode", "truncate") == "mask":
        shared["masked_frac"] = "rollout_is_oob_ratio"
    elif ours.get("level", "token") == "token":
        shared["truncated_frac"] = "rollout_is_ratio_fraction_high"  # no lower bound: truncated = above high
    for ours_name, verl_name in shared.items():
        key = f"rollout_corr/{verl_name}"
        if key in metrics:
            value = getattr(out.metrics, ours_name).item()
            assert value == pytest.approx(metrics[key], rel=1e-7, abs=1e-9), ours_name


# ---- against TRL's vllm_importance_sampling_mode --------------------------------------------------------------


def trl_is_ratio(old, sampling, mask, mode, clip_min, clip_max):
    """TRL's GRPOTrainer importance-sampling ratio (its formulas: the log-ratio times the mask, NaN as 0, exp,
    then clamp or mask), broadcast to [B, T]."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(dim=-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        lo = clip_min if clip_min is not None else -math.inf
        hi = clip_max if clip_max is not None else math.inf
        ratio = ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
    return ratio.expand_as(old)


# TRL's mode -> ours (the mapping the README documents)
TRL_MODES = {
    "token_truncate": dict(level="token", mode="truncate"),
    "token_mask": dict(level="token", mode="mask"),
    "sequence_truncate": dict(level="sequence", mode="truncate"),
    "sequence_mask": dict(level="sequence", mode="mask"),
}


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("trl_mode", sorted(TRL_MODES))
@pytest.mark.parametrize("clip", [(None, 3.0), (0.5, 2.0)])
def test_matches_trl_modes(backend, device, trl_mode, clip):
    old, roll, mask = batch(2, garbage=False)
    roll[0, 0] = float("nan")  # a log-prob the sampler did not return: ratio 1 in TRL
    out = run(backend, device, old, roll, mask, low=clip[0], high=clip[1], **TRL_MODES[trl_mode])
    expected = trl_is_ratio(old, roll, mask.double(), trl_mode, *clip)
    torch.testing.assert_close(torch.where(mask, out.is_weights.cpu(), 0.0), torch.where(mask, expected, 0.0),
                               rtol=1e-12, atol=1e-12)  # fmt: skip


# ---- every backend against the reference ------------------------------------------------------------------

OPTION_CASES = (
    [
        dict(level=level, mode=mode, low=low, high=high, batch_normalize=bn)
        for level, mode, low, high, bn in itertools.product(
            ("token", "sequence"), ("truncate", "mask"), (None, 0.5), (None, 2.0), (False, True)
        )
    ]
    + [dict(reject={name: (0.7, 1.4) if name.endswith("k1") else 0.05}) for name in REJECT_OPTIONS]
    + [dict(level="sequence", batch_normalize=True, reject={"token_k1": 1.5, "seq_mean_k3": 0.05, "seq_max_k2": 0.2})]
)


def case_id(case):
    return ",".join(f"{k}={v}" for k, v in case.items())


def check_against_reference(backend, device, old, roll, mask, **kw):
    out = run(backend, device, old, roll, mask, **kw)
    ref = reference(old, roll, mask, **kw)
    dt = torch.float64 if old.dtype == torch.float64 else torch.float32
    assert out.is_weights.dtype == dt and out.is_weights.shape == old.shape
    assert torch.equal(out.mask.cpu(), ref.mask)
    tol = 1e-12 if dt == torch.float64 else 1e-6
    torch.testing.assert_close(out.is_weights.cpu(), ref.is_weights, rtol=tol, atol=tol)
    for name, a, b in zip(ref.metrics._fields, out.metrics, ref.metrics, strict=True):
        assert a.dim() == 0 and a.dtype == dt, name
        torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol, msg=name)
    return out


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("case", OPTION_CASES, ids=case_id)
def test_every_backend_matches_reference(backend, device, case):
    old, roll, mask = batch(3, empty_row=True)
    roll[0, 0] = float("nan")
    roll[1, 1] = roll[1, 1] + 30.0  # |d| > 20: clamped
    check_against_reference(backend, device, old, roll, mask, **case)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_dtypes_and_strides(backend, device):
    old, roll, mask = batch(4, b=6, t=10)
    for dtype in (torch.float32, torch.bfloat16):
        check_against_reference(backend, device, old.to(dtype), roll.to(dtype), mask, level="sequence")
    # transposed and sliced views: read in place
    check_against_reference(backend, device, old.t().contiguous().t(), roll[:, :], mask.t().contiguous().t(),
                            reject={"seq_sum_k2": 0.5})  # fmt: skip
    wide = torch.cat([old, old], dim=1)[:, ::2]
    check_against_reference(backend, device, wide, roll, mask, mode="mask", low=0.9, high=1.1)


def test_float_mask_and_feeds_policy_loss():
    old, roll, mask = batch(5, garbage=False)
    a = mk.rollout_correction(old, roll, mask)
    b = mk.rollout_correction(old, roll, mask.double())  # a float mask: nonzero is active
    assert torch.equal(a.is_weights, b.is_weights) and torch.equal(a.mask, b.mask)
    logp = old.clone().requires_grad_()
    adv = torch.randn(old.shape[0], dtype=torch.float64)
    loss, _ = mk.policy_loss(logp, adv, a.mask, old_logp=old, is_weights=a.is_weights)
    loss.backward()
    assert torch.isfinite(logp.grad).all()


def test_torch_compile_fullgraph():
    old, roll, mask = batch(6)
    kw = dict(level="sequence", mode="mask", low=0.5, high=2.0, reject={"token_k2": 0.1})
    eager = mk.rollout_correction(old, roll, mask, **kw)
    compiled = torch.compile(lambda o, r, m: mk.rollout_correction(o, r, m, **kw), fullgraph=True)(old, roll, mask)
    assert torch.equal(eager.is_weights, compiled.is_weights) and torch.equal(eager.mask, compiled.mask)
    for a, b in zip(eager.metrics, compiled.metrics, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(low=2.0, high=1.0), ValueError, "low must be <= high"),
        (dict(high=0.0), ValueError, "high"),
        (dict(level="tokens"), ValueError, "level must be one of"),
        (dict(mode="clip"), ValueError, "mode must be one of"),
        (dict(reject={"token_k4": 0.1}), ValueError, "unknown option 'token_k4'"),
        (dict(reject={"token_k1": (1.5, 0.5)}), ValueError, "lower <= upper"),
        (dict(reject={"token_k1": (0.5, 1.0, 2.0)}), ValueError, r"\(lower, upper\)"),
        (dict(reject={"seq_max_k2": -1.0}), ValueError, "seq_max_k2"),
        (dict(reject=[("token_k2", 0.1)]), TypeError, "mapping"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    old, roll, mask = batch(0)
    with pytest.raises(error, match=match):
        mk.rollout_correction(old, roll, mask, **kwargs)


def test_bad_tensors():
    old, roll, mask = batch(0)
    with pytest.raises(ValueError, match="rollout_logp must have shape"):
        mk.rollout_correction(old, roll[:, 1:], mask)
    with pytest.raises(TypeError, match="mask must be"):
        mk.rollout_correction(old, roll, mask.to(torch.int32))
    with pytest.raises(ValueError, match="old_logp must be"):
        mk.rollout_correction(old[0], roll, mask)
