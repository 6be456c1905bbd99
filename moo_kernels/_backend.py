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
    """The compiled extension moo_kernels._C, with a clear error when it was not built.

    The environment variable MOO_KERNELS_EXTENSION, when set, names the file to load as moo_kernels._C
    in place of the extension built in the package: `make sanitize` points it at the build with
    AddressSanitizer and UndefinedBehaviorSanitizer in build/sanitize/ (whose runtime must be
    preloaded: LD_PRELOAD). The first load in a process holds for the rest of it.
    """
    import importlib.util
    import sys

    name = "moo_kernels._C"
    path = os.environ.get("MOO_KERNELS_EXTENSION")
    if name in sys.modules or not path:
        try:
            from moo_kernels import _C
        except ImportError as e:  # pragma: no cover - exercised only on broken installs
            raise ImportError(
                "moo_kernels._C (the C++ CPU kernels) is not built: run `pip install -e .` or "
                "`python setup.py build_ext --inplace` in the repository"
            ) from e
        return _C
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None or not os.path.isfile(path):
        raise ImportError(f"MOO_KERNELS_EXTENSION={path!r} is not an extension module file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    import moo_kernels

    moo_kernels._C = module
    return module
