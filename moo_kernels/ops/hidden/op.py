"""The lm_head fused with the log-probs and the loss: the logits z = hidden @ weight.T + bias exist one tile at a time.

Tiles. The [B, T] positions are cut into tiles of at most `chunk_size` positions: whole sequences when a sequence
fits (rows b0:b1, every t), else pieces of one sequence (row b, t0:t1). chunk_size=None takes the largest power of
two with chunk_size x V x (bytes of the head's dtype) <= TILE_BYTES (1 GiB on CUDA, 32 MiB on the CPU), at least
MIN_TILE_ROWS = 256 (every tile's weight-gradient GEMM reads and writes the V x D gradient: a tile of few rows
makes it memory-bound), at most B T. A tile's logits are one GEMM (cuBLAS / the CPU's BLAS through torch), then
the package's logits kernels run on them, then the gradient GEMMs: d hidden = d z @ weight (the tile's rows) and
d weight += d z^T @ hidden, d bias += the column sums of d z, each only when that input requires a gradient (a
frozen head skips the weight GEMM). Tiles run in a fixed order and the weight gradient accumulates in that order:
the results do not depend on anything but the inputs.

The loss (policy_loss_from_hidden): its normaliser depends on the mask only, so a token's d loss / d logp is known
as soon as its log-prob is, and
- one sweep serves the token-level modes ("clip", "cispo", "reinforce", "sapo") without offpolicy_mask_threshold or
  entropy terms: each tile runs the loss from logits (policy_loss_from_logits's kernels) with the batch's
  normaliser (num_tokens = the batch's mask sum for token-mean, num_sequences = its sequences with an active token,
  or B, for the seq-mean aggregations: the caller's values when given), writing d loss / d z over its logits in
  place; three GEMMs per tile. "seq-mean-token-mean" needs a sequence's whole mask in its tile (n_b): it takes this
  path when the tiles hold whole sequences.
- two sweeps serve the rest (the sequence-level modes, the off-policy mask and the entropy terms need every
  log-prob or entropy before any gradient, as does seq-mean-token-mean over pieces of sequences): the first computes
  each tile's log-probs, entropies and softmax statistics; the loss runs on the [B, T] log-probs
  (moo_kernels.policy_loss's kernels, with the entropy mask and bonus of the loss from logits); the second
  recomputes each tile's logits and writes d loss / d z from the log-probs' and entropies' gradients: four GEMMs
  per tile, one more than the one sweep.
The forward computes the gradients; the backward scales them by the incoming gradient (nothing when it is 1).

Memory beyond the inputs, the outputs and the gradients: one tile of logits in the head's dtype (its gradient is
written over it), for a 16-bit weight the float32 accumulator of its gradient (V x D x 4 bytes) and, where the
GEMM cannot accumulate a 16-bit product in float32 itself (the CPU, a torch without out_dtype), the tile's d z in
float32 for that GEMM (chunk_size x V x 4 bytes), with head_dtype=float32 over a 16-bit weight a block of
the weight in float32 (HEAD_BLOCK rows x D x 4 bytes), and O(B T) for the log-probs and statistics.

The mode that computes the head in float32 (head_dtype=torch.float32 over a 16-bit weight: the precision of the
head matters for the importance ratio) converts the hidden tile and HEAD_BLOCK rows of the weight at a time, never
the whole weight.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from moo_kernels import _options as O
from moo_kernels._backend import tracing
from moo_kernels._codes import METRICS, out_dtype
from moo_kernels._spec import with_spec
from moo_kernels.ops.logits.op import (
    loss_on_logprobs,
    run_logits_loss,
    run_token_logprobs,
    run_token_logprobs_backward,
    token_local,
)
from moo_kernels.ops.logits.spec import EntropySpec, LogitsSpec, entropy_spec
from moo_kernels.ops.loss.spec import LossSpec, PolicyLossMetrics, loss_spec

TILE_BYTES = {"cuda": 1 << 30, "cpu": 32 << 20}  # the default tile's logits, in bytes
MIN_TILE_ROWS = 256  # the default tile's least rows: the weight-gradient GEMM (inner size = rows) rewrites V x D
HEAD_BLOCK = 8192  # vocabulary rows of the weight converted at a time by head_dtype=float32
HEAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

Tile = tuple[slice, slice]


# ---- inputs ------------------------------------------------------------------------------------------------


class Head:
    """The checked head: hidden [B, T, D] (a [B * T, D] hidden is viewed so), weight [V, D], bias [V] or None, the
    dtype of the logits (head_dtype), the tiles."""

    def __init__(self, hidden, weight, tokens, bias, head_dtype, chunk_size):
        O.check_tensor("hidden", hidden)
        O.check_tensor("weight", weight)
        O.check_tensor("tokens", tokens)
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        if hidden.dim() == 2 and hidden.shape[0] == B * T:
            hidden = hidden.view(B, T, hidden.shape[1])
        if hidden.dim() != 3 or tuple(hidden.shape[:2]) != (B, T):
            raise ValueError(f"hidden must be [B, T, D] = [{B}, {T}, D] (or [{B * T}, D]) for tokens [{B}, {T}], "
                             f"got shape {tuple(hidden.shape)}")  # fmt: skip
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
            raise ValueError(f"weight must be [V, D] with D = {hidden.shape[2]} (nn.Linear's layout, the lm_head's "
                             f"weight), got shape {tuple(weight.shape)}")  # fmt: skip
        for name, x in (("hidden", hidden), ("weight", weight)):
            if x.dtype not in HEAD_DTYPES:
                raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
        if hidden.dtype != weight.dtype:
            raise TypeError(f"hidden and weight must have one dtype, got {hidden.dtype} and {weight.dtype}")
        O.check_same_device("weight", weight, hidden.device, other="hidden")
        V = weight.shape[0]
        if bias is not None:
            O.check_tensor("bias", bias)
            if tuple(bias.shape) != (V,):
                raise ValueError(f"bias must be [V] = [{V}], got shape {tuple(bias.shape)}")
            if bias.dtype != weight.dtype:
                raise TypeError(f"bias must have the weight's dtype {weight.dtype}, got {bias.dtype}")
            O.check_same_device("bias", bias, hidden.device, other="hidden")
        if head_dtype is not None and head_dtype not in (weight.dtype, torch.float32):
            raise ValueError(f"head_dtype must be None, torch.float32 or the weight's dtype, got {head_dtype}")
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.dtype = head_dtype or weight.dtype
        self.B, self.T, self.D, self.V = B, T, hidden.shape[2], V
        if chunk_size is None:
            per_row = V * torch.empty((), dtype=self.dtype).element_size()
            budget = TILE_BYTES["cuda" if hidden.is_cuda else "cpu"]
            chunk_size = max(2 ** max(0, int(math.log2(max(budget // per_row, 1)))), MIN_TILE_ROWS)
        self.chunk_size = min(O.check_int("chunk_size", chunk_size, low=1), B * T)

    def tiles(self) -> list[Tile]:
        """Whole sequences per tile when one fits, else pieces of one sequence."""
        B, T, n = self.B, self.T, self.chunk_size
        if n >= T:
            rows = n // T
            return [(slice(b, min(b + rows, B)), slice(0, T)) for b in range(0, B, rows)]
        return [(slice(b, b + 1), slice(t, min(t + n, T))) for b in range(B) for t in range(0, T, n)]

    def whole_rows(self) -> bool:
        return self.chunk_size >= self.T

    def rows(self, tile: Tile) -> Tensor:
        """The tile's hidden states, [n, D]."""
        bs, ts = tile
        return self.hidden[bs, ts].reshape(-1, self.D)

    def buffer(self) -> Tensor:
        """The storage of every tile's logits in a sweep, [the largest tile's positions, V] in the head's dtype:
        one allocation per sweep (a fresh one per tile costs its page faults again on the CPU)."""
        bs, ts = self.tiles()[0]
        n = (bs.stop - bs.start) * (ts.stop - ts.start)
        return torch.empty((n, self.V), dtype=self.dtype, device=self.hidden.device)

    def logits(self, h: Tensor, buffer: Tensor) -> Tensor:
        """z = h @ weight.T + bias, [n, V] in the head's dtype, written into the first n rows of buffer (float32
        over a 16-bit weight: by blocks of the weight's rows)."""
        w, b = self.weight, self.bias
        z = buffer[: h.shape[0]]
        if self.dtype == w.dtype:
            if b is None:
                return torch.mm(h, w.t(), out=z)
            return torch.addmm(b, h, w.t(), out=z)
        h32 = h.to(self.dtype)
        for v0, v1 in _blocks(self.V):
            bias = b[v0:v1].to(self.dtype) if b is not None else None
            z[:, v0:v1] = torch.nn.functional.linear(h32, w[v0:v1].to(self.dtype), bias)
        return z


def _blocks(V: int) -> Iterator[tuple[int, int]]:
    for v0 in range(0, V, HEAD_BLOCK):
        yield v0, min(v0 + HEAD_BLOCK, V)


class Grads:
    """The gradients of hidden, weight and bias (None where not wanted), accumulated tile by tile in a fixed order:
    the weight's and bias's in float32 for 16-bit weights, in their dtype otherwise."""

    def __init__(self, head: Head, want: tuple[bool, bool, bool], start: tuple | None = None):
        """start: gradients (None: zero) the sweep adds to, the weight's and bias's taken into the accumulators."""
        self.head = head
        w = head.weight
        acc = torch.float32 if w.dtype in (torch.bfloat16, torch.float16) else w.dtype
        self.adding = start is not None
        if start is None:
            self.hidden = torch.empty_like(head.hidden) if want[0] else None
            self.weight = torch.empty(w.shape, dtype=acc, device=w.device) if want[1] else None
        else:
            gh, gw, gb = start
            self.hidden = (gh if gh is not None else torch.zeros_like(head.hidden)) if want[0] else None
            self.weight = (gw.to(acc) if gw is not None else torch.zeros(w.shape, dtype=acc, device=w.device)
                           ) if want[1] else None  # fmt: skip
        bias = want[2] and head.bias is not None
        self.bias = torch.zeros(head.V, dtype=acc, device=w.device) if bias else None
        if bias and start is not None and start[2] is not None:
            self.bias += start[2]
        self.first = not self.adding  # the first tile writes the weight gradient, the others add to it

    def add(self, tile: Tile, h: Tensor, gz: Tensor) -> None:
        """The tile's share from d loss / d z, gz [n, V] in the head's dtype."""
        head = self.head
        w = head.weight
        if self.hidden is not None:
            bs, ts = tile
            if gz.dtype == w.dtype:
                gh = gz @ w
            else:  # float32 head over a 16-bit weight: by blocks of the weight's rows, in float32
                gh = torch.zeros((gz.shape[0], head.D), dtype=gz.dtype, device=gz.device)
                for v0, v1 in _blocks(head.V):
                    gh.addmm_(gz[:, v0:v1], w[v0:v1].to(gz.dtype))
            gh = gh.view(self.hidden[bs, ts].shape).to(self.hidden.dtype)
            if self.adding:
                self.hidden[bs, ts] += gh
            else:
                self.hidden[bs, ts] = gh
        if self.weight is not None:
            accumulate(self.weight, gz.t(), h, self.first)
        self.first = False
        if self.bias is not None:
            self.bias += gz.sum(dim=0, dtype=self.bias.dtype)

    def done(self) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        w = self.head.weight
        weight = self.weight.to(w.dtype) if self.weight is not None else None
        bias = self.bias.to(w.dtype) if self.bias is not None else None
        return self.hidden, weight, bias


def accumulate(acc: Tensor, a: Tensor, b: Tensor, first: bool) -> None:
    """acc = a @ b (first) or acc += a @ b, acc float32 or the inputs' dtype: on CUDA a 16-bit product accumulates
    in float32 inside the GEMM (out_dtype, when this torch has it); elsewhere the operands are converted."""
    if a.is_cuda and a.dtype != acc.dtype:
        try:
            if first:
                torch.mm(a, b, out_dtype=acc.dtype, out=acc)
            else:
                torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):  # a torch without the mixed-dtype GEMM: convert
            pass
    a, b = a.to(acc.dtype), b.to(acc.dtype)
    if first:
        torch.mm(a, b, out=acc)
    else:
        acc.addmm_(a, b)


def tile_spec(spec: LossSpec, tile: Tile, counts: dict) -> LossSpec:
    """The loss's arguments restricted to a tile ([B] tensors to its rows, [B, T] ones to its positions), with the
    batch's normaliser (counts)."""
    bs, ts = tile
    values = spec.kwargs()
    for name, arg in LossSpec.args():
        x = values[name]
        if arg.kind == "tensor" and x is not None:
            values[name] = x[bs, ts] if x.dim() == 2 else x[bs]
    values.update(counts)
    return LossSpec.make(values)


def batch_counts(spec: LossSpec, B: int) -> dict | None:
    """The normaliser options that give every tile the batch's token weights (the caller's num_tokens /
    num_sequences when given); None when the batch has none (no active weight: the two sweeps then run the loss
    on the whole batch, which gives 0)."""
    agg, mask = spec.agg, spec.mask
    if agg == "token-sum":
        return {}
    if agg == "token-mean":
        n = spec.num_tokens if spec.num_tokens is not None else float(mask.to(torch.float64).sum())
        return {"num_tokens": n} if n > 0 else None
    if agg == "seq-mean-token-sum-norm":
        return {"num_sequences": spec.num_sequences if spec.num_sequences is not None else float(B)}
    s = spec.num_sequences if spec.num_sequences is not None else float((mask != 0).any(dim=1).sum())
    return {"num_sequences": s} if s > 0 else None


def combine_metrics(parts: list[Tensor]) -> Tensor:
    """The batch's metrics [len(METRICS)] from the tiles' (each over its own active tokens): pg_loss summed (each
    tile's carries the batch's normaliser), the means weighted by the tiles' active weights, min / max over the
    tiles with an active token, active_tokens summed."""
    m = torch.stack(parts)
    col = {name: i for i, name in enumerate(METRICS)}
    act = m[:, col["active_tokens"]]
    total = act.sum()
    has = act != 0
    out = (m * act[:, None]).sum(dim=0) / torch.where(total != 0, total, torch.ones_like(total))
    out = torch.where(total != 0, out, torch.zeros_like(out))
    inf = torch.full_like(act, float("inf"))
    lo = torch.where(has, m[:, col["ratio_min"]], inf).min()
    hi = torch.where(has, m[:, col["ratio_max"]], -inf).max()
    out[col["ratio_min"]] = torch.where(has.any(), lo, torch.zeros_like(lo))
    out[col["ratio_max"]] = torch.where(has.any(), hi, torch.zeros_like(hi))
    out[col["pg_loss"]] = m[:, col["pg_loss"]].sum()
    out[col["active_tokens"]] = total
    return out


# ---- the loss ----------------------------------------------------------------------------------------------


def one_sweep(spec: LossSpec, es: EntropySpec, head: Head) -> bool:
    return token_local(spec, es) and (spec.agg != "seq-mean-token-mean" or head.whole_rows())


def run_hidden_loss(head: Head, s: LogitsSpec, es: EntropySpec, spec: LossSpec, want: tuple[bool, bool, bool],
                    want_entropy: bool):  # fmt: skip
    """(loss, metrics [len(METRICS)], entropy [B, T] or None, (d hidden, d weight, d bias)) for an incoming
    gradient of 1."""
    grads = Grads(head, want) if any(want) else None
    counts = batch_counts(spec, head.B) if one_sweep(spec, es, head) else None
    entropy = torch.empty((head.B, head.T), dtype=torch.float32, device=head.hidden.device) if want_entropy else None
    if counts is not None:
        losses, parts = [], []
        buffer = head.buffer()
        for tile in head.tiles():
            bs, ts = tile
            h = head.rows(tile)
            z = head.logits(h, buffer)
            z3 = z.view(-1, ts.stop - ts.start, head.V)
            tile_s = LogitsSpec.make({"tokens": s.tokens[bs, ts], "temperature": s.temperature})
            loss, metrics, ent = run_logits_loss(
                z3, tile_s, want_entropy, z3 if grads is not None else None, tile_spec(spec, tile, counts), es
            )  # fmt: skip
            if grads is not None:
                grads.add(tile, h, z)
            if entropy is not None:
                entropy[bs, ts] = ent
            losses.append(loss)
            parts.append(metrics)
        loss = torch.stack(losses).sum()
        return loss, combine_metrics(parts), entropy, grads.done() if grads is not None else (None, None, None)

    # two sweeps: the log-probs (entropies) and their statistics, the loss on them, then the logits' gradient
    buffer = head.buffer()
    logp, ent, stats = logprob_sweep(head, s, want_entropy or es.active(), buffer)
    loss, metrics, g_logp, g_ent = loss_on_logprobs(logp, ent, spec, es, grads is not None)
    if grads is not None:
        logits_grad_sweep(head, s, stats, ent, g_logp, g_ent, grads, buffer)
    if entropy is not None:
        entropy.copy_(ent)
    return loss, metrics, entropy, grads.done() if grads is not None else (None, None, None)


def entropy_backward(head: Head, s: LogitsSpec, g_entropy: Tensor, start: tuple, want: tuple) -> tuple:
    """start + the gradients of sum g_entropy H (H the entropy of each position) for hidden, weight and bias: one
    more sweep for the tiles' softmax statistics and one for the gradient (four GEMMs per tile)."""
    buffer = head.buffer()
    _, ent, stats = logprob_sweep(head, s, True, buffer)
    grads = Grads(head, want, start=start)
    logits_grad_sweep(head, s, stats, ent, None, g_entropy.to(ent.dtype), grads, buffer)
    return grads.done()


# ---- the log-probs -----------------------------------------------------------------------------------------


def logprob_sweep(head: Head, s: LogitsSpec, want_entropy: bool, buffer: Tensor | None = None):
    """(logp [B, T], entropy [B, T] or None, the softmax statistics [B, T, 2]), one tile of logits at a time (in
    buffer: head.buffer() when None)."""
    logp = torch.empty((head.B, head.T), dtype=out_dtype(head.dtype), device=head.hidden.device)
    ent = torch.empty_like(logp) if want_entropy else None
    stats = torch.empty((head.B, head.T, 2), dtype=logp.dtype, device=logp.device)
    buffer = head.buffer() if buffer is None else buffer
    for tile in head.tiles():
        bs, ts = tile
        z = head.logits(head.rows(tile), buffer)
        lp_t, stats_t, ent_t = run_token_logprobs(z.view(-1, ts.stop - ts.start, head.V), s.tokens[bs, ts],
                                                  s.temperature, want_entropy)  # fmt: skip
        logp[bs, ts] = lp_t
        if ent is not None:
            ent[bs, ts] = ent_t
        stats[bs, ts] = stats_t
    return logp, ent, stats


def logits_grad_sweep(head: Head, s: LogitsSpec, stats: Tensor, ent, g_logp, g_ent, grads: Grads,
                      buffer: Tensor | None = None) -> None:  # fmt: skip
    """For each tile: its logits again (in buffer: head.buffer() when None), d / d z of sum g_logp logp + sum g_ent H
    written over them (the log-probs' backward kernel), then the gradient GEMMs."""
    buffer = head.buffer() if buffer is None else buffer
    for tile in head.tiles():
        bs, ts = tile
        h = head.rows(tile)
        z = head.logits(h, buffer)
        z3 = z.view(-1, ts.stop - ts.start, head.V)
        stats_t, ent_t, g_logp_t, g_ent_t = (x[bs, ts].contiguous() if x is not None else None
                                             for x in (stats, ent, g_logp, g_ent))  # fmt: skip
        run_token_logprobs_backward(
            z3, s.tokens[bs, ts], stats_t, ent_t if g_ent is not None else None, g_logp_t, g_ent_t, s.temperature, z3
        )  # fmt: skip
        grads.add(tile, h, z)


# ---- the entries ---------------------------------------------------------------------------------------------
#
# As for the logits ops (moo_kernels/ops/logits/op.py): one implementation and one backward per op, with three
# entries to them: under torch.compile (and for meta tensors) the registered op, seen through its fake; in eager
# mode, when a gradient is wanted, an autograd.Function around the implementation; otherwise the implementation
# alone. The loss's forward computes the gradients: its eager backward rescales them in place and hands them over
# once, the registered op's multiplies them (the same values).


def _head_of(hidden, weight, bias, s: LogitsSpec, chunk_size: int, head_dtype) -> Head:
    return Head(hidden, weight, s.tokens, bias, head_dtype, chunk_size)


def _or_empty(x: Tensor | None, like: Tensor) -> Tensor:
    return x if x is not None else like.new_empty(0)


def _grad_fakes(hidden, weight, bias, want) -> tuple[Tensor, Tensor, Tensor]:
    """Empty tensors of the gradients' shapes and dtypes (the weight's and bias's: the weight's dtype)."""
    empty = hidden.new_empty(0)
    gh = torch.empty_like(hidden) if want[0] else empty
    gw = torch.empty_like(weight) if want[1] else empty
    gb = torch.empty_like(bias) if want[2] and bias is not None else empty
    return gh, gw, gb


# policy_loss_from_hidden: (hidden, weight, bias, LogitsSpec, want_entropy, EntropySpec, LossSpec, chunk_size,
# head_dtype, want_hidden, want_weight, want_bias) -> (loss, metrics, entropy, d hidden, d weight, d bias)


def _loss_split(args: tuple):
    """The registered loss op's flat arguments after hidden, weight and bias."""
    n = LogitsSpec.count()
    e = n + 1 + EntropySpec.count()
    k = e + LossSpec.count()
    s, es, spec = LogitsSpec.unflat(args[:n]), EntropySpec.unflat(args[n + 1 : e]), LossSpec.unflat(args[e:k])
    return s, args[n], es, spec, args[k], args[k + 1], tuple(args[k + 2 : k + 5])


def _loss_impl(hidden, weight, bias, *args):
    s, want_entropy, es, spec, chunk_size, head_dtype, want = _loss_split(args)
    head = _head_of(hidden, weight, bias, s, chunk_size, head_dtype)
    loss, metrics, ent, grads = run_hidden_loss(head, s, es, spec, want, want_entropy)
    ent = ent if ent is not None else hidden.new_empty(0, dtype=torch.float32)
    return loss, metrics, ent, *(_or_empty(g, hidden) for g in grads)


_GRAD_ARGS = "bool want_hidden, bool want_weight, bool want_bias"
_HEAD_ARGS = "int chunk_size, ScalarType head_dtype"
policy_loss_from_hidden_op = torch.library.custom_op(
    "moo_kernels::policy_loss_from_hidden", _loss_impl, mutates_args=(),
    schema=f"(Tensor hidden, Tensor weight, Tensor? bias, {LogitsSpec.schema()}, bool want_entropy, "
    f"{EntropySpec.schema()}, {LossSpec.schema()}, {_HEAD_ARGS}, {_GRAD_ARGS}) -> "
    "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
)  # fmt: skip


@policy_loss_from_hidden_op.register_fake
def _(hidden, weight, bias, *args):
    _, want_entropy, _, _, _, head_dtype, want = _loss_split(args)
    B, T, _ = hidden.shape
    dt = out_dtype(head_dtype)
    ent = hidden.new_empty((B, T) if want_entropy else (0,), dtype=torch.float32)
    scalars = hidden.new_empty((), dtype=dt), hidden.new_empty((len(METRICS),), dtype=dt)
    return *scalars, ent, *_grad_fakes(hidden, weight, bias, want)


def _loss_setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, *args = inputs
    s, want_entropy, _, _, chunk_size, head_dtype, want = _loss_split(args)
    _, metrics, ent, *grads = output
    ctx.save_for_backward(hidden, weight, bias, *grads)
    ctx.s, ctx.head_args, ctx.want, ctx.want_entropy = s, (chunk_size, head_dtype), want, want_entropy
    ctx.mark_non_differentiable(metrics, *grads)
    if not want_entropy:
        ctx.mark_non_differentiable(ent)
    ctx.set_materialize_grads(False)


def _loss_backward(ctx, g_loss, g_metrics, g_entropy, *g_grads):
    """The registered op's backward: the forward's gradients times the incoming one (out of place), plus the
    returned entropy's share when it gets a gradient."""
    hidden, weight, bias, *grads = ctx.saved_tensors
    out = tuple(
        g * g_loss.to(g.dtype) if w and g_loss is not None else None for g, w in zip(grads, ctx.want, strict=True)
    )
    if ctx.want_entropy and g_entropy is not None:
        extra = hidden_entropy_backward_op(hidden, weight, bias, *ctx.s.flat(), *ctx.head_args, g_entropy, *ctx.want)
        out = tuple(
            None if not w else (e if o is None else o + e) for o, e, w in zip(out, extra, ctx.want, strict=True)
        )
    n_args = LogitsSpec.count() + 1 + EntropySpec.count() + LossSpec.count() + 2 + 3
    return (*out, *(None,) * n_args)


policy_loss_from_hidden_op.register_autograd(_loss_backward, setup_context=_loss_setup_context)


def _entropy_backward_impl(hidden, weight, bias, *args):
    n = LogitsSpec.count()
    s, (chunk_size, head_dtype, g_entropy), want = LogitsSpec.unflat(args[:n]), args[n : n + 3], tuple(args[n + 3 :])
    head = _head_of(hidden, weight, bias, s, chunk_size, head_dtype)
    return tuple(_or_empty(g, hidden) for g in entropy_backward(head, s, g_entropy, (None, None, None), want))


def _gradient_op(name: str, impl, args: str):
    """A registered op (hidden, weight, bias, the logits' spec, the head's arguments, args, the three want flags) ->
    (d hidden, d weight, d bias), empty where not wanted."""
    op = torch.library.custom_op(
        f"moo_kernels::{name}", impl, mutates_args=(),
        schema=f"(Tensor hidden, Tensor weight, Tensor? bias, {LogitsSpec.schema()}, {_HEAD_ARGS}, {args}, "
        f"{_GRAD_ARGS}) -> (Tensor, Tensor, Tensor)",
    )  # fmt: skip
    op.register_fake(lambda hidden, weight, bias, *rest: _grad_fakes(hidden, weight, bias, tuple(rest[-3:])))
    return op


hidden_entropy_backward_op = _gradient_op("hidden_entropy_backward", _entropy_backward_impl, "Tensor g_entropy")


class HiddenLoss(torch.autograd.Function):
    """The eager entry of policy_loss_from_hidden: apply(hidden, weight, bias, head, s, es, spec, want_entropy); the
    forward computes the loss and the gradients of the inputs that need one, the backward scales them in place by
    the incoming gradient and hands them over once, plus the returned entropy's share when it gets a gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, head, s, es, spec, want_entropy):
        want = tuple(ctx.needs_input_grad[:3])
        loss, metrics, entropy, grads = run_hidden_loss(head, s, es, spec, want, want_entropy)
        ctx.grads = grads  # attributes: handed over once
        ctx.head, ctx.s, ctx.want = head, s, want
        ctx.mark_non_differentiable(metrics)
        if entropy is None:
            entropy = hidden.new_empty(0, dtype=torch.float32)
            ctx.mark_non_differentiable(entropy)
        ctx.set_materialize_grads(False)
        return loss, metrics, entropy

    @staticmethod
    def backward(ctx, g_loss, g_metrics, g_entropy):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("policy_loss_from_hidden: backward ran twice through the same call (retain_graph); "
                               "its gradients are handed over once, so call the loss again instead")  # fmt: skip
        out = (None, None, None)
        if g_loss is not None:
            one = float(g_loss) == 1.0 if not g_loss.is_cuda else False
            out = tuple(None if g is None else (g if one else g.mul_(g_loss.to(g.dtype))) for g in grads)
        if g_entropy is not None and g_entropy.numel():
            out = entropy_backward(ctx.head, ctx.s, g_entropy, out, ctx.want)
        return (*out, None, None, None, None, None)


# token_logprobs_from_hidden: (hidden, weight, bias, LogitsSpec, chunk_size, head_dtype, want_entropy) ->
# (logp, entropy, stats [B, T, 2]); its backward op -> (d hidden, d weight, d bias)


def _logprobs_impl(hidden, weight, bias, *args):
    n = LogitsSpec.count()
    s, (chunk_size, head_dtype, want_entropy) = LogitsSpec.unflat(args[:n]), args[n:]
    head = _head_of(hidden, weight, bias, s, chunk_size, head_dtype)
    logp, ent, stats = logprob_sweep(head, s, want_entropy)
    return logp, _or_empty(ent, logp), stats


token_logprobs_from_hidden_op = torch.library.custom_op(
    "moo_kernels::token_logprobs_from_hidden", _logprobs_impl, mutates_args=(),
    schema=f"(Tensor hidden, Tensor weight, Tensor? bias, {LogitsSpec.schema()}, {_HEAD_ARGS}, bool want_entropy) "
    "-> (Tensor, Tensor, Tensor)",
)  # fmt: skip


@token_logprobs_from_hidden_op.register_fake
def _(hidden, weight, bias, *args):
    B, T, _ = hidden.shape
    dt = out_dtype(args[-2])
    ent = hidden.new_empty((B, T) if args[-1] else (0,), dtype=dt)
    return hidden.new_empty((B, T), dtype=dt), ent, hidden.new_empty((B, T, 2), dtype=dt)


def _logprobs_backward_impl(hidden, weight, bias, *args):
    n = LogitsSpec.count()
    s = LogitsSpec.unflat(args[:n])
    chunk_size, head_dtype, stats, ent, g_logp, g_ent = args[n : n + 6]
    head = _head_of(hidden, weight, bias, s, chunk_size, head_dtype)
    if g_logp is None:
        g_logp = torch.zeros_like(stats[..., 0])
    grads = Grads(head, tuple(args[n + 6 :]))
    logits_grad_sweep(head, s, stats, ent, g_logp.to(stats.dtype), g_ent.to(stats.dtype) if g_ent is not None else None,
                      grads)  # fmt: skip
    return tuple(_or_empty(g, hidden) for g in grads.done())


token_logprobs_from_hidden_backward_op = _gradient_op(
    "token_logprobs_from_hidden_backward", _logprobs_backward_impl,
    "Tensor stats, Tensor? entropy, Tensor? g_logp, Tensor? g_entropy",
)  # fmt: skip


def _logprobs_setup_context(ctx, inputs, output) -> None:
    hidden, weight, bias, *args = inputs
    _, ent, stats = output
    want_entropy = args[-1]
    ctx.save_for_backward(hidden, weight, bias, stats, ent if want_entropy else None)
    ctx.args, ctx.want_entropy = tuple(args[:-1]), want_entropy
    ctx.mark_non_differentiable(stats)
    if not want_entropy:
        ctx.mark_non_differentiable(ent)
    ctx.set_materialize_grads(False)


def _logprobs_backward(ctx, g_logp, g_ent, g_stats):
    """The one backward of token_logprobs_from_hidden: each tile's logits again, their gradient written over them,
    the gradient GEMMs (nothing when no gradient came)."""
    g_ent = g_ent if ctx.want_entropy else None
    none = (None,) * (len(ctx.args) + 1)
    if g_logp is None and g_ent is None:
        return None, None, None, *none
    hidden, weight, bias, stats, ent = ctx.saved_tensors
    want = tuple(ctx.needs_input_grad[:3])
    args = (hidden, weight, bias, *ctx.args, stats, ent if g_ent is not None else None, g_logp, g_ent, *want)
    backward = token_logprobs_from_hidden_backward_op if tracing(stats) else _logprobs_backward_impl
    gh, gw, gb = backward(*args)
    return (gh if want[0] else None), (gw if want[1] else None), (gb if want[2] else None), *none


token_logprobs_from_hidden_op.register_autograd(_logprobs_backward, setup_context=_logprobs_setup_context)


class HiddenLogprobs(torch.autograd.Function):
    """The eager entry of token_logprobs_from_hidden: the implementation without the dispatcher, with the op's
    backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, *args):
        out = _logprobs_impl(hidden, weight, bias, *args)
        _logprobs_setup_context(ctx, (hidden, weight, bias, *args), out)
        return out

    backward = staticmethod(_logprobs_backward)


@with_spec(LogitsSpec, EntropySpec, LossSpec, positional=("tokens", "advantages", "mask"))
def policy_loss_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
    head_dtype: torch.dtype | None = None,
    return_entropy: bool = False,
    **options,
):
    """policy_loss_from_logits(hidden @ weight.T + bias, tokens, advantages, mask, ...) without the [B, T, V]
    logits: one tile of them at a time (see moo_kernels/ops/hidden/op.py for the tiles, the sweeps and the memory).

    Args:
        hidden: [B, T, D] (or [B * T, D]) float32 / bfloat16 / float16 hidden states of the positions that predict
            tokens (the last layer's output, normalised, before the lm_head).
        weight: [V, D] the lm_head's weight (nn.Linear's layout; a weight tied to the embedding is fine), the dtype
            of hidden. Gradients go to hidden, weight and bias, each only when it requires one.
        tokens, advantages, mask: as in policy_loss_from_logits.
        bias: [V] optional, the weight's dtype.
        chunk_size: positions per tile (None: the largest power of two whose logits fit in 1 GiB on CUDA,
            32 MiB on the CPU, at least 256, at most B T).
        head_dtype: None (the weight's dtype) or torch.float32: the head in float32 over a 16-bit weight, block by
            block of the weight (never a float32 copy of the whole weight).
        return_entropy: also return the entropy [B, T] of every position (float32). It carries its gradient: a
            loss term on it reaches hidden, weight and bias through two more sweeps in the backward (the tiles'
            statistics, then the gradient: four GEMMs per tile); an entropy bonus is cheaper as entropy_coef.
        {options}

    Returns:
        (loss, PolicyLossMetrics), plus the entropy with return_entropy: those of policy_loss_from_logits on the
        logits this head gives, to the precision of the GEMMs in their dtype.

    Under torch.compile the call is one registered op (moo_kernels::policy_loss_from_hidden): no graph break.

    Example:
        >>> hidden = torch.randn(2, 8, 16, requires_grad=True)
        >>> head = torch.nn.Linear(16, 100, bias=False)
        >>> tokens = torch.randint(0, 100, (2, 8))
        >>> loss, m = policy_loss_from_hidden(hidden, head.weight, tokens, torch.randn(2), torch.ones(2, 8) > 0)
        >>> loss.backward()
    """
    head = Head(hidden, weight, tokens, bias, head_dtype, chunk_size)
    s = _check_tokens(head, tokens, options.pop("temperature", 1.0))
    es = entropy_spec(**{k: options.pop(k) for k in EntropySpec.names() if k in options})
    return_entropy = O.check_bool("return_entropy", return_entropy)
    spec = loss_spec((head.B, head.T), hidden.device, "hidden", advantages=advantages, mask=mask, **options)

    inputs = (head.hidden, weight, bias)
    want = _wanted(inputs)
    if torch.compiler.is_compiling() or hidden.is_meta:  # the registered op (meta tensors: its fake)
        args = (*s.flat(), return_entropy, *es.flat(), *spec.flat(), head.chunk_size, head.dtype, *want)
        loss, metrics, entropy, *_ = policy_loss_from_hidden_op(*inputs, *args)
    elif any(want):
        loss, metrics, entropy = HiddenLoss.apply(*inputs, head, s, es, spec, return_entropy)
    else:
        loss, metrics, entropy, _ = run_hidden_loss(head, s, es, spec, want, return_entropy)
    metrics = PolicyLossMetrics(*metrics.unbind(0))
    return (loss, metrics, entropy) if return_entropy else (loss, metrics)


def _check_tokens(head: Head, tokens: Tensor, temperature: float) -> LogitsSpec:
    """The tokens and temperature, validated as policy_loss_from_logits validates them (V from the weight)."""
    from moo_kernels._spec import Context

    context = Context({"B": head.B, "T": head.T, "V": head.V}, head.hidden.device, "hidden")
    return LogitsSpec.validate(context, tokens=tokens, temperature=temperature)


def _wanted(inputs: tuple) -> tuple[bool, ...]:
    """Which of (hidden, weight, bias) gets a gradient: grad mode on and the (optional) input requires one."""
    grad = torch.is_grad_enabled()
    return tuple(grad and x is not None and x.requires_grad for x in inputs)


@with_spec(LogitsSpec, positional=("tokens",))
def token_logprobs_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int | None = None,
    head_dtype: torch.dtype | None = None,
    return_entropy: bool = False,
    **options,
) -> Tensor | tuple[Tensor, Tensor]:
    """token_logprobs(hidden @ weight.T + bias, tokens, ...) without the [B, T, V] logits: one tile at a time.

    Args: as policy_loss_from_hidden's.
        {options}

    Returns:
        logp [B, T] (float32; float64 for float64 inputs), and the entropy [B, T] with return_entropy. Both are
        differentiable: the backward recomputes each tile's logits (one GEMM), writes their gradient over them and
        runs the gradient GEMMs; under torch.no_grad (old / reference log-probs) only the forward sweep runs.
        Under torch.compile the call is one registered op (moo_kernels::token_logprobs_from_hidden).

    Example:
        >>> with torch.no_grad():
        ...     old_logp = token_logprobs_from_hidden(hidden, lm_head.weight, completion_ids, temperature=0.9)
    """
    head = Head(hidden, weight, tokens, bias, head_dtype, chunk_size)
    s = _check_tokens(head, tokens, options.pop("temperature", 1.0))
    if options:
        raise TypeError(f"unexpected keyword argument {next(iter(options))!r}")
    return_entropy = O.check_bool("return_entropy", return_entropy)
    inputs = (head.hidden, weight, bias)
    args = (*s.flat(), head.chunk_size, head.dtype, return_entropy)
    if torch.compiler.is_compiling() or hidden.is_meta:  # the registered op (meta tensors: its fake)
        logp, ent, _ = token_logprobs_from_hidden_op(*inputs, *args)
    elif any(_wanted(inputs)):
        logp, ent, _ = HiddenLogprobs.apply(*inputs, *args)
    else:  # nothing to differentiate: the sweep alone
        logp, ent, _ = logprob_sweep(head, s, return_entropy)
    return (logp, ent) if return_entropy else logp
