"""The arguments of the logits ops after the logits themselves, declared once (see moo_kernels._spec); the loss
from logits takes the loss's arguments (moo_kernels.ops.loss.spec.LossSpec) too."""

from __future__ import annotations

import torch

from moo_kernels._codes import ENTROPY_AGG
from moo_kernels._spec import Context, Spec, option, spec, tensor

LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# 1 / temperature is finite in float32 (the kernels multiply by it) iff it is below this: float32's largest
# value plus half its last unit, 2^128 - 2^103, rounds to inf.
RECIPROCAL_LIMIT = 2.0**128 - 2.0**103


@spec
class LogitsSpec(Spec):
    tokens: torch.Tensor = tensor(
        "[B, T] int64 or int32 ids in [0, V). On CPU an id out of range raises a ValueError naming the position; on "
        "CUDA it is not checked (a check would synchronise the host): its log-prob is NaN and nothing outside the "
        "row is read.",
        dtypes=(torch.int64, torch.int32), shapes=("BT",), optional=False,
    )  # fmt: skip
    temperature: float = option(
        1.0, "the logits are divided by it, as the sampler did (> 0, with 1 / temperature finite in float32).",
        "float", low=0.0, low_inclusive=False,
    )  # fmt: skip

    def check(self, context: Context) -> LogitsSpec:
        if not 1.0 / self.temperature < RECIPROCAL_LIMIT:
            raise ValueError(
                f"temperature must be at least {1.0 / RECIPROCAL_LIMIT:.3e} (its reciprocal must be finite in "
                f"float32), got {self.temperature!r}"
            )
        V = context.dims["V"]
        tokens = self.tokens
        if tokens.device.type == "cpu" and not torch.compiler.is_compiling():
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= V:
                bad = int(((tokens < 0) | (tokens >= V)).flatten().nonzero()[0])
                b, t = divmod(bad, tokens.shape[1])
                raise ValueError(
                    f"tokens must be in [0, {V}) (the vocabulary of logits); tokens[{b}, {t}] = {int(tokens[b, t])}"
                )
        return self


def logits_spec(logits: torch.Tensor, **kwargs) -> LogitsSpec:
    """The checked logits [B, T, V] (unit stride on V) and their validated tokens and temperature."""
    from moo_kernels import _options as O

    O.check_tensor("logits", logits)
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(f"logits must be float32, bfloat16, float16 or float64, got {logits.dtype}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise ValueError(f"logits is empty (shape {tuple(logits.shape)})")
    if logits.stride(2) != 1:
        raise ValueError(
            f"logits must have unit stride on the vocabulary (last) dimension, got strides {tuple(logits.stride())}; "
            "views that slice B or T (such as full_logits[:, :-1]) are fine"
        )
    B, T, V = logits.shape
    return LogitsSpec.validate(Context({"B": B, "T": T, "V": V}, logits.device, "logits"), **kwargs)


@spec
class EntropySpec(Spec):
    """The entropy terms of the loss from logits (and hidden states): they need each position's entropy, which
    only those entry points compute."""

    entropy_coef: float = option(
        0.0,
        "the entropy bonus: the loss becomes loss - entropy_coef * Hbar, Hbar the entropy aggregated by "
        "entropy_agg; its gradient p_v (E_p[z] - z_v) / temperature reaches the logits in the pass that writes "
        "the log-probs' (TRL's entropy_coef, verl's entropy_coeff). 0: off.",
        "float",
    )
    entropy_agg: str = option(
        "mean",
        '"mean": Hbar = sum(H m\') / max(sum m\', 1) over the tokens of the policy term, m\' the mask where the '
        'entropy mask keeps the token (TRL\'s entropy bonus, whatever the loss type); "loss": H aggregated as the '
        "loss (agg with its normalisers num_tokens / num_sequences / max_len, over the tokens the entropy mask "
        "keeps: verl's entropy_coeff with loss_agg_mode).",
        "str", choices=ENTROPY_AGG,
    )  # fmt: skip
    top_entropy_quantile: float = option(
        1.0,
        "rho in [0, 1] (TRL's top_entropy_quantile, \"Beyond the 80/20 rule\"): only the active tokens whose "
        "entropy is >= the (1 - rho) quantile of the active tokens' entropies (torch.quantile's linear "
        "interpolation) keep their policy term (the KL term and the normaliser count every token); 1: off. The "
        "op computes the quantile over this batch (a second read of the logits); with several ranks pass "
        "entropy_threshold from moo_kernels.distributed.entropy_quantile instead.",
        "float", low=0.0,
    )  # fmt: skip
    entropy_threshold: float | None = option(
        None,
        "a precomputed entropy threshold: tokens with entropy below it lose their policy term (as "
        "top_entropy_quantile, with the threshold given). None: off.",
        "float", optional=True,
    )  # fmt: skip

    def check(self, context: Context) -> EntropySpec:
        if self.top_entropy_quantile > 1.0:
            raise ValueError(f"top_entropy_quantile must be in [0, 1], got {self.top_entropy_quantile}")
        if self.entropy_threshold is not None and self.top_entropy_quantile < 1.0:
            raise ValueError(
                "pass top_entropy_quantile (the op computes the threshold) or entropy_threshold (a precomputed "
                "one), not both"
            )
        return self

    def active(self) -> bool:
        """Whether any entropy term is on (the loss then reads each position's entropy first)."""
        return self.entropy_coef != 0.0 or self.top_entropy_quantile < 1.0 or self.entropy_threshold is not None


def entropy_spec(**kwargs) -> EntropySpec:
    return EntropySpec.validate(Context({}, None, "logits"), **kwargs)
