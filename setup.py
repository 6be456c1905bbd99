"""Builds moo_kernels._C, the C++17 CPU kernels (pybind11 + OpenMP, no libtorch linkage).

The extension takes raw data pointers and strides from the Python launchers, so it does not depend
on the torch version and builds in seconds in an isolated pip build.

The sources compile in parallel, one process per core (MOO_KERNELS_BUILD_JOBS=N: N processes).
MOO_KERNELS_SANITIZE=1 builds with AddressSanitizer and UndefinedBehaviorSanitizer (-O1 -g, frame
pointers kept): `make sanitize` builds so into build/sanitize/, never over the normal build, and loads
it through MOO_KERNELS_EXTENSION (moo_kernels._backend.cpp).
"""

import os
import sys

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

# Every source is recompiled once the extension is out of date (a changed header must reach every object).
ParallelCompile("MOO_KERNELS_BUILD_JOBS").install()

openmp = [] if sys.platform == "darwin" or os.environ.get("MOO_KERNELS_NO_OPENMP") else ["-fopenmp"]
sources = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp"))
# setuptools tracks only the sources: a changed header must rebuild the extension too.
headers = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".h"))

# No FMA contraction (GCC's C++ default contracts where the instruction set has FMA): every SIMD variant of a
# kernel gives the same bits (csrc/simd.h).
fixed_arithmetic = ["-ffp-contract=off"]
if os.environ.get("MOO_KERNELS_SANITIZE") == "1":
    sanitize = ["-fsanitize=address,undefined"]
    compile_args = ["-O1", "-g", "-fno-omit-frame-pointer", *fixed_arithmetic, *sanitize, *openmp]
    link_args = [*sanitize, *openmp]
else:
    compile_args = ["-O3", *fixed_arithmetic, *openmp]
    link_args = openmp

ext = Pybind11Extension(
    "moo_kernels._C",
    sources,
    depends=headers,
    cxx_std=17,
    extra_compile_args=compile_args,
    extra_link_args=link_args,
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
