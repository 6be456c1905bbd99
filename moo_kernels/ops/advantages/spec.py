"""The arguments of the advantage op after `rewards`, declared once (see moo_kernels._spec).

AdvantageSpec holds the user's arguments in their canonical form: the weights as a float64 [K] tensor (numbers
and 1-D arrays are converted once and cached per device), gates as [N, M]. Derived holds what a call derives
from them for the kernels, which is not an option: the grouping by group_ids, the number and largest size of
the groups, and whether the weights' values still need the kernels' check. AdvantageSpec.prepare gives both.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from moo_kernels import _codes
from moo_kernels import _options as O
from moo_kernels._spec import FLOATS, Context, Spec, cached_tensor, option, spec, tensor

INTEGERS = tuple(
    d
    for d in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    + tuple(getattr(torch, name) for name in ("uint16", "uint32", "uint64") if hasattr(torch, name))
)
BOOL = (torch.bool,)
LENGTHS = (torch.int32, torch.int64, torch.float32, torch.float64)


@spec
class AdvantageSpec(Spec):
    group_size: int | None = option(
        None, "groups are consecutive runs of this many samples (N must be divisible by it).", "int", optional=True,
        low=1,
    )  # fmt: skip
    group_ids: torch.Tensor | None = tensor(
        "[N] integer group id of each sample, any order, any group sizes; groups are numbered by sorted unique "
        "id. Exactly one of group_size / group_ids. group_ids costs a host synchronisation (to count groups); "
        "group_size is sync-free.",
        dtypes=INTEGERS,
        shapes=("N",),
    )
    weights: torch.Tensor | Sequence[float] | None = tensor(
        "[K] non-negative objective weights (default 1/K each): numbers, a 1-D array or a tensor (a tensor may "
        "require grad).",
        dtypes=FLOATS,
        shapes=("K",),
        optional=False,
    )
    normalize: str = option(
        "zscore",
        'per-objective normalisation inside the group: "zscore" (r - mu) / (sigma + eps), "center" r - mu, '
        '"rloo" leave-one-out baseline n / (n - 1) (r - mu), "none" r.',
        "str",
        choices=_codes.NORMALIZE,
    )
    estimator: str | None = option(
        None,
        "the advantage estimator by its verl name, applied to each objective (to the combined reward under "
        '"scalarize"), instead of normalize: "grpo" (the z-score), "dr_grpo" (r - mu), "rloo" (n / (n - 1) '
        '(r - mu)), "grpo_passk" (only the best sample of a group gets (r_max - r_second) / (sigma + eps); a tie at '
        'the top gives every sample 0), "opo" (r minus the length-weighted mean sum(L r) / sum(L); needs lengths), '
        '"gpg" (r - mu, times N / (samples with a nonzero combined reward) over the contributing samples), '
        '"reinforce_plus_plus_baseline" (r - mu, then whitened over the batch, token-weighted with lengths), '
        '"loo_std" (NeMo-RL: (r - b_j) / (s_j + eps) with the mean b_j and the std s_j of the other samples of '
        "the group; r - b_j where s_j is 0). A group of one gives 0 under every estimator (verl gives it the raw "
        "reward). Passing both estimator and normalize is a ValueError.",
        "str",
        optional=True,
        choices=_codes.ESTIMATOR,
    )
    scale: str | None = option(
        None,
        'what divides the group-centred rewards of the z-score (TRL\'s scale_rewards; for normalize="zscore" and '
        'the estimators "grpo" and "grpo_passk"): "group" (the group\'s std: the default), "batch" (the std of the '
        'combined reward over the batch\'s contributing samples: weighting "scalarize" only, as TRL), "none" '
        "(nothing: Dr. GRPO).",
        "str",
        optional=True,
        choices=_codes.SCALE,
    )
    std: str = option(
        "unbiased", '"unbiased" (n - 1) or "population" (n) standard deviation.', "str", choices=_codes.STD
    )
    weighting: str = option(
        "fixed",
        '"fixed" (the default, GDPO: normalise each objective, then weighted sum, so each objective keeps its '
        'weight\'s share whatever its scale or noise), "scalarize" (weighted sum, then normalise the sum: the TRL / '
        'verl baseline), "variance" (DVAO: per-group weights w_k sigma_gk / sum_l w_l sigma_gl; with "zscore" '
        "this is scalarize's centred weighted sum times one factor per group <= 1: it ranks and signs completions "
        "inside a group exactly as scalarize, and cannot discount a noisy objective).",
        "str",
        choices=_codes.WEIGHTING,
    )
    batch_normalize: bool = option(
        False, "whiten the combined advantage over the contributing samples of the batch.", "bool"
    )
    eps: float = option(1e-6, 'added to the standard deviation in "zscore".', "float", low=0.0)
    std_floor: torch.Tensor | float | Sequence[float] | None = tensor(
        'a floor on each objective\'s standard deviation in "zscore", in reward units: z = (r - mu) / (sigma + '
        "std_floor_k + eps), so an objective whose rewards barely vary inside a group (a tiny tie-breaker) is not "
        "blown up to unit scale. A number (every objective), K numbers or a [K] tensor (a constant: no gradient; "
        'a tensor\'s values are checked with one host synchronisation), >= 0. For weighting "fixed" and '
        '"variance" (where each objective is divided by its own sigma); not for "scalarize" nor the batch '
        "whitening of batch_normalize, which divide combined rewards. Default 0.",
        dtypes=FLOATS,
        shapes=("K",),
    )
    valid: torch.Tensor | None = tensor(
        "[N] bool, samples that take part; others get advantage 0. In every bool input any nonzero byte counts "
        "as true.",
        dtypes=BOOL,
        shapes=("N",),
    )
    lengths: torch.Tensor | None = tensor(
        '[N] response lengths (tokens), >= 0: the weights of "opo"\'s baseline, and of the batch statistic of '
        'batch_normalize, "reinforce_plus_plus_baseline" and scale="batch" (token-weighted, as verl whitens over '
        "tokens). Its values are checked with one host synchronisation. Refused where nothing reads it.",
        dtypes=LENGTHS,
        shapes=("N",),
    )
    reward_gates: torch.Tensor | None = tensor(
        "[N, K] bool, a false gate replaces r_jk by gated_value before any statistic (conditional rewards).",
        dtypes=BOOL,
        shapes=("NK",),
    )
    gated_value: float = option(0.0, "the reward of a closed reward gate.", "float")
    gates: torch.Tensor | None = tensor(
        "[N] or [N, M] bool feasibility checks (rubrics as gates): a sample is feasible when all pass; "
        "statistics use feasible samples only and an infeasible sample gets infeasible_advantage.",
        dtypes=BOOL,
        shapes=("NM",),
    )
    infeasible_advantage: float = option(0.0, "advantage of a valid, infeasible sample in an accepted group.", "float")
    min_feasible: int = option(0, "a group with fewer feasible samples is rejected whole (advantage 0).", "int", low=0)
    drop_zero_variance: bool = option(
        False,
        "reject groups whose combined reward sum_k w_k r_jk does not vary (DAPO dynamic sampling). "
        '"Does not vary" is an exact comparison of the combined rewards, which are computed by the same float64 '
        "operations (a sorted sum over the objectives) on every backend, so every backend rejects the same "
        "groups.",
        "bool",
    )
    positive_scale: float = option(1.0, "multiplies positive advantages (W-REINFORCE, NSR).", "float", low=0.0)
    negative_scale: float = option(1.0, "multiplies negative advantages (W-REINFORCE, NSR).", "float", low=0.0)
    clip: float | None = option(
        None, "bound |advantage| by this value (None: no bound).", "float", optional=True, low=0.0,
        low_inclusive=False,
    )  # fmt: skip
    nan_policy: str = option(
        "raise",
        '"raise" (ValueError naming the sample and objective of a non-finite reward; one host synchronisation) '
        'or "ignore" (a non-finite reward is left out of its objective\'s statistics and contributes 0).',
        "str",
        choices=_codes.NAN_POLICY,
    )

    @classmethod
    def validate(cls, context: Context, **kwargs) -> AdvantageSpec:
        """The canonical spec of the public function's arguments (see prepare)."""
        return cls.prepare(context, **kwargs)[0]

    @classmethod
    def prepare(cls, context: Context, **kwargs) -> tuple[AdvantageSpec, Derived]:
        """The canonical spec of these arguments (context: the dimensions N and K, the rewards' device) and what
        the kernels derive from it. Raises a ValueError / TypeError naming the first bad argument."""
        weights, checked = _weights(kwargs.pop("weights", None), context)
        floor, floor_checked = _std_floor(kwargs.pop("std_floor", None), context)
        for name, x in kwargs.items():  # the tensors' own messages, before their generic checks
            if not isinstance(x, torch.Tensor):
                continue
            if name in _BOOL_TENSORS and x.dtype != torch.bool:
                raise TypeError(f"{name} must be a bool tensor, got {x.dtype}")
            if name == "group_ids":
                if x.is_meta:
                    raise ValueError(
                        "group_ids on the meta device: the number of groups depends on the ids' values; pass "
                        "group_size to get output shapes from meta tensors"
                    )
                if x.dtype not in INTEGERS:
                    raise TypeError(f"group_ids must be an integer tensor, got {x.dtype}")
            if name == "gates":
                n = context.dims["N"]
                gates = x.unsqueeze(1) if x.dim() == 1 else x
                if gates.dim() != 2 or gates.shape[0] != n or gates.shape[1] == 0:
                    raise ValueError(f"gates must have shape ({n},) or ({n}, M) with M >= 1, got {tuple(x.shape)}")
                kwargs[name] = gates  # [N] gates are [N, 1] (replacing a value while iterating is allowed)
                context = context._replace(dims={**context.dims, "M": gates.shape[1]})
        # weights (std_floor) from numbers: already a valid float64 tensor of shape [K] on the device
        known = {name: x for name, x, ok in (("weights", weights, checked), ("std_floor", floor, floor_checked)) if ok}
        given = {
            name: x for name, x, ok in (("weights", weights, checked), ("std_floor", floor, floor_checked)) if not ok
        }
        if kwargs.get("estimator") is not None and "normalize" in kwargs:
            raise ValueError(
                f"pass estimator or normalize, not both (estimator={kwargs['estimator']!r}, "
                f"normalize={kwargs['normalize']!r})"
            )
        values = cls.values(context, dict(kwargs, **given), checked=known)
        if values["lengths"] is not None:
            check_values("lengths", values["lengths"])
        if not floor_checked:  # a std_floor tensor: its dtype, shape and device are checked, now its values
            check_values("std_floor", values["std_floor"])
            values["std_floor"] = values["std_floor"].detach().to(torch.float64)
        canonical = cls.make(values).check(context)
        return canonical, Derived.of(canonical, context.dims["N"], check_weights=not checked)

    def check(self, context: Context) -> AdvantageSpec:
        """Exactly one grouping, a group size that divides N; the weights as float64 (every backend computes
        in float64; the conversion is differentiable)."""
        n = context.dims["N"]
        if (self.group_size is None) == (self.group_ids is None):
            raise ValueError("pass exactly one of group_size or group_ids")
        if self.group_size is not None and n % self.group_size:
            raise ValueError(f"group_size={self.group_size} does not divide the batch of N={n} samples")
        column, batch = resolve(self)
        if self.scale is not None and (self.normalize if self.estimator is None else self.estimator) not in (
            "zscore",
            "grpo",
            "grpo_passk",
        ):
            raise ValueError(
                'scale divides the group-centred rewards of the z-score: it needs normalize="zscore" or estimator '
                f'"grpo" / "grpo_passk", got {_method(self)}'
            )
        if self.scale == "batch" and self.weighting != "scalarize":
            raise ValueError(
                'scale="batch" divides by the std of the combined reward over the batch (TRL\'s scale_rewards="batch" '
                f'with sum_then_normalize): it needs weighting="scalarize", got weighting={self.weighting!r}'
            )
        if self.batch_normalize and self.estimator in ("gpg", "reinforce_plus_plus_baseline"):
            raise ValueError(f"batch_normalize cannot be combined with estimator={self.estimator!r}, which has its "
                             "own batch step")  # fmt: skip
        if self.batch_normalize and self.scale == "batch":
            raise ValueError('batch_normalize cannot be combined with scale="batch"')
        if column == "opo" and self.lengths is None:
            raise ValueError('estimator="opo" weights its baseline by the response lengths: pass lengths')
        if self.lengths is not None and column != "opo" and batch not in ("whiten", "scale"):
            raise ValueError(
                'lengths is read by estimator "opo" and by the batch statistic of batch_normalize, '
                f'"reinforce_plus_plus_baseline" and scale="batch"; nothing reads it with {_method(self)}'
            )
        if self.std_floor is not None:
            if column != "zscore" or self.weighting == "scalarize":
                raise ValueError(
                    'std_floor floors the standard deviation of each objective\'s z-score: it needs normalize="zscore" '
                    f'(or estimator "grpo", scale "group") and weighting "fixed" or "variance", got {_method(self)}, '
                    f"weighting={self.weighting!r}"
                )
        if self.weights.dtype != torch.float64:
            return dataclasses.replace(self, weights=self.weights.to(torch.float64))
        return self

    def checks_values(self, derived: Derived) -> bool:
        """Whether the kernels look for bad values (a non-finite reward under nan_policy="raise", a bad value of a
        weights tensor) and report the first one through a status word, which the host then reads."""
        return self.nan_policy == "raise" or derived.check_weights


_BOOL_TENSORS = tuple(name for name, arg in AdvantageSpec.args() if arg.dtypes == BOOL)

# estimator -> (what the kernels apply to each column, the batch step after the combination): moo_kernels._codes
_ESTIMATORS = {
    "grpo": ("zscore", "none"),
    "dr_grpo": ("center", "none"),
    "rloo": ("rloo", "none"),
    "grpo_passk": ("passk", "none"),
    "opo": ("opo", "none"),
    "gpg": ("center", "gpg"),
    "reinforce_plus_plus_baseline": ("center", "whiten"),
    "loo_std": ("loo_std", "none"),
}
_UNSCALED = {"zscore": "center", "passk": "passk_unscaled"}


def resolve(o: AdvantageSpec) -> tuple[str, str]:
    """(column, batch): the normalisation the kernels apply to each column (moo_kernels._codes.COLUMN) and the
    batch step after the combination (BATCH), from normalize / estimator, scale and batch_normalize."""
    column, batch = (o.normalize, "none") if o.estimator is None else _ESTIMATORS[o.estimator]
    if o.scale in ("batch", "none"):
        column = _UNSCALED.get(column, column)
        if o.scale == "batch":
            batch = "scale"
    if o.batch_normalize:
        batch = "whiten"
    return column, batch


def _method(o: AdvantageSpec) -> str:
    return f"estimator={o.estimator!r}" if o.estimator is not None else f"normalize={o.normalize!r}"


# The options a trainer configures (every argument but the grouping and the per-sample tensors), and among them
# the per-objective ones that may be given as tensors ([K]: weights, std_floor).
PER_OBJECTIVE = tuple(name for name, arg in AdvantageSpec.args() if arg.kind == "tensor" and arg.shapes == ("K",))
# the per-sample tensors besides the grouping ([N] or [N, ...]: valid, lengths, reward_gates, gates)
PER_SAMPLE = tuple(
    name
    for name, arg in AdvantageSpec.args()
    if arg.kind == "tensor" and arg.shapes[0].startswith("N") and name != "group_ids"
)
OPTION_NAMES = tuple(name for name, arg in AdvantageSpec.args() if arg.kind != "tensor" and name != "group_size")


@spec
class Derived(Spec):
    """What a call derives from its validated arguments for the kernels: not an option of the public function.
    With group_size nothing here needs the host to wait for the device."""

    group_index: torch.Tensor | None = tensor("[N] int64 group of each sample (group_ids)", dtypes=(torch.int64,),
                                              shapes=("N",))  # fmt: skip
    order: torch.Tensor | None = tensor("[N] int64 samples sorted by group (group_ids)", dtypes=(torch.int64,),
                                        shapes=("N",))  # fmt: skip
    offsets: torch.Tensor | None = tensor("[G + 1] int64 start of each group in order (group_ids)",
                                          dtypes=(torch.int64,), shapes=("G",))  # fmt: skip
    num_groups: int = option(0, "G", "int")
    max_count: int = option(0, "the size of the largest group", "int")
    check_weights: bool = option(False, "a weights tensor whose values the kernels check (>= 0 and finite)", "bool")
    column: str = option("zscore", "what the kernels apply to each column (resolve)", "str", choices=_codes.COLUMN)
    batch: str = option("none", "the batch step after the combination (resolve)", "str", choices=_codes.BATCH)

    @classmethod
    def of(cls, spec: AdvantageSpec, n: int, check_weights: bool) -> Derived:
        column, batch = resolve(spec)
        if spec.group_size is not None:
            return cls(None, None, None, n // spec.group_size, spec.group_size, check_weights, column, batch)
        _, group_index, counts = torch.unique(spec.group_ids, sorted=True, return_inverse=True, return_counts=True)
        order = torch.argsort(group_index, stable=True)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        max_count = n if torch.compiler.is_compiling() else int(counts.max())
        return cls(group_index, order, offsets, counts.numel(), max_count, check_weights, column, batch)

    def sample_groups(self, spec: AdvantageSpec, rewards: torch.Tensor) -> torch.Tensor:
        """[N] int64 group of every sample."""
        if self.group_index is not None:
            return self.group_index
        return torch.arange(rewards.shape[0], device=rewards.device) // spec.group_size


def raise_bad_values(rewards: torch.Tensor, weights: torch.Tensor, bad_reward: int, bad_weight: int) -> None:
    """Turn the first offending flat reward index / weight index a kernel found into an error naming it."""
    k_total = rewards.shape[1]
    if 0 <= bad_weight < weights.numel():
        raise ValueError(f"weights must be finite and >= 0, got weights[{bad_weight}] = {weights[bad_weight].item()}")
    if 0 <= bad_reward < rewards.numel():
        j, k = divmod(bad_reward, k_total)
        raise ValueError(
            f"rewards[{j}, {k}] is {rewards[j, k].item()} (sample {j}, objective {k}); "
            "pass nan_policy='ignore' to leave non-finite rewards out"
        )


# ---- weights -------------------------------------------------------------------------------------------------

_CACHE: dict[tuple, torch.Tensor] = {}


def _cached(key: tuple, make) -> torch.Tensor:
    """The weights (std_floor) tensor cached under key (moo_kernels._spec.cached_tensor)."""
    return cached_tensor(_CACHE, key, make)


def _weights(weights, context: Context) -> tuple[object, bool]:
    """The weights as a [K] float64 tensor and whether its values are known to be valid; a tensor is returned as
    it is (the spec checks its dtype, device and shape, the kernels its values). Weights given as numbers are
    checked once and cached on the device (no copy per call)."""
    k, device = context.dims["K"], context.device
    if weights is None:
        return _cached(
            ("uniform", k, device), lambda: torch.full((k,), 1.0 / k, dtype=torch.float64, device=device)
        ), True
    if isinstance(weights, torch.Tensor):
        return weights, False
    values = _numbers("weights", weights, k, allow_scalar=False)
    return _from_numbers("weights", values, device), True


def _std_floor(floor, context: Context) -> tuple[object, bool]:
    """std_floor as a [K] float64 tensor (None for no floor: absent, 0, or all zeros) and whether its values are
    known to be valid. Numbers are checked once and cached on the device; a tensor is returned as it is (the spec
    checks its dtype, device and shape, check_values its values)."""
    if floor is None or isinstance(floor, torch.Tensor):
        return floor, floor is None
    values = _numbers("std_floor", floor, context.dims["K"], allow_scalar=True)
    if not any(values):
        return None, True
    return _from_numbers("std_floor", values, context.device), True


def _numbers(name: str, value, k: int, allow_scalar: bool) -> tuple:
    """value as a tuple of K numbers: a sequence or 1-D array of K of them, or (allow_scalar) one for every
    objective."""
    if allow_scalar and not isinstance(value, (str, Sequence)) and not hasattr(value, "__array__"):
        O.check_number(name, value, low=0.0)  # a number (a bool or anything else is refused here)
        return (float(value),) * k
    if not isinstance(value, (str, Sequence)) and hasattr(value, "__array__"):
        import numpy as np  # a numpy array or another array-like: numpy is there

        array = np.asarray(value)
        if allow_scalar and array.ndim == 0:
            return _numbers(name, array.item(), k, allow_scalar)
        if array.ndim != 1:
            raise ValueError(f"{name} must be 1-D (one per objective), got shape {array.shape}")
        value = array.tolist()
    if isinstance(value, Sequence) and not isinstance(value, str):
        values = tuple(value)
        if len(values) != k:
            raise ValueError(f"{name} must have {k} entries (one per objective), got {len(values)}")
        return values
    what = "a number, " if allow_scalar else "None, "
    raise TypeError(f"{name} must be {what}a sequence or 1-D array of numbers, or a tensor, got {type(value).__name__}")


def _from_numbers(name: str, values: tuple, device: torch.device) -> torch.Tensor:
    """The [K] float64 tensor of these numbers on the device, cached (each number checked: finite, >= 0)."""
    if not all(type(v) is float for v in values):  # ints, numpy numbers: checked, and keyed as Python floats
        values = tuple(O.check_number(f"{name}[{i}]", v, low=0.0) for i, v in enumerate(values))
    key = (name, values, device)
    if key not in _CACHE:  # validated when it was cached
        for i, v in enumerate(values):
            O.check_number(f"{name}[{i}]", v, low=0.0)
    return _cached(key, lambda: torch.tensor(values, dtype=torch.float64, device=device))


def check_values(name: str, x: torch.Tensor) -> None:
    """The values of a std_floor or lengths tensor: finite and >= 0 (one host synchronisation; an asynchronous
    assertion when traced)."""
    bad = ~((x >= 0) & torch.isfinite(x)) if x.is_floating_point() else x < 0
    if torch.compiler.is_compiling() or x.is_meta:
        if not x.is_meta:
            torch._assert_async(~bad.any(), f"{name} must be finite and >= 0")
        return
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        raise ValueError(f"{name} must be finite and >= 0, got {name}[{i}] = {x[i].item()}")
