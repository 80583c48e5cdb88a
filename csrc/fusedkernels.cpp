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

  // optim: one fused pass over every tensor of the lists. Unused lists are empty. steps hold each
  // param's step count, already incremented. lr_tensor, grad_scale, found_inf, clip_coef: one-element
  // float32 device tensors (capturable lr, GradScaler, deferred clipping). Grads are written back
  // unscaled when grad_scale is given.
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs,"
      " Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] masters, Tensor[] steps, float lr, Tensor? lr_tensor,"
      " float beta1, float beta2, float eps, float weight_decay, bool decoupled, bool amsgrad, bool maximize,"
      " Tensor? grad_scale, Tensor? found_inf, Tensor? clip_coef) -> ()");
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] momentum_buffers, Tensor(d!)[] masters,"
      " float lr, Tensor? lr_tensor, float momentum, float dampening, float weight_decay, bool nesterov,"
      " bool maximize, bool first_step, Tensor? grad_scale, Tensor? found_inf, Tensor? clip_coef) -> ()");
  // LAMB (apex FusedLAMB's formulas); grad_norm: total 2-norm of the raw grads, which are then clipped
  // to max_grad_norm inside the step, or None (no clipping).
  m.def(
      "lamb_step_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs,"
      " Tensor(e!)[] masters, Tensor[] steps, float lr, Tensor? lr_tensor, float beta1, float beta2, float eps,"
      " float weight_decay, bool decoupled, bool bias_correction, bool grad_averaging, bool always_adapt,"
      " Tensor? grad_norm, float max_grad_norm, bool maximize, Tensor? grad_scale, Tensor? found_inf,"
      " Tensor? clip_coef) -> ()");
  // Total 2- or inf-norm of the grads (deterministic), and min(max_norm / (total + 1e-6), 1).
  m.def("grad_norm(Tensor[] grads, float norm_type, float max_norm) -> (Tensor total, Tensor clip_coef)");
  m.def("scale_grads_(Tensor(a!)[] grads, Tensor coef) -> ()");
}

// The module is imported (as fusedkernels._C) only to run the registrations above.
static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module_def); }
