"""The arguments of rollout_correction after old_logp, declared once (see moo_kernels._spec).

The rejection criteria arrive as a mapping {verl's option name: threshold}; the spec holds them as one float64
tensor `reject` of REJECT_SLOTS thresholds (NaN: the criterion is off), made and checked once per distinct
mapping and device (cached, as the advantage op's weights): a k1 criterion takes two slots, the log of its lower
and upper ratio bounds; the others their upper bound.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch

from moo_kernels import _codes
from moo_kernels import _options as O
from moo_kernels._spec import FLOATS, Context, Spec, cached_tensor, option, spec, tensor

# verl's rejection options, in the order of their slots in `reject`
REJECT_OPTIONS = (
    "token_k1", "token_k2", "token_k3",
    "seq_sum_k1", "seq_sum_k2", "seq_sum_k3",
    "seq_mean_k1", "seq_mean_k2", "seq_mean_k3",
    "seq_max_k2", "seq_max_k3",
)  # fmt: skip
_SLOTS: dict[str, tuple[int, ...]] = {}  # option -> its slots (k1: log lower, log upper; others: upper)
for _name in REJECT_OPTIONS:
    _first = sum(len(s) for s in _SLOTS.values())
    _SLOTS[_name] = (_first, _first + 1) if _name.endswith("k1") else (_first,)
REJECT_SLOTS = sum(len(s) for s in _SLOTS.values())  # 14


@spec
class RolloutSpec(Spec):
    rollout_logp: torch.Tensor = tensor(
        "[B, T] log-probs of the sampled tokens under the rollout (sampling) policy. A NaN at an active token (a "
        "log-prob the sampler did not return) gives that token a log-ratio of 0, as TRL does.",
        dtypes=FLOATS, shapes=("BT",), optional=False,
    )  # fmt: skip
    mask: torch.Tensor = tensor(
        "[B, T] bool, the response tokens; any nonzero byte is true.", dtypes=(torch.bool,), shapes=("BT",),
        optional=False,
    )  # fmt: skip
    level: str = option(
        "token",
        '"token": w_t = exp(d_t); "sequence": every token of a sequence gets exp(sum of d over its active tokens); '
        "d = old_logp - rollout_logp clamped to [-20, 20] (the sum too).",
        "str",
        choices=_codes.IS_LEVEL,
    )
    mode: str = option(
        "truncate",
        '"truncate": clamp the weights into [low, high] (TIS); "mask": weights outside [low, high] become 0 (IcePop).',
        "str",
        choices=_codes.IS_MODE,
    )
    low: float | None = option(
        None, "lower bound of the weights (None: none).", "float", optional=True, low=0.0, low_inclusive=False
    )
    high: float | None = option(
        2.0, "upper bound of the weights (None: none).", "float", optional=True, low=0.0, low_inclusive=False
    )
    batch_normalize: bool = option(
        False,
        "divide the weights by their mean (over the active tokens for level token, over the sequences with an "
        "active token for level sequence), when that mean is > 1e-8 (verl).",
        "bool",
    )
    reject: torch.Tensor | None = tensor(
        "verl's rejection criteria (see below), as REJECT_SLOTS float64 thresholds, NaN where a criterion is off.",
        dtypes=(torch.float64,), shapes=("R",),
    )  # fmt: skip

    def check(self, context: Context) -> RolloutSpec:
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"low must be <= high, got low={self.low}, high={self.high}")
        return self


class RolloutMetrics(NamedTuple):
    """0-dim tensors computed in the same pass (no host synchronisation), over the active tokens of the input
    mask (the weights before batch normalisation).

    weight_mean, weight_max, weight_min: of the weights.
    ess: effective sample size 1 / mean(v^2), v = w_c / (mean(w_c) + 1e-8), w_c the weights clamped to
        [0, high] (verl's).
    truncated_frac: share of the tokens whose weight "truncate" changed.
    masked_frac: share of the tokens whose weight "mask" set to 0.
    batch_norm_factor: the mean the weights were divided by (1 without batch_normalize).
    rejected_token_frac: share of the tokens the rejection criteria removed from the mask.
    rejected_seq_frac: share of the sequences (with an active token) that lost a token to them.
    kl_k1: mean of rollout_logp - old_logp (the mismatch KL, k1).
    kl_k3: mean of exp(d) - d - 1 (k3), d clamped to [-20, 20].
    active_tokens: the number of active tokens.
    """

    weight_mean: torch.Tensor
    weight_max: torch.Tensor
    weight_min: torch.Tensor
    ess: torch.Tensor
    truncated_frac: torch.Tensor
    masked_frac: torch.Tensor
    batch_norm_factor: torch.Tensor
    rejected_token_frac: torch.Tensor
    rejected_seq_frac: torch.Tensor
    kl_k1: torch.Tensor
    kl_k3: torch.Tensor
    active_tokens: torch.Tensor


class RolloutCorrection(NamedTuple):
    """is_weights [B, T] (float32, float64 for float64 log-probs; 0 at inactive tokens): feed policy_loss's
    is_weights. mask [B, T] bool: the input mask without the rejected tokens. metrics: RolloutMetrics."""

    is_weights: torch.Tensor
    mask: torch.Tensor
    metrics: RolloutMetrics


# ---- the rejection criteria ------------------------------------------------------------------------------------

_CACHE: dict[tuple, torch.Tensor] = {}


def reject_thresholds(reject: Mapping | None, device: torch.device) -> torch.Tensor | None:
    """The `reject` tensor of a mapping {option: threshold} (None or {}: None). A k1 criterion takes (lower,
    upper) ratio bounds, or one number x meaning (1 / x, x), as verl; the others one upper bound > 0."""
    if reject is None:
        return None
    if not isinstance(reject, Mapping):
        raise TypeError(f"reject must be a mapping {{option: threshold}}, got {type(reject).__name__}")
    if not reject:
        return None
    key = (tuple(sorted((k, _key(v)) for k, v in reject.items())), device)
    return cached_tensor(_CACHE, key, lambda: _thresholds(reject, device))


def _thresholds(reject: Mapping, device: torch.device) -> torch.Tensor:
    """The REJECT_SLOTS thresholds of a mapping, each checked."""
    values = [math.nan] * REJECT_SLOTS
    for name, threshold in reject.items():
        if name not in _SLOTS:
            raise ValueError(f"reject has an unknown option {name!r} (valid: {', '.join(REJECT_OPTIONS)})")
        if name.endswith("k1"):
            if isinstance(threshold, (tuple, list)):
                if len(threshold) != 2:
                    raise ValueError(f"reject[{name!r}] must be (lower, upper) ratio bounds, got {threshold!r}")
                lo = O.check_number(f"reject[{name!r}][0]", threshold[0], low=0.0, low_inclusive=False)
                hi = O.check_number(f"reject[{name!r}][1]", threshold[1], low=0.0, low_inclusive=False)
            else:
                hi = O.check_number(f"reject[{name!r}]", threshold, low=0.0, low_inclusive=False)
                lo = 1.0 / hi
            if lo > hi:
                raise ValueError(f"reject[{name!r}] must have lower <= upper, got {threshold!r}")
            a, b = _SLOTS[name]
            values[a], values[b] = math.log(lo), math.log(hi)
        else:
            (a,) = _SLOTS[name]
            values[a] = O.check_number(f"reject[{name!r}]", threshold, low=0.0, low_inclusive=False)
    return torch.tensor(values, dtype=torch.float64, device=device)


def _key(v):
    return tuple(float(x) for x in v) if isinstance(v, (tuple, list)) else float(v)


def rollout_spec(old_logp: torch.Tensor, reject: Mapping | None, **kwargs) -> RolloutSpec:
    O.check_float_tensor("old_logp", old_logp)
    if old_logp.dim() != 2:
        raise ValueError(f"old_logp must be [B, T], got shape {tuple(old_logp.shape)}")
    if old_logp.numel() == 0:
        raise ValueError(f"old_logp is empty (shape {tuple(old_logp.shape)})")
    B, T = old_logp.shape
    context = Context({"B": B, "T": T, "R": REJECT_SLOTS}, old_logp.device, "old_logp")
    return RolloutSpec.validate(context, reject=reject_thresholds(reject, old_logp.device), **kwargs)
