"""TRL integration: a GRPOTrainer whose reward functions are objectives of moo_kernels' advantage op.

    from moo_kernels.integrations.trl import MooGRPOConfig, MooGRPOTrainer

    args = MooGRPOConfig(output_dir="out", num_generations=8, moo_std_floor=[0.0, 0.01],
                         moo_gate_funcs=["format_ok"], moo_infeasible_advantage=-1.0)
    trainer = MooGRPOTrainer(model, reward_funcs=[correct, concise, format_ok], args=args, train_dataset=ds)
    trainer.train()

What changes against TRL's GRPOTrainer (tested with the TRL version pinned in pyproject.toml):
- the advantages: every reward function is one objective column (or a gate, see `moo_gate_funcs` and
  `moo_reward_gates`), and `moo_kernels.multi_objective_advantages` turns the gathered [N, K] rewards into
  the advantages, with every option of the op set from the config (`moo_*` fields). TRL's
  `reward_weights` are the objective weights; TRL's `scale_rewards` "batch" / "none" become the op's `scale`
  (unless `moo_scale` is set; "group" is the z-score itself), and `multi_objective_aggregation=
  "normalize_then_sum"` is `moo_weighting="fixed"` with `moo_batch_normalize` (TRL's default sum_then_normalize
  is `moo_weighting="scalarize"`; the moo default is "fixed"). The completion lengths reach the op where its
  options read them (`moo_estimator="opo"`, and the batch statistics of batch_normalize, scale="batch" and
  reinforce_plus_plus_baseline, token-weighted). A reward function returning None gives NaN (as in TRL), left out
  of that objective's statistics (`moo_nan_policy="ignore"`); a completion with no objective reward at all gets
  advantage 0.
- the loss (unless `moo_policy_loss=False`): `moo_kernels.policy_loss` on TRL's per-token log-probs,
  with TRL's `epsilon` / `epsilon_high` (clip_low / clip_high), `delta` (ratio_cap), `beta` (k3 KL to the
  reference model TRL loads; `moo_kl` picks another estimator), `off_policy_mask_threshold`
  (offpolicy_mask_threshold, with vLLM's sampling log-probs when TRL has them), `use_bias_correction_kl`
  (kl_bias_correction; token-level importance sampling only), vLLM importance-sampling ratios (is_weights,
  computed by moo_kernels.rollout_correction from TRL's vllm_importance_sampling_mode / clip_min / clip_max),
  `top_entropy_quantile` (policy_mask = TRL's get_high_entropy_mask over every process), the entropy bonus
  `entropy_coef` and TRL's adaptive controller of it (`use_adaptive_entropy`: the coefficient stays TRL's
  bookkeeping, updated at each optimiser step as TRL does) and the MoE router's aux loss
  (`router_aux_loss_coef`); `loss_type` chooses the aggregation: "grpo" -> seq-mean-token-mean, "bnpo" -> local
  token-mean, "dr_grpo" -> seq-mean-token-sum-norm with max_completion_length, "dapo" -> token-mean over the
  global token count; "sapo" -> mode "sapo" (sapo_temperature_pos / neg) with seq-mean-token-mean (token-level
  importance sampling); "vespo" -> mode "vespo" (vespo_k_pos / lambda_pos / k_neg / lambda_neg, the vLLM ratios
  inside its gamma weights) with the global token count; "luspo" -> seq-mean-token-sum over the B sequences
  (mode "gspo" with importance_sampling_level="sequence", as TRL recommends).

Overridden: `_calculate_rewards` (keeps the gathered reward matrix), `_generate_and_score_completions`
(replaces the advantages TRL computed, and their logged copy, and the vLLM importance-sampling ratio) and
`_compute_loss`. Generation, reward evaluation, reference / old log-probs, batching and logging stay TRL's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import GRPOConfig, GRPOTrainer

import moo_kernels as mk
from moo_kernels import _options as O
from moo_kernels._codes import AGG, ESTIMATOR, KL, MODE, SCALE
from moo_kernels.ops.advantages.spec import OPTION_NAMES, AdvantageSpec

_DEFAULT = AdvantageSpec.defaults()  # the op's defaults are the config's (one declaration)

# TRL loss_type -> the policy_loss aggregation of the same normalisation.
_AGG_OF_LOSS_TYPE = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
    "dapo": "token-mean",
    "sapo": "seq-mean-token-mean",
    "vespo": "token-mean",
    "luspo": "seq-mean-token-sum",
}
# the loss types normalised by the generation batch's token count (TRL's num_items_in_batch)
_GLOBAL_TOKEN_LOSS_TYPES = ("dapo", "vespo")
# TRL's vllm_importance_sampling_mode -> moo_kernels.rollout_correction's level and mode
_ROLLOUT_OF_IS_MODE = {
    "token_truncate": dict(level="token", mode="truncate"),
    "token_mask": dict(level="token", mode="mask"),
    "sequence_truncate": dict(level="sequence", mode="truncate"),
    "sequence_mask": dict(level="sequence", mode="mask"),
}
# Inputs of TRL's _get_per_token_logps_and_entropies that _generate_and_score_completions may provide.
_FORWARD_KEYS = (
    "pixel_values",
    "image_grid_thw",
    "num_images",
    "pixel_attention_mask",
    "spatial_shapes",
    "num_tiles",
    "image_sizes",
    "token_type_ids",
    "mm_token_type_ids",
    "image_position_ids",
)


@dataclass
class MooGRPOConfig(GRPOConfig):
    """GRPOConfig plus the options of moo_kernels' advantage op and policy loss (fields `moo_*`).

    Every `moo_<name>` advantage option is the op's option `<name>` (`moo_kernels.multi_objective_advantages`
    documents their meaning) with the op's default, except `moo_nan_policy` ("ignore", as TRL treats a None
    reward). The weights are TRL's `reward_weights`.
    """

    moo_normalize: str = field(
        default=_DEFAULT["normalize"], metadata={"help": "zscore, center, rloo or none (per objective)."}
    )
    moo_std: str = field(default=_DEFAULT["std"], metadata={"help": "unbiased or population standard deviation."})
    moo_weighting: str = field(
        default=_DEFAULT["weighting"],
        metadata={"help": "fixed (GDPO, the default), scalarize (TRL's sum_then_normalize) or variance (DVAO)."},
    )
    moo_estimator: str | None = field(
        default=_DEFAULT["estimator"],
        metadata={"help": "verl's estimator names (grpo, dr_grpo, rloo, grpo_passk, opo, gpg, "
                  "reinforce_plus_plus_baseline, loo_std) instead of moo_normalize; opo and the token-weighted "
                  "batch statistics read the completion lengths."},
    )  # fmt: skip
    moo_scale: str | None = field(
        default=_DEFAULT["scale"],
        metadata={"help": "group, batch or none (None: from TRL's scale_rewards)."},
    )
    moo_batch_normalize: bool = field(
        default=_DEFAULT["batch_normalize"], metadata={"help": "Whiten the advantages over the batch."}
    )
    moo_eps: float = field(default=_DEFAULT["eps"], metadata={"help": "Added to the std in zscore."})
    moo_std_floor: list[float] | None = field(
        default=None,
        metadata={
            "help": "Floor on each objective's std in zscore (reward units): one number for every objective, or "
            "one per objective (reward function that is not a gate)."
        },
    )
    moo_gate_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Names of reward functions that are feasibility gates, not objectives: a completion passes "
            "when the output is > moo_gate_threshold (None fails)."
        },
    )
    moo_gate_threshold: float = field(default=0.5, metadata={"help": "A gate passes when its reward is above this."})
    moo_reward_gates: dict | str | None = field(
        default=None,
        metadata={
            "help": "Conditional rewards: {objective function name: gate function name} (or its JSON). Where the "
            "gate fails, the objective's reward is replaced by moo_gated_value. A gate function named here is "
            "not an objective."
        },
    )
    moo_gated_value: float = field(
        default=_DEFAULT["gated_value"], metadata={"help": "Reward of an objective whose gate failed."}
    )
    moo_infeasible_advantage: float = field(
        default=_DEFAULT["infeasible_advantage"], metadata={"help": "Advantage of an infeasible sample."}
    )
    moo_min_feasible: int = field(
        default=_DEFAULT["min_feasible"], metadata={"help": "Reject groups with fewer feasible samples."}
    )
    moo_drop_zero_variance: bool = field(
        default=_DEFAULT["drop_zero_variance"], metadata={"help": "Reject groups with constant reward."}
    )
    moo_positive_scale: float = field(
        default=_DEFAULT["positive_scale"], metadata={"help": "Multiplies positive advantages."}
    )
    moo_negative_scale: float = field(
        default=_DEFAULT["negative_scale"], metadata={"help": "Multiplies negative advantages."}
    )
    moo_clip: float | None = field(default=_DEFAULT["clip"], metadata={"help": "Bound on |advantage|."})
    moo_nan_policy: str = field(default="ignore", metadata={"help": "ignore (None rewards) or raise."})

    moo_policy_loss: bool = field(
        default=True, metadata={"help": "Use moo_kernels.policy_loss (False: TRL's own loss with moo advantages)."}
    )
    moo_loss_mode: str | None = field(
        default=None,
        metadata={"help": "a policy_loss mode (None: from loss_type, gspo for importance_sampling_level='sequence')."},
    )
    moo_loss_agg: str | None = field(
        default=None, metadata={"help": "policy_loss agg (None: from loss_type; token-mean uses the global count)."}
    )
    moo_kl: str = field(default="k3", metadata={"help": "KL estimator of the beta term: k1, k2 or k3."})
    moo_dual_clip: float | None = field(default=None, metadata={"help": "Dual-clip constant c > 1 for A < 0."})
    moo_fused_linear: bool = field(
        default=False,
        metadata={"help": "The loss from the backbone's last hidden states and the lm_head (policy_loss_from_hidden; "
                  "old / reference log-probs by token_logprobs_from_hidden): the logits never exist beyond one tile."},
    )  # fmt: skip

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.moo_reward_gates, str):
            self.moo_reward_gates = json.loads(self.moo_reward_gates)
        O.choice("moo_normalize", self.moo_normalize, O.NORMALIZE)
        O.choice("moo_std", self.moo_std, O.STD)
        O.choice("moo_weighting", self.moo_weighting, O.WEIGHTING)
        O.choice("moo_nan_policy", self.moo_nan_policy, O.NAN_POLICY)
        if self.moo_estimator is not None:
            O.choice("moo_estimator", self.moo_estimator, ESTIMATOR)
            if self.moo_normalize != _DEFAULT["normalize"]:
                raise ValueError("pass moo_estimator or moo_normalize, not both")
        # TRL's scale_rewards: "group" is the z-score itself; "batch" and "none" are the op's scale
        if self.moo_scale is None and self.scale_rewards != "group":
            self.moo_scale = self.scale_rewards
        if self.moo_scale is not None:
            O.choice("moo_scale", self.moo_scale, SCALE)
            method = self.moo_estimator if self.moo_estimator is not None else self.moo_normalize
            if method not in ("zscore", "grpo", "grpo_passk"):
                raise ValueError(
                    f"scale_rewards / moo_scale={self.moo_scale!r} divides the z-score's group-centred rewards: it "
                    f"needs moo_normalize='zscore' or moo_estimator 'grpo' / 'grpo_passk', got {method!r}"
                )
            if self.moo_scale == "batch" and self.moo_weighting != "scalarize":
                raise ValueError(
                    "scale_rewards / moo_scale='batch' divides by the std of the summed reward over the batch "
                    f"(TRL's sum_then_normalize): it needs moo_weighting='scalarize', got {self.moo_weighting!r}"
                )
        # TRL's normalize_then_sum: every objective z-scored in its group, the weighted sum whitened over the batch
        if self.multi_objective_aggregation == "normalize_then_sum":
            if self.moo_weighting != "fixed":
                raise ValueError(
                    "multi_objective_aggregation='normalize_then_sum' is moo_weighting='fixed' with the batch "
                    f"whitening, got moo_weighting={self.moo_weighting!r}"
                )
            self.moo_batch_normalize = True
        O.choice("moo_kl", self.moo_kl, KL)
        if self.moo_loss_mode is not None:
            O.choice("moo_loss_mode", self.moo_loss_mode, MODE)
        if self.moo_loss_agg is not None:
            O.choice("moo_loss_agg", self.moo_loss_agg, AGG)


class MooGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with moo_kernels advantages (reward functions as objectives) and policy loss.

    Takes GRPOTrainer's arguments; `args` should be a MooGRPOConfig (a plain GRPOConfig gets the moo
    defaults). After each generation, `last_moo_result` holds the AdvantageResult of the whole
    (gathered) batch and `last_moo_rewards` the [N, F] reward matrix it was computed from.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, MooGRPOConfig):
            raise TypeError(f"MooGRPOTrainer needs a MooGRPOConfig, got {type(self.args).__name__}")
        a = self.args
        names = list(self.reward_func_names)
        gates = dict(a.moo_reward_gates or {})
        for name in list(a.moo_gate_funcs or []) + list(gates) + list(gates.values()):
            if name not in names:
                raise ValueError(f"{name!r} is not a reward function name; the reward functions are {names}")
        gate_cols = set(a.moo_gate_funcs or []) | set(gates.values())
        self.moo_objectives = [n for n in names if n not in gate_cols]
        if not self.moo_objectives:
            raise ValueError("every reward function is a gate: at least one must be an objective")
        if set(gates) & gate_cols:
            raise ValueError("a reward function cannot be both a gated objective and a gate")
        self._moo_obj_cols = [names.index(n) for n in self.moo_objectives]
        self._moo_gate_cols = [names.index(n) for n in (a.moo_gate_funcs or [])]
        self._moo_reward_gate_cols = [(self.moo_objectives.index(o), names.index(g)) for o, g in gates.items()]
        self._moo_weights = None if a.reward_weights is None else self.reward_weights[self._moo_obj_cols].tolist()
        self.last_moo_rewards = None
        self.last_moo_lengths = None  # [N] completion lengths, when the options read them
        self.last_moo_result = None
        # opo's baseline and the batch statistics (token-weighted, as verl whitens over tokens) read the lengths
        self._moo_reads_lengths = a.moo_estimator == "opo" or (
            a.moo_batch_normalize or a.moo_scale == "batch" or a.moo_estimator == "reinforce_plus_plus_baseline"
        )

        if a.moo_policy_loss:
            unsupported = {
                "use_bias_correction_kl with importance_sampling_level='sequence'": (
                    a.use_bias_correction_kl and self.beta != 0.0 and a.importance_sampling_level == "sequence"
                ),
            }
            if a.moo_fused_linear:
                config = model_config(self.model)
                unsupported["a scaled or soft-capped lm_head with moo_fused_linear"] = any(
                    getattr(config, name, None) not in (None, 1.0)
                    for name in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                                 "logits_scaling")
                )  # fmt: skip
            bad = [k for k, on in unsupported.items() if on]
            if bad:
                raise ValueError(
                    f"moo_policy_loss does not support {bad}; set moo_policy_loss=False to keep TRL's loss"
                )
            if a.moo_loss_agg is None and self.loss_type not in _AGG_OF_LOSS_TYPE:
                raise ValueError(
                    f"loss_type={self.loss_type!r} has no policy_loss aggregation: set moo_loss_agg, or "
                    f"moo_policy_loss=False, or a loss_type among {sorted(_AGG_OF_LOSS_TYPE)}"
                )
            self._moo_agg = a.moo_loss_agg or _AGG_OF_LOSS_TYPE[self.loss_type]
            self._moo_global_tokens = a.moo_loss_agg == "token-mean" or (
                a.moo_loss_agg is None and self.loss_type in _GLOBAL_TOKEN_LOSS_TYPES
            )
            sequence = self.importance_sampling_level == "sequence"
            if self.loss_type == "sapo" and sequence:
                raise ValueError(
                    "moo_policy_loss supports loss_type='sapo' with importance_sampling_level='token' only; set "
                    "moo_policy_loss=False to keep TRL's loss"
                )
            default_mode = self.loss_type if self.loss_type in ("sapo", "vespo") else "gspo" if sequence else "clip"
            self._moo_mode = a.moo_loss_mode or default_mode

    # ---------------------------------------------------------------- advantages

    def moo_advantages(
        self, rewards_per_func: torch.Tensor, group_size: int, lengths: torch.Tensor | None = None
    ) -> mk.AdvantageResult:
        """The op's AdvantageResult for the [N, F] reward matrix (one column per reward function); lengths: the
        [N] completion lengths, passed on where the options read them (opo, token-weighted batch statistics)."""
        a = self.args
        objectives = rewards_per_func[:, self._moo_obj_cols]
        # A completion without any objective reward (every function returned None) takes no part (TRL: 0).
        valid = ~torch.isnan(objectives).all(dim=1)

        def passes(col: int) -> torch.Tensor:
            r = rewards_per_func[:, col]
            return ~torch.isnan(r) & (r > a.moo_gate_threshold)

        gates = torch.stack([passes(c) for c in self._moo_gate_cols], dim=1) if self._moo_gate_cols else None
        reward_gates = None
        if self._moo_reward_gate_cols:
            reward_gates = torch.ones_like(objectives, dtype=torch.bool)
            for k, col in self._moo_reward_gate_cols:
                reward_gates[:, k] = passes(col)
        floor = a.moo_std_floor
        if floor is not None and len(floor) == 1:  # one number for every objective
            floor = floor[0]
        options = {name: getattr(a, f"moo_{name}") for name in OPTION_NAMES}
        if options["estimator"] is not None:
            del options["normalize"]  # the estimator replaces it (the config refused both)
        return mk.multi_objective_advantages(
            objectives,
            group_size=group_size,
            weights=self._moo_weights,
            std_floor=floor,
            valid=valid,
            lengths=lengths if self._moo_reads_lengths else None,
            reward_gates=reward_gates,
            gates=gates,
            **options,
        )

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self.last_moo_rewards = rewards  # gathered over processes: [N_global, F]
        return rewards

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        lengths = None
        if self._moo_reads_lengths:  # the whole (gathered) batch's completion lengths, as the rewards
            lengths = self.accelerator.gather(output["completion_mask"].sum(dim=1))
        self.last_moo_lengths = lengths
        result = self.moo_advantages(self.last_moo_rewards, group_size, lengths)
        self.last_moo_result = result

        if self.args.moo_policy_loss and "importance_sampling_ratio" in output:
            output["importance_sampling_ratio"] = self.moo_importance_sampling_ratio(output)

        local = output["advantages"]
        start = self.accelerator.process_index * local.shape[0]
        output["advantages"] = result.advantages[start : start + local.shape[0]].to(local.dtype)

        # TRL logged its own advantages of the whole batch last: log ours instead.
        n = result.advantages.shape[0]
        logged = self._logs["advantages"]
        for _ in range(min(n, len(logged))):
            logged.pop()
        logged.extend(result.advantages.tolist())
        metrics = self._metrics[mode]
        metrics["moo/accepted_groups"].append(result.group_mask.float().mean().item())
        metrics["moo/signal_samples"].append(result.sample_mask.float().mean().item())
        for k, name in enumerate(self.moo_objectives):
            metrics[f"moo/weight/{name}"].append(result.weights[:, k].float().mean().item())
        return output

    def moo_importance_sampling_ratio(self, output: dict) -> torch.Tensor:
        """TRL's vLLM importance-sampling ratio by moo_kernels.rollout_correction (one fused pass): the old
        log-probs against the sampler's over the completion (and tool) mask, TRL's mode / clip_min / clip_max;
        [B, T] for the token modes, [B, 1] for the sequence modes (TRL's shapes)."""
        mask = output["completion_mask"]
        if "tool_mask" in output:
            mask = mask * output["tool_mask"]
        mode = _ROLLOUT_OF_IS_MODE[self.vllm_importance_sampling_mode]
        weights = mk.rollout_correction(
            output["old_per_token_logps"],
            output["sampling_per_token_logps"],
            mask != 0,
            low=self.vllm_importance_sampling_clip_min,
            high=self.vllm_importance_sampling_clip_max,
            **mode,
        ).is_weights
        return weights[:, :1] if mode["level"] == "sequence" else weights

    # ---------------------------------------------------------------- loss

    def _compute_loss(self, model, inputs):
        if not self.args.moo_policy_loss:
            return super()._compute_loss(model, inputs)
        a = self.args
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        mask = mask.bool()
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1
        options = self._moo_loss_options(inputs, mask, mode, accumulation)
        apply_coef = self._moo_entropy_coef() if self._entropy_bonus_enabled else 0.0
        aux_loss = None
        if a.moo_fused_linear:
            n = completion_ids.size(1)
            hidden, lm_head, aux_loss = self._moo_hidden_states(
                model, input_ids, attention_mask, n, self.aux_loss_enabled
            )
            weight, head = self._moo_head(lm_head)
            threshold = None
            if self.top_entropy_quantile < 1.0:  # the entropies first (no gradient), TRL's quantile over every rank
                with torch.no_grad():
                    _, ent = mk.token_logprobs_from_hidden(hidden.detach(), weight, completion_ids, return_entropy=True,
                                                           **head)  # fmt: skip
                threshold = float(mk.distributed.entropy_quantile(ent, mask, self.top_entropy_quantile))
            # the bonus is a mean over the tokens it acts on, scaled for gradient accumulation only (TRL)
            coef = apply_coef / accumulation if options["num_tokens"] is not None else apply_coef
            loss, m, entropies = mk.policy_loss_from_hidden(
                hidden, weight, completion_ids, inputs["advantages"], mask, return_entropy=True,
                entropy_coef=coef, entropy_threshold=threshold, **head, **options,
            )  # fmt: skip
            entropy_mask = entropies >= threshold if threshold is not None else None
            if options["num_tokens"] is None:
                loss = loss / accumulation
        else:
            per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
                compute_aux_loss=self.aux_loss_enabled, **{key: inputs.get(key) for key in _FORWARD_KEYS},
            )  # fmt: skip
            entropy_mask = None
            if self.top_entropy_quantile < 1.0:  # TRL's threshold over every process
                entropy_mask = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile).bool()
            loss, m = mk.policy_loss(per_token_logps, inputs["advantages"], mask, policy_mask=entropy_mask, **options)
            if options["num_tokens"] is None:
                loss = loss / accumulation
            if self._entropy_bonus_enabled:
                effective = (mask if entropy_mask is None else mask & entropy_mask).to(entropies.dtype)
                entropy = (entropies * effective).sum() / effective.sum().clamp(min=1.0) / accumulation
                loss = loss - apply_coef * entropy
        if self._entropy_bonus_enabled:
            self._moo_entropy_update(entropies.detach(), mask if entropy_mask is None else mask & entropy_mask, mode)
        if self.aux_loss_enabled:  # as TRL adds it, scaled for gradient accumulation
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation

        def mean(x: torch.Tensor) -> float:
            return self.accelerator.gather(x.detach().float().reshape(1)).mean().item()

        metrics = self._metrics[mode]
        if self.beta != 0.0:
            metrics["kl"].append(mean(m.kl_mean))
        metrics["entropy"].append(mean((entropies.detach() * mask).sum() / mask.sum().clamp(min=1)))
        metrics["clip_ratio/low_mean"].append(mean(m.clip_frac_low))
        metrics["clip_ratio/high_mean"].append(mean(m.clip_frac_high))
        metrics["clip_ratio/region_mean"].append(mean(m.clip_frac_low + m.clip_frac_high))
        metrics["moo/ratio_max"].append(mean(m.ratio_max))
        if self.off_policy_mask_threshold is not None or entropy_mask is not None:
            metrics["moo/masked_frac"].append(mean(m.masked_frac))
        if self.aux_loss_enabled:
            metrics["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())
        return loss

    def _moo_loss_options(self, inputs, mask, mode: str, accumulation: int) -> dict[str, Any]:
        """The loss's options from TRL's configuration and the batch (everything but the log-probs / hidden states,
        the advantages, the mask and the entropy terms)."""
        a = self.args
        num_tokens = None
        if self._moo_agg == "token-mean" and self._moo_global_tokens:
            # TRL's "dapo" normaliser: the generation batch's active tokens, per process and accumulation window.
            num_tokens = float(inputs["num_items_in_batch"].clamp(min=1.0)) / self.accelerator.num_processes
            if mode == "train":
                num_tokens = num_tokens * accumulation / self.args.steps_per_generation
        is_weights = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            is_weights = inputs["importance_sampling_ratio"]
            if is_weights.dim() == 2 and is_weights.shape[1] == 1:
                is_weights = is_weights.squeeze(1)  # a sequence's weight ([B]: vespo counts it once)
        return dict(
            old_logp=inputs.get("old_per_token_logps"),
            ref_logp=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            beta=self.beta,
            kl=a.moo_kl,
            kl_bias_correction=bool(a.use_bias_correction_kl) and self.beta != 0.0,
            clip_low=self.epsilon_low,
            clip_high=self.epsilon_high,
            dual_clip=a.moo_dual_clip,
            ratio_cap=a.delta,
            mode=self._moo_mode,
            sapo_tau_pos=a.sapo_temperature_pos,
            sapo_tau_neg=a.sapo_temperature_neg,
            vespo_k_pos=a.vespo_k_pos,
            vespo_lambda_pos=a.vespo_lambda_pos,
            vespo_k_neg=a.vespo_k_neg,
            vespo_lambda_neg=a.vespo_lambda_neg,
            is_weights=is_weights,
            offpolicy_mask_threshold=self.off_policy_mask_threshold,
            sampling_logp=(
                inputs.get("sampling_per_token_logps") if self.off_policy_mask_threshold is not None else None
            ),
            agg=self._moo_agg,
            max_len=self.max_completion_length if self._moo_agg == "seq-mean-token-sum-norm" else None,
            num_tokens=num_tokens,
            num_sequences=float(mask.shape[0]) if self.loss_type == "luspo" and a.moo_loss_agg is None else None,
        )

    # ---------------------------------------------------------------- the fused head (moo_fused_linear)

    def _moo_hidden_states(self, model, input_ids, attention_mask, logits_to_keep: int, aux_loss: bool = False):
        """(the backbone's last hidden states of the positions that predict the last logits_to_keep tokens
        [B, logits_to_keep, D], the lm_head, the MoE router's aux loss or None), as TRL's fused head reads them.
        With aux_loss the whole model runs (its aux loss exactly as TRL gets it, output_router_logits=True) with one
        position of logits, and the hidden states are read from its backbone's output."""
        unwrapped = self.accelerator.unwrap_model(model)
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        with self.accelerator.autocast():
            if aux_loss:
                seen = []
                hook = unwrapped.base_model.register_forward_hook(lambda m, i, out: seen.append(out.last_hidden_state))
                try:
                    out = unwrapped(**inputs, output_router_logits=True, logits_to_keep=1)
                finally:
                    hook.remove()
                last, aux = seen[-1], out.aux_loss
            else:
                last, aux = unwrapped.base_model(**inputs).last_hidden_state, None
        lm_head = unwrapped.get_output_embeddings()
        hidden = last[:, -logits_to_keep - 1 : -1]
        return hidden.to(lm_head.weight.device, lm_head.weight.dtype), lm_head, aux

    def _moo_head(self, lm_head) -> tuple[torch.Tensor, dict[str, Any]]:
        """(the weight, the other head arguments of the hidden-state entries: bias, TRL's temperature, the float32
        head of cast_lm_head_to_fp32)."""
        head_dtype = torch.float32 if self.args.cast_lm_head_to_fp32 else None
        return lm_head.weight, dict(bias=lm_head.bias, temperature=self.temperature, head_dtype=head_dtype)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **kwargs):  # fmt: skip
        """With moo_fused_linear: token_logprobs_from_hidden on the backbone's hidden states (TRL's old / reference
        log-probs, in chunks of batch_size sequences as TRL, the MoE aux loss their mean as TRL); zero where the
        attention mask is (TRL's fused head does so). Otherwise, and for multimodal inputs, TRL's own."""
        fused = self.args.moo_policy_loss and self.args.moo_fused_linear
        if not fused or any(v is not None for v in kwargs.values()):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **kwargs,
            )  # fmt: skip
        batch_size = batch_size or input_ids.size(0)
        logps, entropies, aux_losses = [], [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, att = input_ids[start : start + batch_size], attention_mask[start : start + batch_size]
            hidden, lm_head, aux = self._moo_hidden_states(model, ids, att, logits_to_keep, compute_aux_loss)
            aux_losses.append(aux)
            weight, head = self._moo_head(lm_head)
            lp, ent = mk.token_logprobs_from_hidden(hidden, weight, ids[:, -logits_to_keep:], return_entropy=True,
                                                    **head)  # fmt: skip
            keep = att[:, -logits_to_keep:] != 0
            logps.append(torch.where(keep, lp, torch.zeros_like(lp)))
            entropies.append(torch.where(keep, ent, torch.zeros_like(ent)))
        aux_loss = torch.stack(aux_losses).mean() if compute_aux_loss else None
        return torch.cat(logps), torch.cat(entropies) if compute_entropy else None, aux_loss

    def _moo_entropy_coef(self) -> float:
        """The coefficient of this step's entropy bonus: TRL's entropy_coef, with use_adaptive_entropy only while the
        last optimiser step's entropy over every process was at most entropy_target (TRL's bookkeeping)."""
        if self.use_adaptive_entropy:
            return self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
        return self.entropy_coef

    def _moo_entropy_update(self, entropies, effective, mode: str) -> None:
        """TRL's adaptive controller after the loss: the window's entropy over the tokens the bonus acts on, summed
        over the processes at each optimiser step, moves entropy_coef by entropy_coef_delta toward entropy_target;
        the coefficient is logged at each optimiser step."""
        a = self.args
        if self.use_adaptive_entropy and mode == "train":
            m = effective.to(entropies.dtype)
            stats = torch.stack([(entropies * m).sum(), m.sum()])
            window = self._entropy_window_stats
            self._entropy_window_stats = stats if window is None else window + stats
            if self.accelerator.sync_gradients:
                total = self.accelerator.reduce(self._entropy_window_stats, reduction="sum")
                world = (total[0] / total[1].clamp(min=1.0)).item()
                if world <= a.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + a.entropy_coef_delta, a.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - a.entropy_coef_delta, a.entropy_coef_min)
                self._last_world_entropy = world
                self._entropy_window_stats = None
        if mode == "train" and self.accelerator.sync_gradients:
            self._metrics[mode]["entropy_coef"].append(self.entropy_coef)


def model_config(model):
    """The text configuration of a (possibly multimodal) model."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config
