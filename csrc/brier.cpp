// Brier calibration reward R = c - (q - c)^2, elementwise, with a range check of q in [0, 1].
#include <pybind11/pybind11.h>

#include <cstdint>

namespace py = pybind11;

namespace {

template <typename C, typename Q>
int64_t brier(const C* c, const Q* q, Q* out, int64_t n) {
    int64_t first_bad = -1;
    for (int64_t i = 0; i < n; ++i) {
        const Q qi = q[i];
        if (first_bad < 0 && !(qi >= Q(0) && qi <= Q(1))) first_bad = i;
        const Q ci = static_cast<Q>(c[i]);
        const Q d = qi - ci;
        out[i] = ci - d * d;
    }
    return first_bad;
}

template <typename Q>
int64_t dispatch_correct(uintptr_t c, int c_code, const Q* q, Q* out, int64_t n) {
    switch (c_code) {
        case 0: return brier(reinterpret_cast<const uint8_t*>(c), q, out, n);
        case 1: return brier(reinterpret_cast<const float*>(c), q, out, n);
        default: return brier(reinterpret_cast<const double*>(c), q, out, n);
    }
}

// Returns the index of the first confidence outside [0, 1] (or NaN), -1 when all are valid.
int64_t brier_forward(uintptr_t c, int c_code, uintptr_t q, bool f64, uintptr_t out, int64_t n) {
    py::gil_scoped_release release;
    if (f64)
        return dispatch_correct(c, c_code, reinterpret_cast<const double*>(q), reinterpret_cast<double*>(out), n);
    return dispatch_correct(c, c_code, reinterpret_cast<const float*>(q), reinterpret_cast<float*>(out), n);
}

}  // namespace

void register_brier(py::module_& m) {
    m.def("brier_forward", &brier_forward, "Brier reward c - (q - c)^2; returns the first bad index or -1",
          py::arg("correct"), py::arg("correct_code"), py::arg("confidence"), py::arg("f64"), py::arg("out"),
          py::arg("n"));
}
