"""The interfaces around the ops: backend selection per thread, clear errors, numbers of any numeric type."""

import os
import threading

import numpy as np
import pytest
import torch
from conftest import CPU_BACKENDS

import moo_kernels as mk
from moo_kernels._backend import implementation


def test_use_backend_is_thread_local():
    """A use_backend block overrides the backend for its own thread only; set_backend is the process default."""
    default = mk.get_backend()
    seen = {}
    inside, done = threading.Event(), threading.Event()

    def other_thread():
        inside.wait()
        seen["during"] = mk.get_backend()
        with mk.use_backend("cpp"):
            seen["own override"] = mk.get_backend()
        done.set()

    t = threading.Thread(target=other_thread)
    t.start()
    with mk.use_backend("reference"):
        inside.set()
        done.wait()
        assert mk.get_backend() == "reference"  # the other thread's override did not leak here
    t.join()
    assert seen == {"during": default, "own override": "cpp"}
    assert mk.get_backend() == default


def test_set_backend_is_the_default_of_every_thread():
    previous = mk.get_backend()
    seen = []
    try:
        mk.set_backend("reference")
        t = threading.Thread(target=lambda: seen.append(mk.get_backend()))
        t.start()
        t.join()
        with mk.use_backend("cpp"):
            assert mk.get_backend() == "cpp"
        assert mk.get_backend() == "reference"
    finally:
        mk.set_backend(previous)
    assert seen == ["reference"]


def test_use_backend_nests_and_restores_after_an_error():
    default = mk.get_backend()
    with pytest.raises(KeyError):
        with mk.use_backend("reference"):
            with mk.use_backend("cpp"):
                assert mk.get_backend() == "cpp"
            assert mk.get_backend() == "reference"
            raise KeyError("inside")
    assert mk.get_backend() == default


@pytest.mark.parametrize("bad", ["cuda", "Auto", None, 1])
def test_unknown_backend_names_raise(bad):
    with pytest.raises(ValueError, match="backend must be one of"):
        mk.set_backend(bad)
    with pytest.raises(ValueError, match="backend must be one of"):
        with mk.use_backend(bad):
            pass


def test_triton_on_cpu_without_the_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with mk.use_backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            implementation(torch.device("cpu"))
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            mk.policy_loss(torch.zeros(2, 3), torch.ones(2), torch.ones(2, 3, dtype=torch.bool))
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            mk.token_logprobs(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with mk.use_backend("triton"):
        assert implementation(torch.device("cpu")) == "triton"
    assert os.environ["TRITON_INTERPRET"] == "1"


def test_numpy_numbers_are_accepted_where_python_numbers_are():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(16, 3, generator=g)
    kw = dict(eps=1e-6, clip=1.0, positive_scale=1.0, min_feasible=1, drop_zero_variance=False)
    ref = mk.multi_objective_advantages(rewards, group_size=4, **kw)
    out = mk.multi_objective_advantages(
        rewards, group_size=np.int64(4), eps=np.float64(1e-6), clip=np.float32(1.0),
        positive_scale=np.float16(1.0), min_feasible=np.int32(1), drop_zero_variance=np.bool_(False),
    )  # fmt: skip
    for a, b in zip(out, ref, strict=True):
        assert torch.equal(a, b)

    logp = -torch.rand(2, 5, generator=g)
    mask = torch.ones(2, 5, dtype=torch.bool)
    loss, _ = mk.policy_loss(logp, torch.ones(2), mask, clip_low=0.2, max_len=5, agg="seq-mean-token-sum-norm")
    loss_np, _ = mk.policy_loss(
        logp, torch.ones(2), mask, clip_low=np.float32(0.2), max_len=np.int64(5), agg="seq-mean-token-sum-norm"
    )
    assert torch.equal(loss, loss_np)
    logits = torch.randn(2, 5, 7, generator=g)
    tokens = torch.randint(0, 7, (2, 5), generator=g)
    assert torch.equal(
        mk.token_logprobs(logits, tokens, temperature=np.float32(0.5)),
        mk.token_logprobs(logits, tokens, temperature=0.5),
    )


@pytest.mark.parametrize(
    "kw, name",
    [
        (dict(group_size=np.float64(4)), "group_size"),
        (dict(group_size=True), "group_size"),
        (dict(group_size=4, eps=np.bool_(True)), "eps"),
        (dict(group_size=4, clip="1"), "clip"),
        (dict(group_size=4, drop_zero_variance=1), "drop_zero_variance"),
    ],
)
def test_wrong_number_types_name_the_argument(kw, name):
    with pytest.raises(TypeError, match=name):
        mk.multi_objective_advantages(torch.randn(8, 2), **kw)


def test_meta_tensors_give_shapes_without_computing():
    """Tensors on the meta device (shape inference, deferred initialisation) get outputs of the right shapes and
    dtypes from the ops' fake implementations, as from any torch op."""
    meta = torch.device("meta")
    out = mk.multi_objective_advantages(torch.empty(12, 3, device=meta), group_size=4, weights=[1.0, 2.0, 3.0])
    assert [tuple(x.shape) for x in out] == [(12,), (3,), (12,), (3, 3), (3, 3), (3, 3)]
    assert all(x.is_meta for x in out) and out.advantages.dtype == torch.float32
    logp = torch.empty(2, 5, device=meta, requires_grad=True)
    loss, metrics = mk.policy_loss(logp, torch.empty(2, device=meta), torch.empty(2, 5, dtype=torch.bool, device=meta))
    assert loss.is_meta and loss.shape == () and metrics.ratio_max.is_meta
    loss.backward()
    assert logp.grad.is_meta and logp.grad.shape == (2, 5)
    logits = torch.empty(2, 5, 11, device=meta, dtype=torch.bfloat16)
    tokens = torch.empty(2, 5, dtype=torch.long, device=meta)
    logp2, ent = mk.token_logprobs(logits, tokens, return_entropy=True)
    assert logp2.shape == ent.shape == (2, 5) and logp2.dtype == torch.float32 and logp2.is_meta
    loss2, _ = mk.policy_loss_from_logits(logits, tokens, torch.empty(2, device=meta), torch.empty(2, 5, device=meta))
    assert loss2.is_meta
    r = mk.brier_reward(torch.empty(4, device=meta), torch.empty(4, device=meta))
    assert r.is_meta and r.shape == (4,)


def test_meta_group_ids_name_the_problem():
    with pytest.raises(ValueError, match="group_ids"):
        mk.multi_objective_advantages(
            torch.empty(4, 2, device="meta"), group_ids=torch.empty(4, dtype=torch.long, device="meta")
        )


@pytest.mark.parametrize("backend", ["reference", *CPU_BACKENDS])
def test_weights_as_arrays(backend):
    rewards = torch.randn(8, 3, generator=torch.Generator().manual_seed(2))
    want = mk.multi_objective_advantages(rewards, group_size=4, weights=[1.0, 0.5, 2.0], weighting="fixed")
    with mk.use_backend(backend):
        for w in (np.array([1.0, 0.5, 2.0]), np.array([1.0, 0.5, 2.0], dtype=np.float32), (1, 0.5, np.float64(2))):
            got = mk.multi_objective_advantages(rewards, group_size=4, weights=w, weighting="fixed")
            torch.testing.assert_close(got.advantages, want.advantages, rtol=1e-6, atol=1e-7)
        with pytest.raises(ValueError, match="weights"):
            mk.multi_objective_advantages(rewards, group_size=4, weights=np.ones((1, 3)))


def _workload(seed: int):
    """Calls of every op on the C++ backend large enough for the kernels' OpenMP paths; returns their outputs."""
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randn(8192, 3, generator=g)
    gates = torch.rand(8192, 2, generator=g) > 0.1
    out = list(mk.multi_objective_advantages(rewards, group_size=16, gates=gates, batch_normalize=True))
    logp = -torch.rand(16, 4096, generator=g)
    x = logp.clone().requires_grad_()
    mask = torch.rand(16, 4096, generator=g) > 0.2
    loss, metrics = mk.policy_loss(x, torch.randn(16, generator=g), mask, old_logp=logp + 0.01, clip_high=0.28)
    loss.backward()
    out += [loss.detach(), *metrics, x.grad]
    logits = torch.randn(4, 64, 517, generator=g)
    tokens = torch.randint(0, 517, (4, 64), generator=g)
    z = logits.clone().requires_grad_()
    lossz, _ = mk.policy_loss_from_logits(z, tokens, torch.randn(4, generator=g), mask[:4, :64])
    lossz.backward()
    out += [lossz.detach(), z.grad, mk.brier_reward(mask[0], torch.rand(4096, generator=g))]
    return out


def test_concurrent_calls_from_threads_give_the_serial_bits():
    """The C++ kernels release the GIL and keep no state between calls: four Python threads calling every op at
    once get bitwise the results of calling one after another."""
    with mk.use_backend("cpp"):
        serial = [_workload(seed) for seed in range(4)]
    results: dict[int, list] = {}

    def work(seed):
        with mk.use_backend("cpp"):
            results[seed] = _workload(seed)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed in range(4):
        assert all(torch.equal(a, b) for a, b in zip(results[seed], serial[seed], strict=True)), seed


_DIGEST = """
import hashlib, sys, torch
sys.path.insert(0, "python_tests")
import moo_kernels as mk
from test_interfaces import _workload
h = hashlib.sha256()
with mk.use_backend("cpp"):
    for x in _workload(7):
        h.update(x.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
print(h.hexdigest())
"""


def test_cpp_results_do_not_depend_on_the_thread_count():
    """OMP_NUM_THREADS 1, 2 and 3 give the same bits for every op (work is split and reduced in fixed orders)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    digests = set()
    for threads in ("1", "2", "3"):
        env = dict(
            os.environ, OMP_NUM_THREADS=threads, PYTHONPATH=f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        )
        run = subprocess.run([sys.executable, "-c", _DIGEST], env=env, capture_output=True, text=True, cwd=root)
        assert run.returncode == 0, run.stderr[-2000:]
        digests.add(run.stdout.strip())
    assert len(digests) == 1, digests
