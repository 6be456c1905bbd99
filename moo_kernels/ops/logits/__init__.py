"""Log-probs, entropy and the policy loss straight from logits [B, T, V]."""

from moo_kernels.ops.logits.op import policy_loss_from_logits, token_logprobs

__all__ = ["policy_loss_from_logits", "token_logprobs"]
