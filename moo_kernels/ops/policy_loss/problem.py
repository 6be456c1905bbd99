"""The canonical, validated form of one policy-loss call, shared by the three backends."""

from __future__ import annotations

from typing import NamedTuple

import torch

MODE_CODES = {"clip": 0, "gspo": 1, "cispo": 2, "reinforce": 3}
AGG_CODES = {"token-mean": 0, "seq-mean-token-mean": 1, "seq-mean-token-sum": 2, "seq-mean-token-sum-norm": 3}
KL_CODES = {"k1": 1, "k2": 2, "k3": 3}


class PolicyLossProblem(NamedTuple):
    logp: torch.Tensor  # [B, T]
    advantages: torch.Tensor  # [B] or [B, T]
    mask: torch.Tensor  # [B, T] bool or float
    old_logp: torch.Tensor | None
    ref_logp: torch.Tensor | None
    token_advantages: torch.Tensor | None
    is_weights: torch.Tensor | None  # [B] or [B, T]
    offpolicy: torch.Tensor | None  # [B] bool
    beta: float
    kl: str
    clip_low: float
    clip_high: float
    dual_clip: float | None
    ratio_cap: float | None
    mode: str
    offpolicy_gamma: float
    agg: str
    max_len: int | None
    num_tokens: float | None
    write_grad: bool

    def reference_kwargs(self) -> dict:
        return dict(
            old_logp=self.old_logp,
            ref_logp=self.ref_logp,
            beta=self.beta,
            kl=self.kl,
            clip_low=self.clip_low,
            clip_high=self.clip_high,
            dual_clip=self.dual_clip,
            ratio_cap=self.ratio_cap,
            mode=self.mode,
            is_weights=self.is_weights,
            offpolicy=self.offpolicy,
            offpolicy_gamma=self.offpolicy_gamma,
            token_advantages=self.token_advantages,
            agg=self.agg,
            max_len=self.max_len,
            num_tokens=self.num_tokens,
        )

    def norm_const(self) -> float:
        """The constant denominator of token-mean with num_tokens, and of seq-mean-token-sum-norm."""
        if self.agg == "seq-mean-token-sum-norm":
            return float(self.mask.shape[0] * self.max_len)
        return float(self.num_tokens) if self.num_tokens is not None else 0.0
