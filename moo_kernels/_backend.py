"""Backend selection and the compiled C++ extension.

The backend decides which implementation runs for CPU tensors (CUDA tensors always take Triton
unless "reference" is forced):

- "auto" (default): C++ on CPU, Triton on CUDA, the float64 reference elsewhere.
- "cpp", "triton", "reference": force one. "triton" on CPU tensors needs TRITON_INTERPRET=1 set
  before triton is imported; it is how the tests run the GPU kernels without a GPU.

Set it with moo_kernels.set_backend(name), the context manager moo_kernels.use_backend(name), or the
environment variable MOO_KERNELS_BACKEND.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

BACKENDS = ("auto", "cpp", "triton", "reference")
_backend = os.environ.get("MOO_KERNELS_BACKEND", "auto")
if _backend not in BACKENDS:
    raise ValueError(f"MOO_KERNELS_BACKEND must be one of {BACKENDS}, got {_backend!r}")


def get_backend() -> str:
    return _backend


def set_backend(name: str) -> None:
    """Choose the implementation for CPU tensors: "auto", "cpp", "triton" or "reference"."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    _backend = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Context manager form of set_backend."""
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def cpp():
    """The compiled extension moo_kernels._C, with a clear error when it was not built."""
    try:
        from moo_kernels import _C
    except ImportError as e:  # pragma: no cover - exercised only on broken installs
        raise ImportError(
            "moo_kernels._C (the C++ CPU kernels) is not built: run `pip install -e .` or "
            "`python setup.py build_ext --inplace` in the repository"
        ) from e
    return _C
