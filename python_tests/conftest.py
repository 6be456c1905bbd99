"""Test configuration.

Without a GPU, the Triton kernels run on CPU tensors under the Triton interpreter: TRITON_INTERPRET=1
must be set before triton is first imported, so it is set here, at the top of the first module
pytest imports. With a GPU the kernels are compiled and run for real, and the `gpu` tests run.
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


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def targets():
    """(backend, device) pairs that the kernel tests run on."""
    pairs = [(b, "cpu") for b in CPU_BACKENDS]
    if HAS_CUDA:
        pairs.append(("auto", "cuda"))
    return pairs


def assert_close(actual, expected, dtype=torch.float32, msg=""):
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol, msg=msg)
