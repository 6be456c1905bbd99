"""Property tests of the advantage op (hypothesis), on the default CPU backend and the reference."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moo_kernels as mk

BACKENDS = ["auto", "reference"]
SETTINGS = settings(max_examples=30, deadline=None)


@st.composite
def batches(draw, max_groups=5, max_size=6, max_k=4):
    g = draw(st.integers(1, max_groups))
    size = draw(st.integers(2, max_size))
    k = draw(st.integers(1, max_k))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    levels = draw(st.sampled_from(["discrete", "continuous"]))
    if levels == "discrete":
        r = torch.randint(0, 3, (g * size, k), generator=gen).double()
    else:
        r = torch.randn(g * size, k, generator=gen, dtype=torch.float64)
    w = torch.rand(k, generator=gen, dtype=torch.float64) + 0.1
    return r, size, w


def adv(backend, r, size, w, **kw):
    with mk.use_backend(backend):
        return mk.multi_objective_advantages(r, group_size=size, weights=w, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(batch=batches(), weighting=st.sampled_from(["scalarize", "fixed", "variance"]), seed=st.integers(0, 99))
def test_permutation_within_group(backend, batch, weighting, seed):
    r, size, w = batch
    n = r.shape[0]
    gen = torch.Generator().manual_seed(seed)
    perm = torch.cat([g * size + torch.randperm(size, generator=gen) for g in range(n // size)])
    a = adv(backend, r, size, w, weighting=weighting).advantages
    b = adv(backend, r[perm], size, w, weighting=weighting).advantages
    torch.testing.assert_close(b, a[perm], atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(batch=batches(), seed=st.integers(0, 99), batch_normalize=st.booleans())
def test_group_order(backend, batch, seed, batch_normalize):
    r, size, w = batch
    groups = r.shape[0] // size
    order = torch.randperm(groups, generator=torch.Generator().manual_seed(seed))
    rows = (order[:, None] * size + torch.arange(size)).reshape(-1)
    a = adv(backend, r, size, w, batch_normalize=batch_normalize)
    b = adv(backend, r[rows], size, w, batch_normalize=batch_normalize)
    torch.testing.assert_close(b.advantages, a.advantages[rows], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(b.mean, a.mean[order])


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(batch=batches(), weighting=st.sampled_from(["fixed", "variance"]), seed=st.integers(0, 99))
def test_zscore_affine_invariance_per_objective(backend, batch, weighting, seed):
    r, size, w = batch
    gen = torch.Generator().manual_seed(seed)
    scale = torch.rand(r.shape[1], generator=gen, dtype=torch.float64) * 5 + 0.2
    shift = torch.randn(r.shape[1], generator=gen, dtype=torch.float64) * 10
    a = adv(backend, r, size, w, weighting=weighting, eps=0.0).advantages
    b = adv(backend, r * scale + shift, size, w, weighting=weighting, eps=0.0).advantages
    if weighting == "fixed":
        torch.testing.assert_close(b, a, atol=1e-9, rtol=1e-9)
    else:
        # DVAO weights objectives by w_k sigma_k: rescaling objective k rescales its say, so only a
        # shift, or one common scale for all objectives, leaves the advantage unchanged.
        c = adv(backend, r * scale[0] + shift, size, w, weighting=weighting, eps=0.0).advantages
        torch.testing.assert_close(c, a, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(batch=batches(), std=st.sampled_from(["unbiased", "population"]))
def test_variance_bounded_by_scalarize(backend, batch, std):
    r, size, w = batch
    a = adv(backend, r, size, w, weighting="variance", eps=0.0, std=std).advantages
    s = adv(backend, r, size, w, weighting="scalarize", eps=0.0, std=std).advantages
    assert bool((a.abs() <= s.abs() + 1e-12).all())


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(batch=batches(), normalize=st.sampled_from(["zscore", "center", "rloo"]))
def test_advantages_sum_to_zero_in_group(backend, batch, normalize):
    r, size, w = batch
    a = adv(backend, r, size, w, normalize=normalize, weighting="fixed").advantages
    sums = a.view(-1, size).sum(dim=1)
    torch.testing.assert_close(sums, torch.zeros_like(sums), atol=1e-9, rtol=0)
