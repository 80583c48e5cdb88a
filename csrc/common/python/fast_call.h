// A direct Python entry point for a public op: parses plain Python arguments into C++ values, calls the op
// through the dispatcher (so autograd, autocast and the device kernels all run as for torch.ops), and
// wraps the result. It exists for the eager host time: `torch.ops.fusedkernels.<op>(...)` spends about
// 4 us a call converting arguments through the schema, more than the op itself costs on the host.
//
// Anything the fast path does not take as is (a Tensor subclass such as a fake or distributed tensor, an
// active __torch_function__ mode, an argument of another type) returns NotImplemented, and the Python
// caller goes through torch.ops, which handles all of it. Only csrc/fusedkernels.cpp includes this.
#pragma once

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fusedkernels::python {

// What each C++ parameter type is parsed into (IntArrayRef views a vector that the call keeps alive).
template <typename T>
struct Parsed {
  using type = std::decay_t<T>;
};
template <>
struct Parsed<at::IntArrayRef> {
  using type = std::vector<int64_t>;
};

inline bool parse(PyObject* o, at::Tensor& out) {
  if (!THPVariable_CheckExact(o)) return false;
  out = THPVariable_Unpack(o);
  return true;
}

inline bool parse(PyObject* o, std::optional<at::Tensor>& out) {
  if (o == Py_None) {
    out.reset();
    return true;
  }
  at::Tensor t;
  if (!parse(o, t)) return false;
  out = std::move(t);
  return true;
}

inline bool parse_int(PyObject* o, int64_t& out) {
  if (!PyLong_CheckExact(o)) return false;
  out = PyLong_AsLongLong(o);
  if (out == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return false;
  }
  return true;
}

inline bool parse(PyObject* o, int64_t& out) { return parse_int(o, out); }

// A tuple (torch.Size included) or list of ints.
inline bool parse(PyObject* o, std::vector<int64_t>& out) {
  if (!PyTuple_Check(o) && !PyList_Check(o)) return false;
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
  PyObject** items = PySequence_Fast_ITEMS(o);
  out.resize(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!parse_int(items[i], out[i])) return false;
  }
  return true;
}

inline bool parse(PyObject* o, double& out) {
  if (PyFloat_CheckExact(o)) {
    out = PyFloat_AS_DOUBLE(o);
    return true;
  }
  int64_t i = 0;
  if (!parse_int(o, i)) return false;
  out = static_cast<double>(i);
  return true;
}

inline bool parse(PyObject* o, std::optional<double>& out) {
  if (o == Py_None) {
    out.reset();
    return true;
  }
  double v = 0;
  if (!parse(o, v)) return false;
  out = v;
  return true;
}

inline bool parse(PyObject* o, bool& out) {
  if (!PyBool_Check(o)) return false;
  out = o == Py_True;
  return true;
}

inline PyObject* wrap(const at::Tensor& t) { return THPVariable_Wrap(t); }

template <typename... Ts>
PyObject* wrap(const std::tuple<Ts...>& values) {
  PyObject* out = PyTuple_New(sizeof...(Ts));
  if (out == nullptr) return nullptr;
  Py_ssize_t i = 0;
  std::apply([&](const auto&... v) { (PyTuple_SET_ITEM(out, i++, wrap(v)), ...); }, values);
  for (i = 0; i < static_cast<Py_ssize_t>(sizeof...(Ts)); ++i) {
    if (PyTuple_GET_ITEM(out, i) == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
  }
  return out;
}

template <typename Signature>
struct FastCall;

// call<kName, Ret(Args...)>: a METH_FASTCALL function taking the op's arguments positionally, all of them.
template <typename Ret, typename... Args>
struct FastCall<Ret(Args...)> {
  template <const char* kName>
  static PyObject* call(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
    HANDLE_TH_ERRORS
    std::tuple<typename Parsed<std::decay_t<Args>>::type...> values;
    const bool parsed = nargs == sizeof...(Args) && !at::impl::torch_function_mode_enabled() &&
                        std::apply([&](auto&... v) {
                          Py_ssize_t i = 0;
                          return (parse(args[i++], v) && ...);
                        }, values);
    if (!parsed) Py_RETURN_NOTIMPLEMENTED;
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(kName, "").typed<Ret(Args...)>();
    Ret result = [&] {
      const pybind11::gil_scoped_release no_gil;
      return std::apply([&](auto&... v) { return op.call(v...); }, values);
    }();
    return wrap(result);
    END_HANDLE_TH_ERRORS
  }
};

}  // namespace fusedkernels::python
