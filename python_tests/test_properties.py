"""Cross-backend property tests (hypothesis) of every op: the backends agree with each other and with the
float64 reference on every accepted input, and every rejected input raises a ValueError / TypeError that
names the argument.

The inputs are drawn the way a demanding trainer produces them: garbage (NaN, +-inf, huge values) at masked,
invalid and gated positions; ties (few reward levels, rows that are permutations of each other); extreme
magnitudes per dtype; strided, transposed and expanded tensors; bool tensors holding bytes other than 0 / 1;
numpy numbers as options. Each example runs on the reference, the C++ kernels and the Triton kernels (under the
interpreter without a GPU).

Profiles: MOO_PROPERTY_PROFILE=ci (default, about a minute in all) or long (many more examples).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import CPU_BACKENDS, HAS_CUDA
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moo_kernels as mk

PROFILE = os.environ.get("MOO_PROPERTY_PROFILE", "ci")
EXAMPLES = {"ci": 3, "long": 40}[PROFILE]


def examples(n: int, device: str = "cpu"):
    """Hypothesis settings for n examples (times the profile's factor). On a GPU, where each new combination of
    options compiles a Triton kernel (a second or two), at most 6 in the ci profile."""
    count = n * EXAMPLES if device != "cuda" or PROFILE != "ci" else min(n, 6)
    return settings(
        max_examples=count, deadline=None, derandomize=PROFILE == "ci",
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )  # fmt: skip


# Backends compared with the reference. With a GPU the Triton kernels run on CUDA tensors.
KERNELS = [("cpp", "cpu"), ("triton", "cuda" if HAS_CUDA else "cpu")]
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
GARBAGE = [float("nan"), float("inf"), float("-inf"), 3.0e38]


def on(backend: str, fn, *args, **kw):
    with mk.use_backend(backend):
        return fn(*args, **kw)


def to(device: str, x):
    return x.to(device) if isinstance(x, torch.Tensor) else x


def gen_of(draw) -> torch.Generator:
    return torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))


def odd_bools(draw, shape, gen, p: float = 0.7) -> torch.Tensor:
    """A bool tensor, sometimes holding the byte 2 for True (nonzero must mean True everywhere)."""
    b = torch.rand(shape, generator=gen) < p
    if draw(st.booleans()):
        return (b.to(torch.uint8) * 2).view(torch.bool)
    return b


def maybe_numpy(draw, value):
    """value, or the same number as a numpy scalar."""
    if value is None or isinstance(value, (bool, str)) or not draw(st.booleans()):
        return value
    return np.int64(value) if isinstance(value, int) else np.float64(value)


def layout(draw, x: torch.Tensor) -> torch.Tensor:
    """The same values in another memory layout: contiguous, transposed storage, or every other column."""
    kind = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    if kind == "transposed" and x.dim() == 2:
        return x.t().contiguous().t()
    if kind == "strided":
        wide = torch.full(x.shape[:-1] + (2 * x.shape[-1],), float("nan"), dtype=x.dtype)
        wide[..., ::2] = x
        return wide[..., ::2]
    return x


def assert_agree(name: str, got: torch.Tensor, want: torch.Tensor, scale: torch.Tensor, rtol: float) -> None:
    """got == want to rtol times scale (broadcast to want's shape), infinities and NaN in the same places."""
    got, want = got.detach().cpu().double(), want.detach().cpu().double()
    assert got.shape == want.shape, name
    same = (got == want) | (torch.isnan(got) & torch.isnan(want))
    tol = rtol * scale.double().expand_as(want)
    close = torch.isfinite(got) & torch.isfinite(want) & ((got - want).abs() <= tol)
    bad = ~(same | close)
    assert not bad.any(), f"{name}: {got[bad][:5].tolist()} vs {want[bad][:5].tolist()} (tol {tol[bad][:5].tolist()})"


# ---- multi_objective_advantages -------------------------------------------------------------------------------


@st.composite
def advantage_problems(draw):
    dtype = draw(st.sampled_from(FLOATS))
    g, size, k = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 4))
    n = g * size
    gen = gen_of(draw)
    big = {torch.float16: 6e4, torch.bfloat16: 3e38, torch.float32: 3e38, torch.float64: 1e300}[dtype]
    tiny = {torch.float16: 1e-7, torch.bfloat16: 1e-38, torch.float32: 1e-38, torch.float64: 1e-300}[dtype]
    kind = draw(st.sampled_from(["levels", "normal", "huge", "tiny", "mixed"]))
    if kind == "levels":
        r = torch.randint(0, draw(st.integers(1, 3)) + 1, (n, k), generator=gen).double()
        r = r * draw(st.sampled_from([1.0, 0.5, 1 / 3, 0.1, 2.0]))
    elif kind == "normal":
        r = torch.randn(n, k, generator=gen, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    elif kind == "huge":
        r = torch.rand(n, k, generator=gen, dtype=torch.float64).mul(2).sub(1) * big
    elif kind == "tiny":
        r = torch.randn(n, k, generator=gen, dtype=torch.float64) * tiny
    else:
        scales = torch.tensor([1.0, big / 4, tiny * 4, 1e-2], dtype=torch.float64)[torch.arange(k) % 4]
        r = torch.randn(n, k, generator=gen, dtype=torch.float64) * scales
    if k > 1 and size > 1 and draw(st.booleans()):  # ties: a row that is a permutation of another of its group
        for grp in range(g):
            i, j = grp * size, grp * size + size - 1
            r[j] = r[i][torch.randperm(k, generator=gen)]
    r = r.to(dtype)

    valid = odd_bools(draw, (n,), gen, 0.8) if draw(st.booleans()) else None
    reward_gates = odd_bools(draw, (n, k), gen, 0.8) if draw(st.booleans()) else None
    gates = odd_bools(draw, (n, draw(st.integers(1, 3))), gen, 0.85) if draw(st.booleans()) else None
    nan_policy = draw(st.sampled_from(["raise", "ignore"]))
    # garbage where it is never read (invalid samples, closed reward gates), or anywhere under "ignore"
    spots = torch.zeros(n, k, dtype=torch.bool)
    if valid is not None:
        spots |= ~valid[:, None]
    if reward_gates is not None:
        spots |= ~reward_gates
    if nan_policy == "ignore":
        spots |= torch.rand(n, k, generator=gen) < 0.2
    if dtype != torch.float64:
        garbage = torch.tensor(draw(st.sampled_from(GARBAGE[:3])), dtype=dtype)
    else:
        garbage = torch.tensor(draw(st.sampled_from(GARBAGE)), dtype=dtype)
    r = torch.where(spots, garbage, r)
    r = layout(draw, r)

    wkind = draw(st.sampled_from(["none", "list", "numpy", "tensor", "expanded", "strided", "huge"]))
    w = (torch.rand(k, generator=gen, dtype=torch.float64) * 2).round(decimals=1)
    w[torch.rand(k, generator=gen) < 0.2] = 0.0
    weights = {
        "none": None,
        "list": w.tolist(),
        "numpy": w.numpy(),
        "tensor": w.to(draw(st.sampled_from([torch.float32, torch.float64]))),
        "expanded": torch.tensor(0.5).expand(k),
        "strided": torch.stack([w, w + 7]).t().reshape(-1)[::2],
        "huge": (w + 1) * 1e30,
    }[wkind]

    grouping = draw(st.sampled_from(["size", "ids"]))
    group = dict(group_size=maybe_numpy(draw, size))
    if grouping == "ids":
        ids = (torch.arange(n) // size)[torch.randperm(n, generator=gen)] * 3 - 2
        group = dict(group_ids=ids)
    options = dict(
        normalize=draw(st.sampled_from(["zscore", "center", "rloo", "none"])),
        std=draw(st.sampled_from(["unbiased", "population"])),
        weighting=draw(st.sampled_from(["scalarize", "fixed", "variance"])),
        batch_normalize=draw(st.booleans()),
        eps=maybe_numpy(draw, draw(st.sampled_from([0.0, 1e-6, 0.1]))),
        drop_zero_variance=draw(st.booleans()),
        min_feasible=maybe_numpy(draw, draw(st.sampled_from([0, 2]))),
        positive_scale=draw(st.sampled_from([1.0, 0.5])),
        negative_scale=draw(st.sampled_from([1.0, 0.0])),
        clip=draw(st.sampled_from([None, 1.5])),
        infeasible_advantage=draw(st.sampled_from([0.0, -0.5])),
        gated_value=draw(st.sampled_from([0.0, 1.0])),
        nan_policy=nan_policy,
    )
    if options["normalize"] == "zscore" and options["weighting"] != "scalarize":
        floors = [None, 0.05, [0.0] * (k - 1) + [2.0]]  # none, one for all, a large one on the last objective
        options["std_floor"] = draw(st.sampled_from(floors))
    tensors = dict(rewards=r, weights=weights, valid=valid, reward_gates=reward_gates, gates=gates, **group)
    return tensors, options


def _group_scale(adv_ref: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Per sample, the largest |advantage| of its group (at least 1): the unit of the tolerance."""
    a = adv_ref.detach().abs().double().nan_to_num(0.0, 0.0, 0.0)
    top = torch.zeros(num_groups, dtype=torch.float64).scatter_reduce(0, groups, a, "amax")
    return top.clamp(min=1.0)[groups]


@pytest.mark.parametrize("backend,device", KERNELS)
def test_advantages_agree_with_the_reference(backend, device):
    @examples(40 if backend == "cpp" else 10, device)
    @given(problem=advantage_problems())
    def check(problem):
        tensors, options = problem
        ref = on("reference", mk.multi_objective_advantages, **tensors, **options)
        out = on(backend, mk.multi_objective_advantages, **{n: to(device, x) for n, x in tensors.items()}, **options)
        for name in ("group_mask", "sample_mask"):
            assert torch.equal(getattr(out, name).cpu(), getattr(ref, name)), name
        n = ref.advantages.shape[0]
        if "group_size" in tensors:
            groups = torch.arange(n) // int(tensors["group_size"])
        else:
            groups = torch.unique(tensors["group_ids"], return_inverse=True)[1]
        num_groups = ref.group_mask.shape[0]
        rtol = 1e-12 if ref.advantages.dtype == torch.float64 else 4e-7
        scale = _group_scale(ref.advantages, groups, num_groups)
        if options["batch_normalize"]:
            scale = scale.clamp(min=float(ref.advantages.abs().nan_to_num(0, 0, 0).max()))
        assert_agree("advantages", out.advantages, ref.advantages, scale, rtol)
        for name in ("weights", "mean", "std"):
            want = getattr(ref, name)
            col = want.abs().double().nan_to_num(0.0, 0.0, 0.0).amax(dim=0, keepdim=True).clamp(min=1e-300)
            assert_agree(name, getattr(out, name), want, col, rtol)
        finite = torch.isfinite(ref.advantages)
        assert torch.isfinite(out.advantages.cpu()[finite]).all()

    check()


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
@examples(25)
@given(problem=advantage_problems(), seed=st.integers(0, 2**31 - 1))
def test_advantages_do_not_depend_on_the_order_of_objectives(backend, problem, seed):
    """Permuting the objectives (rewards' columns, weights, reward gates alike) changes no bit of the advantages
    and permutes the per-objective outputs: the combination adds its terms in sorted order."""
    tensors, options = problem
    r = tensors["rewards"]
    k = r.shape[1]
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    permuted = dict(tensors, rewards=r[:, perm])
    w = tensors["weights"]
    if isinstance(w, torch.Tensor):
        permuted["weights"] = w[perm]
    elif w is not None:
        permuted["weights"] = [list(w)[i] for i in perm.tolist()]
    if tensors["reward_gates"] is not None:
        permuted["reward_gates"] = tensors["reward_gates"][:, perm]
    try:
        a = on(backend, mk.multi_objective_advantages, **tensors, **options)
    except ValueError:  # a non-finite reward under nan_policy="raise": the permuted call must raise too
        with pytest.raises(ValueError, match="rewards"):
            on(backend, mk.multi_objective_advantages, **permuted, **options)
        return
    b = on(backend, mk.multi_objective_advantages, **permuted, **options)
    assert torch.equal(a.advantages, b.advantages), "advantages"
    assert torch.equal(a.group_mask, b.group_mask) and torch.equal(a.sample_mask, b.sample_mask)
    for name in ("weights", "mean", "std"):
        assert torch.equal(getattr(a, name)[:, perm], getattr(b, name)), name


BAD_ADVANTAGES = [
    (dict(rewards=torch.zeros(8, 2, dtype=torch.int64)), "rewards"),
    (dict(rewards=torch.zeros(2, 4, 2)), "rewards"),
    (dict(group_size=3), "group_size"),
    (dict(group_size=0), "group_size"),
    (dict(group_size=np.float64(4)), "group_size"),
    (dict(group_ids=torch.zeros(8)), "group_ids"),
    (dict(group_ids=torch.zeros(7, dtype=torch.long)), "group_ids"),
    (dict(weights=[1.0, -1.0]), "weights"),
    (dict(weights=[1.0, 2.0, 3.0]), "weights"),
    (dict(weights=torch.tensor([1.0, float("nan")])), "weights"),
    (dict(weights=torch.tensor([1.0, -2.0])), "weights"),
    (dict(weights="1,2"), "weights"),
    (dict(eps=-1.0), "eps"),
    (dict(eps=float("nan")), "eps"),
    (dict(normalize="z"), "normalize"),
    (dict(weighting="sum"), "weighting"),
    (dict(std="sample"), "std"),
    (dict(valid=torch.ones(7, dtype=torch.bool)), "valid"),
    (dict(valid=torch.ones(8)), "valid"),
    (dict(gates=torch.ones(8, 2)), "gates"),
    (dict(reward_gates=torch.ones(8, 3, dtype=torch.bool)), "reward_gates"),
    (dict(clip=0.0), "clip"),
    (dict(min_feasible=-1), "min_feasible"),
    (dict(positive_scale=-1.0), "positive_scale"),
    (dict(nan_policy="skip"), "nan_policy"),
    (dict(batch_normalize=1), "batch_normalize"),
    (dict(rewards=torch.tensor([[0.0, 1.0]] * 3 + [[float("nan"), 1.0]] + [[1.0, 0.0]] * 4)), "rewards"),
]


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
@pytest.mark.parametrize("bad,name", BAD_ADVANTAGES)
def test_rejected_advantage_inputs_name_the_argument(backend, bad, name):
    kw = dict(rewards=torch.randn(8, 2, generator=torch.Generator().manual_seed(0)), group_size=4)
    kw.update(bad)
    if "group_ids" in bad:
        kw.pop("group_size")
    with pytest.raises((ValueError, TypeError), match=name):
        on(backend, mk.multi_objective_advantages, **kw)


# ---- policy_loss --------------------------------------------------------------------------------------------------


@st.composite
def loss_problems(draw, with_logits: bool = False):
    b, t = draw(st.integers(1, 3)), draw(st.integers(1, 9))
    gen = gen_of(draw)
    mask_kind = draw(st.sampled_from(["bool", "float", "odd bytes", "signed float"]))
    if mask_kind in ("bool", "odd bytes"):
        mask = odd_bools(draw, (b, t), gen, 0.7) if mask_kind == "odd bytes" else torch.rand(b, t, generator=gen) < 0.7
    else:
        levels = [0.0, 0.5, 1.0, 2.0] + ([-1.0] if mask_kind == "signed float" else [])
        mask = torch.tensor(levels)[torch.randint(0, len(levels), (b, t), generator=gen)]
        mask = mask.to(draw(st.sampled_from([torch.float32, torch.float64])))
    active = mask.bool() if mask.dtype == torch.bool else mask != 0
    masked = ~active

    mode = draw(st.sampled_from(["clip", "gspo", "cispo", "reinforce"]))
    has_old, has_ref = draw(st.booleans()), draw(st.booleans())
    token_adv = draw(st.booleans())
    adv = torch.randn(b, t, generator=gen) if token_adv else torch.randn(b, generator=gen)
    if not token_adv and draw(st.booleans()):
        adv = adv[:, None].expand(b, t)  # expanded along the tokens
    old = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 3 if has_old else None
    ref = -torch.rand(b, t, generator=gen, dtype=torch.float64) * 3 if has_ref else None
    isw = None
    if draw(st.booleans()):
        isw = torch.rand(b, t, generator=gen) * 2 if draw(st.booleans()) else torch.rand(b, generator=gen) * 2
    tadv = torch.randn(b, t, generator=gen) * 0.3 if draw(st.booleans()) else None
    offpolicy = (torch.rand(b, generator=gen) < 0.4) if draw(st.booleans()) else None

    # garbage at masked positions of every per-token input
    garbage = draw(st.sampled_from(GARBAGE[:3]))
    where = draw(st.sampled_from(["advantages", "old_logp", "ref_logp", "is_weights", "token_advantages", "logp"]))

    def dirty(x, name):
        if x is None or x.dim() < 2 or name != where:
            return x
        return torch.where(masked, torch.tensor(garbage, dtype=x.dtype), x)

    adv = dirty(adv.contiguous() if adv.dim() == 2 else adv, "advantages")
    old, ref, isw = dirty(old, "old_logp"), dirty(ref, "ref_logp"), dirty(isw, "is_weights")
    tadv = dirty(tadv, "token_advantages")
    agg = draw(st.sampled_from(["token-mean", "token-sum", "seq-mean-token-mean", "seq-mean-token-sum",
                                "seq-mean-token-sum-norm"]))  # fmt: skip
    options = dict(
        old_logp=old, ref_logp=ref, is_weights=isw, token_advantages=tadv, offpolicy=offpolicy,
        beta=draw(st.sampled_from([0.0, 0.04])) if has_ref else 0.0,
        kl=draw(st.sampled_from(["k1", "k2", "k3"])),
        clip_low=maybe_numpy(draw, draw(st.sampled_from([0.2, 0.1]))),
        clip_high=draw(st.sampled_from([None, 0.28])),
        dual_clip=draw(st.sampled_from([None, 3.0])),
        ratio_cap=draw(st.sampled_from([None, 4.0])),
        mode=mode, agg=agg,
        max_len=maybe_numpy(draw, t + 2) if agg == "seq-mean-token-sum-norm" else None,
        num_tokens=draw(st.sampled_from([None, 7.0])) if agg == "token-mean" else None,
        num_sequences=draw(st.sampled_from([None, 3.0])) if agg.startswith("seq-mean") else None,
    )  # fmt: skip
    minus_inf = draw(st.booleans())  # a token the policy gives no probability, at an active position
    return dict(b=b, t=t, gen=gen, mask=mask, masked=masked, adv=adv, options=options, dirty_logp=where == "logp",
                garbage=garbage, minus_inf=minus_inf)  # fmt: skip


def _loss_scale(ref_grad: torch.Tensor) -> torch.Tensor:
    return ref_grad.detach().abs().nan_to_num(0.0, 0.0, 0.0).max().clamp(min=1e-30)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_policy_loss_agrees_with_the_reference(backend, device):
    @examples(40 if backend == "cpp" else 10, device)
    @given(p=loss_problems(), dtype=st.sampled_from(FLOATS))
    def check(p, dtype):
        b, t, gen = p["b"], p["t"], p["gen"]
        logp = (-torch.rand(b, t, generator=gen, dtype=torch.float64) * 4).to(dtype)
        if p["minus_inf"]:
            logp[0, 0] = float("-inf")
        if p["dirty_logp"]:
            logp = torch.where(p["masked"], torch.tensor(p["garbage"], dtype=dtype), logp)
        wide = torch.full((b, 2 * t), float("nan"), dtype=dtype)
        wide[:, 1::2] = logp

        def run(be, dev):
            x = wide.to(dev).requires_grad_()
            opts = {k: to(dev, v) for k, v in p["options"].items()}
            with mk.use_backend(be):
                loss, metrics = mk.policy_loss(x[:, 1::2], to(dev, p["adv"]), to(dev, p["mask"]), **opts)
            (-1.5 * loss).backward()
            return loss, metrics, x.grad[:, 1::2]

        rloss, rmetrics, rgrad = run("reference", "cpu")
        loss, metrics, grad = run(backend, device)
        # the Triton kernels compute in float32 whatever the input dtype; C++ in float64 for float64 log-probs
        f64_math = dtype == torch.float64 and backend == "cpp"
        rtol = (
            1e-9
            if f64_math
            else {torch.float64: 5e-5, torch.float32: 5e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
        )
        loss_scale = rloss.detach().abs().nan_to_num(0.0, 0.0, 0.0).clamp(min=1.0)
        assert_agree("loss", loss, rloss, loss_scale, rtol)
        for name, got, want in zip(rmetrics._fields, metrics, rmetrics, strict=True):
            assert_agree(name, got, want, want.detach().abs().nan_to_num(0.0, 0.0, 0.0).clamp(min=1.0), rtol)
        assert_agree("grad", grad, rgrad, _loss_scale(rgrad), max(rtol, 1e-6))
        masked = p["masked"]
        assert torch.equal(grad.cpu()[masked], torch.zeros_like(grad.cpu()[masked])), "masked gradient"
        assert torch.equal(rgrad[masked], torch.zeros_like(rgrad[masked])), "masked gradient of the reference"

    check()


# ---- token_logprobs and policy_loss_from_logits ---------------------------------------------------------------


@st.composite
def logits_problems(draw):
    p = draw(loss_problems())
    v = draw(st.sampled_from([1, 5, 33, 130]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    b, t, gen = p["b"], p["t"], p["gen"]
    scale = draw(st.sampled_from([1.0, 30.0, 1e4])) if dtype != torch.float16 else draw(st.sampled_from([1.0, 30.0]))
    z = torch.randn(b, t, v, generator=gen, dtype=torch.float64) * scale
    tokens = torch.randint(0, v, (b, t), generator=gen)
    if v > 1 and draw(st.booleans()):  # -inf logits (a vocabulary mask), never the whole row of an active token
        z[torch.rand(b, t, v, generator=gen) < 0.3] = float("-inf")
        z.scatter_(2, tokens[..., None], torch.randn(b, t, 1, generator=gen, dtype=torch.float64))
    # garbage rows at masked positions: NaN / inf everywhere
    if draw(st.booleans()):
        z[p["masked"]] = p["garbage"]
    p.update(z=z.to(dtype), tokens=tokens, v=v, dtype=dtype, minus_inf=False)
    p["temperature"] = maybe_numpy(draw, draw(st.sampled_from([1.0, 0.7, 2.5])))
    p["chunked"] = draw(st.booleans())  # Triton: rows split over several programs (the chunk exchange)
    return p


def chunking(monkeypatch, chunked: bool) -> None:
    """Triton under the interpreter: rows split over several programs of 32 entries (the chunk exchange), or the
    launcher's defaults."""
    from moo_kernels.ops.logits import triton_launch as logits_cuda

    if not hasattr(chunking, "defaults"):
        chunking.defaults = (logits_cuda.BLOCK_V, logits_cuda.CHUNK_V)
    block, chunk = (16, 32) if chunked and not HAS_CUDA else chunking.defaults
    monkeypatch.setattr(logits_cuda, "BLOCK_V", block)
    monkeypatch.setattr(logits_cuda, "CHUNK_V", chunk)


@pytest.mark.parametrize("backend,device", KERNELS)
def test_policy_loss_from_logits_agrees_with_the_reference(backend, device, monkeypatch):
    @examples(30 if backend == "cpp" else 7, device)
    @given(p=logits_problems(), inplace=st.booleans(), return_entropy=st.booleans())
    def check(p, inplace, return_entropy):
        chunking(monkeypatch, p["chunked"])

        def run(be, dev):
            leaf = p["z"].to(dev).requires_grad_()
            x = leaf * 1.0 if inplace else leaf
            opts = {k: to(dev, v) for k, v in p["options"].items()}
            with mk.use_backend(be):
                out = mk.policy_loss_from_logits(
                    x, to(dev, p["tokens"]), to(dev, p["adv"]), to(dev, p["mask"]), temperature=p["temperature"],
                    inplace_backward=inplace and be != "reference", return_entropy=return_entropy, **opts,
                )  # fmt: skip
            (0.75 * out[0]).backward()
            return out, leaf.grad

        ref, rgrad = run("reference", "cpu")
        out, grad = run(backend, device)
        rtol = {torch.float32: 5e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}[p["dtype"]]
        assert_agree("loss", out[0], ref[0], ref[0].detach().abs().nan_to_num(0, 0, 0).clamp(min=1.0), rtol)
        for name, got, want in zip(ref[1]._fields, out[1], ref[1], strict=True):
            assert_agree(name, got, want, want.abs().nan_to_num(0, 0, 0).clamp(min=1.0), rtol)
        assert_agree("grad", grad, rgrad, _loss_scale(rgrad), rtol)
        masked = p["masked"]
        assert torch.equal(grad.cpu()[masked], torch.zeros_like(grad.cpu()[masked])), "masked rows' gradient"
        if return_entropy:
            keep = ~masked  # the entropy of a garbage row is garbage; compare the others
            assert_agree("entropy", out[2].cpu()[keep], ref[2][keep], torch.tensor(1.0), max(rtol, 1e-4))

    check()


@pytest.mark.parametrize("backend,device", KERNELS)
def test_token_logprobs_agrees_with_the_reference(backend, device, monkeypatch):
    @examples(25 if backend == "cpp" else 6, device)
    @given(p=logits_problems())
    def check(p):
        chunking(monkeypatch, p["chunked"])
        keep = ~p["masked"]
        g_logp = torch.where(keep, torch.randn(p["b"], p["t"], generator=p["gen"]), 0.0)
        g_ent = torch.where(keep, torch.randn(p["b"], p["t"], generator=p["gen"]), 0.0)

        def run(be, dev):
            x = p["z"].to(dev).requires_grad_()
            with mk.use_backend(be):
                logp, ent = mk.token_logprobs(
                    x, to(dev, p["tokens"]), temperature=p["temperature"], return_entropy=True
                )
            ((logp * to(dev, g_logp)).nan_to_num(0.0).sum() + (ent * to(dev, g_ent)).nan_to_num(0.0).sum()).backward()
            return logp, ent, x.grad

        rlogp, rent, rgrad = run("reference", "cpu")
        logp, ent, grad = run(backend, device)
        rtol = {torch.float32: 5e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}[p["dtype"]]
        assert_agree("logp", logp.cpu()[keep], rlogp[keep], rlogp[keep].abs().nan_to_num(0, 0, 0).clamp(min=1.0), rtol)
        assert_agree("entropy", ent.cpu()[keep], rent[keep], torch.tensor(1.0), max(rtol, 1e-4))
        assert_agree("grad", grad, rgrad, _loss_scale(rgrad), rtol)
        assert torch.equal(grad.cpu()[~keep], torch.zeros_like(grad.cpu()[~keep])), "rows without incoming gradient"

    check()


BAD_LOSS = [
    (dict(logp=torch.zeros(2, 3, dtype=torch.int32)), "logp"),
    (dict(logp=torch.zeros(2, 3, 1)), "logp"),
    (dict(advantages=torch.zeros(3)), "advantages"),
    (dict(mask=torch.ones(2, 4, dtype=torch.bool)), "mask"),
    (dict(mask=torch.ones(2, 3, dtype=torch.int64)), "mask"),
    (dict(old_logp=torch.zeros(3, 2)), "old_logp"),
    (dict(mode="ppo"), "mode"),
    (dict(agg="mean"), "agg"),
    (dict(kl="k4"), "kl"),
    (dict(beta=0.1), "ref_logp"),
    (dict(beta=-0.1), "beta"),
    (dict(clip_low=1.0), "clip_low"),
    (dict(clip_high=float("inf")), "clip_high"),
    (dict(dual_clip=1.0), "dual_clip"),
    (dict(ratio_cap=1.1), "ratio_cap"),
    (dict(agg="seq-mean-token-sum-norm"), "max_len"),
    (dict(num_tokens=0), "num_tokens"),
    (dict(num_tokens=torch.tensor(3.0)), "num_tokens"),
    (dict(num_sequences=-1.0, agg="seq-mean-token-sum"), "num_sequences"),
    (dict(num_sequences=2.0), "num_sequences"),
    (dict(offpolicy=torch.ones(2)), "offpolicy"),
    (dict(is_weights=torch.ones(3)), "is_weights"),
]


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
@pytest.mark.parametrize("bad,name", BAD_LOSS)
def test_rejected_loss_inputs_name_the_argument(backend, bad, name):
    kw = dict(logp=-torch.rand(2, 3), advantages=torch.ones(2), mask=torch.ones(2, 3, dtype=torch.bool))
    kw.update(bad)
    with pytest.raises((ValueError, TypeError), match=name):
        on(backend, mk.policy_loss, **kw)


BAD_LOGITS = [
    (dict(logits=torch.zeros(2, 3, 5, dtype=torch.int32)), "logits"),
    (dict(logits=torch.zeros(2, 5, 3).transpose(1, 2)), "logits"),
    (dict(tokens=torch.zeros(2, 3)), "tokens"),
    (dict(tokens=torch.full((2, 3), 5)), "tokens"),
    (dict(tokens=torch.full((2, 3), -1)), "tokens"),
    (dict(temperature=0.0), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=1e-40), "temperature"),
    (dict(inplace_backward=True, logits=torch.zeros(1, 3, 5).expand(2, 3, 5).requires_grad_()), "logits"),
]


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
@pytest.mark.parametrize("bad,name", BAD_LOGITS)
def test_rejected_logits_inputs_name_the_argument(backend, bad, name):
    kw = dict(
        logits=torch.randn(2, 3, 5), tokens=torch.zeros(2, 3, dtype=torch.long), advantages=torch.ones(2),
        mask=torch.ones(2, 3, dtype=torch.bool),
    )  # fmt: skip
    kw.update(bad)
    with pytest.raises((ValueError, TypeError), match=name):
        on(backend, mk.policy_loss_from_logits, **kw)


# ---- brier_reward -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend,device", KERNELS)
def test_brier_reward_agrees_with_the_reference(backend, device):
    @examples(15 if backend == "cpp" else 3, device)
    @given(
        n=st.integers(1, 40), dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
        correct_kind=st.sampled_from(["bool", "odd bytes", "int", "float"]), seed=st.integers(0, 2**31 - 1),
    )  # fmt: skip
    def check(n, dtype, correct_kind, seed):
        gen = torch.Generator().manual_seed(seed)
        q = torch.rand(n, generator=gen).to(dtype)
        q[: min(n, 2)] = torch.tensor([0.0, 1.0][: min(n, 2)], dtype=dtype)
        c = torch.rand(n, generator=gen) < 0.5
        odd = (c.to(torch.uint8) * 2).view(torch.bool)
        correct = {"bool": c, "odd bytes": odd, "int": c.to(torch.int64), "float": c.double()}[correct_kind]
        want = on("reference", mk.brier_reward, correct, q)
        got = on(backend, mk.brier_reward, correct.to(device), q.to(device))
        assert_agree("brier", got, want, torch.tensor(1.0), 1e-6)

    check()
