"""The advantage step and the loss's normalisers when a batch is spread over torch.distributed ranks.

- multi_objective_advantages_distributed: the samples of one group may live on several ranks (the
  rollout workers hand out completions unevenly). The per-sample inputs are gathered over the process
  group, the advantage op runs once on the concatenated batch (rank 0's samples first), and each rank
  keeps its own slice: the result is bitwise the single-process result on the concatenated batch.
- global_token_count: the active-token count of a whole optimiser step (every micro-batch, every
  rank), for policy_loss(..., num_tokens=...), so that the loss and its gradient do not depend on how
  the batch was split over ranks and gradient-accumulation micro-batches.
- global_sequence_count: the same for the seq-mean aggregations, the number of sequences with an active token,
  for policy_loss(..., num_sequences=...).
- rescale_token_mean: the same normalisation from a count held in a tensor (torch.compile: no host
  synchronisation, no recompilation when the count changes).

Everything here is built on torch.distributed collectives. Without an initialised default process
group (and no process_group given) the functions act on the local batch alone (world size 1).
"""

from __future__ import annotations

import hashlib
import inspect
import numbers
from collections.abc import Sequence

import torch
import torch.distributed as dist

from moo_kernels import _options as O
from moo_kernels.ops.advantages.op import AdvantageResult, multi_objective_advantages
from moo_kernels.ops.advantages.spec import PER_OBJECTIVE, PER_SAMPLE
from moo_kernels.ops.loss.spec import PolicyLossMetrics

__all__ = [
    "entropy_quantile",
    "global_sequence_count",
    "global_token_count",
    "multi_objective_advantages_distributed",
    "rescale_token_mean",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32, torch.int64, torch.bool)


# The options of multi_objective_advantages that are not per-sample tensors, with their defaults: every rank
# must pass the same values (they are fingerprinted in the size exchange).
_OPTION_DEFAULTS = {
    name: p.default
    for name, p in inspect.signature(multi_objective_advantages).parameters.items()
    if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("group_size", "group_ids", *PER_SAMPLE)
}


def _checked_option(name: str, value: object) -> object:
    """Numbers as Python numbers (so that 4, 4.0 and numpy's 4.0 fingerprint alike); others unchanged."""
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, O.np_bool)):
        return float(value)
    return value


def _fingerprint(value: object) -> int:
    """A signed 64-bit fingerprint of an option value (numbers, strings, None, sequences of them)."""

    def canonical(v: object) -> str:
        if v is None or isinstance(v, (bool, O.np_bool)):
            return repr(None if v is None else bool(v))
        if isinstance(v, numbers.Real):
            return "f" + float(v).hex()
        if isinstance(v, str):
            return "s" + repr(v)
        if hasattr(v, "tolist"):  # numpy arrays
            v = v.tolist()
        if isinstance(v, Sequence):
            return "[" + ",".join(canonical(x) for x in v) + "]"
        return "o" + repr(v)

    digest = hashlib.sha256(canonical(value).encode()).digest()
    return int.from_bytes(digest[:8], "little", signed=True)


def _tensor_fingerprint(x: torch.Tensor) -> torch.Tensor:
    """A 0-dim int64 fingerprint of a tensor's float64 values and their order, computed on its device (no host
    synchronisation): a position-weighted sum of the values' bit patterns modulo a prime."""
    prime = 2_147_483_647
    bits = x.detach().to(torch.float64).reshape(-1).contiguous().view(torch.int64)
    low, high = (bits & 0xFFFFFFFF) % prime, (bits >> 32) % prime
    mixed = (low * 1_000_003 + high * 999_983) % prime
    position = torch.arange(1, bits.numel() + 1, device=x.device, dtype=torch.int64) % prime
    return ((mixed * position) % prime).sum() * (bits.numel() + 1) % prime


def _group_and_rank(process_group) -> tuple[int, int]:
    """(world size, rank) of the group; (1, 0) when no process group is in use."""
    if process_group is None and not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(process_group), dist.get_rank(process_group)


def _describe(x: torch.Tensor | None) -> list[int]:
    """[present, dtype code, size of dim 1 (or -1 for 1-D)] of an optional per-sample tensor."""
    if x is None:
        return [0, -1, -1]
    code = _DTYPES.index(x.dtype) if x.dtype in _DTYPES else len(_DTYPES)
    return [1, code, x.shape[1] if x.dim() > 1 else -1]


def _gather_rows(x: torch.Tensor, sizes: list[int], process_group, differentiable: bool) -> torch.Tensor:
    """Concatenate every rank's x (rows may differ per rank; the other dims may not) in rank order.

    x is padded to the largest row count, all_gather'ed, and unpadded. bool travels as uint8 (not every
    backend reduces bool). With differentiable, torch.distributed.nn.functional.all_gather carries the
    gradient back: each rank receives the sum over ranks of the gradient of its own rows.
    """
    n, most = x.shape[0], max(sizes)
    is_bool = x.dtype == torch.bool
    y = x.to(torch.uint8) if is_bool else x
    if n < most:
        y = torch.cat([y, y.new_zeros((most - n,) + tuple(y.shape[1:]))])
    y = y.contiguous()
    if differentiable:
        from torch.distributed.nn.functional import all_gather as all_gather_with_grad

        parts = all_gather_with_grad(y, group=process_group)
    else:
        parts = [torch.empty_like(y) for _ in sizes]
        dist.all_gather(parts, y, group=process_group)
    out = torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])
    return out.bool() if is_bool else out


def multi_objective_advantages_distributed(
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    reward_gates: torch.Tensor | None = None,
    gates: torch.Tensor | None = None,
    process_group: dist.ProcessGroup | None = None,
    **options,
) -> AdvantageResult:
    """multi_objective_advantages over the samples of every rank of a process group.

    Each rank passes its own samples. The batch is their concatenation in rank order (rank 0's samples
    first), so a group may span ranks: with group_size, groups are consecutive runs of the
    concatenated batch (its length must be divisible by group_size); with group_ids, equal ids on
    different ranks are one group. The per-sample tensors (rewards, group_ids, valid, lengths, reward_gates,
    gates) are all_gather'ed (ranks may hold different numbers of samples, zero included: the sizes
    are exchanged first, then the tensors are padded, gathered and unpadded), the op runs once on the
    whole batch on every rank, and each rank keeps its slice. The result is bitwise what
    multi_objective_advantages returns for the concatenated batch in one process.

    Every rank must call this function (it runs collectives), with the same options, objectives (K),
    gate columns and dtypes, and with rewards requiring a gradient on every rank or on none (the backward
    runs a collective). weights and every other option of multi_objective_advantages go through **options
    unchanged (weights are not gathered). All of this is checked in the size exchange: the options and the
    weights are fingerprinted (a weights tensor on its device), and a rank that differs makes every rank
    raise a ValueError that names what differs. Costs one host synchronisation (the size exchange), plus
    the op's own (group_ids, nan_policy="raise"), so call it outside a torch.compile'd region.

    Gradients: when rewards requires grad,
    the gather is torch.distributed.nn.functional.all_gather, whose backward sums over ranks: the
    gradient each rank receives for its rewards is its slice of the gradient of the sum over ranks of
    the losses (the single-process gradient of the whole batch). A loss built from the group-level
    outputs (weights, mean, std: the same on every rank) is then counted once per rank.

    Args:
        rewards: [n] or [n, K] float rewards of this rank's n samples (n may be 0 on some ranks).
        group_size, group_ids ([n] integer): the grouping of the concatenated batch, as in
            multi_objective_advantages (exactly one of the two).
        valid ([n] bool), reward_gates ([n, K] bool), gates ([n] or [n, M] bool), and lengths ([n], in
            **options): this rank's rows.
        process_group: the group to gather over (None: the default group; without an initialised
            default group the call is multi_objective_advantages on the local batch).
        **options: every other argument of multi_objective_advantages (weights, normalize, weighting,
            batch_normalize, ...).

    Returns:
        AdvantageResult whose per-sample fields (advantages, sample_mask) are this rank's [n] slice
        and whose per-group fields (group_mask [G], weights, mean, std [G, K]) cover every group of the
        concatenated batch (equal on all ranks; with group_ids, groups are numbered by sorted id).
        A ValueError of the op (nan_policy="raise") names the sample by its index in the concatenated
        batch.

    Example (every rank):
        >>> out = multi_objective_advantages_distributed(local_rewards, group_ids=local_prompt_ids,
        ...                                              gates=local_rubric_ok, std_floor=0.01)
        >>> loss, metrics = policy_loss(logp, out.advantages, mask, num_tokens=global_token_count(mask))
    """
    O.check_float_tensor("rewards", rewards)
    per_sample = {"valid": valid, "reward_gates": reward_gates, "gates": gates}
    per_sample |= {name: options.pop(name, None) for name in PER_SAMPLE if name not in per_sample}  # lengths
    world, rank = _group_and_rank(process_group)
    if world == 1:
        return multi_objective_advantages(rewards, group_size=group_size, group_ids=group_ids, **per_sample, **options)
    if rewards.dim() not in (1, 2):
        raise ValueError(f"rewards must be [n] or [n, K], got shape {tuple(rewards.shape)}")
    if group_size is not None:
        group_size = O.check_int("group_size", group_size, low=1)
    tensors = {"rewards": rewards, "group_ids": group_ids, **per_sample}
    n = rewards.shape[0]
    for name, x in tensors.items():
        if x is not None:
            O.check_tensor(name, x)
            O.check_same_device(name, x, rewards.device)
            if x.dim() not in (1, 2) or x.shape[0] != n:
                raise ValueError(f"{name} must have this rank's {n} samples as its first dimension, "
                                 f"got shape {tuple(x.shape)}")  # fmt: skip

    # One exchange: every rank's sample count, a description of its tensors, whether it needs a gradient,
    # and a fingerprint of every option and of the weights (all of these must agree).
    differentiable = torch.is_grad_enabled() and rewards.requires_grad
    names = ["rewards dim", "group_size"] + [f"{k} {p}" for k in tensors for p in ("given", "dtype", "dim 1")]
    info = [n, rewards.dim(), group_size if group_size is not None else -1]
    for x in tensors.values():
        info += _describe(x)
    names.append("rewards.requires_grad (with grad enabled)")
    info.append(int(differentiable))
    weights = options.get("weights")
    for name, default in _OPTION_DEFAULTS.items():
        value = options.get(name, default)
        if name in options and not isinstance(value, torch.Tensor):
            value = _checked_option(name, value)
        names.append(name)
        info.append(_fingerprint(value) if not isinstance(value, torch.Tensor) else 0)
    given = {name: options.get(name) for name in PER_OBJECTIVE}  # options a tensor may hold: values fingerprinted
    names += [f"{name} (tensor values)" for name in given] + ["weights.requires_grad"]
    mine = torch.tensor(info + [0] * (len(given) + 1), dtype=torch.int64, device=rewards.device)
    for i, (name, x) in enumerate(given.items()):
        if isinstance(x, torch.Tensor):
            O.check_same_device(name, x, rewards.device)
            mine[len(info) + i] = _tensor_fingerprint(x)
    if isinstance(weights, torch.Tensor):
        mine[-1] = int(weights.requires_grad)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=process_group)
    table = torch.stack(every).tolist()
    sizes = [row[0] for row in table]
    for r, row in enumerate(table):
        if row[1:] != table[0][1:]:
            diff = [name for name, a, b in zip(names, row[1:], table[0][1:], strict=True) if a != b]
            raise ValueError(
                f"ranks 0 and {r} of the process group disagree on: {', '.join(diff)} (every rank must pass the "
                "same options, weights, objectives and gate columns, and need a gradient or not alike)"
            )
    if sum(sizes) == 0:
        raise ValueError("rewards is an empty batch on every rank (N = 0)")

    gathered = {
        name: None if x is None else _gather_rows(x, sizes, process_group, differentiable and name == "rewards")
        for name, x in tensors.items()
    }
    out = multi_objective_advantages(
        gathered.pop("rewards"), group_size=group_size, group_ids=gathered.pop("group_ids"), **gathered, **options
    )
    start = sum(sizes[:rank])
    return out._replace(advantages=out.advantages[start : start + n], sample_mask=out.sample_mask[start : start + n])


def entropy_quantile(
    entropy: torch.Tensor, mask: torch.Tensor, rho: float, process_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """The entropy threshold of TRL's top_entropy_quantile ("Beyond the 80/20 rule") over every rank: the (1 - rho)
    quantile (torch.quantile's linear interpolation) of the entropies of the active tokens of all ranks, so that
    the tokens with entropy >= it are the top rho share of the whole batch, as TRL's get_high_entropy_mask computes
    it. Each rank passes its own [B, T] entropy and mask (bool, or float: nonzero is active; ranks may hold
    different numbers of active tokens, none included). Returns a 0-dim float32 tensor, equal on every rank; +inf
    when no rank has an active token (no token passes). Without an initialised process group: the local quantile.
    One host synchronisation (the exchange of the counts)."""
    O.check_tensor("entropy", entropy)
    O.check_tensor("mask", mask)
    if entropy.shape != mask.shape:
        raise ValueError(f"entropy and mask must have the same shape, got {tuple(entropy.shape)} and "
                         f"{tuple(mask.shape)}")  # fmt: skip
    rho = O.check_number("rho", rho, low=0.0)
    if rho > 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    local = entropy.detach()[mask != 0].float()
    world, _ = _group_and_rank(process_group)
    if world > 1:
        count = torch.tensor([local.numel()], dtype=torch.int64, device=local.device)
        counts = [torch.empty_like(count) for _ in range(world)]
        dist.all_gather(counts, count, group=process_group)
        sizes = [int(c) for c in counts]
        local = _gather_rows(local, sizes, process_group, differentiable=False)
    if local.numel() == 0:
        return torch.full((), float("inf"), dtype=torch.float32, device=entropy.device)
    return torch.quantile(local, 1.0 - rho)


def global_token_count(
    mask: torch.Tensor | Sequence[torch.Tensor],
    process_group: dist.ProcessGroup | None = None,
    *,
    divide_by_world_size: bool = False,
    as_tensor: bool = False,
) -> float | torch.Tensor:
    """The active-token count of a whole optimiser step, summed over every rank (all_reduce SUM).

    Pass it as num_tokens to policy_loss / policy_loss_from_logits (agg="token-mean") on every
    micro-batch: each micro-batch's loss is then sum(l m) / count over its own tokens, and the sum of
    those losses over the micro-batches and ranks of the step is exactly the token mean of the whole
    batch: the loss and its gradient do not depend on how the batch was split.

    Gradient accumulation: count the masks of *all* micro-batches of the step (pass them as a list)
    before the first backward, and sum (do not average) the micro-batch losses: call backward on each
    one as it is.

    Data parallelism: the sum over ranks is what the formula needs, but DDP (and FSDP) *average* the
    gradients over the ranks, dividing the sum by the world size W. divide_by_world_size=True returns
    count / W, which multiplies every rank's loss by W and makes the averaged gradient the full-batch
    gradient. Use False when the gradients are summed (an all_reduce SUM of your own, or one process).

    Args:
        mask: [B, T] bool or float mask (a float mask counts its weights), or a sequence of them (the
            micro-batches of the step on this rank).
        process_group: the ranks to sum over (None: the default group; without an initialised default
            group, this process only).
        divide_by_world_size: divide the count by the group's size (for DDP / FSDP gradient averaging).
        as_tensor: return a 0-dim float64 tensor on the mask's device instead of a Python float: no host
            synchronisation (for rescale_token_mean, or to read it later). The Python float costs one.

    Returns:
        float (or 0-dim tensor). It is 0 when every token of the step is masked on every rank; num_tokens
        must be > 0, so pass max(count, 1) then (the loss is 0 either way).

    Example (every rank, two micro-batches, DDP):
        >>> n = global_token_count([mask_a, mask_b], divide_by_world_size=True)
        >>> with ddp_model.no_sync():
        ...     policy_loss_from_logits(ddp_model(xa), ya, adv_a, mask_a, num_tokens=n)[0].backward()
        >>> policy_loss_from_logits(ddp_model(xb), yb, adv_b, mask_b, num_tokens=n)[0].backward()
    """
    return _global_count(mask, process_group, divide_by_world_size, as_tensor, lambda m: m.sum(dtype=torch.float64))


def global_sequence_count(
    mask: torch.Tensor | Sequence[torch.Tensor],
    process_group: dist.ProcessGroup | None = None,
    *,
    divide_by_world_size: bool = False,
    as_tensor: bool = False,
) -> float | torch.Tensor:
    """The number of sequences with an active token in a whole optimiser step, summed over every rank.

    Pass it as num_sequences to policy_loss / policy_loss_from_logits with agg="seq-mean-token-mean" or
    "seq-mean-token-sum" on every micro-batch: the sum of the micro-batch losses over the micro-batches and
    ranks of the step is then the seq-mean of the whole batch, however it was split (with
    "seq-mean-token-sum-norm", num_sequences replaces B in sum(l m) / (B max_len)). Gradient accumulation and
    data parallelism as for global_token_count: count every micro-batch of the step before the first backward,
    sum the micro-batch losses, and pass divide_by_world_size=True when DDP / FSDP average the gradients.

    Args:
        mask: [B, T] bool or float mask (a row counts when its weights sum to more than 0), or a sequence of them
            (the micro-batches of the step on this rank).
        process_group, divide_by_world_size, as_tensor: as for global_token_count.

    Returns:
        float (or 0-dim float64 tensor). It is 0 when no sequence of the step has an active token; num_sequences
        must be > 0, so pass max(count, 1) then (the loss is 0 either way).

    Example (every rank, two micro-batches, DDP):
        >>> s = global_sequence_count([mask_a, mask_b], divide_by_world_size=True)
        >>> with ddp_model.no_sync():
        ...     policy_loss(logp_a, adv_a, mask_a, agg="seq-mean-token-mean", num_sequences=s)[0].backward()
        >>> policy_loss(logp_b, adv_b, mask_b, agg="seq-mean-token-mean", num_sequences=s)[0].backward()
    """
    return _global_count(
        mask, process_group, divide_by_world_size, as_tensor, lambda m: (m.sum(dim=-1) > 0).sum(dtype=torch.float64)
    )


def _global_count(mask, process_group, divide_by_world_size, as_tensor, count) -> float | torch.Tensor:
    """count(m) summed over the masks of this rank, then over the group's ranks (see global_token_count)."""
    masks = [mask] if isinstance(mask, torch.Tensor) else list(mask)
    if not masks:
        raise ValueError("mask is an empty sequence (no micro-batch)")
    for i, m in enumerate(masks):
        O.check_tensor(f"mask[{i}]" if len(masks) > 1 else "mask", m)
        O.check_same_device(f"mask[{i}]", m, masks[0].device, other="mask[0]")
    divide_by_world_size = O.check_bool("divide_by_world_size", divide_by_world_size)
    as_tensor = O.check_bool("as_tensor", as_tensor)
    total = torch.stack([count(m) for m in masks]).sum()
    world, _ = _group_and_rank(process_group)
    if world > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=process_group)
    if divide_by_world_size:
        total = total / world
    return total if as_tensor else total.item()


def rescale_token_mean(loss: torch.Tensor, metrics: PolicyLossMetrics, num_tokens: torch.Tensor) -> torch.Tensor:
    """A token-mean loss computed with its local normaliser, renormalised by a count held in a tensor.

    policy_loss(..., agg="token-mean", num_tokens=None) divides by the local active-token count
    (metrics.active_tokens); this returns loss * metrics.active_tokens / num_tokens, the loss that
    num_tokens=float(num_tokens) would give (to rounding), with its gradient. Use it under torch.compile:
    num_tokens (from global_token_count(..., as_tensor=True)) stays a tensor, so nothing syncs, and a
    count that changes every step does not recompile the graph (a Python float passed as num_tokens is
    a constant of the compiled graph). Only the loss is renormalised: the metrics stay local.

    Args:
        loss, metrics: the outputs of policy_loss / policy_loss_from_logits with agg="token-mean" and
            num_tokens=None.
        num_tokens: 0-dim tensor, the count to normalise by (> 0).

    Returns:
        0-dim tensor in loss's dtype.
    """
    O.check_tensor("num_tokens", num_tokens)
    if num_tokens.dim() != 0:
        raise ValueError(f"num_tokens must be a 0-dim tensor, got shape {tuple(num_tokens.shape)}")
    scale = metrics.active_tokens.to(torch.float64) / num_tokens.to(device=loss.device, dtype=torch.float64)
    return loss * scale.to(loss.dtype)
