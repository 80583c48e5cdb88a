// The schemas of every fusedkernels op. Each family's *_api.cpp registers its CUDA implementation;
// the CPU implementation of every op is the Python reference (fusedkernels/ops).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(fusedkernels, m) {
  // norm: x is [..., hidden], normalized over the last dimension; weight / bias are [hidden].
  // mean / rstd are float32 [rows] (rows = x.numel() / hidden), saved for the backward.
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor y, Tensor mean, Tensor rstd)");
  m.def(
      "layer_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor? bias, Tensor mean, Tensor rstd)"
      " -> (Tensor dx, Tensor dweight, Tensor dbias)");
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, float eps) -> (Tensor y, Tensor rstd)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor rstd) -> (Tensor dx, Tensor dweight)");
}

// The module is imported (as fusedkernels._C) only to run the registrations above.
static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module_def); }
