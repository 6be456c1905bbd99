"""The arguments of the logits ops after the logits themselves, declared once (see moo_kernels._spec); the loss
from logits takes the loss's arguments (moo_kernels.ops.loss.spec.LossSpec) too."""

from __future__ import annotations

import torch

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
