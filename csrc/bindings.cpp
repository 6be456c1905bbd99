// The pybind11 module moo_kernels._C: C++17 CPU kernels called with raw data pointers by the Python
// launchers (moo_kernels/ops/*/cpu.py), so it links against neither libtorch nor numpy. Each op's
// source file defines a register_<op> function that adds its entry points to the module.

#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_advantages(py::module_& m);   // csrc/advantages.cpp
void register_logits(py::module_& m);       // csrc/logits.cpp
void register_policy_loss(py::module_& m);  // csrc/policy_loss.cpp

PYBIND11_MODULE(_C, m) {
    m.doc() = "moo_kernels C++ CPU kernels (OpenMP)";
    register_advantages(m);
    register_logits(m);
    register_policy_loss(m);
}
