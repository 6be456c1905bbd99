"""The advantage estimators (estimator=, scale=, lengths=): every backend against the float64 reference, and
against verl's own estimator functions (verl.trainer.ppo.core_algos), NeMo-RL's leave-one-out formula and
TRL's scale_rewards, written out here from their definitions.

verl's estimators take one scalar reward per response: the comparisons use one objective. A group of one gets
0 here under every estimator (verl gives it its raw reward, or raises for grpo_passk); the tests compare groups
of two or more with verl and check groups of one against that rule.
"""

import itertools

import numpy as np
import pytest
import torch
from conftest import assert_close, targets
from test_advantages import check_against_reference, run

import moo_kernels as mk

core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")

TARGETS = targets()
SIZES = (3, 5, 4, 2, 6, 2)  # uneven groups; group 1 is constant
T = 8  # response length of the token-level tensors verl takes


class Config(dict):
    """verl's algorithm config as its estimators read it (config.get)."""


def batch(seed=0, sizes=SIZES):
    """(rewards [N], group ids [N] shuffled, lengths [N], verl's (token_level_rewards, response_mask, index))."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    ids = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])[torch.randperm(n, generator=gen)]
    # rewards with ties (a three-level score) and a little noise, as verifiers and judges give them
    r = torch.randint(0, 3, (n,), generator=gen).double() / 2 + 0.05 * torch.randn(n, generator=gen).double()
    r[ids == 1] = 0.75
    lengths = torch.randint(1, T + 1, (n,), generator=gen)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    token_rewards = torch.zeros(n, T, dtype=torch.float64)
    token_rewards[torch.arange(n), lengths - 1] = r
    return r, ids, lengths, (token_rewards, mask, ids.numpy())


def verl_advantages(estimator: str, verl_batch, **config) -> torch.Tensor:
    """verl's advantage of each response (its value on the response's tokens)."""
    token_rewards, mask, index = verl_batch
    fn = core_algos.get_adv_estimator_fn(estimator)
    adv, _ = fn(token_level_rewards=token_rewards, response_mask=mask, index=index, config=Config(config))
    return adv[:, 0]


def ours(backend, device, estimator, r, ids, **kw):
    return run(backend, device, r[:, None], group_ids=ids, estimator=estimator, **kw).advantages.cpu()


# estimator -> (options of ours, verl's config, tolerance). verl's reinforce_plus_plus_baseline whitens with
# rsqrt(var + 1e-8) where every other whitening here divides by std + eps (eps = 1e-6): they agree to ~1e-5.
VERL_CASES = {
    "grpo": ({}, {}, 1e-12),
    "dr_grpo": ({}, None, 1e-12),
    "rloo": ({}, {}, 1e-12),
    "grpo_passk": ({}, {"norm_adv_by_std_in_grpo": True}, 1e-12),
    "grpo_passk/unscaled": ({"scale": "none"}, {"norm_adv_by_std_in_grpo": False}, 1e-12),
    "opo": ({"lengths": True}, {}, 1e-12),
    "gpg": ({}, {}, 1e-12),
    "reinforce_plus_plus_baseline": ({"lengths": True}, {}, 2e-5),
}


def verl_reference(name, vb):
    estimator = name.split("/")[0]
    if estimator == "dr_grpo":  # verl's grpo without the std
        token_rewards, mask, index = vb
        adv, _ = core_algos.compute_grpo_outcome_advantage(token_rewards, mask, index, norm_adv_by_std_in_grpo=False)
        return adv[:, 0]
    return verl_advantages(estimator, vb, **VERL_CASES[name][1])


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("name", sorted(VERL_CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_verl(backend, device, name, seed):
    r, ids, lengths, vb = batch(seed)
    options, _, tol = VERL_CASES[name]
    kw = dict(options, lengths=lengths if options.get("lengths") else None)
    got = ours(backend, device, name.split("/")[0], r, ids, **kw)
    expected = verl_reference(name, vb)
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=tol, atol=tol)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "rloo", "opo", "grpo_passk/unscaled", "grpo_passk"])
def test_groups_of_one_get_zero_where_verl_gives_the_reward(backend, device, name):
    """A group of one has no baseline: 0 here; verl gives it its raw reward (grpo_passk raises)."""
    r, ids, lengths, vb = batch(3, sizes=(4, 1, 3, 1, 5))
    options = VERL_CASES[name][0]
    got = ours(backend, device, name.split("/")[0], r, ids, lengths=lengths if options.get("lengths") else None,
               scale=options.get("scale"))  # fmt: skip
    single = (ids == 1) | (ids == 3)
    assert torch.equal(got[single], torch.zeros(2, dtype=got.dtype))
    if name.startswith("grpo_passk"):
        with pytest.raises(ValueError, match="at least 2 samples"):
            verl_reference(name, vb)
        keep = ~single  # verl without the groups of one
        vb_kept = (vb[0][keep], vb[1][keep], vb[2][keep.numpy()])
        torch.testing.assert_close(got[keep], verl_reference(name, vb_kept))
        return
    expected = verl_reference(name, vb)
    torch.testing.assert_close(got[~single], expected[~single])
    torch.testing.assert_close(expected[single], r[single] / (1.0 + 1e-6) if name == "grpo" else r[single])


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("name", sorted(VERL_CASES))
def test_gates_equal_verl_on_the_feasible_samples(backend, device, name):
    """Infeasible samples take no part: the feasible ones get verl's advantages of the feasible batch."""
    r, ids, lengths, vb = batch(4, sizes=(4, 5, 6, 3, 7))
    gates = torch.ones(len(r), dtype=torch.bool)
    for g in range(5):  # one infeasible sample in each group, none leaving a group of one
        gates[(ids == g).nonzero()[0]] = False
    options = VERL_CASES[name][0]
    kw = dict(options, lengths=lengths if options.get("lengths") else None)
    got = ours(backend, device, name.split("/")[0], r, ids, gates=gates, infeasible_advantage=-0.5, **kw)
    kept = (vb[0][gates], vb[1][gates], vb[2][gates.numpy()])
    tol = VERL_CASES[name][2]
    torch.testing.assert_close(got[gates], verl_reference(name, kept).to(got.dtype), rtol=tol, atol=tol)
    assert torch.equal(got[~gates], torch.full((5,), -0.5, dtype=got.dtype))


def nemo_loo_std(r: torch.Tensor, ids: torch.Tensor, eps: float) -> torch.Tensor:
    """NeMo-RL's leave-one-out baseline and std (unbiased, over the other samples of the group), written out
    sample by sample: (r - b) / (s + eps) where s > 0, r - b where s == 0 (a group of one: 0)."""
    out = torch.zeros_like(r)
    for j in range(len(r)):
        others = r[(ids == ids[j]) & (torch.arange(len(r)) != j)]
        if len(others) == 0:
            continue
        b = others.mean()
        s = others.std() if len(others) > 1 else torch.tensor(0.0, dtype=r.dtype)
        out[j] = (r[j] - b) / (s + eps) if s > 0 else r[j] - b
    return out


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loo_std_is_nemo_formula(backend, device, seed):
    r, ids, _, _ = batch(seed, sizes=(3, 5, 4, 2, 6, 1))
    r[ids == 3] = torch.tensor([0.25, 1.0], dtype=r.dtype)  # a group of two: the others' std is 0
    got = ours(backend, device, "loo_std", r, ids)
    torch.testing.assert_close(got, nemo_loo_std(r, ids, 1e-6).to(got.dtype), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_loo_std_others_equal_is_exact(backend, device):
    """[1, 0, 0, 0]: the outlier's others are all equal (std exactly 0): it gets r - b = 1, not 1 / eps."""
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 3.0, 3.0, 7.0], dtype=torch.float64)
    got = run(backend, device, r[:, None], group_size=4, estimator="loo_std").advantages.cpu()
    torch.testing.assert_close(got, nemo_loo_std(r, torch.arange(8) // 4, 1e-6), rtol=1e-12, atol=1e-12)
    assert got[0] == 1.0 and got[7] == 4.0


def trl_advantages(rewards, weights, group, scale_rewards, aggregation, eps=1e-4):
    """TRL's GRPOTrainer advantages (sum_then_normalize with scale_rewards, or normalize_then_sum), from its
    formulas: torch.std (unbiased) over the group or the batch."""
    if aggregation == "sum_then_normalize":
        s = (rewards * weights).sum(1)
        g = s.view(-1, group)
        adv = (g - g.mean(1, keepdim=True)).flatten()
        if scale_rewards == "group":
            adv = adv / (g.std(1, keepdim=True).expand_as(g).flatten() + eps)
        elif scale_rewards == "batch":
            adv = adv / (s.std() + eps)
        return adv
    g = rewards.view(-1, group, rewards.shape[1])
    z = ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + eps)).view(-1, rewards.shape[1])
    s = (z * weights).sum(1)
    return (s - s.mean()) / (s.std() + eps)


# TRL's options -> the op's
TRL_CASES = {
    ("sum_then_normalize", "group"): dict(weighting="scalarize"),
    ("sum_then_normalize", "batch"): dict(weighting="scalarize", scale="batch"),
    ("sum_then_normalize", "none"): dict(weighting="scalarize", scale="none"),
    ("normalize_then_sum", "group"): dict(weighting="fixed", batch_normalize=True),
}


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("case", sorted(TRL_CASES))
def test_trl_scale_rewards(backend, device, case):
    gen = torch.Generator().manual_seed(5)
    rewards = torch.cat([torch.randint(0, 2, (24, 1), generator=gen).double(),
                         torch.rand(24, 2, generator=gen, dtype=torch.float64)], dim=1)  # fmt: skip
    weights = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64)
    got = run(backend, device, rewards, group_size=6, weights=weights, eps=1e-4, **TRL_CASES[case]).advantages
    expected = trl_advantages(rewards, weights, 6, case[1], case[0])
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-10, atol=1e-10)


# ---- every backend against the reference, every estimator with every weighting and gate ----------------------

ESTIMATOR_OPTIONS = [
    dict(estimator="grpo"),
    dict(estimator="dr_grpo"),
    dict(estimator="rloo"),
    dict(estimator="grpo_passk"),
    dict(estimator="grpo_passk", scale="none"),
    dict(estimator="opo", lengths="int"),
    dict(estimator="gpg"),
    dict(estimator="reinforce_plus_plus_baseline"),
    dict(estimator="reinforce_plus_plus_baseline", lengths="float"),
    dict(estimator="loo_std"),
    dict(scale="none"),
    dict(batch_normalize=True, lengths="int"),
]
SCALARIZE_ONLY = [
    dict(scale="batch"),
    dict(scale="batch", lengths="float"),
    dict(estimator="grpo_passk", scale="batch"),
]


def estimator_cases():
    for options, weighting in itertools.product(ESTIMATOR_OPTIONS, ("scalarize", "fixed", "variance")):
        yield dict(options, weighting=weighting)
    for options in SCALARIZE_ONLY:
        yield dict(options, weighting="scalarize")


def case_id(case):
    return ",".join(f"{k}={v}" for k, v in case.items())


def inputs(case, n=36, k=3, seed=0, dtype=torch.float64):
    """Rewards with ties and a constant group, NaN at masked positions, shuffled uneven groups, gates."""
    gen = torch.Generator().manual_seed(seed)
    sizes = (5, 1, 7, 4, 3, 8, 2, 6)
    ids = torch.cat([torch.full((s,), i) for i, s in enumerate(sizes)])[torch.randperm(n, generator=gen)]
    r = torch.randint(0, 4, (n, k), generator=gen).double() / 3 + 0.01 * torch.randint(0, 2, (n, k), generator=gen)
    r[ids == 3] = 0.5
    valid = torch.rand(n, generator=gen) > 0.1
    r[~valid] = float("nan")  # garbage where the sample takes no part
    gates = torch.rand(n, 2, generator=gen) > 0.1
    kw = dict(case, group_ids=ids, valid=valid, gates=gates, weights=[1.0, 0.5, 2.0], nan_policy="ignore",
              infeasible_advantage=-0.25)  # fmt: skip
    lengths = kw.pop("lengths", None)
    if lengths is not None:
        length = torch.randint(0, 9, (n,), generator=gen)
        kw["lengths"] = length if lengths == "int" else length.double() * 0.5
    return r.to(dtype), kw


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("case", list(estimator_cases()), ids=case_id)
def test_every_backend_matches_reference(backend, device, case):
    rewards, kw = inputs(case)
    check_against_reference(backend, device, rewards, **kw)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("case", [dict(estimator="loo_std", weighting="fixed"),
                                  dict(estimator="grpo_passk", weighting="scalarize"),
                                  dict(estimator="opo", weighting="variance", lengths="int")], ids=case_id)  # fmt: skip
def test_float32_rewards_and_extreme_magnitudes(backend, device, case):
    rewards, kw = inputs(case, seed=3)
    check_against_reference(backend, device, rewards.float(), **kw)
    check_against_reference(backend, device, rewards * 1e300, **kw)
    check_against_reference(backend, device, rewards * 1e-300, **kw)


@pytest.mark.parametrize("case", list(estimator_cases()), ids=case_id)
def test_gradcheck(case):
    rewards, kw = inputs(case, n=36)
    # no ties (a tie at the top of a group moves the winner under finite differences), no constant group
    noise = 1e-3 * torch.randn(rewards.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rewards = torch.nan_to_num(rewards, nan=0.0) + noise
    rewards.requires_grad_(True)
    w = torch.tensor(kw.pop("weights"), dtype=torch.float64, requires_grad=True)

    def f(r, w):
        with mk.use_backend("reference"):
            out = mk.multi_objective_advantages(r, weights=w, **kw)
        return out.advantages, out.mean, out.std

    assert torch.autograd.gradcheck(f, (rewards, w), eps=1e-7, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(estimator="grpo", normalize="zscore"), ValueError, "estimator or normalize, not both"),
        (dict(estimator="ppo"), ValueError, "estimator must be one of"),
        (dict(estimator="rloo", scale="none"), ValueError, "scale divides"),
        (dict(normalize="center", scale="group"), ValueError, "scale divides"),
        (dict(scale="batch", weighting="fixed"), ValueError, 'weighting="scalarize"'),
        (dict(estimator="opo"), ValueError, "pass lengths"),
        (dict(estimator="grpo", lengths="int"), ValueError, "nothing reads it"),
        (dict(estimator="gpg", batch_normalize=True), ValueError, "own batch step"),
        (dict(scale="batch", weighting="scalarize", batch_normalize=True), ValueError, "cannot be combined"),
        (dict(estimator="grpo_passk", std_floor=0.1), ValueError, "std_floor"),
        (dict(estimator="opo", lengths="negative"), ValueError, r"lengths\[3\]"),
        (dict(estimator="opo", lengths="nan"), ValueError, "lengths must be finite"),
        (dict(estimator="opo", lengths="bool"), TypeError, "lengths must be"),
        (dict(estimator="opo", lengths="short"), ValueError, "lengths must have shape"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    r = torch.rand(8, 2)
    kwargs = dict(kwargs)
    lengths = kwargs.pop("lengths", None)
    if lengths is not None:
        kwargs["lengths"] = {
            "int": torch.full((8,), 3),
            "negative": torch.tensor([1, 2, 3, -1, 2, 2, 2, 2]),
            "nan": torch.full((8,), float("nan")),
            "bool": torch.ones(8, dtype=torch.bool),
            "short": torch.ones(7),
        }[lengths]
    with pytest.raises(error, match=match):
        mk.multi_objective_advantages(r, group_size=4, **kwargs)


def test_scale_group_is_the_default_zscore():
    r, kw = inputs(dict(weighting="fixed"), seed=7)
    a = mk.multi_objective_advantages(r, **kw)
    b = mk.multi_objective_advantages(r, scale="group", **kw)
    c = mk.multi_objective_advantages(r, estimator="grpo", **kw)
    for x, y, z in zip(a, b, c, strict=True):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_passk_tie_at_the_top_gives_zero_and_one_winner_otherwise():
    r = torch.tensor([1.0, 1.0, 0.0, 0.5, 0.25, 1.0, 0.5, 0.0], dtype=torch.float64)
    out = mk.multi_objective_advantages(r[:, None], group_size=4, estimator="grpo_passk", scale="none").advantages
    assert torch.equal(out[:4], torch.zeros(4, dtype=torch.float64))  # two samples at the top: margin 0
    assert torch.equal(out[4:], torch.tensor([0.0, 0.5, 0.0, 0.0], dtype=torch.float64))


def test_gpg_factor_counts_nonzero_combined_rewards():
    r = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    out = mk.multi_objective_advantages(r, group_size=4, estimator="gpg").advantages
    center = mk.multi_objective_advantages(r, group_size=4, estimator="dr_grpo").advantages
    assert_close(out, center * 4 / 2, torch.float64)  # 4 samples, 2 with a nonzero combined reward


def test_lengths_weight_the_whitening_as_tokens():
    """batch_normalize with lengths equals whitening the advantage repeated over each sample's tokens."""
    r, ids, lengths, _ = batch(6)
    out = mk.multi_objective_advantages(r[:, None], group_ids=ids, normalize="center", batch_normalize=True,
                                        lengths=lengths).advantages  # fmt: skip
    centred = mk.multi_objective_advantages(r[:, None], group_ids=ids, normalize="center").advantages
    tokens = centred.repeat_interleave(lengths)
    expected = (centred - tokens.mean()) / (tokens.std() + 1e-6)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_distributed_wrapper_gathers_lengths():
    """lengths is per sample: the distributed wrapper gathers it with the other per-sample tensors, and does not
    take it for an option that every rank must pass alike."""
    from moo_kernels import distributed
    from moo_kernels.ops.advantages.spec import PER_SAMPLE

    assert set(PER_SAMPLE) == {"valid", "lengths", "reward_gates", "gates"}
    assert "lengths" not in distributed._OPTION_DEFAULTS


def test_estimator_options_reach_the_registered_op():
    r, kw = inputs(dict(estimator="opo", weighting="fixed", lengths="int"), seed=2)
    eager = mk.multi_objective_advantages(r, **kw)
    compiled = torch.compile(lambda r: mk.multi_objective_advantages(r, **kw), fullgraph=True)(r)
    for x, y in zip(eager, compiled, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_verl_config_is_read_as_a_mapping():
    # the Config helper is what verl's estimators read (config.get); a guard that the oracle itself runs
    r, ids, _, vb = batch(0)
    assert verl_advantages("grpo_passk", vb, norm_adv_by_std_in_grpo=True).shape == r.shape
    assert np.array_equal(vb[2], ids.numpy())
