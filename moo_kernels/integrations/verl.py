"""verl integration: moo_kernels' advantage op and policy loss in verl's own registries.

    from moo_kernels.integrations import verl as moo_verl
    moo_verl.register()     # idempotent; then in the Hydra config:
    #   algorithm.adv_estimator=moo  +algorithm.moo.std_floor=0.01  +algorithm.moo.drop_zero_variance=true
    #   actor_rollout_ref.actor.policy_loss.loss_mode=moo        (or moo_gspo / moo_cispo)

Registered (tested with the verl version pinned in pyproject.toml):
- advantage estimator "moo" (`compute_moo_advantage`): `moo_kernels.multi_objective_advantages` with the
  options of the mapping `algorithm.moo` (every keyword of the op except rewards / group_size / group_ids /
  valid / lengths / gates / reward_gates; `normalize` defaults to "zscore", or "center" when
  `algorithm.norm_adv_by_std_in_grpo` is false, which also gives the estimators "grpo" and "grpo_passk"
  `scale="none"`). `algorithm.moo.estimator` takes verl's own estimator names ("grpo", "dr_grpo", "rloo",
  "grpo_passk", "opo", "gpg", "reinforce_plus_plus_baseline", plus NeMo-RL's "loo_std"), per objective and with
  every other option; the response lengths (response_mask summed) go to the op where its options read them.
  Groups are verl's `uid` index. Returns the advantage broadcast over the response tokens, as verl's GRPO does.
- policy losses "moo" (mode "clip" with verl's dual clip `clip_ratio_c`: verl's "vanilla"), "moo_gspo",
  "moo_cispo", "moo_sapo" (verl's "sapo": `tau_pos` / `tau_neg`, seq-mean-token-mean) and "moo_gmpo" (verl's
  "geo_mean": the mean over the micro-batch's sequences whatever loss_agg_mode, the rollout weights' geometric mean
  per sequence, its clip fractions): `moo_kernels.policy_loss`
  with `clip_ratio_low` / `clip_ratio_high`, rollout importance
  weights and verl's loss aggregation (`loss_agg_mode` with the global batch info verl sets).

Rollout correction: `compute_rollout_correction_and_rejection_mask` takes verl's function's arguments and returns
what it returns (weights, rejected mask, the metrics both compute), by `moo_kernels.rollout_correction`; call it
where verl's is called (its trainer imports verl's by name: a custom trainer, or a patch of
`verl.trainer.ppo.rollout_corr_helper`).

Objectives. verl's trainers (0.9) hand a registered estimator one scalar reward per response
(`token_level_rewards` summed over tokens): that is objective 0. More objectives come as keyword arguments
when the caller has them: `objective_rewards` ([B, K'] tensor), or, as verl's legacy trainer passes to
GDPO, `non_tensor_batch` with the keys listed in `algorithm.moo.reward_keys` (the extra values a
compute_score returned). With `algorithm.moo.reward_keys` set, those keys are the objectives and the
scalar reward is not used. Feasibility gates: `algorithm.moo.gate_keys` (non_tensor_batch keys, a gate
passes when its value is > `gate_threshold`, default 0.5) or a `gates` keyword ([B] / [B, M] bool).
verl's stock trainers do not pass these keywords to estimators other than "gdpo", so with them the "moo"
estimator is single-objective; a custom trainer (or a call like the one in the tests) uses the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from verl.trainer.ppo import core_algos

import moo_kernels as mk
from moo_kernels.ops.advantages.spec import OPTION_NAMES, PER_OBJECTIVE

ADV_ESTIMATOR = "moo"
POLICY_LOSSES = {"moo": "clip", "moo_gspo": "gspo", "moo_cispo": "cispo", "moo_sapo": "sapo", "moo_gmpo": "gmpo"}
_OP_OPTIONS = (*PER_OBJECTIVE, *OPTION_NAMES)  # the keyword options of multi_objective_advantages
_LAYOUT_OPTIONS = ("reward_keys", "gate_keys", "gate_threshold")


def _moo_options(config) -> dict[str, Any]:
    """The op's keyword arguments from config.moo (a mapping; omegaconf containers are converted)."""
    moo = config.get("moo", None) if config is not None else None
    if moo is None:
        moo = {}
    if not isinstance(moo, Mapping):
        raise TypeError(f"algorithm.moo must be a mapping of options, got {type(moo).__name__}")
    lists = (*PER_OBJECTIVE, "reward_keys", "gate_keys")  # omegaconf lists as lists (std_floor may be a number)
    moo = {
        k: (list(v) if k in lists and isinstance(v, Sequence) and not isinstance(v, str) else v) for k, v in moo.items()
    }
    unknown = set(moo) - set(_OP_OPTIONS) - set(_LAYOUT_OPTIONS)
    if unknown:
        raise ValueError(
            f"unknown algorithm.moo options {sorted(unknown)}; known: {sorted(_OP_OPTIONS + _LAYOUT_OPTIONS)}"
        )
    return moo


def _column(non_tensor_batch, key: str, device: torch.device) -> torch.Tensor:
    if key not in non_tensor_batch:
        raise KeyError(f"{key!r} is not in non_tensor_batch (keys: {sorted(non_tensor_batch)})")
    return torch.as_tensor(np.asarray(non_tensor_batch[key], dtype=np.float32), device=device)


def compute_moo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray | None = None,
    config=None,
    objective_rewards: torch.Tensor | None = None,
    gates: torch.Tensor | None = None,
    non_tensor_batch: Mapping | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl advantage estimator "moo": multi-objective group advantages, broadcast over response tokens.

    Args:
        token_level_rewards: [B, T] verl's rewards; their sum over T is objective 0.
        response_mask: [B, T] response tokens.
        index: [B] group id of each response (verl's uid; any hashable values).
        config: verl's algorithm config; `config.moo` holds the op's options (see the module docstring).
        objective_rewards: [B, K'] more objectives, appended after objective 0.
        gates: [B] or [B, M] bool feasibility checks.
        non_tensor_batch: verl's non-tensor batch, read for `moo.reward_keys` / `moo.gate_keys`.

    Returns:
        (advantages, returns), both [B, T]: the advantage of each response times response_mask.
    """
    if index is None:
        raise ValueError("the moo estimator needs verl's group index (uid)")
    moo = _moo_options(config)
    reward_keys, gate_keys = moo.pop("reward_keys", None), moo.pop("gate_keys", None)
    threshold = moo.pop("gate_threshold", 0.5)
    if config is not None and not config.get("norm_adv_by_std_in_grpo", True):  # verl's Dr. GRPO switch
        if moo.get("estimator") is None and "normalize" not in moo:
            moo["normalize"] = "center"
        elif moo.get("estimator") in ("grpo", "grpo_passk") and "scale" not in moo:
            moo["scale"] = "none"
    device = token_level_rewards.device
    if (reward_keys or gate_keys) and non_tensor_batch is None:
        raise ValueError("algorithm.moo.reward_keys / gate_keys need the non_tensor_batch keyword")

    if reward_keys:
        rewards = torch.stack([_column(non_tensor_batch, k, device) for k in reward_keys], dim=1)
    else:
        rewards = token_level_rewards.sum(dim=-1, keepdim=True).float()
    if objective_rewards is not None:
        extra = objective_rewards.to(device=device, dtype=rewards.dtype)
        rewards = torch.cat([rewards, extra.reshape(extra.shape[0], -1)], dim=1)
    if gate_keys:
        keyed = torch.stack([_column(non_tensor_batch, k, device) > threshold for k in gate_keys], dim=1)
        gates = keyed if gates is None else torch.cat([gates.reshape(gates.shape[0], -1).to(device), keyed], dim=1)

    _, group_ids = np.unique(np.asarray(index), return_inverse=True)
    group_ids = torch.as_tensor(group_ids.reshape(-1), device=device)
    # the response lengths, where the options read them: opo's baseline, and the batch statistics (token-weighted,
    # as verl whitens over the response tokens)
    batch = moo.get("batch_normalize") or moo.get("scale") == "batch"
    if moo.get("estimator") in ("opo", "reinforce_plus_plus_baseline") or batch:
        moo["lengths"] = response_mask.sum(dim=-1)
    with torch.no_grad():
        result = mk.multi_objective_advantages(rewards, group_ids=group_ids, gates=gates, **moo)
    advantages = result.advantages.to(token_level_rewards.dtype).unsqueeze(-1) * response_mask
    return advantages, advantages


def _make_policy_loss(mode: str):
    def moo_policy_loss(
        old_log_prob: torch.Tensor,
        log_prob: torch.Tensor,
        advantages: torch.Tensor,
        response_mask: torch.Tensor,
        loss_agg_mode: str = "token-mean",
        config=None,
        rollout_is_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """verl policy loss backed by moo_kernels.policy_loss (see the module docstring)."""
        if config is None:
            raise ValueError("the moo policy losses need verl's actor config")
        if mode == "sapo":  # verl's SAPO aggregates by seq-mean-token-mean whatever loss_agg_mode says
            loss_agg_mode = "seq-mean-token-mean"
        if mode == "gmpo":  # verl's geo_mean: the mean over the micro-batch's B sequences, whatever the settings
            loss_agg_mode, info_override = "seq-mean-token-mean", True
        else:
            info_override = False
        clip = config.clip_ratio
        clip_low = config.clip_ratio_low if config.clip_ratio_low is not None else clip
        clip_high = config.clip_ratio_high if config.clip_ratio_high is not None else clip
        info = dict(config.get("global_batch_info", None) or {})
        dp = info.get("dp_size", 1) or 1
        batch_tokens, batch_size = info.get("batch_num_tokens"), info.get("global_batch_size")
        scale_factor = info.get("loss_scale_factor")
        B, T = log_prob.shape
        mask = response_mask.bool()

        # verl's agg_loss in the op's terms: its global normalisers are the op's num_tokens / num_sequences (over dp,
        # as DDP averages the gradients), token-sum's factor dp and the one case left a rescaling.
        agg, num_tokens, num_sequences, max_len, rescale = loss_agg_mode, None, None, None, None
        if loss_agg_mode == "token-mean":
            if batch_tokens is not None:
                num_tokens = float(batch_tokens) / dp
            elif dp > 1:
                raise ValueError("(global) batch_num_tokens is required when dp_size > 1")
        elif loss_agg_mode == "token-sum":
            rescale = dp if dp != 1 else None
        elif info_override:
            num_sequences = float(B)
        elif loss_agg_mode in ("seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
            if batch_size is None and dp > 1:
                raise ValueError("global_batch_size is required when dp_size > 1")
            if batch_size is not None:
                num_sequences = float(batch_size) / dp
            if loss_agg_mode == "seq-mean-token-sum-norm":
                max_len = int(scale_factor) if scale_factor is not None else T
                if batch_size is None:  # verl divides by the active sequences, the op by B: no host sync to count
                    rescale = B / mask.any(dim=-1).sum().clamp(min=1)
        else:
            raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")

        loss, m = mk.policy_loss(
            log_prob,
            advantages,
            mask,
            old_logp=old_log_prob,
            clip_low=clip_low,
            clip_high=clip_high,
            dual_clip=config.get("clip_ratio_c", 3.0) if mode == "clip" else None,
            mode=mode,
            **({"sapo_tau_pos": config.tau_pos, "sapo_tau_neg": config.tau_neg} if mode == "sapo" else {}),
            is_weights=rollout_is_weights,
            agg=agg,
            max_len=max_len,
            num_tokens=num_tokens,
            num_sequences=num_sequences,
        )
        if rescale is not None:
            loss = loss * rescale
        metrics = {
            "actor/pg_clipfrac": (m.clip_frac_high if mode == "gmpo" else m.clip_frac).item(),
            "actor/ppo_kl": m.ppo_kl.item(),
            "actor/pg_clipfrac_lower": (m.clip_frac_low if mode == "gmpo" else m.dual_clip_frac).item(),
        }
        return loss, metrics

    moo_policy_loss.__name__ = f"moo_policy_loss_{mode}"
    return moo_policy_loss


_POLICY_LOSS_FNS = {name: _make_policy_loss(mode) for name, mode in POLICY_LOSSES.items()}


# our RolloutMetrics -> verl's metric names (those with the same meaning; see the README's rollout correction)
_ROLLOUT_METRICS = {
    "weight_mean": "rollout_is_mean",
    "ess": "rollout_is_eff_sample_size",
    "kl_k1": "kl",
    "kl_k3": "k3_kl",
}


def _verl_pair(spec: str | float, name: str) -> tuple[float | None, float]:
    """verl's threshold "lower_upper" or a single upper bound, as (lower or None, upper)."""
    if isinstance(spec, str) and "_" in spec:
        low, high = spec.split("_", 1)
        return float(low), float(high)
    if isinstance(spec, bool) or not isinstance(spec, (str, int, float)):
        raise TypeError(f"{name} must be a number or a 'lower_upper' string, got {spec!r}")
    return None, float(spec)


def compute_rollout_correction_and_rejection_mask(
    old_log_prob: torch.Tensor,
    rollout_log_prob: torch.Tensor,
    response_mask: torch.Tensor,
    rollout_is: str | None = None,
    rollout_is_threshold: str | float | None = 2.0,
    rollout_is_batch_normalize: bool = False,
    rollout_rs: str | None = None,
    rollout_rs_threshold: str | float | None = None,
):
    """verl's function of this name (verl.trainer.ppo.rollout_corr_helper), same arguments and returns, computed
    by moo_kernels.rollout_correction in one pass: (DataProto with "rollout_is_weights", or None without
    rollout_is; the response mask with the rejected tokens removed, in response_mask's dtype; metrics under
    "rollout_corr/": the IS mean, ESS, batch-norm factor, IcePop's out-of-bounds ratio, the rejection fractions
    and both mismatch KLs, as verl names them)."""
    from verl.protocol import DataProto

    reject = None
    if rollout_rs is not None:
        if rollout_rs_threshold is None:
            raise ValueError("rollout_rs_threshold must be given with rollout_rs")
        names = list(dict.fromkeys(o.strip() for o in rollout_rs.split(",") if o.strip()))
        specs = [p.strip() for p in str(rollout_rs_threshold).split(",") if p.strip()]
        if len(specs) == 1:
            specs = specs * len(names)
        if len(specs) != len(names):
            raise ValueError(f"rollout_rs_threshold needs one threshold or one per option ({len(names)})")
        reject = {}
        for name, spec in zip(names, specs, strict=True):
            low, high = _verl_pair(spec, "rollout_rs_threshold")
            reject[name] = (low, high) if low is not None else high
    low = None
    high = 2.0
    mode = "truncate"
    if rollout_is is not None and rollout_is_threshold is not None:
        low, high = _verl_pair(rollout_is_threshold, "rollout_is_threshold")
        mode = "mask" if low is not None else "truncate"
    rc = mk.rollout_correction(
        old_log_prob.detach(),
        rollout_log_prob,
        response_mask,
        level=rollout_is if rollout_is is not None else "token",
        mode=mode,
        low=low,
        high=high,
        batch_normalize=bool(rollout_is_batch_normalize) and rollout_is is not None,
        reject=reject,
    )
    m = rc.metrics
    shared = _ROLLOUT_METRICS if rollout_is is not None else {"kl_k1": "kl", "kl_k3": "k3_kl"}
    metrics = {f"rollout_corr/{verl}": getattr(m, ours).item() for ours, verl in shared.items()}
    if rollout_is is not None and rollout_is_batch_normalize:
        metrics["rollout_corr/rollout_is_batch_norm_factor"] = m.batch_norm_factor.item()
    if mode == "mask":
        metrics["rollout_corr/rollout_is_oob_ratio"] = m.masked_frac.item()
    if reject is not None:
        metrics["rollout_corr/rollout_rs_masked_fraction"] = m.rejected_token_frac.item()
        metrics["rollout_corr/rollout_rs_seq_masked_fraction"] = m.rejected_seq_frac.item()
    weights = None
    if rollout_is is not None and rollout_is_threshold is not None:
        weights = DataProto.from_dict(tensors={"rollout_is_weights": rc.is_weights.to(old_log_prob.dtype)})
    return weights, rc.mask.to(response_mask.dtype), metrics


def register() -> None:
    """Registers the "moo" advantage estimator and the "moo", "moo_gspo", "moo_cispo", "moo_sapo", "moo_gmpo" policy
    losses with
    verl.trainer.ppo.core_algos. Idempotent: registering again is a no-op."""
    core_algos.register_adv_est(ADV_ESTIMATOR)(compute_moo_advantage)
    for name, fn in _POLICY_LOSS_FNS.items():
        if core_algos.POLICY_LOSS_REGISTRY.get(name) is not fn:
            core_algos.register_policy_loss(name)(fn)
