"""moo_kernels in verl's registries: the estimator and policy losses, called through verl's real core_algos.

Checks that register() is idempotent and the names resolve through verl's getters, that the calls through
verl equal moo_kernels called directly, that a single objective with GRPO's options reproduces verl's own
compute_grpo_outcome_advantage, and that the "moo" losses reproduce verl's vanilla / GSPO / CISPO losses
(value, gradient, metrics) under every loss_agg_mode and global batch setting.
"""

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from verl.trainer.ppo import core_algos
from verl.workers.config import ActorConfig

import moo_kernels as mk
from moo_kernels.integrations import verl as moo_verl

GROUP, GROUPS, T = 5, 6, 11


@pytest.fixture(scope="module", autouse=True)
def registered():
    moo_verl.register()
    moo_verl.register()  # idempotent


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    B = GROUP * GROUPS
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).float()
    scores = torch.randint(0, 3, (B,), generator=g).float() + torch.rand(B, generator=g)
    rewards = torch.zeros(B, T)
    rewards[torch.arange(B), lengths - 1] = scores  # verl puts the outcome reward on the last response token
    uids = np.array([f"prompt-{i}" for i in np.random.default_rng(seed).permutation(GROUPS)], dtype=object)
    index = np.repeat(uids, GROUP)
    return rewards, mask, index, scores, g


def test_names_resolve_through_verl():
    assert core_algos.get_adv_estimator_fn("moo") is moo_verl.compute_moo_advantage
    for name in ("moo", "moo_gspo", "moo_cispo", "moo_sapo", "moo_gmpo"):
        assert core_algos.get_policy_loss_fn(name) is moo_verl._POLICY_LOSS_FNS[name]


@pytest.mark.parametrize("norm_by_std", [True, False])
def test_single_objective_matches_verl_grpo(norm_by_std):
    rewards, mask, index, _, _ = batch()
    config = OmegaConf.create({"norm_adv_by_std_in_grpo": norm_by_std, "moo": {"weighting": "variance"}})
    ours, returns = core_algos.get_adv_estimator_fn("moo")(
        token_level_rewards=rewards, response_mask=mask, index=index, config=config
    )
    verl, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, index, norm_adv_by_std_in_grpo=norm_by_std)
    torch.testing.assert_close(ours, verl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(returns, ours)


@pytest.mark.parametrize(
    "estimator,norm_by_std",
    [("grpo", True), ("grpo", False), ("rloo", True), ("grpo_passk", True), ("grpo_passk", False), ("opo", True),
     ("gpg", True), ("reinforce_plus_plus_baseline", True)],
)  # fmt: skip
def test_verl_estimators_through_moo(estimator, norm_by_std):
    """algorithm.moo.estimator=<verl's name> through the "moo" estimator equals verl's own estimator (the response
    lengths reach opo and the token-weighted whitening; verl's dr_grpo switch reaches grpo and grpo_passk)."""
    rewards, mask, index, _, _ = batch(2)
    config = OmegaConf.create({"norm_adv_by_std_in_grpo": norm_by_std, "moo": {"estimator": estimator}})
    ours, _ = core_algos.get_adv_estimator_fn("moo")(
        token_level_rewards=rewards, response_mask=mask, index=index, config=config
    )
    extra = {"norm_adv_by_std_in_grpo": norm_by_std} if estimator == "grpo" else {}  # verl's trainer passes it so
    theirs, _ = core_algos.get_adv_estimator_fn(estimator)(
        token_level_rewards=rewards, response_mask=mask, index=index, config=config, **extra
    )
    tol = 2e-5 if estimator == "reinforce_plus_plus_baseline" else 1e-5  # verl whitens with rsqrt(var + 1e-8)
    torch.testing.assert_close(ours, theirs, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "options",
    [
        dict(weights=[1.0, 0.5, 0.25], weighting="variance", drop_zero_variance=True, negative_scale=0.5, clip=2.0),
        dict(weights=[1.0, 1.0, 1.0], weighting="fixed", std_floor=[0.0, 0.05, 0.2]),
        dict(weighting="fixed", std_floor=0.1),
    ],
)
def test_estimator_through_verl_equals_direct_call(options):
    rewards, mask, index, scores, g = batch(1)
    extra = torch.rand(scores.shape[0], 2, generator=g)
    ok = torch.rand(scores.shape[0], generator=g) > 0.2
    config = OmegaConf.create({"moo": {**options, "infeasible_advantage": -0.3}})
    ours, _ = core_algos.get_adv_estimator_fn("moo")(
        token_level_rewards=rewards, response_mask=mask, index=index, config=config, objective_rewards=extra, gates=ok
    )
    _, group_ids = np.unique(index, return_inverse=True)
    direct = mk.multi_objective_advantages(
        torch.cat([scores[:, None], extra], dim=1),
        group_ids=torch.as_tensor(group_ids),
        gates=ok,
        infeasible_advantage=-0.3,
        **options,
    ).advantages
    torch.testing.assert_close(ours, direct[:, None] * mask)


def test_objectives_and_gates_from_non_tensor_batch():
    rewards, mask, index, scores, g = batch(2)
    B = scores.shape[0]
    non_tensor_batch = {
        "uid": index,
        "accuracy": (torch.rand(B, generator=g) > 0.5).float().numpy(),
        "format": torch.rand(B, generator=g).numpy(),
        "safe": (torch.rand(B, generator=g) > 0.1).float().numpy(),
    }
    config = OmegaConf.create(
        {"moo": {"reward_keys": ["accuracy", "format"], "gate_keys": ["safe"], "weighting": "fixed", "weights": [2, 1]}}
    )
    ours, _ = core_algos.get_adv_estimator_fn("moo")(
        token_level_rewards=rewards, response_mask=mask, index=index, config=config, non_tensor_batch=non_tensor_batch
    )
    _, group_ids = np.unique(index, return_inverse=True)
    direct = mk.multi_objective_advantages(
        torch.tensor(np.stack([non_tensor_batch["accuracy"], non_tensor_batch["format"]], axis=1)),
        group_ids=torch.as_tensor(group_ids),
        gates=torch.tensor(non_tensor_batch["safe"] > 0.5),
        weighting="fixed",
        weights=[2.0, 1.0],
    ).advantages
    torch.testing.assert_close(ours, direct[:, None] * mask)
    with pytest.raises(ValueError, match="unknown algorithm.moo options"):
        core_algos.get_adv_estimator_fn("moo")(rewards, mask, index, OmegaConf.create({"moo": {"weigting": "x"}}))


def loss_inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    B = 12
    lengths = torch.randint(0, T + 1, (B,), generator=g)  # one response may be empty
    lengths[0] = 0
    mask = torch.arange(T)[None, :] < lengths[:, None]
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + 0.4 * torch.randn(B, T, generator=g)  # ratios well outside [0.8, 1.28]: clipping happens
    adv = torch.randn(B, 1, generator=g).expand(B, T) * mask
    weights = 0.5 + torch.rand(B, T, generator=g)
    return old, logp, adv.contiguous(), mask, weights


AGG_SETTINGS = [
    ("token-mean", {}),
    ("token-mean", {"dp_size": 2, "batch_num_tokens": 150}),
    ("token-sum", {}),
    ("token-sum", {"dp_size": 2}),
    ("seq-mean-token-mean", {}),
    ("seq-mean-token-mean", {"dp_size": 4, "global_batch_size": 40}),
    ("seq-mean-token-sum", {"global_batch_size": 16}),
    ("seq-mean-token-sum-norm", {}),
    ("seq-mean-token-sum-norm", {"dp_size": 2, "global_batch_size": 30, "loss_scale_factor": 16}),
]


@pytest.mark.parametrize(
    "ours,theirs",
    [("moo", "vanilla"), ("moo_gspo", "gspo"), ("moo_cispo", "cispo"), ("moo_sapo", "sapo"), ("moo_gmpo", "geo_mean")],
)
@pytest.mark.parametrize("agg,info", AGG_SETTINGS)
@pytest.mark.parametrize("with_is_weights", [False, True])
def test_policy_loss_matches_verl(ours, theirs, agg, info, with_is_weights):
    old, logp, adv, mask, weights = loss_inputs()
    config = ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=2, clip_ratio_high=0.28)
    config.global_batch_info.update(info)
    if theirs == "sapo" and info.get("dp_size", 1) > 1 and "global_batch_size" not in info:
        # SAPO aggregates by seq-mean-token-mean: over several ranks it needs the global batch size
        with pytest.raises(ValueError, match="global_batch_size is required"):
            core_algos.get_policy_loss_fn(ours)(old_log_prob=old, log_prob=logp, advantages=adv, response_mask=mask,
                                                loss_agg_mode=agg, config=config)  # fmt: skip
        return
    results = []
    for name in (ours, theirs):
        x = logp.clone().requires_grad_(True)
        loss, metrics = core_algos.get_policy_loss_fn(name)(
            old_log_prob=old,
            log_prob=x,
            advantages=adv,
            response_mask=mask,
            loss_agg_mode=agg,
            config=config,
            rollout_is_weights=weights if with_is_weights else None,
        )
        (3.0 * loss).backward()  # grad_output != 1
        results.append((loss.detach(), x.grad, metrics))
    (l0, g0, m0), (l1, g1, m1) = results
    torch.testing.assert_close(l0, l1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g0, g1, rtol=1e-5, atol=1e-6)
    assert g0.abs().max() > 0 and (m1["actor/pg_clipfrac"] > 0 or theirs == "sapo")  # SAPO does not clip
    assert m0["actor/pg_clipfrac"] == pytest.approx(m1["actor/pg_clipfrac"], abs=1e-6)
    assert m0["actor/ppo_kl"] == pytest.approx(m1["actor/ppo_kl"], abs=1e-5)
    if theirs in ("vanilla", "geo_mean"):
        assert m0["actor/pg_clipfrac_lower"] == pytest.approx(m1["actor/pg_clipfrac_lower"], abs=1e-6)


@pytest.mark.parametrize(
    "kw",
    [
        dict(rollout_is="token", rollout_is_threshold=2.0),
        dict(rollout_is="sequence", rollout_is_threshold="0.5_2.0", rollout_is_batch_normalize=True),
        dict(rollout_is=None, rollout_rs="token_k1,seq_mean_k3", rollout_rs_threshold="0.7_1.4,0.05"),
        dict(rollout_is="token", rollout_is_threshold=3.0, rollout_rs="seq_max_k2", rollout_rs_threshold=0.2),
    ],
)
def test_rollout_correction_is_a_drop_in_for_verls(kw):
    from verl.trainer.ppo import rollout_corr_helper

    g = torch.Generator().manual_seed(0)
    old = -2 * torch.rand(6, 11, generator=g)
    roll = old + 0.3 * torch.randn(6, 11, generator=g)
    mask = (torch.arange(11)[None] < torch.randint(1, 12, (6,), generator=g)[:, None]).float()
    ours = moo_verl.compute_rollout_correction_and_rejection_mask(old, roll, mask, **kw)
    theirs = rollout_corr_helper.compute_rollout_correction_and_rejection_mask(old, roll, mask, **kw)
    assert (ours[0] is None) == (theirs[0] is None)
    if ours[0] is not None:
        torch.testing.assert_close(ours[0].batch["rollout_is_weights"] * mask,
                                   theirs[0].batch["rollout_is_weights"] * mask, rtol=1e-5, atol=1e-6)  # fmt: skip
    assert torch.equal(ours[1], theirs[1]) and ours[1].dtype == mask.dtype
    assert ours[2] and set(ours[2]) <= set(theirs[2])
    for key, value in ours[2].items():
        assert value == pytest.approx(theirs[2][key], rel=1e-5, abs=1e-6), key
