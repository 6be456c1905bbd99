"""Backend selection and the compiled C++ extension.

The backend decides which implementation runs for CPU tensors (CUDA tensors always take Triton
unless "reference" is forced):

- "auto" (default): C++ on CPU, Triton on CUDA, the float64 reference elsewhere.
- "cpp", "triton", "reference": force one. "triton" on CPU tensors needs TRITON_INTERPRET=1 set
  before triton is imported; it is how the tests run the GPU kernels without a GPU.

The process default comes from the environment variable MOO_KERNELS_BACKEND (else "auto") and can be
changed with moo_kernels.set_backend(name), for every thread. The context manager
moo_kernels.use_backend(name) overrides it for the current thread only, until the block ends: another
thread (a data loader, a second trainer) keeps seeing the process default.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

import torch

BACKENDS = ("auto", "cpp", "triton", "reference")


def _check(name: object, what: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {name!r}")
    return name


_default = _check(os.environ.get("MOO_KERNELS_BACKEND", "auto"), "MOO_KERNELS_BACKEND")
_local = threading.local()  # .override: this thread's use_backend, when one is active


def get_backend() -> str:
    """The backend in force in this thread: its use_backend override, else the process default."""
    return getattr(_local, "override", None) or _default


def set_backend(name: str) -> None:
    """Set the process default: "auto", "cpp", "triton" or "reference" (every thread without a
    use_backend override sees it)."""
    global _default
    _default = _check(name, "backend")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Use this backend in the current thread only, for the duration of the with block."""
    _check(name, "backend")
    previous = getattr(_local, "override", None)
    _local.override = name
    try:
        yield
    finally:
        _local.override = previous


def implementation(device: torch.device) -> str:
    """The implementation that runs an op on tensors of this device: "cpp", "triton" or "reference".

    Raises a RuntimeError that says what to do when "triton" is forced on CPU tensors without the
    Triton interpreter (Triton itself would only report that it found no active driver).
    """
    backend = getattr(_local, "override", None) or _default  # get_backend(), inline: this runs on every call
    kind = device.type
    if kind == "cpu" and (backend == "auto" or backend == "cpp"):
        return "cpp"
    if backend == "reference" or kind not in ("cpu", "cuda"):
        return "reference"
    if kind == "cuda":
        return "triton"
    if backend == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "the 'triton' backend on CPU tensors runs the kernels under the Triton interpreter: set the "
                "environment variable TRITON_INTERPRET=1 (or move the tensors "
                "to a CUDA device, or use the 'cpp' or 'reference' backend)"
            )
        return "triton"
    return "cpp"


def tracing(x: torch.Tensor) -> bool:
    """Whether x's value cannot be read: it is being traced (torch.compile, torch.library's checks) or is a meta
    tensor."""
    from torch._subclasses.fake_tensor import is_fake

    return torch.compiler.is_compiling() or x.is_meta or is_fake(x)


_extension = None  # the loaded extension module


def cpp():
    """The compiled extension moo_kernels._C, with a clear error when it was not built.

    The environment variable MOO_KERNELS_EXTENSION, when set, names the file to load as moo_kernels._C
    in place of the extension built in the package: `make sanitize` points it at the build with
    AddressSanitizer and UndefinedBehaviorSanitizer in build/sanitize/ (whose runtime must be
    preloaded: LD_PRELOAD). The first load in a process holds for the rest of it.
    """
    global _extension
    if _extension is not None:
        return _extension
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
        _extension = _registered(_C)
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
    _extension = _registered(module)
    return module


def _registered(module):
    """The extension, after handing it the code tables of moo_kernels._codes (csrc/args.h reads dtypes and string
    options through them)."""
    from moo_kernels import _codes

    module.register_codes(dtypes=_codes.DTYPE, options=_codes.OPTIONS)
    return module
