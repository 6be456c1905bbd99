"""Every public op under torch.compile(fullgraph=True) on CPU: forward and backward, against eager.

Each check compiles the function once and asserts that dynamo produced exactly one graph and no graph
break, and that the traced forward and backward graphs hold no host synchronisation: scalar capture is
off (an .item(), int() or bool() of a tensor in traced code would break the graph, which fullgraph turns
into an error) and the AOT graphs hold no aten._local_scalar_dense (nor, except where documented, an op
whose output size depends on the data). Most checks use the "aot_eager" backend (the graphs are the
ones inductor would get, at a fraction of the compile time); one check per op uses the default
inductor backend (C++ code generation on CPU). The ops' forward outputs come from the same kernel
compiled or not, so they must match eager bitwise; gradients traced through PyTorch code (the
advantage backward) may be reordered by inductor and are compared to rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.utils import counters
from torch.utils import _pytree as pytree

import moo_kernels as mk

# ops that make the host wait for the device (a value read back, or an output size read from the data)
SYNC_OPS = {"_local_scalar_dense", "item", "nonzero", "unique", "_unique", "_unique2", "unique_dim", "masked_select"}


def _recording_backend(graphs: list):
    """aot_eager that keeps the forward and backward graphs it was given."""

    def keep(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=keep, bw_compiler=keep)


def _op_names(gm) -> set[str]:
    names = set()
    for node in gm.graph.nodes:
        if node.op in ("call_function", "call_method"):
            target = node.target
            name = getattr(target, "__name__", str(target))
            names.add(name.split(".")[0])
    return names


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone().requires_grad_(x.requires_grad)
    return x


def check_compiled(fn, *args, backend="aot_eager", grad_rtol=1e-6, allowed_sync=frozenset()):
    """Compile fn with fullgraph=True, run it and eager fn on copies of args, backpropagate the same
    cotangents (not 1) through both; assert one graph, no break, no host sync, equal outputs and grads.
    Returns the compiled outputs and the compiled arguments (with their .grad)."""
    torch._dynamo.reset()
    counters.clear()
    graphs: list = []
    compiled_backend = _recording_backend(graphs) if backend == "aot_eager" else backend
    compiled = torch.compile(fn, fullgraph=True, backend=compiled_backend)
    args_c = [_clone(a) for a in args]
    args_e = [_clone(a) for a in args]
    with torch._dynamo.config.patch(capture_scalar_outputs=False, capture_dynamic_output_shape_ops=False):
        out_c = compiled(*args_c)
    out_e = fn(*args_e)

    leaves_c, leaves_e = pytree.tree_leaves(out_c), pytree.tree_leaves(out_e)
    assert len(leaves_c) == len(leaves_e)
    for a, b in zip(leaves_c, leaves_e, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b), "a forward output differs from eager"

    g = torch.Generator().manual_seed(0)
    diff = [(a, b) for a, b in zip(leaves_c, leaves_e, strict=True) if a.requires_grad]
    if diff:
        cot = [torch.randn(a.shape, generator=g, dtype=torch.float64).to(a.dtype) + 0.5 for a, _ in diff]
        torch.autograd.backward([a for a, _ in diff], cot)
        torch.autograd.backward([b for _, b in diff], cot)
        for a, b in zip(args_c, args_e, strict=True):
            if isinstance(a, torch.Tensor) and a.requires_grad:
                assert a.grad is not None and b.grad is not None
                assert a.grad.abs().sum() > 0, "the gradient is zero: nothing checked"
                torch.testing.assert_close(a.grad, b.grad, atol=grad_rtol, rtol=grad_rtol)

    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 1
    if backend == "aot_eager":
        assert len(graphs) == (2 if diff else 1), "expected a forward and a backward graph"
        for gm in graphs:
            syncs = (_op_names(gm) & SYNC_OPS) - allowed_sync
            assert not syncs, f"host synchronisation in a traced graph: {syncs}"
    return out_c, args_c


# ---- the advantage op ---------------------------------------------------------------------------------------

N, K = 24, 3


def _rewards(n=N, k=K, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, k, generator=g)
    r[:, 0] = (r[:, 0] > 0).float()  # 0/1 correctness
    r[:4, 1] = 0.5  # a group where objective 1 does not vary
    valid = torch.rand(n, generator=g) > 0.1
    gates = torch.rand(n, 2, generator=g) > 0.15
    return r, valid, gates, torch.rand(n, k, generator=g) > 0.2


ADV_CASES = {
    "scalarize": dict(weighting="scalarize", normalize="zscore"),
    "fixed_batch_normalize": dict(weighting="fixed", normalize="center", batch_normalize=True, std="population"),
    "variance_all_options": dict(
        weighting="variance",
        batch_normalize=True,
        infeasible_advantage=-0.5,
        min_feasible=2,
        drop_zero_variance=True,
        positive_scale=0.8,
        negative_scale=1.2,
        clip=2.0,
    ),
    "variance_rloo_reward_gates": dict(weighting="variance", normalize="rloo", reward_gates=True, gated_value=-1.0),
    "fixed_std_floor": dict(weighting="fixed", std_floor=[0.0, 0.1, 0.02]),
}


@pytest.mark.parametrize("grouping", ["group_size", "group_ids"])
@pytest.mark.parametrize("case", list(ADV_CASES))
def test_advantages(case, grouping):
    r, valid, gates, reward_gates = _rewards()
    options = dict(ADV_CASES[case])
    if options.pop("reward_gates", False):
        options["reward_gates"] = reward_gates
    ids = torch.randperm(N, generator=torch.Generator().manual_seed(2)) % 5  # groups of 4 and 5, any order
    group = {"group_size": 4} if grouping == "group_size" else {"group_ids": ids}

    def step(r, w):
        return mk.multi_objective_advantages(r, weights=w, valid=valid, gates=gates, **group, **options)

    w = torch.tensor([1.0, 0.5, 2.0], requires_grad=True)
    allowed = {"unique", "_unique2"} if grouping == "group_ids" else set()  # counting groups: documented sync
    out, _ = check_compiled(step, r.requires_grad_(), w, allowed_sync=allowed)
    assert torch.count_nonzero(out.advantages) > 0


def test_advantages_inductor():
    """Default backend: gates, batch_normalize (its batch statistic is a segment of size 1 in the traced
    backward, summed with a plain sum there: see reference._segment_sum) and clip."""
    r, _, gates, _ = _rewards(seed=1)

    def step(r):
        out = mk.multi_objective_advantages(r, group_size=4, gates=gates, batch_normalize=True, clip=3.0)
        return out.advantages, out.std

    check_compiled(step, r.requires_grad_(), backend="inductor", grad_rtol=1e-5)


# ---- brier_reward -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_brier_reward(backend):
    g = torch.Generator().manual_seed(3)
    q = torch.rand(5, 7, generator=g, requires_grad=True)
    correct = torch.rand(5, 7, generator=g) > 0.5

    def step(q):
        return mk.brier_reward(correct, q), mk.brier_reward(correct.float(), q.double())

    check_compiled(step, q, backend=backend)


# ---- policy_loss --------------------------------------------------------------------------------------------

B, T, V = 5, 37, 61


def _loss_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g) * 3 - 0.01
    old = logp + 0.4 * torch.randn(B, T, generator=g)
    ref = logp + 0.4 * torch.randn(B, T, generator=g)
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[1] = False  # a sequence without an active token
    adv = torch.randn(B, generator=g)
    extra = dict(
        is_weights=torch.rand(B, T, generator=g) + 0.5,
        offpolicy=torch.tensor([True, False, False, True, False]),
        token_advantages=0.3 * torch.randn(B, T, generator=g),
    )
    return logp, old, ref, mask, adv, extra


LOSS_CASES = {
    "clip_dual_cap_k3": dict(clip_high=0.28, dual_clip=3.0, ratio_cap=2.5, beta=0.04, kl="k3", num_tokens=123),
    "clip_k1_seq_mean_token_mean": dict(beta=0.1, kl="k1", agg="seq-mean-token-mean", is_weights=True),
    "gspo_seq_mean_token_sum": dict(mode="gspo", agg="seq-mean-token-sum"),
    "cispo_sum_norm": dict(mode="cispo", clip_high=0.5, agg="seq-mean-token-sum-norm", max_len=40),
    "reinforce_token_advantages": dict(mode="reinforce", token_advantages=True, beta=0.02, kl="k2"),
    "offpolicy": dict(offpolicy=True, clip_high=0.3),
}


def _loss_kwargs(case, old, ref, extra):
    kw = dict(LOSS_CASES[case])
    for name in ("is_weights", "offpolicy", "token_advantages"):
        if kw.pop(name, False):
            kw[name] = extra[name]
    kw["old_logp"] = old
    if kw.get("beta", 0) > 0:
        kw["ref_logp"] = ref
    return kw


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_policy_loss(case):
    logp, old, ref, mask, adv, extra = _loss_inputs()
    kw = _loss_kwargs(case, old, ref, extra)

    def step(x):
        loss, metrics = mk.policy_loss(x, adv, mask, **kw)
        return loss, metrics

    out, _ = check_compiled(step, logp.requires_grad_())
    assert out[1].active_tokens == mask.sum()


def test_policy_loss_inductor():
    logp, old, ref, mask, adv, extra = _loss_inputs(seed=1)

    def step(x):
        loss, metrics = mk.policy_loss(x, adv, mask, old_logp=old, ref_logp=ref, beta=0.04, clip_high=0.28)
        return loss, metrics.clip_frac, metrics.kl_mean

    check_compiled(step, logp.requires_grad_(), backend="inductor")


def test_policy_loss_changing_float_option():
    """A float option that changes between calls (a global token count, a beta schedule) becomes a
    symbolic float in dynamo: validation must still trace (no graph break under fullgraph)."""
    torch._dynamo.reset()
    logp, old, ref, mask, adv, _ = _loss_inputs(seed=2)
    compiled = torch.compile(
        lambda x, n, beta: mk.policy_loss(x, adv, mask, old_logp=old, ref_logp=ref, beta=beta, num_tokens=n)[0],
        fullgraph=True,
        backend="aot_eager",
    )
    for n, beta in ((100.0, 0.01), (150.0, 0.02), (201.0, 0.03)):
        got = compiled(logp, n, beta)
        want = mk.policy_loss(logp, adv, mask, old_logp=old, ref_logp=ref, beta=beta, num_tokens=n)[0]
        assert torch.equal(got, want)


# ---- token_logprobs and policy_loss_from_logits ----------------------------------------------------------------


def _logits_inputs(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    full = (torch.randn(B, T + 1, V, generator=g) * 2).to(dtype)
    tokens = torch.randint(0, V, (B, T), generator=g)
    return full, tokens


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_token_logprobs(backend):
    full, tokens = _logits_inputs(seed=4, dtype=torch.bfloat16 if backend == "aot_eager" else torch.float32)

    def step(x):
        logp, ent = mk.token_logprobs(x[:, :-1], tokens, temperature=0.9, return_entropy=True)
        return logp, ent

    check_compiled(step, full.requires_grad_(), backend=backend)


@pytest.mark.parametrize("mode", ["clip", "gspo"])
def test_policy_loss_from_logits(mode):
    full, tokens = _logits_inputs(seed=5)
    _, old, ref, mask, adv, _ = _loss_inputs(seed=5)

    def step(x):
        loss, metrics, ent = mk.policy_loss_from_logits(
            x[:, :-1], tokens, adv, mask, temperature=0.9, old_logp=old, ref_logp=ref, beta=0.04, clip_high=0.28,
            mode=mode, return_entropy=True,
        )  # fmt: skip
        return loss, metrics.clip_frac, ent

    check_compiled(step, full.requires_grad_())


def test_policy_loss_from_logits_inductor_inplace_backward():
    """inplace_backward is eager-only: compiled, the gradient gets its own buffer and the logits stay."""
    full, tokens = _logits_inputs(seed=6)
    _, old, _, mask, adv, _ = _loss_inputs(seed=6)
    logits = full[:, :-1].contiguous()

    def step(x):
        loss, metrics = mk.policy_loss_from_logits(
            x, tokens, adv, mask, old_logp=old, clip_high=0.28, inplace_backward=True
        )
        return loss, metrics.ratio_mean

    out, (x,) = check_compiled(step, logits.requires_grad_(), backend="inductor")
    assert torch.equal(x, logits), "compiled, the logits must not be overwritten"
    assert x.grad.data_ptr() != x.data_ptr()


def _head_inputs(seed, dtype=torch.float32):
    """hidden [B, T, D], weight [V, D], bias [V] for the logits inputs' tokens."""
    full, tokens = _logits_inputs(seed=seed)
    B, T, V = full.shape[0], full.shape[1] - 1, full.shape[2]
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, 16, generator=g).to(dtype)
    weight = (torch.randn(V, 16, generator=g) * 0.5).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.2).to(dtype)
    return hidden, weight, bias, tokens


@pytest.mark.parametrize("mode", ["clip", "gspo"])
def test_policy_loss_from_hidden(mode):
    """One registered op (no graph break); the entropy's gradient (a cotangent on it) through the traced backward."""
    hidden, weight, bias, tokens = _head_inputs(seed=7)
    _, old, ref, mask, adv, _ = _loss_inputs(seed=7)

    def step(h, w, b):
        loss, metrics, ent = mk.policy_loss_from_hidden(
            h, w, tokens, adv, mask, bias=b, temperature=0.9, old_logp=old, ref_logp=ref, beta=0.04, mode=mode,
            chunk_size=5, return_entropy=True,
        )  # fmt: skip
        return loss, metrics.clip_frac, ent

    check_compiled(step, hidden.requires_grad_(), weight.requires_grad_(), bias.requires_grad_(), grad_rtol=1e-5)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_token_logprobs_from_hidden(backend):
    hidden, weight, bias, tokens = _head_inputs(seed=8)

    def step(h, w):
        return mk.token_logprobs_from_hidden(h, w, tokens, bias=bias, temperature=0.9, chunk_size=4,
                                             return_entropy=True)  # fmt: skip

    check_compiled(step, hidden.requires_grad_(), weight.requires_grad_(), backend=backend, grad_rtol=1e-5)


# ---- a whole GRPO step in one graph -------------------------------------------------------------------------------


def test_grpo_step_is_one_graph():
    """torch._dynamo.explain: rewards -> Brier -> advantages -> log-probs -> loss is a single graph."""
    torch._dynamo.reset()
    full, tokens = _logits_inputs(seed=7)
    _, old, ref, mask, _, _ = _loss_inputs(seed=7)
    g = torch.Generator().manual_seed(7)
    correct = torch.rand(B, generator=g) > 0.5
    confidence = torch.rand(B, generator=g)
    fmt = torch.rand(B, generator=g)

    def step(logits):
        brier = mk.brier_reward(correct, confidence)
        rewards = torch.stack([correct.float(), brier, fmt], dim=1)
        adv = mk.multi_objective_advantages(rewards, group_size=B, weighting="variance").advantages
        with torch.no_grad():
            ref_logp = mk.token_logprobs(logits.detach()[:, :-1], tokens)
        loss, metrics = mk.policy_loss_from_logits(
            logits[:, :-1], tokens, adv, mask, old_logp=old, ref_logp=ref_logp, beta=0.04
        )
        return loss, metrics.clip_frac

    explanation = torch._dynamo.explain(step)(full.requires_grad_())
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.gpu
def test_grpo_step_compiles_on_cuda():
    """The whole step on CUDA with inductor (the Triton kernels inside the compiled graph), forward and
    backward, against eager; nan_policy="ignore" and check=False keep the step free of host syncs."""
    g = torch.Generator().manual_seed(11)
    b, t, v = 8, 32, 1000
    full = torch.randn(b, t + 1, v, generator=g).to(torch.bfloat16).cuda()
    tokens = torch.randint(0, v, (b, t), generator=g).cuda()
    mask = (torch.rand(b, t, generator=g) > 0.2).cuda()
    correct = (torch.rand(b, generator=g) > 0.5).cuda()
    confidence = torch.rand(b, generator=g).cuda()
    fmt = torch.rand(b, generator=g).cuda()
    with torch.no_grad():
        old = mk.token_logprobs(full[:, :-1], tokens) + 0.05 * torch.randn(b, t, generator=g).cuda()

    def step(logits):
        brier = mk.brier_reward(correct, confidence, check=False)
        rewards = torch.stack([correct.float(), brier, fmt], dim=1)
        adv = mk.multi_objective_advantages(rewards, group_size=4, weighting="variance", nan_policy="ignore")
        loss, metrics = mk.policy_loss_from_logits(logits[:, :-1], tokens, adv.advantages, mask, old_logp=old)
        return loss, mk.token_logprobs(logits[:, :-1], tokens), metrics.clip_frac

    check_compiled(step, full.requires_grad_(), backend="inductor", grad_rtol=1e-2)
