from moo_kernels.ops.hidden.op import policy_loss_from_hidden, token_logprobs_from_hidden

__all__ = ["policy_loss_from_hidden", "token_logprobs_from_hidden"]
