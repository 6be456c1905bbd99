"""brier_reward: every backend against the float64 reference, gradient, errors, compile."""

import pytest
import torch
from conftest import assert_close, targets

import moo_kernels as mk
from moo_kernels.ops.brier import brier_reference


@pytest.mark.parametrize("backend,device", targets())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("correct_dtype", [torch.bool, torch.int64, torch.float32])
def test_matches_reference(backend, device, dtype, correct_dtype):
    g = torch.Generator().manual_seed(0)
    c = (torch.rand(3, 37, generator=g) > 0.4).to(correct_dtype)
    q = torch.rand(3, 37, generator=g).to(dtype)
    q[0, :3] = torch.tensor([0.0, 1.0, 0.5]).to(dtype)
    with mk.use_backend(backend):
        out = mk.brier_reward(c.to(device), q.to(device))
    assert out.shape == q.shape and out.device.type == device
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == expected_dtype
    assert_close(out, brier_reference(c, q), expected_dtype)


@pytest.mark.parametrize("backend,device", targets())
def test_gradient_and_best_confidence(backend, device):
    c = torch.tensor([True, True, False, False], device=device)
    q = torch.tensor([0.3, 1.0, 0.0, 0.8], dtype=torch.float64, device=device, requires_grad=True)
    with mk.use_backend(backend):
        r = mk.brier_reward(c, q)
        interior = torch.tensor([0.3, 0.9, 0.1, 0.8], dtype=torch.float64, device=device, requires_grad=True)
        assert torch.autograd.gradcheck(lambda q: mk.brier_reward(c, q), (interior,))
    # Best confidence: 1 for a correct answer, 0 for a wrong one.
    assert r[1].item() == 1.0 and r[2].item() == 0.0
    (r * torch.tensor([2.0, 1.0, 1.0, -1.0], dtype=torch.float64, device=device)).sum().backward()
    expected = -2 * (q.detach() - c.double()) * torch.tensor([2.0, 1.0, 1.0, -1.0], dtype=torch.float64, device=device)
    torch.testing.assert_close(q.grad, expected)


@pytest.mark.parametrize("backend,device", targets())
@pytest.mark.parametrize("bad", [1.5, -0.1, float("nan")])
def test_confidence_out_of_range(backend, device, bad):
    q = torch.tensor([0.2, 0.4, bad, 0.1], device=device)
    with mk.use_backend(backend), pytest.raises(ValueError, match=r"confidence\[2\]"):
        mk.brier_reward(torch.ones(4, dtype=torch.bool, device=device), q)


def test_bad_arguments():
    q = torch.rand(4)
    with pytest.raises(ValueError, match="one shape"):
        mk.brier_reward(torch.ones(3, dtype=torch.bool), q)
    with pytest.raises(TypeError, match="confidence must be float16"):
        mk.brier_reward(torch.ones(4, dtype=torch.bool), torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="correct must hold 0 or 1"):
        mk.brier_reward(torch.tensor([0.0, 1.0, 0.5, 1.0]), q)
    with pytest.raises(TypeError, match="correct must be a torch.Tensor"):
        mk.brier_reward([1, 0, 1, 0], q)
    with pytest.raises(ValueError, match="empty"):
        mk.brier_reward(torch.ones(0, dtype=torch.bool), torch.ones(0))


def test_compile():
    c = torch.tensor([1, 0, 1], dtype=torch.uint8)
    q = torch.tensor([0.2, 0.5, 0.9], requires_grad=True)
    torch._dynamo.reset()
    f = torch.compile(lambda c, q: mk.brier_reward(c, q).sum(), fullgraph=True)
    torch.testing.assert_close(f(c.bool(), q), mk.brier_reward(c.bool(), q).sum())


@pytest.mark.parametrize("backend,device", targets())
def test_check_false_skips_the_value_checks(backend, device):
    """check=False reads nothing back (no host synchronisation on CUDA): values outside [0, 1] enter the formula."""
    c = torch.tensor([1.0, 0.0, 1.0], device=device)
    q = torch.tensor([1.5, -0.25, 0.5], device=device)
    with mk.use_backend(backend):
        with pytest.raises(ValueError, match="confidence must lie in"):
            mk.brier_reward(c, q)
        r = mk.brier_reward(c, q, check=False)
    torch.testing.assert_close(r.cpu(), (c - (q - c) ** 2).cpu())
