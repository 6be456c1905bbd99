"""The logits ops: implementations on each backend, torch.library registration (schemas from the specs, fakes),
the one backward of each, and the public functions.

- token_logprobs: moo_kernels::token_logprobs (logp, entropy, stats) and its backward
  moo_kernels::token_logprobs_backward; stats [B, T, 2] holds each row's maximum logit and
  log l = log sum exp((z - max) / tau), what the backward needs.
- policy_loss_from_logits: moo_kernels::policy_loss_from_logits (loss, metrics [len(METRICS)], entropy, grad): grad is
  d loss / d logits for an incoming gradient of 1, computed by the forward itself; the backward only rescales it.

One implementation and one backward per op, with three entries to them (as moo_kernels/ops/policy_loss/op.py
explains): under torch.compile (and for meta tensors) the registered op, seen through its fake; in eager mode,
when a gradient is needed, an autograd.Function around the implementation; otherwise the implementation alone.
The loss's eager Function also implements inplace_backward: the gradient buffer is the logits' storage, and the
logits' version counter is bumped so that autograd refuses a backward through an op that saved them; its
backward rescales the buffer in place (no second [B, T, V] buffer), so it runs once per call: a second backward
raises. Under torch.compile the buffer is the op's output and the backward multiplies it: the same values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from moo_kernels import _options as O
from moo_kernels._backend import implementation, tracing
from moo_kernels._codes import METRICS, out_dtype
from moo_kernels._spec import with_spec
from moo_kernels.ops.logits.entropy import entropy_bonus, entropy_keep, with_policy_mask
from moo_kernels.ops.logits.reference import (
    logits_loss_reference,
    row_stats_reference,
    token_logprobs_grad_reference,
    token_logprobs_reference,
)
from moo_kernels.ops.logits.spec import EntropySpec, LogitsSpec, entropy_spec, logits_spec
from moo_kernels.ops.loss.spec import LossSpec, PolicyLossMetrics, loss_spec

# ---- token_logprobs ----------------------------------------------------------------------------------------


def run_token_logprobs(logits: Tensor, tokens: Tensor, temperature: float, want_entropy: bool):
    """(logp, stats [B, T, 2], entropy or None), in float32 (float64 for float64 logits)."""
    impl = implementation(logits.device)
    if impl == "triton":
        from moo_kernels.ops.logits.triton_launch import token_logprobs_fwd_triton

        return token_logprobs_fwd_triton(logits, tokens, temperature, want_entropy)
    if impl == "cpp":
        from moo_kernels.ops.logits.cpp_launch import token_logprobs_fwd_cpp

        return token_logprobs_fwd_cpp(logits, tokens, temperature, want_entropy)
    logp, ent = token_logprobs_reference(logits, tokens, temperature)
    dt = out_dtype(logits)
    stats = row_stats_reference(logits, temperature).to(dt)  # unused by its backward
    return logp.to(dt), stats, ent.to(dt) if want_entropy else None


def run_token_logprobs_backward(logits, tokens, stats, entropy, g_logp, g_entropy, temperature, out) -> Tensor:
    impl = implementation(logits.device)
    if impl == "triton":
        from moo_kernels.ops.logits.triton_launch import token_logprobs_bwd_triton

        return token_logprobs_bwd_triton(logits, tokens, stats, entropy, g_logp, g_entropy, temperature, out)
    if impl == "cpp":
        from moo_kernels.ops.logits.cpp_launch import token_logprobs_bwd_cpp

        return token_logprobs_bwd_cpp(logits, tokens, stats, entropy, g_logp, g_entropy, temperature, out)
    return out.copy_(token_logprobs_grad_reference(logits, tokens, g_logp, g_entropy, temperature))


def _logprobs_impl(logits: Tensor, tokens: Tensor, temperature: float, want_entropy: bool):
    logp, stats, ent = run_token_logprobs(logits, tokens, temperature, want_entropy)
    return logp, ent if ent is not None else logp.new_empty(0), stats


token_logprobs_op = torch.library.custom_op(
    "moo_kernels::token_logprobs", _logprobs_impl, mutates_args=(),
    schema=f"(Tensor logits, {LogitsSpec.schema()}, bool want_entropy) -> (Tensor, Tensor, Tensor)",
)  # fmt: skip


@token_logprobs_op.register_fake
def _(logits, tokens, temperature, want_entropy):
    B, T, _ = logits.shape
    dt = out_dtype(logits)
    ent = logits.new_empty((B, T), dtype=dt) if want_entropy else logits.new_empty(0, dtype=dt)
    return logits.new_empty((B, T), dtype=dt), ent, logits.new_empty((B, T, 2), dtype=dt)


def _logprobs_backward_impl(logits, tokens, stats, entropy, g_logp, g_entropy, temperature) -> Tensor:
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return run_token_logprobs_backward(logits, tokens, stats, entropy, g_logp, g_entropy, temperature, out)


token_logprobs_backward_op = torch.library.custom_op(
    "moo_kernels::token_logprobs_backward", _logprobs_backward_impl, mutates_args=(),
    schema="(Tensor logits, Tensor tokens, Tensor stats, Tensor? entropy, Tensor? g_logp, Tensor? g_entropy, "
    "float temperature) -> Tensor",
)  # fmt: skip


@token_logprobs_backward_op.register_fake
def _(logits, *args):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _logprobs_setup_context(ctx, inputs, output) -> None:
    logits, tokens, temperature, want_entropy = inputs
    _, ent, stats = output
    ctx.save_for_backward(logits, tokens, stats, ent)
    ctx.temperature = temperature
    ctx.want_entropy = want_entropy
    ctx.mark_non_differentiable(stats)
    ctx.set_materialize_grads(False)


def _logprobs_backward(ctx, g_logp, g_ent, g_stats):
    """The one backward of token_logprobs: one kernel writing d / d logits (nothing when no gradient came)."""
    g_ent = g_ent if ctx.want_entropy else None
    if g_logp is None and g_ent is None:
        return None, None, None, None
    logits, tokens, stats, ent = ctx.saved_tensors
    args = (logits, tokens, stats, ent if ctx.want_entropy else None, g_logp, g_ent, ctx.temperature)
    backward = token_logprobs_backward_op if tracing(logits) else _logprobs_backward_impl
    return backward(*args), None, None, None


token_logprobs_op.register_autograd(_logprobs_backward, setup_context=_logprobs_setup_context)


class TokenLogprobs(torch.autograd.Function):
    """The eager path of token_logprobs: the implementation without the dispatcher, with the op's backward."""

    @staticmethod
    def forward(ctx, logits, tokens, temperature, want_entropy):
        # ctx set up here: a separate setup_context makes apply bind the arguments through inspect on every call
        out = _logprobs_impl(logits, tokens, temperature, want_entropy)
        _logprobs_setup_context(ctx, (logits, tokens, temperature, want_entropy), out)
        return out

    backward = staticmethod(_logprobs_backward)


@with_spec(LogitsSpec, positional=("tokens",))
def token_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, *, return_entropy: bool = False, **options
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each chosen token, log_softmax(logits / temperature).gather(tokens), without
    materialising the log-softmax; optionally the entropy of each position.

    Args:
        logits: [B, T, V] float32 / bfloat16 / float16 (float64 for checks), unit stride on V (any strides
            on B and T: full_logits[:, :-1] is read in place).
        tokens: [B, T] int64 or int32 ids in [0, V): see below.
        return_entropy: also return H = -sum p log p per position.
        {options}

    Returns:
        logp [B, T] float32 (float64 for float64 logits), and entropy [B, T] with return_entropy. Both are
        differentiable; the backward is one fused kernel writing d / d logits (no [B, T, V] intermediate).
        Under torch.no_grad (old / reference log-probs) only the forward kernel runs.

    Example:
        >>> logits = torch.randn(2, 8, 100, requires_grad=True)
        >>> logp = token_logprobs(logits, torch.randint(0, 100, (2, 8)), temperature=0.9)
        >>> logp.sum().backward()
    """
    s = logits_spec(logits, tokens=tokens, **options)
    return_entropy = O.check_bool("return_entropy", return_entropy)
    args = (logits, s.tokens, s.temperature, return_entropy)
    if torch.compiler.is_compiling() or logits.is_meta:  # the registered op (meta tensors: its fake)
        logp, ent, _ = token_logprobs_op(*args)
    elif torch.is_grad_enabled() and logits.requires_grad:
        logp, ent, _ = TokenLogprobs.apply(*args)
    else:  # nothing to differentiate: the implementation alone
        logp, _, ent = run_token_logprobs(*args)
    return (logp, ent) if return_entropy else logp


# ---- policy_loss_from_logits -------------------------------------------------------------------------------


SEQUENCE_MODES = ("gspo", "gmpo", "vespo")  # their sequence values need every log-prob of the row first


def token_local(spec: LossSpec, es: EntropySpec) -> bool:
    """Whether a token's d loss / d logp follows from its own log-prob (with the batch's normaliser): no sequence
    ratio, no off-policy mask, no entropy term. Such a loss runs in one pass over the logits (the fused kernel)."""
    return spec.mode not in SEQUENCE_MODES and spec.offpolicy_mask_threshold is None and not es.active()


def run_logits_loss(
    logits: Tensor, s: LogitsSpec, want_entropy: bool, grad: Tensor | None, spec: LossSpec, es: EntropySpec
):
    """(loss, metrics [len(METRICS)], entropy or None); the gradient for an incoming gradient of 1 is written into
    grad when it is not None (grad may be logits itself)."""
    impl = implementation(logits.device)
    if impl == "reference":
        loss, metrics, ent, g = logits_loss_reference(logits, s.tokens, s.temperature, spec, es)
        if grad is not None:
            grad.copy_(g)
        dt = out_dtype(logits)
        metrics = torch.stack([metrics[k] for k in METRICS]).to(dt)
        return loss.to(dt), metrics, ent.to(torch.float32) if want_entropy else None
    if impl == "triton" and token_local(spec, es):
        from moo_kernels.ops.logits.triton_launch import logits_loss_triton

        return logits_loss_triton(logits, s.tokens, spec, s.temperature, want_entropy, grad)
    if es.active():
        return run_entropy_loss(logits, s, want_entropy, grad, spec, es)
    # Two kernels: log-probs first, then the loss on them, then the gradient of the log-probs (the sequence ratios
    # of gspo, gmpo and vespo and the off-policy mask need every token's log-prob before any gradient is known;
    # the CPU takes this path for every mode).
    from moo_kernels.ops.policy_loss.op import run as run_policy_loss

    logp, stats, ent = run_token_logprobs(logits, s.tokens, s.temperature, want_entropy)
    loss, metrics, g_logp = run_policy_loss(logp, spec, grad is not None)
    if grad is not None:
        run_token_logprobs_backward(logits, s.tokens, stats, None, g_logp, None, s.temperature, grad)
    return loss, metrics, ent.to(torch.float32) if ent is not None else None


def run_entropy_loss(
    logits: Tensor, s: LogitsSpec, want_entropy: bool, grad: Tensor | None, spec: LossSpec, es: EntropySpec
):
    """run_logits_loss with entropy terms, on the kernels of any backend: the log-probs and entropies first (one
    read of the logits), the entropy mask joined to the policy mask, the loss on the log-probs, then one pass
    writing d loss / d logits from the log-probs' gradient and the entropy bonus's together."""
    logp, stats, ent = run_token_logprobs(logits, s.tokens, s.temperature, True)
    loss, metrics, g_logp, g_ent = loss_on_logprobs(logp, ent, spec, es, grad is not None)
    if grad is not None:
        run_token_logprobs_backward(
            logits, s.tokens, stats, ent if g_ent is not None else None, g_logp, g_ent, s.temperature, grad
        )  # fmt: skip
    return loss, metrics, ent.to(torch.float32) if want_entropy else None


def loss_on_logprobs(logp: Tensor, ent: Tensor | None, spec: LossSpec, es: EntropySpec, write_grad: bool):
    """(loss, metrics, d loss / d logp or None, d loss / d entropy or None) of the loss on the [B, T] log-probs with
    the entropy terms (ent: the entropies, needed when es.active()): the entropy mask joins the policy mask, the
    bonus is subtracted."""
    from moo_kernels.ops.policy_loss.op import run as run_policy_loss

    keep = entropy_keep(ent, spec, es) if ent is not None else None
    spec = with_policy_mask(spec, keep)
    loss, metrics, g_logp = run_policy_loss(logp, spec, write_grad)
    g_ent = None
    if es.entropy_coef != 0.0:
        hbar, weights = entropy_bonus(ent, spec, es, keep)
        loss = loss - (es.entropy_coef * hbar).to(loss.dtype)
        g_ent = (-es.entropy_coef * weights).to(ent.dtype) if write_grad else None
    return loss, metrics, g_logp, g_ent


def _split(args: tuple) -> tuple[LogitsSpec, bool, EntropySpec, LossSpec, bool]:
    """The registered op's flat arguments after the logits: the logits' spec, want_entropy, the entropy terms'
    spec, the loss's spec and write_grad."""
    n = LogitsSpec.count()
    e = n + 1 + EntropySpec.count()
    s = LogitsSpec.unflat(args[:n])
    return s, args[n], EntropySpec.unflat(args[n + 1 : e]), LossSpec.unflat(args[e:-1]), args[-1]


def _loss_impl(logits: Tensor, *args) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    s, want_entropy, es, spec, write_grad = _split(args)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if write_grad else None
    loss, metrics, ent = run_logits_loss(logits, s, want_entropy, grad, spec, es)
    empty = logits.new_empty(0)
    return loss, metrics, ent if ent is not None else empty.float(), grad if grad is not None else empty


policy_loss_from_logits_op = torch.library.custom_op(
    "moo_kernels::policy_loss_from_logits", _loss_impl, mutates_args=(),
    schema=f"(Tensor logits, {LogitsSpec.schema()}, bool want_entropy, {EntropySpec.schema()}, {LossSpec.schema()}, "
    "bool write_grad) -> (Tensor, Tensor, Tensor, Tensor)",
)  # fmt: skip


@policy_loss_from_logits_op.register_fake
def _(logits, *args):
    _, want_entropy, _, _, write_grad = _split(args)
    B, T, _ = logits.shape
    dt = out_dtype(logits)
    ent = logits.new_empty((B, T) if want_entropy else (0,), dtype=torch.float32)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if write_grad else logits.new_empty(0)
    return logits.new_empty((), dtype=dt), logits.new_empty((len(METRICS),), dtype=dt), ent, grad


def _op_setup_context(ctx, inputs, output) -> None:
    _, metrics, ent, grad = output
    s, want_entropy, _, _, _ = _split(inputs[1:])
    ctx.s = s
    ctx.want_entropy = want_entropy
    ctx.save_for_backward(grad, inputs[0] if want_entropy else None)
    ctx.mark_non_differentiable(metrics, grad)
    if not want_entropy:
        ctx.mark_non_differentiable(ent)


def _op_backward(ctx, g_loss, g_metrics, g_ent, g_grad):
    saved = []

    def buffer() -> Tensor:  # unpacked once, before the buffer is rescaled in place (autograd checks versions)
        saved.extend(ctx.saved_tensors)
        return saved[0]

    grad = hand_over_grad(ctx, buffer, g_loss)
    if ctx.want_entropy and g_ent is not None:
        grad = grad + entropy_grad(saved[1], ctx.s, g_ent)
    return (grad,) + (None,) * (LogitsSpec.count() + EntropySpec.count() + LossSpec.count() + 2)


def entropy_grad(logits: Tensor, s: LogitsSpec, g_entropy: Tensor) -> Tensor:
    """d (sum g_entropy H) / d logits, H the entropy of each position: p_v (E_p[z] - z_v) / temperature, from a
    second pass over the logits (their row statistics, then the log-probs' backward kernel with the entropy's
    gradient alone)."""
    g = g_entropy.to(out_dtype(logits)).contiguous()
    if tracing(g):  # the registered ops (a backward traced by torch.compile)
        _, ent, stats = token_logprobs_op(logits, s.tokens, s.temperature, True)
        return token_logprobs_backward_op(logits, s.tokens, stats, ent, None, g, s.temperature)
    _, stats, ent = run_token_logprobs(logits, s.tokens, s.temperature, True)
    out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return run_token_logprobs_backward(logits, s.tokens, stats, ent, None, g, s.temperature, out)


policy_loss_from_logits_op.register_autograd(_op_backward, setup_context=_op_setup_context)


def hand_over_grad(ctx, buffer: Callable[[], Tensor], g_loss: Tensor) -> Tensor:
    """The one backward of the loss from logits, for both entries: the forward's d loss / d logits buffer (read
    through `buffer` once the call is known to be the first), rescaled in place by the incoming gradient and handed
    over, once (a [B, T, V] buffer: no second one is allocated, and on a GPU an incoming 1 is decided on the device);
    a second backward through the same call raises. Traced (torch.compile), the graph multiplies out of place
    instead: a traced function keeps no state between runs."""
    if tracing(g_loss):
        grad = buffer()
        return grad * g_loss.to(grad.dtype)
    if getattr(ctx, "handed_over", False):
        raise RuntimeError(
            "policy_loss_from_logits: backward ran twice through the same call (retain_graph); its gradient "
            "buffer is rescaled in place, so call the loss again instead"
        )
    ctx.handed_over = True
    return scale_grad_(buffer(), g_loss)


def scale_grad_(grad: Tensor, g: Tensor) -> Tensor:
    """grad *= g in place, skipped when g == 1 (on a GPU decided on the device: no synchronisation)."""
    if tracing(g):
        return grad.mul_(g.to(grad.dtype))
    if grad.is_cuda:
        from moo_kernels.ops.logits.triton_launch import scale_

        return scale_(grad, g)
    if float(g) != 1.0:
        grad.mul_(g.to(grad.dtype))
    return grad


class LogitsLoss(torch.autograd.Function):
    """The eager path of policy_loss_from_logits: apply(logits, want_entropy, inplace, write_grad, logits_spec,
    entropy_spec, loss_spec). With inplace the gradient buffer is the logits' storage; the backward rescales the
    buffer in place (a second backward through one call raises)."""

    @staticmethod
    def forward(ctx, logits, want_entropy, inplace, write_grad, s, es, spec):
        grad = None
        if write_grad:
            grad = logits if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        loss, metrics, ent = run_logits_loss(logits, s, want_entropy, grad, spec, es)
        if grad is logits:
            # the logits were overwritten in place: an op that saved them for its backward must see it
            torch.autograd.graph.increment_version(logits)
        ent = ent if ent is not None else logits.new_empty(0, dtype=torch.float32)
        ctx.grad = grad  # an attribute, not a saved tensor: with inplace it is the (overwritten) input
        ctx.set_materialize_grads(False)  # an unused entropy brings no gradient (no second pass)
        ctx.mark_non_differentiable(metrics)
        if want_entropy and not inplace:
            ctx.save_for_backward(logits)  # the entropy's gradient reads them again
        else:
            ctx.mark_non_differentiable(ent)
        ctx.s, ctx.want_entropy, ctx.inplace = s, want_entropy, inplace
        return loss, metrics, ent

    @staticmethod
    def backward(ctx, g_loss, g_metrics, g_ent):
        grad = None
        if g_loss is not None:
            grad = hand_over_grad(ctx, lambda: ctx.grad, g_loss)
        ctx.grad = None  # autograd holds the buffer now
        if ctx.want_entropy and g_ent is not None and not ctx.inplace:
            (logits,) = ctx.saved_tensors
            extra = entropy_grad(logits, ctx.s, g_ent)
            grad = extra if grad is None else grad.add_(extra)
        return grad, None, None, None, None, None, None


def may_overlap(x: torch.Tensor) -> bool:
    """Whether two positions (b, t) of x [B, T, V] (unit stride on V) may share memory: torch's answer when
    it has one, else whether the two position dimensions, innermost first, fail to nest (conservative)."""
    answer = torch._debug_has_internal_overlap(x)  # 0: no, 1: yes, 2: too hard to tell
    if answer != 2:
        return answer == 1
    extent = x.size(2)  # elements spanned by one position, then by every position of the dimensions seen
    for stride, size in sorted((x.stride(i), x.size(i)) for i in range(2) if x.size(i) > 1):
        if stride < extent:
            return True
        extent += stride * (size - 1)
    return False


@with_spec(LogitsSpec, EntropySpec, LossSpec, positional=("tokens", "advantages", "mask"))
def policy_loss_from_logits(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    inplace_backward: bool = False,
    return_entropy: bool = False,
    **options,
):
    """policy_loss(token_logprobs(logits, tokens, temperature=...), advantages, mask, ...) in one pass.

    Every loss option means what it means in moo_kernels.policy_loss. The loss's normaliser depends on
    the mask only, so the forward computes d loss / d logits together with the loss: on a GPU one kernel
    reads each vocabulary row once from HBM and writes its gradient once (modes "gspo", "gmpo", "vespo",
    offpolicy_mask_threshold and the entropy terms take two kernels: they need every log-prob or entropy first).
    The backward only rescales the gradient by the incoming one, and does nothing when that is 1.

    Args:
        logits: [B, T, V] float32 / bfloat16 / float16 (float64 accepted, for checks), unit stride on V.
        advantages, mask: as in policy_loss ([B] or [B, T] advantages, [B, T] mask).
        inplace_backward: write the gradient into the logits' storage: peak memory beyond the logits is
            O(B T). The logits hold the gradient once the call returns, so they must not be used again:
            their version counter is bumped, so a backward through an op that saved them raises autograd's
            in-place error. Logits whose positions overlap in memory (an expanded view) raise ValueError.
            Eager mode only: under torch.compile the gradient gets its own buffer.
        return_entropy: also return the entropy [B, T] of each position (float32). It carries its gradient (a
            loss term on it, such as an entropy bonus, reaches the logits: p_v (E_p[z] - z_v) / temperature,
            computed in the backward from a second pass over the logits) unless inplace_backward, which
            overwrites the logits: then the entropy has no gradient.
        {options}

    Returns:
        (loss, PolicyLossMetrics), or (loss, PolicyLossMetrics, entropy) with return_entropy. loss is a
        0-dim float32 tensor (float64 for float64 logits); the gradient of logits has logits' dtype.

    Example:
        >>> logits = torch.randn(2, 8, 100, requires_grad=True)
        >>> tokens = torch.randint(0, 100, (2, 8))
        >>> loss, m = policy_loss_from_logits(logits, tokens, torch.randn(2), torch.ones(2, 8, dtype=torch.bool))
        >>> loss.backward()
    """
    s = logits_spec(logits, tokens=tokens, **{k: options.pop(k) for k in LogitsSpec.names() if k in options})
    es = entropy_spec(**{k: options.pop(k) for k in EntropySpec.names() if k in options})
    inplace_backward = O.check_bool("inplace_backward", inplace_backward)
    return_entropy = O.check_bool("return_entropy", return_entropy)
    B, T, _ = logits.shape
    spec = loss_spec((B, T), logits.device, "logits", advantages=advantages, mask=mask, **options)
    write_grad = torch.is_grad_enabled() and logits.requires_grad
    if inplace_backward and write_grad and not torch.compiler.is_compiling() and may_overlap(logits):
        raise ValueError(
            f"logits overlap in memory (shape {tuple(logits.shape)}, strides {tuple(logits.stride())}: an expanded "
            "view?), so inplace_backward=True cannot write a gradient per position into them; pass "
            "inplace_backward=False or contiguous logits"
        )
    if torch.compiler.is_compiling() or logits.is_meta:  # the registered op (meta tensors: its fake)
        loss, metrics, ent, _ = policy_loss_from_logits_op(
            logits, *s.flat(), return_entropy, *es.flat(), *spec.flat(), write_grad
        )  # fmt: skip
    elif write_grad:
        loss, metrics, ent = LogitsLoss.apply(logits, return_entropy, inplace_backward, write_grad, s, es, spec)
    else:  # nothing to differentiate: the implementation alone
        loss, metrics, ent = run_logits_loss(logits, s, return_entropy, None, spec, es)
    metrics = PolicyLossMetrics(*metrics.unbind(0))
    return (loss, metrics, ent) if return_entropy else (loss, metrics)
