// The fusedkernels op library and the Python module that loads it. Each family declares its own ops
// (TORCH_LIBRARY_FRAGMENT in csrc/<family>/*_api.cpp or *_ops.cpp); importing fusedkernels._C runs those
// registrations. The module holds op_info(), what each family registered for `python -m fusedkernels.info`,
// and a direct entry point per public op (common/python/fast_call.h), which fusedkernels.ops calls in
// eager mode.
#include <Python.h>
#include <torch/library.h>

#include "common/python/fast_call.h"
#include "common/torch/ops.h"

TORCH_LIBRARY(fusedkernels, m) {}

namespace {

// [(family, op, dtypes, sizes), ...]
PyObject* op_info(PyObject*, PyObject*) {
  const auto& infos = fusedkernels::op_infos();
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(infos.size()));
  if (list == nullptr) return nullptr;
  for (size_t i = 0; i < infos.size(); ++i) {
    const auto& info = infos[i];
    PyObject* item = Py_BuildValue("(ssss)", info.family.c_str(), info.op.c_str(), info.dtypes.c_str(),
                                   info.sizes.c_str());
    if (item == nullptr) {
      Py_DECREF(list);
      return nullptr;
    }
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), item);
  }
  return list;
}

using at::Tensor;
using OptTensor = std::optional<at::Tensor>;

// The public ops with a direct entry point: name and C++ signature, as in their schema.
constexpr char kLayerNorm[] = "fusedkernels::layer_norm";
constexpr char kRmsNorm[] = "fusedkernels::rms_norm";
using LayerNorm = Tensor(const Tensor&, c10::SymIntArrayRef, const OptTensor&, const OptTensor&, double);
using RmsNorm = Tensor(const Tensor&, c10::SymIntArrayRef, const OptTensor&, std::optional<double>);
constexpr char kAddLayerNorm[] = "fusedkernels::add_layer_norm";
constexpr char kAddRmsNorm[] = "fusedkernels::add_rms_norm";
constexpr char kBiasDropoutAddLayerNorm[] = "fusedkernels::bias_dropout_add_layer_norm";
constexpr char kBiasDropoutAddRmsNorm[] = "fusedkernels::bias_dropout_add_rms_norm";
using OptDtype = std::optional<at::ScalarType>;
using AddLayerNorm = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, double,
                                                OptDtype);
using AddRmsNorm = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&, std::optional<double>,
                                              OptDtype);
using BiasDropoutAddLayerNorm = std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, const Tensor&,
                                                           const OptTensor&, const OptTensor&, double, double, bool,
                                                           OptDtype);
using BiasDropoutAddRmsNorm = std::tuple<Tensor, Tensor>(const Tensor&, const OptTensor&, const Tensor&,
                                                         const OptTensor&, double, std::optional<double>, bool,
                                                         OptDtype);
constexpr char kSdpa[] = "fusedkernels::scaled_dot_product_attention";
using Sdpa = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, double, bool, std::optional<double>,
                    bool);
constexpr char kAttention[] = "fusedkernels::attention";
constexpr char kAttentionVarlen[] = "fusedkernels::attention_varlen";
using Attention = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, double, bool,
                                             int64_t, int64_t, std::optional<double>, bool, bool);
using AttentionVarlen = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                                   const Tensor&, c10::SymInt, c10::SymInt, double, bool, int64_t,
                                                   int64_t, std::optional<double>, bool, bool);
constexpr char kLinearAct[] = "fusedkernels::linear_act";
constexpr char kLinearGated[] = "fusedkernels::linear_gated";
using LinearAct = Tensor(const Tensor&, const Tensor&, const OptTensor&, c10::string_view, const OptTensor&);
constexpr char kMlp[] = "fusedkernels::mlp";
constexpr char kGatedMlp[] = "fusedkernels::gated_mlp";
using Mlp = Tensor(const Tensor&, const Tensor&, const OptTensor&, const Tensor&, const OptTensor&, c10::string_view,
                   const OptTensor&);
constexpr char kConv2dBiasRelu[] = "fusedkernels::conv2d_bias_relu";
using Conv2dBiasRelu = Tensor(const Tensor&, const Tensor&, const OptTensor&, at::IntArrayRef, at::IntArrayRef,
                              at::IntArrayRef, const OptTensor&);
constexpr char kBatchNormRelu[] = "fusedkernels::batch_norm_relu";
using BatchNormRelu = Tensor(const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&, const OptTensor&, bool,
                             double, double, const OptTensor&);

constexpr char kApplyRotary[] = "fusedkernels::apply_rotary";
constexpr char kApplyRotaryInplace[] = "fusedkernels::apply_rotary_";
using ApplyRotary = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                               const OptTensor&, bool, c10::string_view);
using ApplyRotaryInplace = void(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&, bool,
                                c10::string_view);
constexpr char kRotaryCosSin[] = "fusedkernels::rotary_cos_sin";
using RotaryCosSin = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, double, OptDtype);
constexpr char kLinearCrossEntropy[] = "fusedkernels::linear_cross_entropy";
using LinearCrossEntropy = Tensor(const Tensor&, const Tensor&, const Tensor&, const OptTensor&, int64_t,
                                  c10::string_view, double, double, std::optional<double>, int64_t);

template <typename Signature, const char* kName>
PyCFunction fast() {
  return reinterpret_cast<PyCFunction>(
      reinterpret_cast<void (*)()>(&fusedkernels::python::FastCall<Signature>::template call<kName>));
}

PyMethodDef methods[] = {
    {"op_info", op_info, METH_NOARGS, "[(family, op, dtypes, sizes)] of the ops this build registered"},
    {"layer_norm", fast<LayerNorm, kLayerNorm>(), METH_FASTCALL, "fusedkernels::layer_norm, or NotImplemented"},
    {"rms_norm", fast<RmsNorm, kRmsNorm>(), METH_FASTCALL, "fusedkernels::rms_norm, or NotImplemented"},
    {"add_layer_norm", fast<AddLayerNorm, kAddLayerNorm>(), METH_FASTCALL,
     "fusedkernels::add_layer_norm, or NotImplemented"},
    {"add_rms_norm", fast<AddRmsNorm, kAddRmsNorm>(), METH_FASTCALL, "fusedkernels::add_rms_norm, or NotImplemented"},
    {"bias_dropout_add_layer_norm", fast<BiasDropoutAddLayerNorm, kBiasDropoutAddLayerNorm>(), METH_FASTCALL,
     "fusedkernels::bias_dropout_add_layer_norm, or NotImplemented"},
    {"bias_dropout_add_rms_norm", fast<BiasDropoutAddRmsNorm, kBiasDropoutAddRmsNorm>(), METH_FASTCALL,
     "fusedkernels::bias_dropout_add_rms_norm, or NotImplemented"},
    {"scaled_dot_product_attention", fast<Sdpa, kSdpa>(), METH_FASTCALL,
     "fusedkernels::scaled_dot_product_attention, or NotImplemented"},
    {"attention", fast<Attention, kAttention>(), METH_FASTCALL, "fusedkernels::attention, or NotImplemented"},
    {"attention_varlen", fast<AttentionVarlen, kAttentionVarlen>(), METH_FASTCALL,
     "fusedkernels::attention_varlen, or NotImplemented"},
    {"linear_act", fast<LinearAct, kLinearAct>(), METH_FASTCALL, "fusedkernels::linear_act, or NotImplemented"},
    {"linear_gated", fast<LinearAct, kLinearGated>(), METH_FASTCALL,
     "fusedkernels::linear_gated, or NotImplemented"},
    {"mlp", fast<Mlp, kMlp>(), METH_FASTCALL, "fusedkernels::mlp, or NotImplemented"},
    {"gated_mlp", fast<Mlp, kGatedMlp>(), METH_FASTCALL, "fusedkernels::gated_mlp, or NotImplemented"},
    {"conv2d_bias_relu", fast<Conv2dBiasRelu, kConv2dBiasRelu>(), METH_FASTCALL,
     "fusedkernels::conv2d_bias_relu, or NotImplemented"},
    {"batch_norm_relu", fast<BatchNormRelu, kBatchNormRelu>(), METH_FASTCALL,
     "fusedkernels::batch_norm_relu, or NotImplemented"},
    {"apply_rotary", fast<ApplyRotary, kApplyRotary>(), METH_FASTCALL, "fusedkernels::apply_rotary, or NotImplemented"},
    {"apply_rotary_", fast<ApplyRotaryInplace, kApplyRotaryInplace>(), METH_FASTCALL,
     "fusedkernels::apply_rotary_, or NotImplemented"},
    {"rotary_cos_sin", fast<RotaryCosSin, kRotaryCosSin>(), METH_FASTCALL,
     "fusedkernels::rotary_cos_sin, or NotImplemented"},
    {"linear_cross_entropy", fast<LinearCrossEntropy, kLinearCrossEntropy>(), METH_FASTCALL,
     "fusedkernels::linear_cross_entropy, or NotImplemented"},
    {nullptr, nullptr, 0, nullptr},
};

// torch's build names the module (TORCH_EXTENSION_NAME): _C in a pip install, fusedkernels_C in a JIT build.
#define FUSEDKERNELS_STR_(x) #x
#define FUSEDKERNELS_STR(x) FUSEDKERNELS_STR_(x)
#define FUSEDKERNELS_CONCAT_(a, b) a##b
#define FUSEDKERNELS_CONCAT(a, b) FUSEDKERNELS_CONCAT_(a, b)

PyModuleDef module_def = {PyModuleDef_HEAD_INIT, FUSEDKERNELS_STR(TORCH_EXTENSION_NAME), nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC FUSEDKERNELS_CONCAT(PyInit_, TORCH_EXTENSION_NAME)() { return PyModule_Create(&module_def); }
