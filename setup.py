"""Builds moo_kernels._C, the C++17 CPU kernels (pybind11 + OpenMP, no libtorch linkage).

The extension takes raw data pointers and strides from the Python launchers, so it does not depend
on the torch version and builds in seconds in an isolated pip build.
"""

import os
import sys

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

openmp = [] if sys.platform == "darwin" or os.environ.get("MOO_KERNELS_NO_OPENMP") else ["-fopenmp"]
sources = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp"))
# setuptools tracks only the sources: a changed header must rebuild the extension too.
headers = sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".h"))

ext = Pybind11Extension(
    "moo_kernels._C",
    sources,
    depends=headers,
    cxx_std=17,
    extra_compile_args=["-O3", *openmp],
    extra_link_args=openmp,
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
