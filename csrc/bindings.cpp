// The pybind11 module moo_kernels._C: C++17 CPU kernels called by the Python launchers
// (moo_kernels/ops/*/cpp_launch.py), which read their tensors through the Python C API (csrc/args.h), so the
// module links against neither libtorch nor numpy. Each op's source file defines a register_<op> function that
// adds its entry points to the module.

#include <pybind11/pybind11.h>

#include "args.h"

namespace py = pybind11;

void register_advantages(py::module_& m);   // csrc/advantages.cpp
void register_logits(py::module_& m);       // csrc/logits.cpp
void register_policy_loss(py::module_& m);  // csrc/policy_loss.cpp
void register_rollout(py::module_& m);      // csrc/rollout.cpp

PYBIND11_MODULE(_C, m) {
    m.doc() = "moo_kernels C++ CPU kernels (OpenMP)";
    m.def("register_codes", &moo::register_codes,
          "Keep the code tables of moo_kernels._codes: torch.dtype -> code, and option name -> {value -> code}.",
          py::arg("dtypes"), py::arg("options"));
    register_advantages(m);
    register_logits(m);
    register_policy_loss(m);
    register_rollout(m);
}
