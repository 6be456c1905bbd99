// The C++ side of a launcher's call: how an op's arguments cross the Python boundary.
//
// A launcher passes the op's spec object (moo_kernels/_spec.py) and its own tensors (the primary input, the
// outputs it allocated) as torch.Tensor objects or None. A kernel reads what it uses by name:
//   TensorArg adv = tensor_arg(spec, "advantages", {{B}, {B, T}}, kFloats);   (a lone tensor: tensor_value)
//   double beta = option<double>(spec, "beta");                                (a string option: its code)
// Tensors are read through the C API (address, dtype, sizes, strides in elements; no libtorch), string options
// through the code tables moo_kernels._codes registers at import (register_codes), and every tensor is checked
// against what the kernel relies on (its rank, sizes and dtype): a mismatch throws std::invalid_argument naming
// the argument, which pybind11 raises as a ValueError. So a launcher that passes a wrong tensor fails loudly
// instead of corrupting memory, and a new option is read where it is used.

#pragma once

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <unordered_map>
#include <vector>

#include "dtype.h"

namespace moo {

namespace py = pybind11;

// The dtype codes of floating tensors.
inline const std::vector<int> kFloats = {kFloat16, kBFloat16, kFloat32, kFloat64};

// The sizes (or strides) of a tensor of rank <= kMaxRank, held inline: reading an argument allocates nothing.
constexpr size_t kMaxRank = 4;
struct Dims {
    int64_t v[kMaxRank] = {};
    size_t n = 0;
    size_t size() const { return n; }
    bool empty() const { return n == 0; }
    int64_t operator[](size_t i) const { return v[i]; }
};

// One accepted shape of a tensor argument (a size of -1 matches any), and the accepted dtype codes, held inline:
// a call site writes them as braces ({{B}, {B, T}}, {kBool}) or passes vectors, and nothing is allocated.
struct Shape : Dims {
    Shape() = default;
    Shape(std::initializer_list<int64_t> sizes) { assign(sizes.begin(), sizes.size()); }
    Shape(const std::vector<int64_t>& sizes) { assign(sizes.data(), sizes.size()); }  // NOLINT: implicit

  private:
    void assign(const int64_t* sizes, size_t count) {
        if (count > kMaxRank) throw std::invalid_argument("a shape of rank > " + std::to_string(kMaxRank));
        n = count;
        for (size_t i = 0; i < n; ++i) v[i] = sizes[i];
    }
};
using Shapes = std::initializer_list<Shape>;

struct DTypes {
    int v[8] = {};
    size_t n = 0;
    DTypes(std::initializer_list<int> codes) { assign(codes.begin(), codes.size()); }
    DTypes(const std::vector<int>& codes) { assign(codes.data(), codes.size()); }  // NOLINT: implicit
    bool empty() const { return n == 0; }
    const int* begin() const { return v; }
    const int* end() const { return v + n; }

  private:
    void assign(const int* codes, size_t count) {
        if (count > 8) throw std::invalid_argument("more than 8 dtype codes");
        n = count;
        for (size_t i = 0; i < n; ++i) v[i] = codes[i];
    }
};

// A checked tensor argument: its Operand (address, dtype, strides of the first two dimensions; a 1-D tensor has
// a second stride of 0) and its sizes and strides. ptr is null when the argument is absent.
struct TensorArg : Operand {
    Dims sizes, strides;
};

template <typename S>
std::string shape_text(const S& s) {
    std::string out = "(";
    for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + (s[i] < 0 ? std::string("*") : std::to_string(s[i]));
    return out + (s.size() == 1 ? ",)" : ")");
}

// The code tables of moo_kernels._codes, registered once at import (register_codes): torch.dtype -> dtype code,
// and option name -> {string value -> code}.
struct Codes {
    PyObject* dtypes = nullptr;
    PyObject* options = nullptr;
};
inline Codes& codes() {
    static Codes tables;
    return tables;
}

// A new reference from a Python call, or the pending Python error as an exception.
inline PyObject* checked(PyObject* result) {
    if (result == nullptr) throw py::error_already_set();
    return result;
}

// The integers of a tuple (a torch.Size or a tuple of strides), stolen; `what` names it in errors.
inline Dims dims_of(PyObject* tuple, const char* what) {
    Dims d;
    const bool ok = tuple != nullptr && PyTuple_Check(tuple) && PyTuple_GET_SIZE(tuple) <= Py_ssize_t(kMaxRank);
    if (ok) {
        d.n = static_cast<size_t>(PyTuple_GET_SIZE(tuple));
        for (size_t i = 0; i < d.n; ++i) d.v[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(tuple, Py_ssize_t(i)));
    }
    Py_XDECREF(tuple);
    if (PyErr_Occurred()) throw py::error_already_set();
    if (!ok) throw std::invalid_argument(std::string(what) + ": a tensor of rank <= " + std::to_string(kMaxRank) + " expected");
    return d;
}

// The names of the tensor attributes read below, made once.
struct TensorNames {
    PyObject* data_ptr = PyUnicode_InternFromString("data_ptr");
    PyObject* dtype = PyUnicode_InternFromString("dtype");
    PyObject* shape = PyUnicode_InternFromString("shape");
    PyObject* stride = PyUnicode_InternFromString("stride");
};
inline const TensorNames& tensor_names() {
    static const TensorNames names;
    return names;
}

// The tensor value (None: absent), checked: its sizes must equal one of shapes (a size of -1 matches any), its
// dtype one of dtypes (empty: any). Read with the C API: this runs on every call of an op.
inline TensorArg tensor_value(const py::handle& value, const char* name, const Shapes& shapes, const DTypes& dtypes,
                              bool optional = true) {
    TensorArg t;
    if (value.is_none()) {
        if (!optional) throw std::invalid_argument(std::string(name) + " must be given");
        return t;
    }
    PyObject* x = value.ptr();
    if (codes().dtypes == nullptr) throw std::runtime_error("the code tables are not registered (register_codes)");
    const TensorNames& attr = tensor_names();
    PyObject* address = checked(PyObject_CallMethodNoArgs(x, attr.data_ptr));
    t.ptr = reinterpret_cast<const void*>(static_cast<uintptr_t>(PyLong_AsUnsignedLongLong(address)));
    Py_DECREF(address);
    PyObject* dtype = checked(PyObject_GetAttr(x, attr.dtype));
    PyObject* code = PyDict_GetItem(codes().dtypes, dtype);  // borrowed
    Py_DECREF(dtype);
    t.dtype = code == nullptr ? -1 : static_cast<int>(PyLong_AsLong(code));
    if (PyErr_Occurred()) throw py::error_already_set();
    t.sizes = dims_of(PyObject_GetAttr(x, attr.shape), name);
    t.strides = dims_of(PyObject_CallMethodNoArgs(x, attr.stride), name);
    const Dims& strides = t.strides;
    if (strides.size() != t.sizes.size())
        throw std::invalid_argument(std::string(name) + ": sizes and strides of different ranks");
    bool matches = shapes.size() == 0;
    for (const auto& shape : shapes) {
        bool ok = shape.size() == t.sizes.size();
        for (size_t i = 0; ok && i < shape.size(); ++i) ok = shape[i] < 0 || shape[i] == t.sizes[i];
        matches |= ok;
    }
    if (!matches) {
        std::string want;
        for (const Shape& shape : shapes) want += (want.empty() ? "" : " or ") + shape_text(shape);
        throw std::invalid_argument(std::string(name) + " must have shape " + want + ", got " + shape_text(t.sizes));
    }
    bool dtype_ok = dtypes.empty() ? t.dtype >= 0 : false;
    for (int d : dtypes) dtype_ok |= d == t.dtype;
    if (!dtype_ok) throw std::invalid_argument(std::string(name) + ": unsupported dtype code " + std::to_string(t.dtype));
    t.sb = t.sizes.empty() ? 0 : strides[0];
    t.st = t.sizes.size() > 1 ? strides[1] : 0;
    return t;
}

// `name` as an interned Python string, made once per name: the names are string literals, so their addresses
// key the cache, and an interned key makes the attribute lookup a pointer comparison.
inline PyObject* interned(const char* name) {
    static std::unordered_map<const char*, PyObject*> cache;
    PyObject*& key = cache[name];
    if (key == nullptr) key = PyUnicode_InternFromString(name);
    return key;
}

// The attribute `name` of a spec object, or an error naming it when the spec has none.
inline py::object field(const py::handle& spec, const char* name) {
    PyObject* v = PyObject_GetAttr(spec.ptr(), interned(name));
    if (v == nullptr) {
        PyErr_Clear();
        throw std::invalid_argument(std::string("the spec has no argument ") + name);
    }
    return py::reinterpret_steal<py::object>(v);
}

// The tensor argument `name` of the spec (see tensor_value).
inline TensorArg tensor_arg(const py::handle& spec, const char* name, const Shapes& shapes, const DTypes& dtypes,
                            bool optional = true) {
    return tensor_value(field(spec, name), name, shapes, dtypes, optional);
}

// The option `name` of the spec as T (None: nullopt); a string option as its code.
template <typename T>
std::optional<T> optional_option(const py::handle& spec, const char* name) {
    const py::object v = field(spec, name);
    if (v.is_none()) return std::nullopt;
    if (PyUnicode_Check(v.ptr())) {
        PyObject* table = codes().options == nullptr ? nullptr : PyDict_GetItem(codes().options, interned(name));
        PyObject* code = table == nullptr ? nullptr : PyDict_GetItem(table, v.ptr());  // borrowed
        if (code == nullptr) throw std::invalid_argument(std::string("no code for the option ") + name);
        return py::handle(code).cast<T>();
    }
    return v.cast<T>();
}

// The option `name` of the spec as T (the spec has the defaults: None is an error here).
template <typename T>
T option(const py::handle& spec, const char* name) {
    const std::optional<T> v = optional_option<T>(spec, name);
    if (!v) throw std::invalid_argument(std::string(name) + " must be given");
    return *v;
}

// The address of an output tensor the launcher allocated, checked like a tensor argument.
template <typename T>
T* output(const py::handle& value, const char* name, const Shapes& shapes, const DTypes& dtypes) {
    TensorArg t = tensor_value(value, name, shapes, dtypes, /*optional=*/false);
    return static_cast<T*>(const_cast<void*>(t.ptr));
}

// Keeps the code tables of moo_kernels._codes (called once by moo_kernels._backend when the extension loads).
inline void register_codes(const py::dict& dtypes, const py::dict& options) {
    Codes& c = codes();
    Py_XDECREF(c.dtypes);
    Py_XDECREF(c.options);
    c.dtypes = dtypes.inc_ref().ptr();
    c.options = options.inc_ref().ptr();
}

}  // namespace moo
