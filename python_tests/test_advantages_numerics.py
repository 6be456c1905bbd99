"""multi_objective_advantages at the edges of floating point, on every backend (reference, C++, Triton).

- Strided and expanded weights tensors are read through their strides.
- Extreme magnitudes (overflowing squares, underflowing ones, subnormals, every float dtype near its
  largest value, huge weights): every output is NaN-free, finite wherever its exact value is
  representable, and close to the float64 reference relative to the group's spread.
- Exact ties: "does not vary" is decided on the combined reward computed with the same operations
  everywhere, so rejected groups and zero advantages agree on every backend.
- Bool inputs holding bytes other than 0 and 1: nonzero means true.
- Permuting objectives changes no bit; permuting samples inside groups changes nothing but rounding.
- group_mask and sample_mask agree bit for bit across backends on adversarial tie sets.
"""

import pytest
import torch
from conftest import targets

import moo_kernels as mk

# The interpreter evaluates both sides of a select: overflows in discarded lanes warn.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")

BACKENDS = [("reference", "cpu")] + targets()
NORMALIZES = ("zscore", "center", "rloo", "none")
WEIGHTINGS = ("scalarize", "fixed", "variance")
RTOL = 1e-12  # of the group's spread: everything is computed in float64


def run(backend, device, rewards, **kw):
    kw = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    with mk.use_backend(backend):
        out = mk.multi_objective_advantages(rewards.to(device), **kw)
    return type(out)(*(x.cpu() for x in out))


def reference64(rewards, **kw):
    """The float64 reference on the same values (rewards converted exactly): outputs before any rounding."""
    with mk.use_backend("reference"):
        return mk.multi_objective_advantages(rewards.double(), **kw)


def bytes_as_bool(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8).view(torch.bool)


def group_scale(ref_adv: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per sample, the largest |advantage| of its group in the reference: the group's spread in the
    units of the output."""
    per_group = ref_adv.abs().view(-1, group_size).amax(dim=1)
    return per_group.repeat_interleave(group_size)


def check_close(name, got, ref64, scale, out_dtype):
    """got (out_dtype) against the float64 reference: no NaN, finite where the reference fits the dtype,
    within RTOL * scale plus the output's own rounding."""
    assert got.dtype == out_dtype, name
    assert not torch.isnan(got).any(), f"{name} has NaN"
    top = torch.finfo(out_dtype).max
    fits = ref64.abs() <= top * 0.5
    assert torch.isfinite(got[fits]).all(), f"{name} is not finite where its exact value is representable"
    g = got.double()
    # outside the range: the same sign of infinity
    assert torch.equal(torch.sign(g[~fits]), torch.sign(ref64[~fits])), name
    rounding = 0.0 if out_dtype == torch.float64 else 2.0**-23
    tiny = torch.finfo(out_dtype).smallest_normal * torch.finfo(out_dtype).eps
    tol = RTOL * scale + rounding * ref64.abs() + tiny
    err = (g - ref64).abs()
    bad = fits & ~(err <= tol)
    assert not bad.any(), f"{name}: {g[bad][:4].tolist()} vs {ref64[bad][:4].tolist()} (tol {tol[bad][:4].tolist()})"


def check_against_reference64(backend, device, rewards, group_size, **kw):
    out = run(backend, device, rewards, group_size=group_size, **kw)
    ref = reference64(rewards, group_size=group_size, **kw)
    out_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    assert torch.equal(out.group_mask, ref.group_mask)
    assert torch.equal(out.sample_mask, ref.sample_mask)
    check_close("advantages", out.advantages, ref.advantages, group_scale(ref.advantages, group_size), out_dtype)
    spread = ref.mean.abs() + ref.std
    check_close("mean", out.mean, ref.mean, spread, out_dtype)
    check_close("std", out.std, ref.std, spread, out_dtype)
    check_close("weights", out.weights, ref.weights, ref.weights.abs(), out_dtype)
    return out, ref


# ---- 1. strided weights ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_expanded_and_strided_weights(backend, device):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(16, 3, generator=g)
    expanded = torch.tensor(0.5).expand(3)
    out = run(backend, device, rewards, group_size=4, weights=expanded, weighting="fixed")
    assert torch.equal(out.weights, torch.full((4, 3), 0.5))
    dense = run(backend, device, rewards, group_size=4, weights=torch.full((3,), 0.5), weighting="fixed")
    assert torch.equal(out.advantages, dense.advantages)

    longer = torch.tensor([1.0, 9.0, 2.0, 9.0, 3.0, 9.0])
    out = run(backend, device, rewards, group_size=4, weights=longer[::2], weighting="fixed")
    assert torch.equal(out.weights, torch.tensor([1.0, 2.0, 3.0]).expand(4, 3))
    dense = run(backend, device, rewards, group_size=4, weights=torch.tensor([1.0, 2.0, 3.0]), weighting="fixed")
    assert torch.equal(out.advantages, dense.advantages)
    # float64 strided weights (the dtype the kernels read) and float16 ones
    for w in (torch.tensor([1.0, 9.0, 2.0, 9.0, 3.0, 9.0], dtype=torch.float64)[::2], longer[::2].half()):
        out = run(backend, device, rewards, group_size=4, weights=w, weighting="variance")
        ref = reference64(rewards, group_size=4, weights=w.double().contiguous(), weighting="variance")
        check_close("advantages", out.advantages, ref.advantages, group_scale(ref.advantages, 4), torch.float32)


# ---- 4. extreme magnitudes --------------------------------------------------------------------------


def _extreme_cases():
    g = torch.Generator().manual_seed(4)

    def normal(n, k, scale, dtype):
        return (torch.randn(n, k, generator=g, dtype=torch.float64) * scale).to(dtype)

    cases = {
        # the issue's four cases
        "f32_2e19": (torch.tensor([2e19, -2e19, 1e19, 0.0, 3.0, -1e19, 5e18, 2e19]), {}),
        "bf16_1e38": (torch.tensor([[1.0e38, 1.0], [-2.0e38, 2.0], [3.0e38, 3.0], [0.0, 4.0]] * 2).bfloat16(), {}),
        "weights_1e30": (normal(8, 2, 1.0, torch.float32), {"weights": [1e30, 1.0]}),
        "f32_1e-30_eps0": (normal(8, 2, 1e-30, torch.float32), {"eps": 0.0}),
        # float64 near its limits, mixed with an ordinary objective
        "f64_1e300": (torch.cat([normal(8, 1, 1e300, torch.float64), normal(8, 1, 1.0, torch.float64)], 1), {}),
        "f64_1e-300": (torch.cat([normal(8, 1, 1e-300, torch.float64), normal(8, 1, 1.0, torch.float64)], 1), {}),
        "f64_1e308": (
            torch.tensor([[1.7e308, 1.0], [-1.7e308, -1.0], [1.0e308, 2.0], [-5e307, 0.5]] * 2, dtype=torch.float64),
            {},
        ),  # fmt: skip
        "f64_1e-308": (
            torch.tensor([[2e-308, 1e-320], [-1e-308, 3e-321], [5e-309, 0.0], [0.0, -4e-322]] * 2, dtype=torch.float64),
            {},
        ),  # fmt: skip
        # float32 near its limits and below its normal range
        "f32_3e38": (torch.tensor([[3.0e38, 1.0], [-3.2e38, 2.0], [1.0e38, 0.5], [2.5e38, 0.25]] * 2), {}),
        "f32_1e-38": (normal(8, 2, 1e-38, torch.float32), {"eps": 0.0}),
        "f32_subnormal": (
            torch.tensor([[1e-40, 3e-45], [2e-40, 0.0], [-5e-41, 1e-44], [0.0, 7e-45]] * 2),
            {"eps": 0.0},
        ),
        "bf16_3e38": (torch.tensor([[3.0e38, 1.0], [-3.3e38, 2.0], [1.0e38, 0.5], [2.0e38, 0.25]] * 2).bfloat16(), {}),
        "f16_65504": (torch.tensor([[65504.0, 1.0], [-65504.0, 2.0], [60000.0, 0.5], [-1.0, 0.25]] * 2).half(), {}),
        "weights_1e300": (normal(8, 3, 1.0, torch.float64), {"weights": [1e300, 1.0, 0.5]}),
        "weights_1e300_f32": (normal(8, 3, 1.0, torch.float32), {"weights": [1e300, 1.0, 0.5]}),
    }
    return cases


EXTREME = _extreme_cases()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("case", list(EXTREME))
def test_extreme_magnitudes(backend, device, case):
    rewards, kw = EXTREME[case]
    for normalize in NORMALIZES:
        for weighting in WEIGHTINGS:
            out, ref = check_against_reference64(
                backend, device, rewards, 4, normalize=normalize, weighting=weighting, **kw
            )
            if normalize == "zscore" and out.advantages.abs().sum() == 0:
                pytest.fail(f"{case}: every zscore advantage is 0 ({weighting})")


def test_issue_cases_are_not_degenerate():
    """The four reported cases: finite, non-zero, and equal to the textbook values where those exist."""
    r = torch.tensor([2e19, -2e19, 1e19, 0.0])
    expected = (r.double() - r.double().mean()) / (r.double().std() + 1e-6)
    for backend, device in BACKENDS:
        out = run(backend, device, r, group_size=4)
        torch.testing.assert_close(out.advantages.double(), expected, rtol=1e-6, atol=0)
        tiny = run(backend, device, torch.tensor([2e-30, -2e-30, 1e-30, 0.0]), group_size=4, eps=0.0)
        torch.testing.assert_close(tiny.advantages.double(), expected, rtol=1e-6, atol=0)
        big = run(backend, device, (r * 1.5e19).bfloat16(), group_size=4)
        assert torch.isfinite(big.advantages).all() and big.advantages.abs().sum() > 0
        s = torch.tensor([[1.0, 2.0], [3.0, 1.0], [0.0, 0.0], [5.0, 1.0]])
        sc = run(backend, device, s, group_size=4, weights=[1e30, 1.0], weighting="scalarize")
        col = s[:, 0].double()
        torch.testing.assert_close(sc.advantages.double(), (col - col.mean()) / col.std(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_extreme_magnitudes_batch_normalize(backend, device):
    for case in ("f64_1e300", "f64_1e-308", "f32_3e38", "weights_1e300"):
        rewards, kw = EXTREME[case]
        for normalize in ("zscore", "center"):
            out = run(backend, device, rewards, group_size=4, normalize=normalize, batch_normalize=True, **kw)
            ref = reference64(rewards, group_size=4, normalize=normalize, batch_normalize=True, **kw)
            out_dtype = out.advantages.dtype
            scale = torch.full_like(ref.advantages, float(ref.advantages.abs().max()))
            check_close(f"{case}/{normalize}", out.advantages, ref.advantages, scale, out_dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_extreme_magnitudes_across_chunks(backend, device):
    # One group larger than a kernel chunk (and a C++ block spread over the lanes): the combined reward's
    # moments are merged across chunks of different scales, one of them all zeros.
    n = 300
    g = torch.Generator().manual_seed(8)
    r = torch.randn(n, 2, generator=g, dtype=torch.float64)
    r[:, 0] *= 1e-300
    r[:150] = 0.0
    r[-3:, 1] = 1e200
    for weighting in WEIGHTINGS:
        for normalize in ("zscore", "center"):
            check_against_reference64(backend, device, r, n, weighting=weighting, normalize=normalize,
                                      weights=[1.0, 1e-250], batch_normalize=True)  # fmt: skip


# ---- 7. exact ties ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_permuted_rows_do_not_vary(backend, device):
    r = torch.tensor([[0.5, 2.0, 0.5], [0.5, 0.5, 2.0]])
    out = run(backend, device, r, group_size=2, drop_zero_variance=True)
    assert not out.group_mask.any() and not out.sample_mask.any()
    assert torch.equal(out.advantages, torch.zeros(2))
    out = run(backend, device, r, group_size=2, weighting="scalarize", eps=0.0)
    assert torch.equal(out.advantages, torch.zeros(2))
    assert out.group_mask.all()


def _permutation_ties(seed: int, groups: int = 6, size: int = 4):
    """Groups of rows whose values are permutations of each other over objectives of equal weight (the
    same multiset of weighted terms: their combined rewards are equal), and groups with one row changed."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.1, 1 / 3, 0.7, 2.0, -1 / 7, 1e-3], dtype=torch.float64)
    weights = torch.tensor([0.3, 0.3, 1 / 3, 1 / 3, 0.0], dtype=torch.float64)  # pairs (0, 1), (2, 3); a 0
    rows, varies = [], []
    for gi in range(groups):
        base = levels[torch.randint(0, len(levels), (5,), generator=g)]
        for _ in range(size):
            row = base.clone()
            if bool(torch.rand(1, generator=g) < 0.5):
                row[[0, 1]] = row[[1, 0]]
            if bool(torch.rand(1, generator=g) < 0.5):
                row[[2, 3]] = row[[3, 2]]
            row[4] = levels[torch.randint(0, len(levels), (1,), generator=g)]  # weight 0: no say
            rows.append(row)
        changed = gi % 2 == 1
        if changed:
            rows[-1] = rows[-1].clone()
            rows[-1][0] += 1.0
        varies.append(changed)
    return torch.stack(rows), weights, torch.tensor(varies)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_permutation_ties(backend, device, seed):
    r, w, varies = _permutation_ties(seed)
    for dtype in (torch.float64, torch.float32):
        rr = r.to(dtype)
        out = run(backend, device, rr, group_size=4, weights=w.tolist(), drop_zero_variance=True)
        assert torch.equal(out.group_mask, varies)
        sc = run(backend, device, rr, group_size=4, weights=w.tolist(), weighting="scalarize", eps=0.0)
        constant = ~varies.repeat_interleave(4)
        assert torch.equal(sc.advantages[constant], torch.zeros(int(constant.sum()), dtype=sc.advantages.dtype))
        assert (sc.advantages[~constant] != 0).any()


# ---- bool bytes ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nonzero_bool_bytes_are_true(backend, device):
    g = torch.Generator().manual_seed(2)
    n, k = 12, 2
    rewards = torch.randn(n, k, generator=g)
    vb = torch.tensor([2, 1, 0, 255, 3, 0, 1, 2, 4, 1, 1, 128], dtype=torch.uint8)
    valid = vb.view(torch.bool)
    gb = torch.tensor([[2, 1], [1, 255], [0, 2], [3, 3]] * 3, dtype=torch.uint8)
    gates = gb.view(torch.bool)
    rb = torch.tensor([[2, 1], [0, 4], [1, 1], [128, 0]] * 3, dtype=torch.uint8)
    reward_gates = rb.view(torch.bool)
    assert (vb > 1).any() and (gb > 1).any() and (rb > 1).any()
    for extra in ({}, {"batch_normalize": True}, {"min_feasible": 2, "drop_zero_variance": True}):
        kw = dict(group_size=4, infeasible_advantage=-0.5, gated_value=-2.0, **extra)
        odd = run(backend, device, rewards, valid=valid, gates=gates, reward_gates=reward_gates, **kw)
        clean = run(backend, device, rewards, valid=vb != 0, gates=gb != 0, reward_gates=rb != 0, **kw)
        for a, b in zip(odd, clean, strict=True):
            assert torch.equal(a, b)
        ref = reference64(rewards, valid=vb != 0, gates=gb != 0, reward_gates=rb != 0, **kw)
        assert torch.equal(odd.sample_mask, ref.sample_mask) and torch.equal(odd.group_mask, ref.group_mask)
        torch.testing.assert_close(odd.advantages.double(), ref.advantages, rtol=1e-6, atol=1e-6)


# ---- permutation invariance ------------------------------------------------------------------------


def _mixed_rewards(n, k, seed, dtype=torch.float64):
    """Discrete columns with ties, continuous ones, and values that are not exact in binary."""
    g = torch.Generator().manual_seed(seed)
    cols = []
    for c in range(k):
        if c % 3 == 0:
            cols.append(torch.randint(0, 3, (n,), generator=g).double() / 3)
        elif c % 3 == 1:
            cols.append(torch.randn(n, generator=g, dtype=torch.float64) * 10 ** (c - 2))
        else:
            cols.append((torch.rand(n, generator=g) > 0.5).double() * 0.1)
    return torch.stack(cols, dim=1).to(dtype)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("k", [3, 5])
def test_permuting_objectives_changes_no_bit(backend, device, k):
    n = 16
    r = _mixed_rewards(n, k, seed=k)
    g = torch.Generator().manual_seed(10 + k)
    w = torch.tensor([0.25, 1 / 3, 1 / 3, 0.0, 0.7][:k], dtype=torch.float64)
    rg = torch.rand(n, k, generator=g) > 0.2
    gates = torch.rand(n, 2, generator=g) > 0.15
    perm = torch.randperm(k, generator=g)
    for normalize, weighting, extra in (
        ("zscore", "variance", {}),
        ("zscore", "fixed", {"batch_normalize": True}),
        ("rloo", "variance", {"drop_zero_variance": True}),
        ("center", "scalarize", {}),
        ("none", "fixed", {}),
        ("zscore", "scalarize", {"drop_zero_variance": True, "batch_normalize": True}),
    ):
        kw = dict(group_size=4, normalize=normalize, weighting=weighting, gates=gates, gated_value=0.4, **extra)
        for dtype in (torch.float64, torch.float32):
            a = run(backend, device, r.to(dtype), weights=w, reward_gates=rg, **kw)
            b = run(backend, device, r.to(dtype)[:, perm], weights=w[perm], reward_gates=rg[:, perm], **kw)
            msg = f"{normalize}/{weighting}/{dtype}"
            assert torch.equal(a.advantages, b.advantages), msg
            assert torch.equal(a.group_mask, b.group_mask), msg
            assert torch.equal(a.sample_mask, b.sample_mask), msg
            for name in ("weights", "mean", "std"):
                assert torch.equal(getattr(a, name)[:, perm], getattr(b, name)), f"{name} {msg}"


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_permuting_samples_in_groups(backend, device):
    n, k, size = 24, 4, 6
    r = _mixed_rewards(n, k, seed=3)
    g = torch.Generator().manual_seed(5)
    w = [0.5, 0.5, 1.0, 0.0]
    perm = torch.cat([i * size + torch.randperm(size, generator=g) for i in range(n // size)])
    for normalize in NORMALIZES:
        for weighting in WEIGHTINGS:
            kw = dict(group_size=size, weights=w, normalize=normalize, weighting=weighting, drop_zero_variance=True)
            a = run(backend, device, r, **kw)
            b = run(backend, device, r[perm], **kw)
            assert torch.equal(a.group_mask, b.group_mask)
            assert torch.equal(a.sample_mask[perm], b.sample_mask)
            scale = group_scale(a.advantages, size)[perm]
            assert ((b.advantages - a.advantages[perm]).abs() <= RTOL * scale).all(), f"{normalize}/{weighting}"


# ---- masks across backends -------------------------------------------------------------------------


def _tie_set(seed: int):
    g = torch.Generator().manual_seed(seed)
    k = [2, 3, 5, 8][seed % 4]
    size = 4
    groups = 8
    levels = torch.tensor([0.1, 1 / 3, 0.7, 2 / 3, 1.0, 0.0], dtype=torch.float64)[: 3 + seed % 3]
    choices = torch.tensor([0.0, 0.1, 1 / 3, 1 / 3, 0.7, 1.0], dtype=torch.float64)
    w = choices[torch.randint(0, len(choices), (k,), generator=g)]
    w[: min(k, 3)] = 1 / 3  # three equal weights: reordering their terms changes a plain sum's rounding
    r = levels[torch.randint(0, len(levels), (groups * size, k), generator=g)]
    # some groups made of permutations of one row over objectives of equal weight
    for gi in range(0, groups, 3):
        base = r[gi * size].clone()
        for j in range(1, size):
            row = base.clone()
            for a in range(k):
                for b in range(a + 1, k):
                    if w[a] == w[b] and bool(torch.rand(1, generator=g) < 0.5):
                        row[[a, b]] = row[[b, a]]
            r[gi * size + j] = row
    gates = torch.rand(groups * size, 2, generator=g) > 0.1
    return r, w, gates


@pytest.mark.parametrize("seed", range(6))
def test_masks_agree_across_backends(seed):
    r, w, gates = _tie_set(seed)
    results = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        for weighting in ("scalarize", "variance"):
            kw = dict(group_size=4, weights=w, gates=gates, drop_zero_variance=True, min_feasible=2,
                      weighting=weighting, infeasible_advantage=-1.0)  # fmt: skip
            outs = [run(b, d, r.to(dtype), **kw) for b, d in BACKENDS]
            for o in outs[1:]:
                assert torch.equal(o.group_mask, outs[0].group_mask), (dtype, weighting)
                assert torch.equal(o.sample_mask, outs[0].sample_mask), (dtype, weighting)
            results[(dtype, weighting)] = outs[0].group_mask
    # the tie set is adversarial: some groups rejected for not varying, some accepted
    masks = torch.stack(list(results.values()))
    assert masks.any() and not masks.all()
