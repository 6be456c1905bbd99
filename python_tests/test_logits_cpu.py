"""token_logprobs C++ kernels (moo_kernels/ops/logits/cpp_launch.py, csrc/logits.cpp) against the float64 reference:
forward (logp, row statistics, entropy) and backward for every logits dtype, int32 / int64 tokens,
temperatures, strided views, in-place gradients, -inf logits, bad token ids, and bitwise determinism across
thread counts."""

import os
import subprocess
import sys

import pytest
import torch

from moo_kernels.ops.logits.cpp_launch import token_logprobs_bwd_cpp, token_logprobs_fwd_cpp
from moo_kernels.ops.logits.reference import (
    row_stats_reference,
    token_logprobs_grad_reference,
    token_logprobs_reference,
)

F64 = torch.float64
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# (atol, rtol) against the reference evaluated on the same (rounded) logits. The forward computes in float
# for every 16/32-bit dtype; the gradient is rounded to the logits' dtype.
FWD_TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-5, 1e-5), torch.float16: (1e-5, 1e-5), F64: (1e-12, 1e-12)}
GRAD_TOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-5, 1e-2), torch.float16: (1e-5, 1e-2), F64: (1e-12, 1e-12)}
B, T, V = 3, 7, 1031  # V: one full tile of 1024 and a ragged one


def make_logits(dtype, b=B, t=T, v=V, seed=0, strided=False, scale=3.0):
    """Logits [b, t, v] in dtype; strided: the view full[:, :-1] of [b, t + 1, v] logits (no copy)."""
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(b, t + 1 if strided else t, v, generator=g, dtype=F64) * scale).to(dtype)
    return full[:, :-1] if strided else full


def make_tokens(index_dtype=torch.int64, b=B, t=T, v=V, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, v, (b, t), generator=g).to(index_dtype)


def make_grads(seed=2, b=B, t=T):
    g = torch.Generator().manual_seed(seed)
    g_logp = torch.randn(t, b, generator=g).t()  # any strides
    g_entropy = torch.randn(b, t, generator=g, dtype=F64)
    return g_logp, g_entropy


def assert_close(actual, expected, tol, msg=""):
    atol, rtol = tol
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, equal_nan=True, msg=msg)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("strided", [False, True])
def test_forward(dtype, index_dtype, temperature, strided):
    logits = make_logits(dtype, strided=strided)
    assert logits.is_contiguous() != strided
    tokens = make_tokens(index_dtype)
    logp, stats, entropy = token_logprobs_fwd_cpp(logits, tokens, temperature, want_entropy=True)
    out_dtype = F64 if dtype == F64 else torch.float32
    assert logp.dtype == stats.dtype == entropy.dtype == out_dtype
    assert logp.shape == entropy.shape == (B, T) and stats.shape == (B, T, 2)
    ref_logp, ref_entropy = token_logprobs_reference(logits, tokens, temperature)
    ref_stats = row_stats_reference(logits, temperature)
    assert torch.equal(stats[..., 0].double(), ref_stats[..., 0])  # the row maximum, exactly
    assert_close(logp, ref_logp, FWD_TOL[dtype], "logp")
    assert_close(stats[..., 1], ref_stats[..., 1], FWD_TOL[dtype], "log l")
    assert_close(entropy, ref_entropy, FWD_TOL[dtype], "entropy")

    logp_only, stats_only, none = token_logprobs_fwd_cpp(logits, tokens, temperature, want_entropy=False)
    assert none is None
    assert torch.equal(logp_only, logp) and torch.equal(stats_only, stats)


def test_forward_large_vocab_float32():
    """logp within 1e-5 relative of float64 at V = 50k (sums over 50k terms in float)."""
    logits = make_logits(torch.float32, b=2, t=4, v=50_000, scale=4.0)
    tokens = make_tokens(b=2, t=4, v=50_000)
    logp, _, entropy = token_logprobs_fwd_cpp(logits, tokens, 0.7, want_entropy=True)
    ref_logp, ref_entropy = token_logprobs_reference(logits, tokens, 0.7)
    assert ((logp.double() - ref_logp).abs() / ref_logp.abs()).max() < 1e-5
    assert_close(entropy, ref_entropy, FWD_TOL[torch.float32])


GRADS = {"both": (True, True), "logp": (True, False), "entropy": (False, True), "none": (False, False)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("grads", list(GRADS))
@pytest.mark.parametrize("strided", [False, True])
def test_backward(dtype, temperature, grads, strided):
    logits = make_logits(dtype, strided=strided)
    tokens = make_tokens(torch.int32 if strided else torch.int64)
    use_logp, use_entropy = GRADS[grads]
    g_logp, g_entropy = make_grads()
    g_logp, g_entropy = (g_logp if use_logp else None), (g_entropy if use_entropy else None)
    _, stats, entropy = token_logprobs_fwd_cpp(logits, tokens, temperature, want_entropy=use_entropy)
    # a strided output too: rows of a larger buffer
    out = torch.full((B, T + 1, V), float("nan"), dtype=dtype)[:, 1:] if strided else torch.empty_like(logits)
    res = token_logprobs_bwd_cpp(logits, tokens, stats, entropy, g_logp, g_entropy, temperature, out)
    assert res is out and res.dtype == dtype
    expected = token_logprobs_grad_reference(logits, tokens, g_logp, g_entropy, temperature)
    if grads == "none":
        assert torch.equal(out, torch.zeros_like(out))
    assert_close(out, expected, GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True])
def test_backward_in_place(dtype, strided):
    """out = logits: the gradient overwrites the logits it is computed from."""
    logits = make_logits(dtype, strided=strided, seed=5)
    tokens = make_tokens()
    g_logp, g_entropy = make_grads(seed=6)
    _, stats, entropy = token_logprobs_fwd_cpp(logits, tokens, 0.7, want_entropy=True)
    expected = token_logprobs_grad_reference(logits, tokens, g_logp, g_entropy, 0.7)
    not_in_place = token_logprobs_bwd_cpp(
        logits, tokens, stats, entropy, g_logp, g_entropy, 0.7, torch.empty_like(logits)
    )
    buffer = make_logits(dtype, strided=strided, seed=5)  # a copy of the logits, in the same layout
    res = token_logprobs_bwd_cpp(buffer, tokens, stats, entropy, g_logp, g_entropy, 0.7, buffer)
    assert res is buffer and res.stride() == logits.stride()
    assert torch.equal(res, not_in_place)
    assert_close(res, expected, GRAD_TOL[dtype])


def neg_inf_logits(dtype):
    """Logits with -inf entries: scattered ones, whole lanes and a whole tile of a row, the chosen token of
    one row, and one row of -inf only (row [2, 6])."""
    logits = make_logits(F64, seed=7)
    g = torch.Generator().manual_seed(8)
    logits[torch.rand(B, T, V, generator=g) < 0.3] = float("-inf")
    logits[0, 1, :40] = float("-inf")  # the first lanes of the row have no finite logit for a while
    logits[0, 2, :1024] = float("-inf")  # the whole first tile
    logits[1, 0, 5:] = float("-inf")  # five finite logits
    logits[2, 6] = float("-inf")
    tokens = make_tokens()
    tokens[0, 1] = 3  # a -inf logit: logp = -inf
    tokens[1, 0] = 2
    return logits.to(dtype), tokens


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_neg_inf_logits(dtype, temperature):
    logits, tokens = neg_inf_logits(dtype)
    logp, stats, entropy = token_logprobs_fwd_cpp(logits, tokens, temperature, want_entropy=True)
    # The limit of p * x is 0 at a -inf logit, which a very negative finite logit gives too.
    finite = logits.to(F64).masked_fill(logits.isneginf(), -1e300)
    ref_logp, ref_entropy = token_logprobs_reference(finite, tokens, temperature)
    chosen_neg_inf = logits.gather(-1, tokens.long()[..., None])[..., 0].isneginf()
    ref_logp[chosen_neg_inf] = float("-inf")
    ref_stats = row_stats_reference(finite, temperature)
    live = torch.ones(B, T, dtype=torch.bool)
    live[2, 6] = False
    assert_close(logp[live], ref_logp[live], FWD_TOL[dtype], "logp")
    assert_close(stats[live], ref_stats[live], FWD_TOL[dtype], "stats")
    assert_close(entropy[live], ref_entropy[live], FWD_TOL[dtype], "entropy")
    assert logp[0, 1] == float("-inf") and entropy[live].isfinite().all()
    # a row of -inf only: log-prob -inf, entropy 0, like the reference
    assert (stats[2, 6] == float("-inf")).all() and logp[2, 6] == float("-inf") and entropy[2, 6] == 0
    ref = token_logprobs_reference(logits, tokens, temperature)
    assert ref[0][2, 6] == float("-inf") and ref[1][2, 6] == 0

    g_logp, g_entropy = make_grads(seed=9)
    grad = token_logprobs_bwd_cpp(
        logits, tokens, stats, entropy, g_logp, g_entropy, temperature, torch.empty_like(logits)
    )
    expected = token_logprobs_grad_reference(finite, tokens, g_logp, g_entropy, temperature)
    assert_close(grad[live], expected[live], GRAD_TOL[dtype])
    not_chosen = torch.ones_like(logits, dtype=torch.bool).scatter_(-1, tokens.long()[..., None], False)
    assert (grad[logits.isneginf() & not_chosen] == 0).all()
    assert grad[0, 1, 3].double() == pytest.approx(g_logp[0, 1].item() / temperature, rel=1e-2)
    assert torch.equal(grad[2, 6], torch.zeros_like(grad[2, 6]))  # no finite logit: gradient 0


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("bad", [-1, V, V + 100])
def test_token_out_of_range(index_dtype, bad):
    logits = make_logits(torch.float32, strided=True)
    tokens = make_tokens(index_dtype)
    tokens[1, 4] = bad
    tokens[2, 0] = -5  # a later bad id: the first one is reported
    message = rf"tokens\[1, 4\] = {bad} is outside \[0, V\) with V = {V}"
    with pytest.raises(ValueError, match=message):
        token_logprobs_fwd_cpp(logits, tokens, 1.0, want_entropy=True)
    stats = torch.zeros(B, T, 2)
    out = torch.full((B, T, V), 7.0)
    with pytest.raises(ValueError, match=message):
        token_logprobs_bwd_cpp(logits, tokens, stats, None, torch.ones(B, T), None, 1.0, out)
    assert (out == 7.0).all()  # nothing written


def test_rejects_layouts_it_cannot_read():
    logits = make_logits(torch.float32)
    tokens = make_tokens()
    with pytest.raises(ValueError, match="unit stride on V"):
        token_logprobs_fwd_cpp(logits.transpose(1, 2).contiguous().transpose(1, 2), tokens, 1.0, False)
    with pytest.raises(ValueError, match="tokens must have shape"):
        token_logprobs_fwd_cpp(logits, tokens[:, :-1], 1.0, False)
    with pytest.raises(ValueError, match="unsupported dtype"):
        token_logprobs_fwd_cpp(logits, tokens.to(torch.int16), 1.0, False)
    _, stats, _ = token_logprobs_fwd_cpp(logits, tokens, 1.0, False)
    with pytest.raises(ValueError, match="g_entropy needs the entropy"):
        token_logprobs_bwd_cpp(logits, tokens, stats, None, None, torch.ones(B, T), 1.0, torch.empty_like(logits))
    with pytest.raises(ValueError, match="out: unsupported dtype"):
        token_logprobs_bwd_cpp(logits, tokens, stats, None, torch.ones(B, T), None, 1.0, logits.double())
    with pytest.raises(ValueError, match="stats must have shape"):
        token_logprobs_bwd_cpp(logits, tokens, stats[..., 0], None, torch.ones(B, T), None, 1.0, logits.clone())


# Prints a digest of every output for sizes above the kernels' parallel threshold; run under 1 and 2 threads.
DIGEST_SCRIPT = """
import hashlib, torch
from moo_kernels.ops.logits.cpp_launch import token_logprobs_bwd_cpp, token_logprobs_fwd_cpp
g = torch.Generator().manual_seed(0)
h = hashlib.sha256()
for dtype in (torch.float32, torch.bfloat16, torch.float64):
    logits = (torch.randn(3, 38, 3001, generator=g, dtype=torch.float64) * 3).to(dtype)[:, 1:]
    tokens = torch.randint(0, 3001, (3, 37), generator=g)
    logp, stats, entropy = token_logprobs_fwd_cpp(logits, tokens, 0.7, want_entropy=True)
    grad = token_logprobs_bwd_cpp(logits, tokens, stats, entropy, torch.randn(3, 37, generator=g),
                                  torch.randn(3, 37, generator=g), 0.7, torch.empty_like(logits))
    for x in (logp, stats, entropy, grad):
        h.update(x.contiguous().view(torch.uint8).numpy().tobytes())
print(h.hexdigest())
"""


def test_deterministic_across_thread_counts():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = set()
    for threads in ("1", "2", "2"):
        env = dict(os.environ, OMP_NUM_THREADS=threads, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        run = subprocess.run(
            [sys.executable, "-c", DIGEST_SCRIPT], env=env, capture_output=True, text=True, check=True, cwd=root
        )
        digests.add(run.stdout.strip())
    assert len(digests) == 1, digests


def test_deterministic_run_to_run():
    logits = make_logits(torch.float32, b=4, t=33, v=2003, seed=11)
    tokens = make_tokens(b=4, t=33, v=2003)
    g_logp, g_entropy = make_grads(b=4, t=33)
    first = token_logprobs_fwd_cpp(logits, tokens, 0.7, want_entropy=True)
    grad = token_logprobs_bwd_cpp(logits, tokens, first[1], first[2], g_logp, g_entropy, 0.7, torch.empty_like(logits))
    for _ in range(3):
        again = token_logprobs_fwd_cpp(logits, tokens, 0.7, want_entropy=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
        out = torch.empty_like(logits)
        token_logprobs_bwd_cpp(logits, tokens, again[1], again[2], g_logp, g_entropy, 0.7, out)
        assert torch.equal(out, grad)
