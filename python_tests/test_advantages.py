"""multi_objective_advantages: every backend against the float64 reference, edge cases, errors,
gradients, torch.library checks and torch.compile."""

import pytest
import torch
from conftest import HAS_CUDA, assert_close, targets

import moo_kernels as mk
from moo_kernels.ops.advantages.reference import advantages_reference

TARGETS = targets()
FIELDS = ("advantages", "group_mask", "sample_mask", "weights", "mean", "std")


def make_rewards(n, k, seed=0, dtype=torch.float32):
    """Columns of the kinds trainers produce: 0/1 correctness, uniform, normal, three-level rubric."""
    g = torch.Generator().manual_seed(seed)
    cols = []
    for c in range(k):
        kind = c % 4
        if kind == 0:
            cols.append((torch.rand(n, generator=g) > 0.5).double())
        elif kind == 1:
            cols.append(torch.rand(n, generator=g, dtype=torch.float64))
        elif kind == 2:
            cols.append(torch.randn(n, generator=g, dtype=torch.float64) * 3 + 1)
        else:
            cols.append(torch.randint(0, 3, (n,), generator=g).double() / 2)
    return torch.stack(cols, dim=1).to(dtype)


def masks(n, m=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) > 0.1, torch.rand(n, m, generator=g) > 0.15


def run(backend, device, rewards, **kw):
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    with mk.use_backend(backend):
        return mk.multi_objective_advantages(rewards.to(device), **kw)


def reference(rewards, **kw):
    with mk.use_backend("reference"):
        return mk.multi_objective_advantages(rewards, **kw)


def check_against_reference(backend, device, rewards, **kw):
    out = run(backend, device, rewards, **kw)
    ref = reference(rewards, **kw)
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    for name, a, b in zip(FIELDS, out, ref, strict=True):
        assert a.device.type == device, name
        assert a.shape == b.shape, name
        if a.dtype == torch.bool:
            assert torch.equal(a.cpu(), b), f"{name} differs"
        else:
            assert a.dtype == dtype, name
            assert torch.isfinite(a).all(), f"{name} has non-finite values"
            assert_close(a, b, dtype, msg=f"{name} ({backend}/{device})")
    return out


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("normalize", ["zscore", "center", "rloo", "none"])
@pytest.mark.parametrize("weighting", ["scalarize", "fixed", "variance"])
@pytest.mark.parametrize("std,batch_normalize", [("unbiased", False), ("population", True), ("unbiased", True)])
def test_matches_reference(backend, device, normalize, weighting, std, batch_normalize):
    n, k = 7 * 6, 3
    valid, gates = masks(n)
    check_against_reference(
        backend,
        device,
        make_rewards(n, k, seed=3),
        group_size=6,
        weights=[1.0, 0.5, 2.0],
        normalize=normalize,
        weighting=weighting,
        std=std,
        batch_normalize=batch_normalize,
        valid=valid,
        gates=gates,
    )


OPTION_CASES = {
    "defaults": {},
    "reward_gates": {"reward_gates": "rg", "gated_value": -0.25},
    "gates_1d_infeasible": {"gates": "g1", "infeasible_advantage": -1.0},
    "min_feasible": {"gates": "g2", "min_feasible": 4, "infeasible_advantage": -0.5},
    "drop_zero_variance": {"drop_zero_variance": True, "weighting": "scalarize"},
    "sign_shaping": {"positive_scale": 0.0, "negative_scale": 1.5},
    "clip": {"clip": 0.75, "weighting": "fixed"},
    "eps_zero": {"eps": 0.0, "normalize": "zscore"},
    "std_floor_fixed": {"weighting": "fixed", "std_floor": [0.0, 0.05, 0.5, 0.02]},
    "std_floor_variance_number": {
        "weighting": "variance",
        "std_floor": 0.1,
        "gates": "g2",
        "nan_policy": "ignore",
        "nan": True,
    },  # fmt: skip
    "std_floor_tensor_eps_zero": {"weighting": "fixed", "std_floor": "floor", "eps": 0.0, "batch_normalize": True},
    "nan_ignore": {"nan_policy": "ignore", "nan": True},
    "everything": {
        "reward_gates": "rg",
        "gates": "g2",
        "valid": "v",
        "min_feasible": 2,
        "drop_zero_variance": True,
        "batch_normalize": True,
        "positive_scale": 0.5,
        "clip": 1.5,
        "infeasible_advantage": -0.3,
        "nan_policy": "ignore",
        "nan": True,
        "std": "population",
    },
}


def build_case(case, n, k, seed=5):
    g = torch.Generator().manual_seed(seed)
    rewards = make_rewards(n, k, seed=seed)
    kw = dict(OPTION_CASES[case])
    if kw.pop("nan", False):
        rewards[torch.rand(n, k, generator=g) < 0.08] = float("nan")
        rewards[3, 1] = float("inf")
    tensors = {
        "rg": torch.rand(n, k, generator=g) > 0.3,
        "g1": torch.rand(n, generator=g) > 0.2,
        "g2": torch.rand(n, 3, generator=g) > 0.1,
        "v": torch.rand(n, generator=g) > 0.1,
        "floor": torch.tensor([0.3, 0.0, 0.01, 1e-4], dtype=torch.float32)[:k],
    }
    kw = {key: tensors[v] if isinstance(v, str) and v in tensors else v for key, v in kw.items()}
    return rewards, kw


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_options_match_reference(backend, device, case):
    rewards, kw = build_case(case, 8 * 5, 4)
    check_against_reference(backend, device, rewards, group_size=5, **kw)


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("weighting", ["scalarize", "variance"])
def test_group_ids_uneven_and_shuffled(backend, device, weighting):
    sizes = [1, 5, 2, 9, 3, 1, 7]
    ids = torch.cat([torch.full((s,), 10 * i - 7) for i, s in enumerate(sizes)])
    ids = ids[torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(0))]
    n = ids.numel()
    valid, gates = masks(n)
    out = check_against_reference(
        backend,
        device,
        make_rewards(n, 3),
        group_ids=ids,
        weighting=weighting,
        valid=valid,
        gates=gates,
        batch_normalize=True,
    )
    assert out.group_mask.numel() == len(sizes)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_group_ids_equal_group_size(backend, device):
    rewards = make_rewards(24, 2)
    a = run(backend, device, rewards, group_size=4)
    b = run(backend, device, rewards, group_ids=torch.arange(24) // 4)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_large_groups_span_several_chunks(backend, device):
    # One group larger than a kernel chunk: statistics are merged across chunks.
    n = 600 if backend != "triton" else 300
    rewards = make_rewards(n, 3, seed=9)
    ids = torch.cat([torch.zeros(n - 40, dtype=torch.long), torch.ones(40, dtype=torch.long)])
    check_against_reference(backend, device, rewards, group_ids=ids, batch_normalize=True)
    check_against_reference(backend, device, rewards, group_size=n // 2, weighting="scalarize")


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(backend, device, dtype):
    rewards = make_rewards(30, 3, dtype=dtype)
    valid, gates = masks(30)
    check_against_reference(backend, device, rewards, group_size=6, valid=valid, gates=gates)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_non_contiguous_inputs(backend, device):
    base = make_rewards(24, 6)
    transposed = base.t().contiguous().t()
    sliced = base[:, ::2]
    rg = (torch.rand(6, 24) > 0.3).t()
    for rewards in (transposed, sliced):
        assert not rewards.is_contiguous()
        check_against_reference(backend, device, rewards, group_size=4, reward_gates=rg[:, : rewards.shape[1]])


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("normalize", ["zscore", "center", "rloo"])
@pytest.mark.parametrize("weighting", ["scalarize", "fixed", "variance"])
def test_constant_groups_give_exact_zero(backend, device, normalize, weighting):
    # Values that are not exact in binary: a naive fp32 mean leaves a residue that zscore amplifies.
    vals = torch.tensor([0.1, 1 / 3, 0.7, 1e4 + 0.1])
    rewards = vals.repeat_interleave(7).view(-1, 1).repeat(1, 2).float()
    rewards[:, 1] *= 3
    out = run(backend, device, rewards, group_size=7, normalize=normalize, weighting=weighting)
    assert torch.equal(out.advantages.cpu(), torch.zeros(28))
    assert torch.equal(out.std.cpu(), torch.zeros(4, 2))
    assert torch.equal(out.mean.cpu(), rewards[::7].cpu())
    single = run(backend, device, make_rewards(5, 2), group_size=1, normalize=normalize, weighting=weighting)
    assert torch.equal(single.advantages.cpu(), torch.zeros(5))


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("weighting", ["fixed", "variance"])
def test_one_objective_is_plain_grpo(backend, device, weighting):
    r = torch.randn(40, dtype=torch.float64)
    out = run(backend, device, r, group_size=8, weighting=weighting, eps=1e-4)
    g = r.view(5, 8)
    expected = (g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-4)
    assert_close(out.advantages, expected.reshape(-1), torch.float64)


def test_default_weighting_is_fixed():
    # GDPO is the default: each objective z-scored, then the weighted sum (0.4.0; "variance" before)
    r = torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0], [0.0, -2.0]], dtype=torch.float64)
    w = torch.tensor([2.0, 1.0], dtype=torch.float64)
    default = mk.multi_objective_advantages(r, group_size=4, weights=w).advantages
    z = (r - r.mean(0)) / (r.std(0) + 1e-6)
    torch.testing.assert_close(default, (z * w).sum(1), rtol=1e-12, atol=1e-12)
    variance = mk.multi_objective_advantages(r, group_size=4, weights=w, weighting="variance").advantages
    assert (default - variance).abs().max() > 0.1


@pytest.mark.parametrize("backend,device", TARGETS)
def test_deterministic(backend, device):
    rewards, kw = build_case("everything", 64, 4)
    a = run(backend, device, rewards, group_size=8, **kw)
    b = run(backend, device, rewards, group_size=8, **kw)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("backend,device", TARGETS)
def test_nan_raise_names_sample_and_objective(backend, device):
    rewards = make_rewards(12, 3)
    rewards[7, 2] = float("nan")
    rewards[9, 0] = float("inf")
    with pytest.raises(ValueError, match=r"rewards\[7, 2\].*sample 7, objective 2"):
        run(backend, device, rewards, group_size=4)
    # An invalid sample or a closed reward gate hides the bad value.
    valid = torch.ones(12, dtype=torch.bool)
    valid[7] = False
    with pytest.raises(ValueError, match=r"rewards\[9, 0\]"):
        run(backend, device, rewards, group_size=4, valid=valid)
    rg = torch.ones(12, 3, dtype=torch.bool)
    rg[9, 0] = False
    out = run(backend, device, rewards, group_size=4, valid=valid, reward_gates=rg)
    assert torch.isfinite(out.advantages).all()


@pytest.mark.parametrize("backend,device", TARGETS)
def test_bad_weight_tensor_values(backend, device):
    rewards = make_rewards(8, 2)
    with pytest.raises(ValueError, match=r"weights\[1\]"):
        run(backend, device, rewards, group_size=4, weights=torch.tensor([1.0, -0.5]))
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        run(backend, device, rewards, group_size=4, weights=torch.tensor([float("nan"), 1.0]))


BAD_INPUTS = [
    (dict(rewards=[1.0, 2.0]), TypeError, "rewards must be a torch.Tensor"),
    (dict(rewards=torch.ones(4, dtype=torch.int64)), TypeError, "rewards must be float16"),
    (dict(rewards=torch.ones(2, 2, 2)), ValueError, r"rewards must be \[N\] or \[N, K\]"),
    (dict(rewards=torch.ones(0, 2)), ValueError, "empty batch"),
    (dict(group_size=None), ValueError, "exactly one of group_size or group_ids"),
    (dict(group_ids=torch.zeros(8, dtype=torch.long)), ValueError, "exactly one of group_size or group_ids"),
    (dict(group_size=3), ValueError, "group_size=3 does not divide"),
    (dict(group_size=0), ValueError, "group_size must be >= 1"),
    (dict(group_size=2.0), TypeError, "group_size must be an int"),
    (dict(group_size=None, group_ids=torch.zeros(8)), TypeError, "group_ids must be an integer tensor"),
    (dict(group_size=None, group_ids=torch.zeros(7, dtype=torch.long)), ValueError, r"group_ids must have shape"),
    (dict(weights=[1.0, -1.0]), ValueError, r"weights\[1\] must be >= 0"),
    (dict(weights=[1.0]), ValueError, "weights must have 2 entries"),
    (dict(weights=torch.ones(3)), ValueError, r"weights must have shape \(2,\)"),
    (dict(weights=torch.ones(2, dtype=torch.long)), TypeError, "weights must be float16"),
    (dict(weights="1,1"), TypeError, "weights must be None"),
    (dict(normalize="z"), ValueError, "normalize must be one of"),
    (dict(std="sample"), ValueError, "std must be one of"),
    (dict(weighting="dvao"), ValueError, "weighting must be one of"),
    (dict(nan_policy="skip"), ValueError, "nan_policy must be one of"),
    (dict(eps=-1.0), ValueError, "eps must be >= 0"),
    (dict(eps=float("nan")), ValueError, "eps must be finite"),
    (dict(clip=0.0), ValueError, "clip must be > 0"),
    (dict(positive_scale=-1.0), ValueError, "positive_scale must be >= 0"),
    (dict(min_feasible=-1), ValueError, "min_feasible must be >= 0"),
    (dict(batch_normalize=1), TypeError, "batch_normalize must be a bool"),
    (dict(valid=torch.ones(8)), TypeError, "valid must be a bool tensor"),
    (dict(valid=torch.ones(7, dtype=torch.bool)), ValueError, r"valid must have shape \(8,\)"),
    (dict(reward_gates=torch.ones(8, 3, dtype=torch.bool)), ValueError, r"reward_gates must have shape \(8, 2\)"),
    (dict(gates=torch.ones(8, 0, dtype=torch.bool)), ValueError, "gates must have shape"),
    (dict(gates=torch.ones(8, 2)), TypeError, "gates must be a bool tensor"),
    (dict(std_floor=-0.1, weighting="fixed"), ValueError, "std_floor must be >= 0"),
    (dict(std_floor=float("nan"), weighting="fixed"), ValueError, "std_floor must be finite"),
    (dict(std_floor=[0.1], weighting="fixed"), ValueError, "std_floor must have 2 entries"),
    (dict(std_floor=[0.1, -0.2], weighting="fixed"), ValueError, r"std_floor\[1\] must be >= 0"),
    (dict(std_floor=torch.ones(3), weighting="fixed"), ValueError, r"std_floor must have shape \(2,\)"),
    (dict(std_floor=torch.tensor([0.1, -1.0]), weighting="fixed"), ValueError, r"std_floor\[1\] = -1.0"),
    (dict(std_floor=torch.tensor([0.1, float("inf")]), weighting="fixed"), ValueError, "finite and >= 0"),
    (dict(std_floor=torch.ones(2, dtype=torch.long), weighting="fixed"), TypeError, "std_floor must be float16"),
    (dict(std_floor="0.1", weighting="fixed"), TypeError, "std_floor must be a number"),
    (dict(std_floor=0.1, weighting="scalarize"), ValueError, "std_floor floors the standard deviation"),
    (dict(std_floor=0.1, weighting="fixed", normalize="center"), ValueError, 'needs normalize="zscore"'),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_INPUTS)
def test_bad_inputs(kwargs, error, match):
    kw = dict(rewards=make_rewards(8, 2), group_size=4)
    kw.update(kwargs)
    if kw.get("group_size") is None:
        kw.pop("group_size")
    rewards = kw.pop("rewards")
    with pytest.raises(error, match=match):
        mk.multi_objective_advantages(rewards, **kw)


@pytest.mark.skipif(not HAS_CUDA, reason="mixing devices needs a CUDA device")
def test_mixed_devices():
    with pytest.raises(ValueError, match="valid is on"):
        mk.multi_objective_advantages(
            torch.ones(8, 2, device="cuda"), group_size=4, valid=torch.ones(8, dtype=torch.bool)
        )


# ---- gradients -------------------------------------------------------------------------------

GRAD_CASES = [
    dict(weighting="variance"),
    dict(weighting="fixed", normalize="rloo", std="population"),
    dict(weighting="scalarize", normalize="center", batch_normalize=True),
    dict(weighting="variance", batch_normalize=True, positive_scale=0.5, negative_scale=2.0, clip=1.0),
    dict(weighting="fixed", normalize="none", gates="g", infeasible_advantage=-1.0),
    dict(weighting="variance", reward_gates="rg", gated_value=0.3, valid="v", drop_zero_variance=True),
    dict(weighting="fixed", std_floor=[0.0, 0.3, 0.05]),
    dict(weighting="variance", std_floor=0.2, batch_normalize=True),
]


def _grad_inputs(case, n=12, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, k, dtype=torch.float64, generator=g)
    w = torch.rand(k, dtype=torch.float64, generator=g) + 0.2
    kw = dict(case)
    extra = {
        "g": torch.rand(n, generator=g) > 0.3,
        "rg": torch.rand(n, k, generator=g) > 0.3,
        "v": torch.rand(n, generator=g) > 0.2,
    }
    kw = {key: extra[v] if isinstance(v, str) and v in extra else v for key, v in kw.items()}
    return r, w, kw


@pytest.mark.parametrize("backend,device", TARGETS)
@pytest.mark.parametrize("case", range(len(GRAD_CASES)))
def test_gradcheck(backend, device, case):
    r, w, kw = _grad_inputs(GRAD_CASES[case])
    r = r.to(device).requires_grad_()
    w = w.to(device).requires_grad_()
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}

    def f(r, w):
        with mk.use_backend(backend):
            out = mk.multi_objective_advantages(r, group_size=4, weights=w, **kw)
        return out.advantages, out.weights, out.mean, out.std

    assert torch.autograd.gradcheck(f, (r, w), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("case", range(len(GRAD_CASES)))
def test_backward_matches_autograd_through_reference(case):
    r, w, kw = _grad_inputs(GRAD_CASES[case], seed=1)
    g = torch.Generator().manual_seed(2)
    grads = [torch.randn(12, dtype=torch.float64, generator=g)] + [
        torch.randn(3, 3, dtype=torch.float64, generator=g) for _ in range(3)
    ]
    r1, w1 = r.clone().requires_grad_(), w.clone().requires_grad_()
    out = mk.multi_objective_advantages(r1, group_size=4, weights=w1, **kw)
    torch.autograd.backward([out.advantages, out.weights, out.mean, out.std], grads)

    r2, w2 = r.clone().requires_grad_(), w.clone().requires_grad_()
    opts = {k: v for k, v in kw.items() if k not in ("valid", "gates", "reward_gates")}
    gates = kw.get("gates")
    ref = advantages_reference(
        r2,
        torch.arange(12) // 4,
        3,
        w2,
        kw.get("valid"),
        kw.get("reward_gates"),
        None if gates is None else gates[:, None],
        **opts,
    )
    torch.autograd.backward([ref[0], ref[3], ref[4], ref[5]], grads)
    torch.testing.assert_close(r1.grad, r2.grad, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-10, rtol=1e-9)


def test_grad_output_not_one_and_float32():
    r = make_rewards(16, 2).requires_grad_()
    out = mk.multi_objective_advantages(r, group_size=4, weighting="fixed")
    (out.advantages * torch.linspace(-2, 3, 16)).sum().backward()
    assert r.grad.dtype == torch.float32 and torch.isfinite(r.grad).all()
    assert r.grad.abs().sum() > 0


# ---- torch.library / torch.compile ---------------------------------------------------------------


def _op_args(group_ids=False):
    """The registered op's flat arguments: rewards, then AdvantageSpec's fields, then Derived's."""
    from moo_kernels._spec import Context
    from moo_kernels.ops.advantages import op as op_module  # noqa: F401
    from moo_kernels.ops.advantages.spec import AdvantageSpec

    r = make_rewards(16, 3).double().requires_grad_()
    w = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    valid, gates = masks(16)
    grouping = dict(group_ids=torch.arange(16) // 4) if group_ids else dict(group_size=4, valid=valid)
    spec, derived = AdvantageSpec.prepare(
        Context({"N": 16, "K": 3}, r.device, "rewards"),
        weights=w,
        gates=gates,
        batch_normalize=True,
        infeasible_advantage=-0.5,
        min_feasible=1,
        clip=2.0,
        **grouping,
    )
    assert derived.check_weights  # a weights tensor: its values are checked by the kernels
    return (r, *spec.flat(), *derived.flat())


@pytest.mark.parametrize("backend", ["cpp", "reference"])
@pytest.mark.parametrize("group_ids", [False, True])
def test_opcheck(backend, group_ids):
    with mk.use_backend(backend):
        torch.library.opcheck(torch.ops.moo_kernels.multi_objective_advantages.default, _op_args(group_ids))


def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    r = make_rewards(32, 3)
    valid, gates = masks(32)

    def step(r, w):
        out = mk.multi_objective_advantages(
            r, group_size=8, weights=w, gates=gates, valid=valid, weighting="variance", clip=3.0
        )
        return (out.advantages * torch.arange(32.0)).sum(), out

    w = torch.tensor([1.0, 0.5, 2.0])
    compiled = torch.compile(step, fullgraph=True)
    r1, w1 = r.clone().requires_grad_(), w.clone().requires_grad_()
    loss1, out1 = compiled(r1, w1)
    loss1.backward()
    r2, w2 = r.clone().requires_grad_(), w.clone().requires_grad_()
    loss2, out2 = step(r2, w2)
    loss2.backward()
    for a, b in zip(out1, out2, strict=True):
        assert torch.equal(a, b)
    torch.testing.assert_close(r1.grad, r2.grad)
    torch.testing.assert_close(w1.grad, w2.grad)


@pytest.mark.gpu
def test_gpu_large_batch_matches_reference():
    n, k = 131072, 8
    rewards = make_rewards(n, k, seed=11)
    valid, gates = masks(n)
    check_against_reference("auto", "cuda", rewards, group_size=16, gates=gates, valid=valid)
    check_against_reference(
        "auto",
        "cuda",
        rewards,
        group_size=16,
        gates=gates,
        batch_normalize=True,
        weighting="scalarize",
        drop_zero_variance=True,
    )


@pytest.mark.gpu
def test_gpu_torch_compile():
    torch._dynamo.reset()
    r = make_rewards(1024, 4).cuda()

    def f(r):
        return mk.multi_objective_advantages(r, group_size=16, nan_policy="ignore").advantages

    assert torch.equal(torch.compile(f, fullgraph=True)(r), f(r))


def test_torch_compile_fullgraph_group_ids():
    torch._dynamo.reset()
    r = make_rewards(30, 3)
    ids = torch.arange(30) % 7

    def f(r, ids):
        out = mk.multi_objective_advantages(r, group_ids=ids, nan_policy="ignore", weighting="fixed")
        return out.advantages, out.mean

    for a, b in zip(torch.compile(f, fullgraph=True)(r, ids), f(r, ids), strict=True):
        assert torch.equal(a, b)


# ---- std_floor --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", TARGETS)
def test_std_floor_is_the_formula(backend, device):
    """weighting="fixed", zscore: A_j = sum_k w_k (r_jk - mu_gk) / (sigma_gk + floor_k + eps), written out here in
    float64 from the definition (unbiased sigma), independent of the reference's scaled arithmetic."""
    g = torch.Generator().manual_seed(4)
    r = torch.randn(24, 3, dtype=torch.float64, generator=g)
    r[:, 2] *= 1e-3  # a tiny objective: the floor keeps it from being blown up to unit scale
    w = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    floor = torch.tensor([0.0, 0.2, 0.01], dtype=torch.float64)
    out = run(backend, device, r, group_size=6, weights=w, weighting="fixed", std_floor=floor, eps=1e-6)
    x = r.view(4, 6, 3)
    z = (x - x.mean(dim=1, keepdim=True)) / (x.std(dim=1, keepdim=True) + floor + 1e-6)
    expected = (z * w).sum(dim=-1).flatten()
    torch.testing.assert_close(out.advantages.cpu(), expected, atol=1e-12, rtol=1e-10)
    # the floor of the tiny objective shrinks its share: without it, it weighs as much as the others
    plain = run(backend, device, r, group_size=6, weights=w, weighting="fixed")
    assert (out.advantages.cpu() - expected).abs().max() < 1e-10
    assert (plain.advantages.cpu() - expected).abs().max() > 0.5


@pytest.mark.parametrize("backend,device", TARGETS)
def test_std_floor_zero_is_no_floor(backend, device):
    """0, zeros or an all-zero list are no floor: the same bits as without the option."""
    r = make_rewards(20, 3, seed=8)
    base = run(backend, device, r, group_size=5, weighting="fixed")
    for floor in (0.0, 0, [0.0, 0.0, 0.0]):
        out = run(backend, device, r, group_size=5, weighting="fixed", std_floor=floor)
        for name, a, b in zip(FIELDS, out, base, strict=True):
            assert torch.equal(a, b), (floor, name)


def test_std_floor_forms_agree():
    """A number, K numbers, a numpy array and a tensor of any float dtype give the same bits; the floor gets no
    gradient (a constant)."""
    np = pytest.importorskip("numpy")
    r = make_rewards(12, 2, seed=9)
    forms = [0.25, [0.25, 0.25], np.array([0.25, 0.25]), torch.tensor([0.25, 0.25]), torch.full((2,), 0.25).double()]
    outs = [mk.multi_objective_advantages(r, group_size=4, weighting="fixed", std_floor=f).advantages for f in forms]
    assert all(torch.equal(o, outs[0]) for o in outs)
    floor = torch.full((2,), 0.25, requires_grad=True)
    rg = r.clone().requires_grad_()
    mk.multi_objective_advantages(rg, group_size=4, weighting="fixed", std_floor=floor).advantages.sum().backward()
    assert floor.grad is None and rg.grad is not None
