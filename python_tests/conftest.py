"""Test configuration.

Without a GPU, the Triton kernels run on CPU tensors under the Triton interpreter: TRITON_INTERPRET=1
must be set before triton is first imported, so it is set here, at the top of the first module
pytest imports. With a GPU the kernels are compiled and run for real, and the `gpu` tests run.

Markers set here, at collection, so that `-m` selects by what a test touches:
- `gpu`: the test runs on a CUDA device: marked so in its file, parametrised with a device parameter "cuda" (the
  ("auto", "cuda") pair of targets()), or skipped without a GPU for a reason that names a CUDA device.
  `pytest -m gpu` on a GPU machine runs exactly these (bench/gpu_check.sh does).
- `triton_cpu`: the Triton kernels on CPU tensors under the interpreter (the ("triton", "cpu") pair of
  targets(), present without a GPU): the CPU twins of the parametrised `gpu` tests, which the CPU
  rehearsal of bench/gpu_check.sh runs a few of.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Backends that run on CPU tensors here: the C++ kernels, and the Triton kernels (interpreted) when
# there is no GPU. With a GPU, the Triton kernels are tested on CUDA tensors instead.
CPU_BACKENDS = ["cpp"] + ([] if HAS_CUDA else ["triton"])

# Absolute / relative tolerance of an output computed in this dtype against the float64 reference.
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.float64: (1e-10, 1e-10)}


def pytest_configure(config):
    config.addinivalue_line("markers", "triton_cpu: Triton kernels on CPU tensors under the interpreter")


def _is_cuda(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and (value == "cuda" or value.startswith("cuda:"))


def touches_cuda(item) -> bool:
    """Whether a collected test runs on a CUDA device (see the module's docstring)."""
    if item.get_closest_marker("gpu") is not None:
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(_is_cuda(v) for k, v in callspec.params.items() if "device" in k):
        return True
    return any("CUDA device" in str(m.kwargs.get("reason", "")) for m in item.iter_markers("skipif"))


def runs_triton_on_cpu(item) -> bool:
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return False
    params = callspec.params
    return params.get("backend") == "triton" and params.get("device", "cpu") == "cpu"


# tryfirst: the markers must be in place before pytest deselects by -m.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if touches_cuda(item):
            item.add_marker(pytest.mark.gpu)
            if not HAS_CUDA:
                item.add_marker(skip_gpu)
        elif runs_triton_on_cpu(item):
            item.add_marker(pytest.mark.triton_cpu)


def targets():
    """(backend, device) pairs that the kernel tests run on."""
    pairs = [(b, "cpu") for b in CPU_BACKENDS]
    if HAS_CUDA:
        pairs.append(("auto", "cuda"))
    return pairs


def assert_close(actual, expected, dtype=torch.float32, msg=""):
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol, msg=msg)
