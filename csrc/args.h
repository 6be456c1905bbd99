// The C++ side of a launcher's call: how an op's arguments cross the Python boundary.
//
// A launcher passes the op's tensors as a dict by argument name, each either None (absent) or the tuple
// (address, dtype code, sizes, strides in elements) of moo_kernels._spec.operand, and its options as a dict
// by name (strings already turned into the codes of codes.h). A kernel reads what it uses by name:
//   Operand adv = tensor_arg(tensors, "advantages", {{B}, {B, T}}, kFloats);   (a lone tensor: tensor_value)
//   double beta = option<double>(options, "beta");
// and every tensor is checked against what the kernel relies on (its rank, sizes and dtype): a mismatch
// throws std::invalid_argument naming the argument, which pybind11 raises as a ValueError. So a launcher that
// passes a wrong tensor fails loudly instead of corrupting memory, and a new option is read where it is used.

#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "dtype.h"

namespace moo {

namespace py = pybind11;

// The dtype codes of floating tensors.
inline const std::vector<int> kFloats = {kFloat16, kBFloat16, kFloat32, kFloat64};

// A checked tensor argument: its Operand (address, dtype, strides of the first two dimensions; a 1-D tensor has
// a second stride of 0) and its sizes. ptr is null when the argument is absent.
struct TensorArg : Operand {
    std::vector<int64_t> sizes, strides;
};

inline std::string shape_text(const std::vector<int64_t>& s) {
    std::string out = "(";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + (s[i] < 0 ? std::string("*") : std::to_string(s[i]));
    return out + (s.size() == 1 ? ",)" : ")");
}

// The integers of a Python sequence (a tuple of sizes or strides).
inline std::vector<int64_t> int_list(PyObject* seq) {
    PyObject* fast = PySequence_Fast(seq, "sizes and strides must be sequences");
    if (fast == nullptr) throw py::error_already_set();
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    std::vector<int64_t> out(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) out[i] = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(fast, i));
    Py_DECREF(fast);
    if (PyErr_Occurred()) throw py::error_already_set();
    return out;
}

// The operand tuple value (None: absent), checked: its sizes must equal one of shapes (a size of -1 matches any),
// its dtype code one of dtypes (empty: any). Read with the C API: this runs on every call of an op.
inline TensorArg tensor_value(const py::handle& value, const std::string& name,
                              const std::vector<std::vector<int64_t>>& shapes, const std::vector<int>& dtypes,
                              bool optional = true) {
    TensorArg t;
    if (value.is_none()) {
        if (!optional) throw std::invalid_argument(name + " must be given");
        return t;
    }
    PyObject* tup = value.ptr();
    if (!PyTuple_Check(tup) || PyTuple_GET_SIZE(tup) != 4)
        throw std::invalid_argument(name + " must be an (address, dtype, sizes, strides) tuple");
    t.ptr = reinterpret_cast<const void*>(static_cast<uintptr_t>(PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(tup, 0))));
    t.dtype = static_cast<int>(PyLong_AsLong(PyTuple_GET_ITEM(tup, 1)));
    if (PyErr_Occurred()) throw py::error_already_set();
    t.sizes = int_list(PyTuple_GET_ITEM(tup, 2));
    t.strides = int_list(PyTuple_GET_ITEM(tup, 3));
    const std::vector<int64_t>& strides = t.strides;
    if (strides.size() != t.sizes.size()) throw std::invalid_argument(name + ": sizes and strides of different ranks");
    bool matches = shapes.empty();
    for (const auto& shape : shapes) {
        bool ok = shape.size() == t.sizes.size();
        for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || shape[i] == t.sizes[i];
        matches |= ok;
    }
    if (!matches) {
        std::string want;
        for (size_t i = 0; i < shapes.size(); ++i) want += (i ? " or " : "") + shape_text(shapes[i]);
        throw std::invalid_argument(name + " must have shape " + want + ", got " + shape_text(t.sizes));
    }
    bool dtype_ok = dtypes.empty();
    for (int d : dtypes) dtype_ok |= d == t.dtype;
    if (!dtype_ok) throw std::invalid_argument(name + ": unsupported dtype code " + std::to_string(t.dtype));
    t.sb = t.sizes.empty() ? 0 : strides[0];
    t.st = t.sizes.size() > 1 ? strides[1] : 0;
    return t;
}

// The entry `name` of a dict of arguments (a borrowed reference), or an error when it is missing.
inline py::handle entry(const py::dict& d, const char* name, const char* what) {
    PyObject* v = PyDict_GetItemString(d.ptr(), name);
    if (v == nullptr) throw std::invalid_argument(std::string("missing ") + what + " " + name);
    return py::handle(v);
}

// The tensor argument `name` of the dict (see above).
inline TensorArg tensor_arg(const py::dict& tensors, const char* name, const std::vector<std::vector<int64_t>>& shapes,
                            const std::vector<int>& dtypes, bool optional = true) {
    return tensor_value(entry(tensors, name, "tensor argument"), name, shapes, dtypes, optional);
}

// The option `name` of the dict, as T (a missing option is an error, not a default: the spec has the defaults).
template <typename T>
T option(const py::dict& options, const char* name) {
    return entry(options, name, "option").cast<T>();
}

// The option `name`, or nullopt when it is None.
template <typename T>
std::optional<T> optional_option(const py::dict& options, const char* name) {
    const py::handle v = entry(options, name, "option");
    if (v.is_none()) return std::nullopt;
    return v.cast<T>();
}

// The address of an output buffer the launcher allocated (an operand tuple), checked like a tensor argument.
template <typename T>
T* output(const py::handle& value, const std::string& name, const std::vector<std::vector<int64_t>>& shapes,
          const std::vector<int>& dtypes) {
    TensorArg t = tensor_value(value, name, shapes, dtypes, /*optional=*/false);
    return static_cast<T*>(const_cast<void*>(t.ptr));
}

}  // namespace moo
