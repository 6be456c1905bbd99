"""The arguments of the token-level policy loss, declared once (see moo_kernels._spec): every loss entry point
(policy_loss from log-probs, policy_loss_from_logits) takes them after its own inputs."""

from __future__ import annotations

from typing import NamedTuple

import torch

from moo_kernels._codes import AGG, KL, MODE
from moo_kernels._spec import FLOATS, Context, Spec, option, spec, tensor


@spec
class LossSpec(Spec):
    advantages: torch.Tensor = tensor(
        "[B] (broadcast over tokens) or [B, T] advantages.", dtypes=FLOATS, shapes=("BT", "B"), optional=False
    )
    mask: torch.Tensor = tensor(
        "[B, T] bool (any nonzero byte is True), or float (a per-token weight; a token is active where it is "
        "nonzero). Masked tokens influence nothing, whatever NaN or inf their inputs hold, and get a 0 gradient.",
        dtypes=(torch.bool, *FLOATS), shapes=("BT",), optional=False,
    )  # fmt: skip
    old_logp: torch.Tensor | None = tensor(
        "[B, T] log-probs of the policy that sampled (None: on-policy, ratio 1 with gradient 1 whatever logp holds).",
        dtypes=FLOATS, shapes=("BT",),
    )  # fmt: skip
    ref_logp: torch.Tensor | None = tensor(
        "[B, T] reference log-probs; with beta > 0 the loss adds beta * KL (estimator kl).", dtypes=FLOATS,
        shapes=("BT",),
    )  # fmt: skip
    token_advantages: torch.Tensor | None = tensor(
        "[B, T] added to the (broadcast) sequence advantage.", dtypes=FLOATS, shapes=("BT",)
    )
    is_weights: torch.Tensor | None = tensor(
        "[B] or [B, T] behaviour-policy importance weights, multiplied into the policy term.", dtypes=FLOATS,
        shapes=("BT", "B"),
    )  # fmt: skip
    offpolicy: torch.Tensor | None = tensor(
        "[B] bool, sequences generated off-policy: -A f(p), f(p) = p / (p + offpolicy_gamma), no ratio, no clip.",
        dtypes=(torch.bool,), shapes=("B",),
    )  # fmt: skip
    sampling_logp: torch.Tensor | None = tensor(
        "[B, T] the sampler's log-probs, for offpolicy_mask_threshold (None: old_logp, as TRL).", dtypes=FLOATS,
        shapes=("BT",),
    )  # fmt: skip
    policy_mask: torch.Tensor | None = tensor(
        "[B, T] bool: where False, an active token's policy term and its gradient are 0 (the KL term, the "
        "normaliser and the metrics' means still count it), as TRL's entropy mask (top_entropy_quantile).",
        dtypes=(torch.bool,), shapes=("BT",),
    )  # fmt: skip
    offpolicy_mask_threshold: float | None = option(
        None,
        "off-policy sequence masking (DeepSeek-V3.2; TRL's off_policy_mask_threshold): a token keeps its policy "
        "term when its advantage is >= 0 or its sequence's mean over active tokens of sampling_logp - logp (NaN "
        "counts 0; weighted by a float mask; over max(sum m, 1)) is <= this; otherwise the policy term and its "
        "gradient are 0 (the KL term stays). None: off.",
        "float",
        optional=True,
    )
    beta: float = option(0.0, "weight of the KL term (> 0 needs ref_logp).", "float", low=0.0)
    kl: str = option(
        "k3",
        'the KL estimator of u = logp - ref (verl\'s kl_penalty names): "k1" u, "k2" u^2 / 2, "k3" exp(-u) + u - 1 '
        '(u clamped to +-20), "abs" |u|, "low_var_kl" k3 clamped to at most 10 (no gradient where clamped); '
        '"k1+", "k3+", "low_var_kl+", "abs+": the value of that estimator with the gradient of k2 (straight-'
        "through).",
        "str",
        choices=KL,
    )
    kl_bias_correction: bool = option(
        False,
        "multiply the KL term by the token's importance ratio to old_logp (differentiable; 1 with gradient 1 "
        "on-policy), as TRL's use_bias_correction_kl; kl_mean reports the corrected term. Not with mode "
        '"gspo" (a ValueError: TRL differentiates the sequence ratio through every token of the sequence, which '
        "needs a per-sequence sum of the KL terms the kernels do not have yet).",
        "bool",
    )
    clip_low: float = option(0.2, "the ratio is clipped to [1 - clip_low, 1 + clip_high].", "float", low=0.0, below=1.0)
    clip_high: float | None = option(
        None, "defaults to clip_low; larger is DAPO clip-higher.", "float", optional=True, low=0.0
    )
    dual_clip: float | None = option(
        None, "c > 1 bounds the loss of negative-advantage tokens by -c A.", "float", optional=True, low=1.0,
        low_inclusive=False,
    )  # fmt: skip
    ratio_cap: float | None = option(
        None, "delta > 1 + clip_high: clamps the ratio from above before the min (two-sided clipping).", "float",
        optional=True, low=1.0, low_inclusive=False,
    )  # fmt: skip
    mode: str = option(
        "clip",
        '"clip" (PPO / GRPO), "cispo" (-sg(clamp(ratio)) A logp), "gspo" (sequence-level ratio exp(mean of '
        'logp - old_logp over the sequence\'s active tokens)), "reinforce" (-A logp), "sapo" (-A sigmoid(tau '
        "(ratio - 1)) 4 / tau, tau = sapo_tau_pos where A > 0, else sapo_tau_neg: SAPO's soft gate, no clip), "
        '"gmpo" (-mean(A) exp(mean of the sign-clipped log-ratio) per sequence: verl\'s geo_mean), "vespo" '
        "(-sg(phi(w)) A logp, phi(w) = exp(lambda + k log w - lambda w) of the sequence ratio w (importance "
        "weights included), k / lambda by the sign of A: TRL's vespo).",
        "str", choices=MODE,
    )  # fmt: skip
    vespo_k_pos: float = option(2.0, 'k of mode "vespo" where A >= 0.', "float", low=0.0)
    vespo_lambda_pos: float = option(
        3.0, 'lambda of mode "vespo" where A >= 0 (used as max(lambda, 1e-4), as TRL).', "float", low=0.0
    )
    vespo_k_neg: float = option(3.0, 'k of mode "vespo" where A < 0.', "float", low=0.0)
    vespo_lambda_neg: float = option(
        2.0, 'lambda of mode "vespo" where A < 0 (used as max(lambda, 1e-4), as TRL).', "float", low=0.0
    )
    sapo_tau_pos: float = option(1.0, 'the gate\'s temperature of mode "sapo" where A > 0.', "float", low=0.0,
                                 low_inclusive=False)  # fmt: skip
    sapo_tau_neg: float = option(1.05, 'the gate\'s temperature of mode "sapo" where A <= 0.', "float", low=0.0,
                                 low_inclusive=False)  # fmt: skip
    offpolicy_gamma: float = option(
        0.1, "gamma of the off-policy shaping f(p) = p / (p + gamma).", "float", low=0.0, low_inclusive=False
    )
    agg: str = option(
        "token-mean",
        '"token-mean" sum(l m) / sum(m) (or / num_tokens); "token-sum" sum(l m); "seq-mean-token-mean" and '
        '"seq-mean-token-sum": the mean over the sequences with an active token (or the sum over them / '
        'num_sequences) of sum_t(l m) / sum_t(m), of sum_t(l m); "seq-mean-token-sum-norm" sum(l m) / (B max_len) '
        "(Dr. GRPO; or / (num_sequences max_len)).",
        "str", choices=AGG,
    )  # fmt: skip
    max_len: int | None = option(None, 'the constant length of "seq-mean-token-sum-norm".', "int", optional=True, low=1)
    num_tokens: float | None = option(
        None,
        'the global active-token count for "token-mean" (all micro-batches and ranks of the step), so that '
        "data-parallel ranks and gradient-accumulation micro-batches agree.",
        "float", optional=True, low=0.0, low_inclusive=False,
    )  # fmt: skip
    num_sequences: float | None = option(
        None,
        'the global count of sequences with an active token for the seq-mean aggregations (all micro-batches and '
        "ranks of the step, moo_kernels.distributed.global_sequence_count), as num_tokens is for token-mean; "
        'it replaces B in "seq-mean-token-sum-norm".',
        "float", optional=True, low=0.0, low_inclusive=False,
    )  # fmt: skip

    def check(self, context: Context) -> LossSpec:
        if self.kl_bias_correction and self.mode == "gspo":
            raise ValueError(
                'kl_bias_correction is not supported with mode="gspo" (TRL differentiates the sequence ratio '
                "through every token); use it with the token-level modes"
            )
        if self.sampling_logp is not None and self.offpolicy_mask_threshold is None:
            raise ValueError("sampling_logp is read by offpolicy_mask_threshold only: pass the threshold")
        if self.beta > 0 and self.ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp (the reference policy's log-probs)")
        clip_high = self.clip_low if self.clip_high is None else self.clip_high
        if self.ratio_cap is not None and not self.ratio_cap > 1.0 + clip_high:
            raise ValueError(f"ratio_cap must be > 1 + clip_high = {1.0 + clip_high}, got {self.ratio_cap}")
        if self.agg == "seq-mean-token-sum-norm" and self.max_len is None:
            raise ValueError("agg='seq-mean-token-sum-norm' needs max_len (the constant length to divide by)")
        if self.num_tokens is not None and self.agg != "token-mean":
            raise ValueError(f"num_tokens is the normaliser of agg='token-mean'; agg={self.agg!r} does not use it")
        if self.num_sequences is not None and not self.agg.startswith("seq-mean"):
            raise ValueError(f"num_sequences is the normaliser of the seq-mean aggregations; agg={self.agg!r} does "
                             "not use it")  # fmt: skip
        self.clip_high = clip_high
        return self


def loss_spec(shape: tuple[int, int], device: torch.device, primary: str, **kwargs) -> LossSpec:
    """The validated loss arguments of a [B, T] = shape batch on device (primary: the name of the input whose
    shape and device they must match, for the error messages)."""
    B, T = shape
    return LossSpec.validate(Context({"B": B, "T": T}, device, primary), **kwargs)


class PolicyLossMetrics(NamedTuple):
    """0-dim tensors computed inside the kernel (no host synchronisation), over active tokens.

    pg_loss: the aggregated policy term (the loss without the KL term).
    kl_mean: mean KL estimate to the reference (0 without ref_logp).
    clip_frac: share of tokens where the clipped term was strictly the larger loss (its gradient is cut);
        for "cispo", where the ratio weight was clipped; for "gmpo", where the sign-clip cut the log-ratio
        (its clip_frac_low / clip_frac_high: log-ratio outside [-clip_low, clip_high] with A < 0 / A > 0, as verl).
    clip_frac_low / clip_frac_high: ratio below 1 - clip_low with A < 0 / above 1 + clip_high with A > 0.
    dual_clip_frac: share of tokens (A < 0) bounded by the dual clip.
    ratio_mean, ratio_min, ratio_max: importance ratio statistics (the sequence ratio for "gspo" and "gmpo", the
        sequence weight w for "vespo").
    ppo_kl: mean of old_logp - logp.
    active_tokens: sum of the mask.
    masked_frac: share of tokens whose policy term was dropped (offpolicy_mask_threshold, policy_mask).
    """

    pg_loss: torch.Tensor
    kl_mean: torch.Tensor
    clip_frac: torch.Tensor
    clip_frac_low: torch.Tensor
    clip_frac_high: torch.Tensor
    dual_clip_frac: torch.Tensor
    ratio_mean: torch.Tensor
    ratio_min: torch.Tensor
    ratio_max: torch.Tensor
    ppo_kl: torch.Tensor
    active_tokens: torch.Tensor
    masked_frac: torch.Tensor
