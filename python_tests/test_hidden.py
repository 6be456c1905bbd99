"""policy_loss_from_hidden and token_logprobs_from_hidden: equal to the logits entries on hidden @ weight.T + bias
(value and the gradients of hidden, weight and bias) on every backend, for every loss option and tile shape (whole
sequences, pieces of one: both sweeps); one tile of logits at a time; 16-bit inputs and the float32 head; errors."""

import pytest
import torch
from conftest import targets
from test_logits import build
from test_policy_loss import CASES

import moo_kernels as mk
from moo_kernels._codes import METRICS
from moo_kernels.ops.hidden import op as hidden_op

TARGETS = [*targets(), ("reference", "cpu")]
D = 16


def head_of(logits_shape, seed=0, dtype=torch.float64, bias=True):
    B, T, V = logits_shape
    g = torch.Generator().manual_seed(seed + 7)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.2 if bias else None
    return hidden.to(dtype), weight.to(dtype), b.to(dtype) if bias else None


def on(device, kw):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def logits_side(hidden, weight, bias, tokens, adv, mask, kw, device, grad_out, g_ent=None):
    """policy_loss_from_logits on the head's logits, and the gradients of hidden / weight / bias by autograd of
    loss * grad_out (+ sum(entropy * g_ent))."""
    leaves = [x.to(device).requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
    z = torch.nn.functional.linear(*leaves)
    loss, metrics, ent = mk.policy_loss_from_logits(z, tokens.to(device), adv.to(device), mask.to(device),
                                                    return_entropy=True, **on(device, kw))  # fmt: skip
    backward(loss, grad_out, ent, g_ent)
    return loss, metrics, ent, [x.grad if x is not None else None for x in leaves]


def backward(loss, grad_out, ent, g_ent):
    """d (loss * grad_out + sum(ent * g_ent)), either term left out when None (the loss's gradient is then None)."""
    out = loss * grad_out if grad_out is not None else 0.0
    if g_ent is not None:
        out = out + (ent * g_ent.to(ent)).sum()
    out.backward()


def hidden_side(hidden, weight, bias, tokens, adv, mask, kw, device, grad_out, g_ent=None, **extra):
    leaves = [x.to(device).requires_grad_() if x is not None else None for x in (hidden, weight, bias)]
    loss, metrics, ent = mk.policy_loss_from_hidden(
        leaves[0], leaves[1], tokens.to(device), adv.to(device), mask.to(device), bias=leaves[2], return_entropy=True,
        **on(device, kw), **extra,
    )  # fmt: skip
    backward(loss, grad_out, ent, g_ent)
    return loss, metrics, ent, [x.grad if x is not None else None for x in leaves]


def assert_same(a, b, atol=1e-9, rtol=1e-7):
    (l1, m1, e1, g1), (l2, m2, e2, g2) = a, b
    torch.testing.assert_close(l1, l2, atol=atol, rtol=rtol)
    for name in METRICS:
        torch.testing.assert_close(getattr(m1, name), getattr(m2, name), atol=atol, rtol=rtol, msg=name)
    torch.testing.assert_close(e1.double(), e2.double(), atol=1e-6, rtol=1e-6)
    for x, y in zip(g1, g2, strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            torch.testing.assert_close(x, y, atol=atol, rtol=rtol)


# chunk sizes: pieces of one sequence (two sweeps for seq-mean-token-mean), two whole sequences, all at once
CHUNKS = [5, 2 * 12, None]


@pytest.mark.parametrize("backend,device", [t for t in TARGETS if t[0] != "triton"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk", CHUNKS)
def test_equals_loss_from_logits(backend, device, case, chunk):
    logits, tokens, adv, mask, kw = build(case)
    hidden, weight, bias = head_of(logits.shape)
    kw = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}
    with mk.use_backend(backend):
        want = logits_side(hidden, weight, bias, tokens, adv.double(), mask, kw, device, -1.3)
        got = hidden_side(hidden, weight, bias, tokens, adv.double(), mask, kw, device, -1.3, chunk_size=chunk)
    assert_same(got, want)


@pytest.mark.parametrize("case", list(CASES))
def test_equals_loss_from_logits_triton(case):
    """Every loss case on the Triton kernels (the interpreter: one tile shape per case, the three in turn)."""
    if ("triton", "cpu") not in TARGETS:
        pytest.skip("the Triton interpreter is not enabled (TRITON_INTERPRET=1)")
    logits, tokens, adv, mask, kw = build(case)
    hidden, weight, bias = head_of(logits.shape, dtype=torch.float32)
    chunk = CHUNKS[list(CASES).index(case) % len(CHUNKS)]
    with mk.use_backend("triton"):
        want = logits_side(hidden, weight, bias, tokens, adv, mask, kw, "cpu", 0.7)
        got = hidden_side(hidden, weight, bias, tokens, adv, mask, kw, "cpu", 0.7, chunk_size=chunk)
    assert_same(got, want, atol=2e-5, rtol=2e-4)


@pytest.mark.parametrize("backend,device", [t for t in TARGETS if t[0] != "triton"])
@pytest.mark.parametrize(
    "entropy", [dict(entropy_coef=0.05), dict(top_entropy_quantile=0.4, entropy_coef=-0.1, entropy_agg="loss")]
)
def test_entropy_terms(backend, device, entropy):
    logits, tokens, adv, mask, kw = build("clip_token_mean")
    hidden, weight, bias = head_of(logits.shape)
    kw = dict(kw, old_logp=kw["old_logp"].double(), **entropy)
    with mk.use_backend(backend):
        want = logits_side(hidden, weight, bias, tokens, adv.double(), mask, kw, device, 1.0)
        got = hidden_side(hidden, weight, bias, tokens, adv.double(), mask, kw, device, 1.0, chunk_size=4)
    assert_same(got, want)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("case,chunk", [("clip_token_mean", 5), ("clip_token_mean", None), ("gspo", 2 * 12)])
@pytest.mark.parametrize("grad_out", [1.0, None])
def test_entropy_gradient(backend, device, case, chunk, grad_out):
    """The returned entropy carries its gradient (with the loss's, or alone: grad_out None leaves the loss out)."""
    logits, tokens, adv, mask, kw = build(case)
    dtype = torch.float32 if backend == "triton" else torch.float64
    hidden, weight, bias = head_of(logits.shape, dtype=dtype)
    kw = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kw.items()}
    g_ent = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sides = []
    with mk.use_backend(backend):
        for side in (logits_side, hidden_side):
            extra = dict(chunk_size=chunk) if side is hidden_side else {}
            sides.append(side(hidden, weight, bias, tokens, adv.to(dtype), mask, kw, device, grad_out, g_ent, **extra))
    tol = dict(atol=2e-5, rtol=2e-4) if dtype == torch.float32 else {}
    assert_same(sides[1], sides[0], **tol)
    assert sides[1][3][0].abs().sum() > 0


@pytest.mark.parametrize("backend,device", TARGETS)
def test_token_logprobs_from_hidden(backend, device):
    logits, tokens, _, _, _ = build("clip_token_mean")
    hidden, weight, bias = head_of(logits.shape, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    g_logp, g_ent = torch.randn(tokens.shape, generator=g), torch.randn(tokens.shape, generator=g)
    out = []
    with mk.use_backend(backend):
        for fused in (False, True):
            leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
            if fused:
                lp, ent = mk.token_logprobs_from_hidden(leaves[0], leaves[1], tokens, bias=leaves[2], chunk_size=3,
                                                        temperature=0.8, return_entropy=True)  # fmt: skip
            else:
                z = torch.nn.functional.linear(*leaves)
                lp, ent = mk.token_logprobs(z, tokens, temperature=0.8, return_entropy=True)
            ((lp * g_logp).sum() + (ent * g_ent).sum()).backward()
            out.append((lp, ent, [x.grad for x in leaves]))
        with torch.no_grad():
            lp_nograd = mk.token_logprobs_from_hidden(hidden, weight, tokens, bias=bias, chunk_size=3, temperature=0.8)
    (lp1, e1, g1), (lp2, e2, g2) = out
    torch.testing.assert_close(lp2, lp1, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(e2, e1, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(lp_nograd, lp2, atol=0, rtol=0)
    for x, y in zip(g2, g1, strict=True):
        torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-4)


def test_frozen_head_and_no_bias():
    """Only the gradients asked for: a frozen weight gets none (its GEMM is skipped), no bias, no bias gradient."""
    logits, tokens, adv, mask, kw = build("clip_token_mean")
    hidden, weight, _ = head_of(logits.shape, dtype=torch.float32, bias=False)
    calls = []
    grads_add = hidden_op.Grads.add

    def spy(self, tile, h, gz):
        calls.append(self.weight is None)
        return grads_add(self, tile, h, gz)

    x = hidden.clone().requires_grad_()
    hidden_op.Grads.add = spy
    try:
        loss, _ = mk.policy_loss_from_hidden(x, weight, tokens, adv, mask, chunk_size=4, **kw)
        loss.backward()
    finally:
        hidden_op.Grads.add = grads_add
    assert x.grad is not None and weight.grad is None and calls and all(calls)
    z = (hidden @ weight.T).requires_grad_()
    mk.policy_loss_from_logits(z, tokens, adv, mask, **kw)[0].backward()
    torch.testing.assert_close(x.grad, z.grad @ weight, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 12, 40])
def test_one_tile_of_logits_at_a_time(chunk):
    """Every GEMM makes at most chunk_size rows of logits, into one buffer of at most chunk_size rows, and the
    tiles cover every position once."""
    logits, tokens, adv, mask, kw = build("gspo")
    hidden, weight, bias = head_of(logits.shape, dtype=torch.float32)
    rows, buffers = [], set()
    original = hidden_op.Head.logits

    def spy(self, h, buffer):
        rows.append(h.shape[0])
        assert buffer.shape[0] <= chunk
        buffers.add(buffer.data_ptr())
        z = original(self, h, buffer)
        assert z.data_ptr() == buffer.data_ptr()
        return z

    hidden_op.Head.logits = spy
    try:
        x = hidden.clone().requires_grad_()
        loss, _ = mk.policy_loss_from_hidden(x, weight, tokens, adv, mask, bias=bias, chunk_size=chunk, **kw)
        loss.backward()
    finally:
        hidden_op.Head.logits = original
    B, T = tokens.shape
    assert max(rows) <= chunk and sum(rows) == 2 * B * T  # gspo: two sweeps
    assert len(buffers) == 1  # one buffer for both sweeps


@pytest.mark.parametrize("backend,device", TARGETS)
def test_deterministic(backend, device):
    """Two calls give the same bits: loss, metrics, entropy and every gradient (the tiles and the weight gradient's
    accumulation run in a fixed order)."""
    logits, tokens, adv, mask, kw = build("clip_higher_dual_cap_k3")
    hidden, weight, bias = head_of(logits.shape, dtype=torch.float32)
    runs = []
    with mk.use_backend(backend):
        for _ in range(2):
            runs.append(hidden_side(hidden, weight, bias, tokens, adv, mask, kw, device, 0.9, torch.ones(tokens.shape),
                                    chunk_size=5))  # fmt: skip
    (l1, m1, e1, g1), (l2, m2, e2, g2) = runs
    assert torch.equal(l1, l2) and torch.equal(e1, e2)
    assert all(torch.equal(getattr(m1, n), getattr(m2, n)) for n in METRICS)
    assert all(torch.equal(x, y) for x, y in zip(g1, g2, strict=True))


def test_default_chunk_rule():
    def rows(b, t, v):
        return hidden_op.Head(torch.zeros(b, t, 8), torch.zeros(v, 8), torch.zeros(b, t, dtype=torch.long), None,
                              None, None).chunk_size  # fmt: skip

    assert rows(8, 128, 32000) == 256  # 32 MiB / (32000 x 4 bytes) = 262 -> 256
    assert rows(8, 128, 200000) == 256  # 32 MiB / (200000 x 4 bytes) = 41 -> 32, at least 256
    head = hidden_op.Head(torch.zeros(2, 3, 8), torch.zeros(10, 8), torch.zeros(2, 3, dtype=torch.long), None, None,
                          None)  # fmt: skip
    assert head.chunk_size == 6  # at most B T


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_and_float32_head(dtype):
    """16-bit hidden / weight: the loss of the 16-bit logits (to their precision); head_dtype=float32: exactly the
    float32 computation of the head, without a float32 copy of the weight (blocks of HEAD_BLOCK rows)."""
    logits, tokens, adv, mask, kw = build("clip_higher_dual_cap_k3")
    hidden, weight, bias = head_of(logits.shape, dtype=dtype)
    loss16, _ = mk.policy_loss_from_hidden(hidden, weight, tokens, adv, mask, bias=bias, chunk_size=7, **kw)
    want16, _ = mk.policy_loss_from_logits(torch.nn.functional.linear(hidden, weight, bias), tokens, adv, mask, **kw)
    torch.testing.assert_close(loss16, want16, atol=1e-3, rtol=1e-3)
    old_block = hidden_op.HEAD_BLOCK
    hidden_op.HEAD_BLOCK = 8  # several weight blocks
    try:
        x = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        loss32, _ = mk.policy_loss_from_hidden(x, w, tokens, adv, mask, bias=bias, chunk_size=7,
                                               head_dtype=torch.float32, **kw)  # fmt: skip
        loss32.backward()
    finally:
        hidden_op.HEAD_BLOCK = old_block
    y = hidden.float().requires_grad_()
    v = weight.float().requires_grad_()
    want32, _ = mk.policy_loss_from_logits(torch.nn.functional.linear(y, v, bias.float()), tokens, adv, mask, **kw)
    want32.backward()
    torch.testing.assert_close(loss32, want32, atol=1e-6, rtol=1e-5)
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    torch.testing.assert_close(x.grad.float(), y.grad, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(w.grad.float(), v.grad, atol=1e-2, rtol=1e-2)


def test_backward_scales_and_runs_once():
    logits, tokens, adv, mask, kw = build("clip_token_mean")
    hidden, weight, bias = head_of(logits.shape, dtype=torch.float32)
    x = hidden.clone().requires_grad_()
    loss, _ = mk.policy_loss_from_hidden(x, weight, tokens, adv, mask, **kw)
    (loss * 2.5).backward(retain_graph=True)
    y = hidden.clone().requires_grad_()
    mk.policy_loss_from_hidden(y, weight, tokens, adv, mask, **kw)[0].backward()
    torch.testing.assert_close(x.grad, 2.5 * y.grad)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(hidden=torch.zeros(5, 9, 3)), ValueError, "weight must be \\[V, D\\]"),
        (dict(hidden=torch.zeros(4, 9, D)), ValueError, "hidden must be \\[B, T, D\\]"),
        (dict(weight=torch.zeros(300, D, dtype=torch.float64)), TypeError, "one dtype"),
        (dict(bias=torch.zeros(299)), ValueError, "bias must be \\[V\\]"),
        (dict(head_dtype=torch.float16), ValueError, "head_dtype"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(tokens=torch.full((5, 9), 300)), ValueError, "tokens must be in"),
        (dict(temperature=0.0), ValueError, "temperature"),
    ],
)
def test_bad_inputs(change, error, match):
    logits, tokens, adv, mask, _ = build("clip_token_mean")
    hidden, weight, bias = head_of(logits.shape, dtype=torch.float32)
    args = {**dict(hidden=hidden, weight=weight, tokens=tokens, bias=bias), **change}
    with pytest.raises(error, match=match):
        mk.policy_loss_from_hidden(args.pop("hidden"), args.pop("weight"), args.pop("tokens"), adv, mask, **args)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_opcheck(backend):
    """The registered ops (what torch.compile sees): schemas, fakes and autograd registrations."""
    from moo_kernels.ops.logits.spec import LogitsSpec, entropy_spec
    from moo_kernels.ops.loss.spec import loss_spec

    logits, tokens, adv, mask, kw = build("clip_higher_dual_cap_k3")
    hidden, weight, bias = head_of(logits.shape, dtype=torch.float32)
    B, T, V = logits.shape
    leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
    s = LogitsSpec.make({"tokens": tokens, "temperature": 0.9})
    spec = loss_spec((B, T), hidden.device, "hidden", advantages=adv, mask=mask, **kw)
    head = (5, torch.float32)
    with mk.use_backend(backend):
        torch.library.opcheck(hidden_op.token_logprobs_from_hidden_op, (*leaves, *s.flat(), *head, True))
        _, ent, stats = hidden_op.token_logprobs_from_hidden_op(hidden, weight, bias, *s.flat(), *head, True)
        g = torch.randn(B, T)
        torch.library.opcheck(hidden_op.token_logprobs_from_hidden_backward_op,
                              (hidden, weight, bias, *s.flat(), *head, stats, ent, g, g, True, True, True))  # fmt: skip
        # opcheck's backward takes sign(loss) as the incoming gradient and compares the outputs after it: the
        # registered op's backward multiplies out of place, so any sign is fine
        for es in (entropy_spec(), entropy_spec(entropy_coef=0.01)):
            args = (*leaves, *s.flat(), True, *es.flat(), *spec.flat(), *head, True, True, True)
            torch.library.opcheck(hidden_op.policy_loss_from_hidden_op, args)
        torch.library.opcheck(hidden_op.hidden_entropy_backward_op,
                              (hidden, weight, bias, *s.flat(), *head, g, True, False, True))  # fmt: skip
