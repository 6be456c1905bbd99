"""token_logprobs and policy_loss_from_logits: every backend against the float64 reference (log-probs,
entropy, loss, metrics, gradients), agreement with policy_loss(token_logprobs(...)), the chunk exchange of
the fused kernel, in-place backward, int64 offsets and long sequences, errors, torch.library checks."""

import os

import pytest
import torch
from conftest import HAS_CUDA, targets
from test_policy_loss import CASES

import moo_kernels as mk
from moo_kernels._codes import METRICS
from moo_kernels.ops.logits import triton_launch as logits_cuda
from moo_kernels.ops.logits.reference import (
    policy_loss_from_logits_reference,
    row_stats_reference,
    token_logprobs_grad_reference,
    token_logprobs_reference,
)

TARGETS = targets()
B, T, V = 5, 9, 300
# float32 logits: log-probs and gradients against float64 (the vocabulary sums run in float32)
TOL = {torch.float32: 2e-5, torch.float64: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def make_logits(seed=0, b=B, t=T, v=V, dtype=torch.float32):
    """logits as the view full[:, :-1] of a [b, t + 1, v] tensor (strided on T, unit stride on V)."""
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(b, t + 1, v, generator=g, dtype=torch.float64) * 2).to(dtype)
    tokens = torch.randint(0, v, (b, t), generator=g)
    return full[:, :-1], tokens, g


def build(case, seed=0, dtype=torch.float32, v=V):
    """(logits, tokens, advantages, mask, loss kwargs) for a case of test_policy_loss.CASES."""
    logits, tokens, g = make_logits(seed, v=v, dtype=dtype)
    lp, _ = token_logprobs_reference(logits, tokens)
    old = (lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    ref = (lp + 0.4 * torch.randn(B, T, generator=g, dtype=torch.float64)).float()
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[1] = False  # a sequence without active tokens
    extra = {
        "adv_bt": torch.randn(B, T, generator=g),
        "tok": 0.3 * torch.randn(B, T, generator=g),
        "isw_b": torch.rand(B, generator=g) + 0.5,
        "isw_bt": torch.rand(B, T, generator=g) + 0.5,
        "off": torch.tensor([True, False, False, True, False]),
        "fmask": torch.rand(B, T, generator=g) * mask,
        "pmask": torch.rand(B, T, generator=torch.Generator().manual_seed(seed + 1)) > 0.4,  # g's draws unchanged
    }
    kw = dict(CASES[case])
    use_old, use_ref = kw.pop("old", True), kw.pop("ref", False)
    adv = extra[kw.pop("adv")] if "adv" in kw else torch.randn(B, generator=g)
    mask = extra[kw.pop("mask")] if "mask" in kw else mask
    for key in ("token_advantages", "is_weights", "offpolicy", "policy_mask"):
        if key in kw:
            kw[key] = extra[kw[key]]
    if kw.get("max_len"):
        kw["max_len"] = 12
    if use_old:
        kw["old_logp"] = old
    if use_ref:
        kw["ref_logp"] = ref
    return logits, tokens, adv, mask, kw


def to(device, x):
    return x.to(device) if isinstance(x, torch.Tensor) else x


def run_loss(backend, device, logits, tokens, adv, mask, kw, grad_out=1.0, **opts):
    full = torch.zeros(logits.shape[0], logits.shape[1] + 1, logits.shape[2], dtype=logits.dtype, device=device)
    full[:, :-1] = logits.to(device)
    leaf = full.requires_grad_()
    x = leaf[:, :-1]  # a strided view, as a trainer slices its logits
    with mk.use_backend(backend):
        out = mk.policy_loss_from_logits(
            x, tokens.to(device), to(device, adv), to(device, mask), **{k: to(device, v) for k, v in kw.items()}, **opts
        )
    (out[0] * grad_out).backward()
    return out, leaf.grad[:, :-1], leaf.grad[:, -1]


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("case", list(CASES))
def test_loss_matches_reference(backend, device, case):
    logits, tokens, adv, mask, kw = build(case)
    (loss, metrics, ent), grad, pad_grad = run_loss(
        backend, device, logits, tokens, adv, mask, kw, grad_out=-1.7, return_entropy=True, temperature=0.9
    )
    rloss, rmetrics, rent, rgrad = policy_loss_from_logits_reference(logits, tokens, adv, mask, temperature=0.9, **kw)
    assert loss.dtype == torch.float32 and loss.dim() == 0 and grad.dtype == torch.float32
    torch.testing.assert_close(loss.double().cpu(), rloss, atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(grad.double().cpu(), -1.7 * rgrad, atol=2e-7, rtol=2e-5)
    torch.testing.assert_close(ent.double().cpu(), rent, atol=2e-5, rtol=2e-5)
    assert torch.equal(pad_grad, torch.zeros_like(pad_grad))  # nothing written outside the view
    for name in METRICS:
        torch.testing.assert_close(
            getattr(metrics, name).double().cpu(), rmetrics[name], atol=2e-6, rtol=2e-5, msg=name
        )


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("mode", ["clip", "gspo", "cispo", "reinforce"])
def test_loss_agrees_with_policy_loss_of_token_logprobs(backend, device, mode):
    logits, tokens, adv, mask, kw = build("clip_higher_dual_cap_k3")
    kw = dict(kw, mode=mode)
    (loss, metrics), grad, _ = run_loss(backend, device, logits, tokens, adv, mask, kw)
    x = logits.detach().to(device).requires_grad_()
    with mk.use_backend(backend):
        loss2, metrics2 = mk.policy_loss(
            mk.token_logprobs(x, tokens.to(device)), to(device, adv), to(device, mask),
            **{k: to(device, v) for k, v in kw.items()},
        )  # fmt: skip
    loss2.backward()
    torch.testing.assert_close(loss, loss2, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, x.grad, atol=1e-7, rtol=1e-5)
    for name in METRICS:
        torch.testing.assert_close(getattr(metrics, name), getattr(metrics2, name), atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs(backend, device, dtype, temperature):
    logits, tokens, g = make_logits(1, dtype=dtype)
    g_logp = torch.randn(B, T, generator=g)
    g_ent = torch.randn(B, T, generator=g)
    x = logits.detach().to(device).requires_grad_()
    with mk.use_backend(backend):
        logp, ent = mk.token_logprobs(x, tokens.to(device), temperature=temperature, return_entropy=True)
        (logp * g_logp.to(device) + ent * g_ent.to(device)).sum().backward()
        with torch.no_grad():
            logp_ng = mk.token_logprobs(x, tokens.to(device).int(), temperature=temperature)
    rlogp, rent = token_logprobs_reference(logits, tokens, temperature)
    rgrad = token_logprobs_grad_reference(logits, tokens, g_logp, g_ent, temperature)
    out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert logp.dtype == out_dtype and ent.dtype == out_dtype and x.grad.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(logp.double().cpu(), rlogp, atol=tol, rtol=tol)
    torch.testing.assert_close(ent.double().cpu(), rent, atol=tol, rtol=tol)
    torch.testing.assert_close(logp_ng, logp.detach())
    gtol = tol * (2 if dtype in (torch.float32, torch.float64) else 1)
    torch.testing.assert_close(x.grad.double().cpu(), rgrad, atol=gtol * rgrad.abs().max().item(), rtol=gtol)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_token_logprobs_gradient_of_one_output(backend, device):
    logits, tokens, g = make_logits(2)
    for which in ("logp", "entropy"):
        x = logits.detach().to(device).requires_grad_()
        with mk.use_backend(backend):  # the backward is a kernel of the backend too
            logp, ent = mk.token_logprobs(x, tokens.to(device), return_entropy=True)
            (logp if which == "logp" else ent).sum().backward()
        ones = torch.ones(B, T)
        args = (ones, None) if which == "logp" else (None, ones)
        rgrad = token_logprobs_grad_reference(logits, tokens, *args)
        torch.testing.assert_close(x.grad.double().cpu(), rgrad, atol=2e-6, rtol=2e-5)


def test_reference_gradients_match_autograd():
    logits, tokens, g = make_logits(3, dtype=torch.float64)
    x = logits.detach().requires_grad_()
    lsm = torch.log_softmax(x / 0.8, dim=-1)
    logp = lsm.gather(-1, tokens[..., None])[..., 0]
    ent = -(lsm.exp() * lsm).sum(-1)
    g1, g2 = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    (logp * g1 + ent * g2).sum().backward()
    torch.testing.assert_close(
        token_logprobs_grad_reference(logits, tokens, g1, g2, 0.8), x.grad, atol=1e-13, rtol=1e-11
    )
    rlogp, rent = token_logprobs_reference(logits, tokens, 0.8)
    torch.testing.assert_close(rlogp, logp.detach(), atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(rent, ent.detach(), atol=1e-13, rtol=1e-13)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_half_precision(backend, device, dtype):
    logits, tokens, adv, mask, kw = build("clip_higher_dual_cap_k3", dtype=dtype)
    (loss, _), grad, _ = run_loss(backend, device, logits, tokens, adv, mask, kw)
    rloss, _, _, rgrad = policy_loss_from_logits_reference(logits, tokens, adv, mask, **kw)
    assert grad.dtype == dtype
    torch.testing.assert_close(loss.double().cpu(), rloss, atol=TOL[dtype], rtol=TOL[dtype])
    scale = rgrad.abs().max().item()
    torch.testing.assert_close(grad.double().cpu(), rgrad, atol=TOL[dtype] * scale, rtol=TOL[dtype])


@pytest.mark.parametrize("backend,device", TARGETS)
def test_inplace_backward(backend, device):
    logits, tokens, adv, mask, kw = build("clip_higher_dual_cap_k3")
    (loss, _), grad, _ = run_loss(backend, device, logits, tokens, adv, mask, kw, grad_out=0.5)
    buf = logits.detach().clone().to(device)
    x = buf.clone().requires_grad_()
    y = x * 1.0  # a non-leaf, as logits out of an lm_head are
    storage = y.data_ptr()
    with mk.use_backend(backend):
        loss2, _ = mk.policy_loss_from_logits(
            y, tokens.to(device), to(device, adv), to(device, mask), inplace_backward=True,
            **{k: to(device, v) for k, v in kw.items()},
        )  # fmt: skip
    (0.5 * loss2).backward()
    torch.testing.assert_close(loss2, loss)
    torch.testing.assert_close(x.grad, grad.contiguous(), atol=0, rtol=0)
    assert y.data_ptr() == storage
    torch.testing.assert_close(y.detach(), grad.contiguous(), atol=0, rtol=0)  # the logits now hold the gradient


@pytest.mark.parametrize("backend,device", TARGETS)
def test_backward_twice_raises(backend, device):
    logits, tokens, adv, mask, kw = build("clip_token_mean")
    x = logits.detach().to(device).requires_grad_()
    with mk.use_backend(backend):
        loss, _ = mk.policy_loss_from_logits(x, tokens.to(device), to(device, adv), to(device, mask))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_registered_op_has_the_same_backward(backend):
    """The registered op (torch.compile's entry), called in eager mode, hands its gradient over like the public
    function: the same gradient, and the same error on a second backward through one call."""
    from moo_kernels.ops.logits.op import policy_loss_from_logits_op
    from moo_kernels.ops.logits.spec import entropy_spec
    from moo_kernels.ops.loss.spec import loss_spec

    logits, tokens, adv, mask, kw = build("clip_token_mean")
    spec = loss_spec((B, T), logits.device, "logits", advantages=adv, mask=mask, **kw)
    x = logits.detach().clone().requires_grad_()
    y = logits.detach().clone().requires_grad_()
    with mk.use_backend(backend):
        es = entropy_spec()
        loss = policy_loss_from_logits_op(x, tokens, 1.0, False, *es.flat(), *spec.flat(), True)[0]
        (loss * 0.5).backward(retain_graph=True)
        (mk.policy_loss_from_logits(y, tokens, adv, mask, **kw)[0] * 0.5).backward()
    assert torch.equal(x.grad, y.grad)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("backend,device", TARGETS)
def test_no_grad_and_all_masked(backend, device):
    logits, tokens, adv, mask, kw = build("clip_higher_dual_cap_k3")
    with mk.use_backend(backend), torch.no_grad():
        loss, metrics = mk.policy_loss_from_logits(
            logits.to(device),
            tokens.to(device),
            to(device, adv),
            to(device, mask),
            **{k: to(device, v) for k, v in kw.items()},
        )
    rloss, _, _, _ = policy_loss_from_logits_reference(logits, tokens, adv, mask, **kw)
    torch.testing.assert_close(loss.double().cpu(), rloss, atol=2e-6, rtol=2e-5)
    (loss0, metrics0), grad0, _ = run_loss(backend, device, logits, tokens, adv, torch.zeros_like(mask), kw)
    assert loss0.item() == 0.0 and torch.equal(grad0, torch.zeros_like(grad0))
    assert all(torch.isfinite(v).all() for v in metrics0)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_deterministic(backend, device):
    logits, tokens, adv, mask, kw = build("clip_higher_dual_cap_k3")
    runs = [run_loss(backend, device, logits, tokens, adv, mask, kw) for _ in range(2)]
    assert torch.equal(runs[0][0][0], runs[1][0][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.skipif(HAS_CUDA, reason="interpreter test of the chunk exchange; the GPU test covers CUDA")
@pytest.mark.parametrize("chunk,block", [(128, 64), (64, 64), (256, 128)])
def test_chunk_exchange(monkeypatch, chunk, block):
    """The fused kernel with rows split over several programs (chunks of chunk entries), in and out of place
    (the interpreter runs the programs one after another: a sibling not yet run is read from its chunk)."""
    monkeypatch.setattr(logits_cuda, "CHUNK_V", chunk)
    monkeypatch.setattr(logits_cuda, "BLOCK_V", block)
    assert logits_cuda._tiles(V)[2] > 1
    logits, tokens, adv, mask, kw = build("clip_higher_dual_cap_k3")
    rloss, _, rent, rgrad = policy_loss_from_logits_reference(logits, tokens, adv, mask, **kw)
    (loss, _, ent), grad, _ = run_loss("triton", "cpu", logits, tokens, adv, mask, kw, return_entropy=True)
    torch.testing.assert_close(loss.double(), rloss, atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(grad.double(), rgrad, atol=2e-7, rtol=2e-5)
    torch.testing.assert_close(ent.double(), rent, atol=2e-5, rtol=2e-5)
    y = logits.detach().clone().requires_grad_()
    z = y * 1.0
    with mk.use_backend("triton"):
        mk.policy_loss_from_logits(z, tokens, adv, mask, inplace_backward=True, **kw)[0].backward()
    torch.testing.assert_close(y.grad, grad.contiguous(), atol=0, rtol=0)


class _Props:  # the fields of torch.cuda.get_device_properties that the capacity check reads (an H200)
    multi_processor_count = 132
    max_threads_per_multi_processor = 2048
    regs_per_multiprocessor = 65536
    shared_memory_per_multiprocessor = 233472


@pytest.mark.parametrize(
    "n_regs, shared, warps, per_sm",
    [
        (96, 0, 8, 2),  # registers: 96 x 32 x 8 = 24,576 of 65,536
        (64, 0, 8, 4),  # threads and registers both allow 4
        (32, 0, 4, 16),  # threads: 2,048 / 128
        (40, 0, 1, 32),  # the limit of 32 programs per SM
        (255, 0, 8, 1),  # 255 registers round up to 256 per thread: 65,536 per program
        (32, 100_000, 4, 2),  # shared memory: 233,472 / (100,000 + 1,024)
        (255, 0, 16, 0),  # does not fit at all
    ],
)
def test_resident_programs(n_regs, shared, warps, per_sm):
    assert logits_cuda.resident_programs(n_regs, shared, warps, _Props) == 132 * per_sm


def test_whole_row_chunking_covers_the_row():
    for v in (1, 7, 2048, 32000, 151936):
        block, chunk, n = logits_cuda._whole_rows(v)
        assert n == 1 and chunk >= v and chunk % block == 0


@pytest.mark.gpu
@pytest.mark.parametrize("slots", [1, None])
def test_gpu_exchange_or_whole_rows(monkeypatch, slots):
    """On CUDA: with the GPU taken to hold a single program (slots=1), the launcher takes the path without
    waiting; with its real capacity, the chunk exchange. Both match the reference at V = 151,936."""
    monkeypatch.setattr(logits_cuda, "SLOTS", slots)
    g = torch.Generator().manual_seed(3)
    b, t, v = 2, 16, 151936
    logits = torch.randn(b, t, v, generator=g)
    tokens = torch.randint(0, v, (b, t), generator=g)
    adv, mask = torch.randn(b, generator=g), torch.rand(b, t, generator=g) > 0.2
    rloss, _, _, rgrad = policy_loss_from_logits_reference(logits, tokens, adv, mask)
    x = logits.cuda().requires_grad_()
    loss, _ = mk.policy_loss_from_logits(x, tokens.cuda(), adv.cuda(), mask.cuda())
    loss.backward()
    torch.testing.assert_close(loss.double().cpu(), rloss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double().cpu(), rgrad, atol=1e-7, rtol=1e-4)


_TIMEOUT_SCRIPT = """
import torch, moo_kernels as mk
g = torch.Generator().manual_seed(0)
b, t, v = 8, 512, 151936
logits = torch.randn(b, t, v, generator=g).cuda()
tokens = torch.randint(0, v, (b, t), generator=g).cuda()
adv, mask = torch.randn(b).cuda(), torch.ones(b, t, dtype=torch.bool).cuda()
x = logits.clone().requires_grad_()
loss, _ = mk.policy_loss_from_logits(x, tokens, adv, mask)
loss.backward()
ref = logits.clone().requires_grad_()
lp = torch.log_softmax(ref.double(), -1).gather(-1, tokens[..., None])[..., 0]
(-(adv[:, None] * torch.exp(lp - lp.detach())).mean()).backward()
print("MATCH", bool(torch.allclose(x.grad.double(), ref.grad, atol=1e-7, rtol=1e-4)))
"""


@pytest.mark.gpu
def test_gpu_wait_is_bounded(tmp_path):
    """With a wait bound of 1 ns nearly every program of the exchange gives up: the launch must end in an
    error naming the timeout or in correct results (never a hang, never a silently wrong gradient). In a
    process of its own: the device-side assertion ends the process's CUDA context."""
    import subprocess
    import sys

    env = dict(os.environ, MOO_KERNELS_LOGITS_TIMEOUT_S="1e-9")
    res = subprocess.run([sys.executable, "-c", _TIMEOUT_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    out = res.stdout + res.stderr
    if res.returncode == 0:
        assert "MATCH True" in out, out[-2000:]
    else:
        assert "MOO_KERNELS_LOGITS_TIMEOUT_S" in out or "device-side assert" in out, out[-2000:]


def test_tiles_cover_the_vocabulary():
    for v in (1, 7, 2048, 32000, 151936, 262144, 1 << 20):
        block, chunk, n = logits_cuda._tiles(v)
        assert chunk % block == 0 and (n - 1) * chunk < v <= n * chunk and n <= logits_cuda.MAX_CHUNKS


@pytest.mark.parametrize("backend", ["cpp", "triton"] if not HAS_CUDA else ["cpp"])
def test_int64_offsets(backend):
    """A row beyond element 2^31 of the storage (the storage's pages that are never touched are never
    allocated): offsets must be computed in 64 bits."""
    v = 64
    base = torch.empty((1 << 31) + 4 * v, dtype=torch.bfloat16)
    x = base.as_strided((1, 3, v), ((1 << 31) + 3 * v, (1 << 30) + v, 1))  # rows at 0, 2^30 + v, 2^31 + 2v
    g = torch.Generator().manual_seed(5)
    vals = torch.randn(3, v, generator=g).to(torch.bfloat16)
    for t in range(3):
        x[0, t] = vals[t]
    tokens = torch.tensor([[3, 17, 60]])
    with mk.use_backend(backend):
        logp, ent = mk.token_logprobs(x, tokens, return_entropy=True)
    rlogp, rent = token_logprobs_reference(vals[None], tokens)
    torch.testing.assert_close(logp.double(), rlogp, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), rent, atol=1e-5, rtol=1e-5)


def test_long_sequence_cpu():
    """T = 65,536 positions on the C++ path, against the reference."""
    g = torch.Generator().manual_seed(6)
    t, v = 65536, 16
    logits = torch.randn(1, t, v, generator=g)
    tokens = torch.randint(0, v, (1, t), generator=g)
    adv = torch.randn(1, generator=g)
    mask = torch.rand(1, t, generator=g) > 0.1
    x = logits.clone().requires_grad_()
    with mk.use_backend("cpp"):
        loss, _ = mk.policy_loss_from_logits(x, tokens, adv, mask, old_logp=None)
    loss.backward()
    rloss, _, _, rgrad = policy_loss_from_logits_reference(logits, tokens, adv, mask)
    torch.testing.assert_close(loss.double(), rloss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), rgrad, atol=1e-9, rtol=1e-5)


BAD = [
    (dict(logits=torch.zeros(2, 3, 5, dtype=torch.int32)), TypeError, "logits must be float32"),
    (dict(logits=torch.zeros(6, 5)), ValueError, r"logits must be \[B, T, V\]"),
    (dict(logits=torch.zeros(2, 5, 3).transpose(1, 2)), ValueError, "unit stride on the vocabulary"),
    (dict(tokens=torch.zeros(2, 3)), TypeError, "tokens must be int64 or int32"),
    (dict(tokens=torch.zeros(3, 2, dtype=torch.long)), ValueError, r"tokens must have shape \(2, 3\)"),
    (dict(tokens=torch.tensor([[0, 1, 5], [0, 0, 0]])), ValueError, r"tokens\[0, 2\] = 5"),
    (dict(tokens=torch.tensor([[0, 1, 2], [0, -1, 0]])), ValueError, r"tokens\[1, 1\] = -1"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask must have shape"),
    (dict(advantages=torch.ones(3)), ValueError, "advantages must have shape"),
    (dict(mode="ppo"), ValueError, "mode"),
    (dict(inplace_backward=1), TypeError, "inplace_backward"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD)
def test_bad_inputs(kwargs, error, match):
    args = dict(
        logits=torch.zeros(2, 3, 5), tokens=torch.zeros(2, 3, dtype=torch.long), advantages=torch.ones(2),
        mask=torch.ones(2, 3, dtype=torch.bool),
    )  # fmt: skip
    args.update(kwargs)
    with pytest.raises(error, match=match):
        mk.policy_loss_from_logits(**args)
    if not any(k in kwargs for k in ("mask", "advantages", "mode", "inplace_backward")):
        with pytest.raises(error, match=match):
            mk.token_logprobs(args["logits"], args["tokens"], temperature=args.get("temperature", 1.0))


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_opcheck(backend):
    from moo_kernels.ops.logits.op import policy_loss_from_logits_op, token_logprobs_backward_op, token_logprobs_op
    from moo_kernels.ops.logits.spec import entropy_spec
    from moo_kernels.ops.loss.spec import loss_spec

    logits, tokens, adv, mask, kw = build("clip_higher_dual_cap_k3")
    logits = logits.contiguous().requires_grad_()
    stats = row_stats_reference(logits).float()
    g = torch.randn(B, T)
    with mk.use_backend(backend):
        torch.library.opcheck(token_logprobs_op, (logits, tokens, 0.9, True))
        torch.library.opcheck(token_logprobs_backward_op, (logits.detach(), tokens, stats, None, g, None, 1.0))
        # the loss's arguments in the order of its spec, from which the op's schema comes
        spec = loss_spec((B, T), logits.device, "logits", advantages=adv, mask=mask, **kw)
        es = entropy_spec(entropy_coef=0.01)
        # opcheck's backward takes sign(loss) as the incoming gradient and then compares the outputs: the eager op
        # rescales its gradient output in place (by design, see hand_over_grad), so this case has a positive loss
        torch.library.opcheck(policy_loss_from_logits_op, (logits, tokens, 1.0, True, *entropy_spec().flat(),
                                                           *spec.flat(), True))  # fmt: skip
        torch.library.opcheck(policy_loss_from_logits_op, (logits, tokens, 1.0, True, *es.flat(), *spec.flat(), True))


def test_torch_compile_fullgraph():
    logits, tokens, adv, mask, kw = build("clip_higher_dual_cap_k3")

    def step(x):
        loss, metrics, ent = mk.policy_loss_from_logits(x, tokens, adv, mask, return_entropy=True, **kw)
        logp = mk.token_logprobs(x, tokens, temperature=0.9)
        return loss + 0.1 * logp.sum(), metrics.clip_frac, ent

    x = logits.detach().clone().requires_grad_()
    y = logits.detach().clone().requires_grad_()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out[0].backward()
    ref = step(y)
    ref[0].backward()
    torch.testing.assert_close(out[0], ref[0])
    torch.testing.assert_close(out[2], ref[2])
    torch.testing.assert_close(x.grad, y.grad, atol=1e-7, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("v", [32000, 151936])
def test_gpu_vocabulary_sizes(dtype, v):
    """Real vocabulary sizes on CUDA (the chunk exchange runs for real): against the float64 reference."""
    g = torch.Generator().manual_seed(7)
    b, t = 2, 64
    full = (torch.randn(b, t + 1, v, generator=g) * 2).to(dtype)
    tokens = torch.randint(0, v, (b, t), generator=g)
    adv = torch.randn(b, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.2
    lp, _ = token_logprobs_reference(full[:, :-1], tokens)
    old = (lp + 0.3 * torch.randn(b, t, generator=g, dtype=torch.float64)).float()
    kw = dict(old_logp=old, ref_logp=old, beta=0.04, clip_high=0.28)
    rloss, _, rent, rgrad = policy_loss_from_logits_reference(full[:, :-1], tokens, adv, mask, **kw)
    for inplace in (False, True):
        leaf = full.cuda().requires_grad_()
        x = leaf * 1.0
        loss, _, ent = mk.policy_loss_from_logits(
            x[:, :-1], tokens.cuda(), adv.cuda(), mask.cuda(), return_entropy=True, inplace_backward=inplace,
            **{k: v.cuda() for k, v in kw.items() if isinstance(v, torch.Tensor)}, beta=0.04, clip_high=0.28,
        )  # fmt: skip
        (3 * loss).backward()
        tol = TOL[dtype]
        torch.testing.assert_close(loss.double().cpu(), rloss, atol=tol, rtol=tol)
        torch.testing.assert_close(ent.double().cpu(), rent, atol=1e-3, rtol=1e-3)
        grad = leaf.grad[:, :-1].double().cpu()
        torch.testing.assert_close(grad, 3 * rgrad, atol=tol * 3 * rgrad.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("backend,device", targets())
def test_returned_entropy_carries_its_gradient(backend, device):
    """An entropy bonus on the returned entropy reaches the logits (p_v (E_p[z] - z_v) / temperature), as
    autograd through log_softmax gives it; with inplace_backward the entropy has no gradient."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 11, (3, 5), generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.2
    adv = torch.randn(3, generator=g, dtype=torch.float64)
    x = z.clone().to(device).requires_grad_()
    with mk.use_backend(backend):
        loss, _, ent = mk.policy_loss_from_logits(x, tokens.to(device), adv.to(device), mask.to(device),
                                                  temperature=0.7, return_entropy=True)  # fmt: skip
    (loss - 0.05 * (ent * mask.to(device)).sum()).backward()
    y = z.clone().requires_grad_()
    with mk.use_backend("reference"):
        plain, _ = mk.policy_loss_from_logits(y, tokens, adv, mask, temperature=0.7)
    lp = torch.log_softmax(y / 0.7, dim=-1)
    entropy = -(lp.exp() * lp).sum(-1)
    (plain - 0.05 * (entropy * mask).sum()).backward()
    torch.testing.assert_close(x.grad.cpu(), y.grad, rtol=1e-6, atol=1e-7)
    # an unused entropy costs no second pass and changes nothing
    x2 = z.clone().to(device).requires_grad_()
    with mk.use_backend(backend):
        loss2, _, _ = mk.policy_loss_from_logits(x2, tokens.to(device), adv.to(device), mask.to(device),
                                                 temperature=0.7, return_entropy=True)  # fmt: skip
    loss2.backward()
    w = z.clone().requires_grad_()
    lw = torch.log_softmax(w / 0.7, dim=-1)
    (-(lw.exp() * lw).sum(-1) * mask).sum().backward()
    torch.testing.assert_close(x2.grad.cpu(), y.grad + 0.05 * w.grad, rtol=1e-6, atol=1e-7)


def test_entropy_has_no_gradient_with_inplace_backward():
    z = torch.randn(2, 4, 6, dtype=torch.float64).requires_grad_()
    leaf = z.clone()
    _, _, ent = mk.policy_loss_from_logits(leaf, torch.randint(0, 6, (2, 4)), torch.randn(2, dtype=torch.float64),
                                           torch.ones(2, 4, dtype=torch.bool), inplace_backward=True,
                                           return_entropy=True)  # fmt: skip
    assert not ent.requires_grad


def test_entropy_gradient_under_torch_compile():
    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 4, 9, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, 9, (2, 4), generator=g)
    mask = torch.ones(2, 4, dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)

    def f(x):
        loss, _, ent = mk.policy_loss_from_logits(x, tokens, adv, mask, return_entropy=True)
        return loss - 0.1 * ent.sum()

    x = z.clone().requires_grad_()
    f(x).backward()
    y = z.clone().requires_grad_()
    torch.compile(f, fullgraph=True)(y).backward()
    torch.testing.assert_close(y.grad, x.grad, rtol=1e-6, atol=1e-8)
