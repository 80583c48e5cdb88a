// A direct Python entry point for a public op: parses plain Python arguments into C++ values, calls the op
// through the dispatcher (so autograd, autocast and the device kernels all run as for torch.ops), and
// wraps the result. It exists for the eager host time: `torch.ops.fusedkernels.<op>(...)` spends about
// 4 us a call converting arguments through the schema, more than the op itself costs on the host.
//
// What the fast path does not take as is (a Tensor subclass such as a fake or distributed tensor, an
// active __torch_function__ mode) returns NotImplemented, and the Python caller goes through torch.ops,
// which handles all of it; an argument of the wrong type raises TypeError, as torch's own bindings do.
// Only csrc/fusedkernels.cpp includes this.
#pragma once

#include <ATen/ATen.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Dtype.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace fusedkernels::python {

// What each C++ parameter type is parsed into (SymIntArrayRef views a vector that the call keeps alive).
template <typename T>
struct Parsed {
  using type = std::decay_t<T>;
};
template <>
struct Parsed<c10::SymIntArrayRef> {
  using type = std::vector<c10::SymInt>;
};
template <>
struct Parsed<c10::SymInt> {
  using type = int64_t;  // a plain int (a symbolic one, under torch.compile, goes through torch.ops)
};
template <>
struct Parsed<c10::IntArrayRef> {
  using type = std::vector<int64_t>;  // a schema's int[N]
};
template <>
struct Parsed<c10::string_view> {
  using type = std::string;  // the op takes a view of it
};

// What parsing an argument found: a value, something for the torch.ops path (a Tensor subclass), or an
// object of the wrong type (a TypeError, as torch's own bindings raise).
enum class Parse { kOk, kDecline, kWrongType };

inline Parse parse(PyObject* o, at::Tensor& out) {
  if (THPVariable_CheckExact(o)) {
    out = THPVariable_Unpack(o);
    return Parse::kOk;
  }
  // Tensor subclasses, and objects that take part in __torch_function__ (fx's Proxy): torch.ops's job
  return THPVariable_Check(o) || PyObject_HasAttrString(o, "__torch_function__") ? Parse::kDecline
                                                                                : Parse::kWrongType;
}

inline Parse parse(PyObject* o, std::optional<at::Tensor>& out) {
  if (o == Py_None) {
    out.reset();
    return Parse::kOk;
  }
  at::Tensor t;
  const Parse result = parse(o, t);
  if (result == Parse::kOk) out = std::move(t);
  return result;
}

// Anything with __index__ (Python and numpy ints, one-element integer tensors), as torch's bindings take;
// not bools, not Tensor subclasses (a symbolic size under torch.compile is torch.ops's job).
inline Parse parse(PyObject* o, int64_t& out) {
  if (PyBool_Check(o) || (THPVariable_Check(o) && !THPVariable_CheckExact(o))) return Parse::kDecline;
  if (PyLong_CheckExact(o)) {
    out = PyLong_AsLongLong(o);
  } else {
    PyObject* index = PyNumber_Index(o);
    if (index == nullptr) {
      PyErr_Clear();
      return Parse::kWrongType;
    }
    out = PyLong_AsLongLong(index);
    Py_DECREF(index);
  }
  if (out == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return Parse::kWrongType;
  }
  return Parse::kOk;
}

// The ints of a tuple or list, as Int (int64_t or c10::SymInt).
template <typename Int>
Parse parse_ints(PyObject* o, std::vector<Int>& out) {
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
  PyObject** items = PySequence_Fast_ITEMS(o);
  out.clear();
  out.reserve(n);
  for (Py_ssize_t i = 0; i < n; ++i) {
    int64_t v = 0;
    const Parse result = parse(items[i], v);
    if (result != Parse::kOk) return result;
    out.emplace_back(v);
  }
  return Parse::kOk;
}

// A tuple (torch.Size included) or list of ints.
inline Parse parse(PyObject* o, std::vector<c10::SymInt>& out) {
  if (!PyTuple_Check(o) && !PyList_Check(o)) return Parse::kWrongType;
  return parse_ints(o, out);
}

// A schema's int[N]: a tuple or list of ints, or one int (the op expands it to N values, as torch.ops does).
inline Parse parse(PyObject* o, std::vector<int64_t>& out) {
  if (PyTuple_Check(o) || PyList_Check(o)) return parse_ints(o, out);
  int64_t v = 0;
  const Parse result = parse(o, v);
  if (result == Parse::kOk) out.assign(1, v);
  return result;
}

// Anything with __float__ (Python and numpy floats and ints, bools, one-element tensors), as torch's
// bindings take.
inline Parse parse(PyObject* o, double& out) {
  if (PyFloat_CheckExact(o)) {
    out = PyFloat_AS_DOUBLE(o);
    return Parse::kOk;
  }
  if (THPVariable_Check(o) && !THPVariable_CheckExact(o)) return Parse::kDecline;
  out = PyFloat_AsDouble(o);
  if (out == -1.0 && PyErr_Occurred()) {
    PyErr_Clear();
    return Parse::kWrongType;
  }
  return Parse::kOk;
}

inline Parse parse(PyObject* o, std::optional<double>& out) {
  if (o == Py_None) {
    out.reset();
    return Parse::kOk;
  }
  double v = 0;
  const Parse result = parse(o, v);
  if (result == Parse::kOk) out = v;
  return result;
}

// A torch.dtype, or None.
inline Parse parse(PyObject* o, std::optional<at::ScalarType>& out) {
  if (o == Py_None) {
    out.reset();
    return Parse::kOk;
  }
  if (!THPDtype_Check(o)) return Parse::kWrongType;
  out = reinterpret_cast<THPDtype*>(o)->scalar_type;
  return Parse::kOk;
}

inline Parse parse(PyObject* o, bool& out) {
  if (!PyBool_Check(o)) return Parse::kWrongType;
  out = o == Py_True;
  return Parse::kOk;
}

// A Python str (a schema's `str`), as torch's bindings take; not bytes.
inline Parse parse(PyObject* o, std::string& out) {
  if (!PyUnicode_Check(o)) return Parse::kWrongType;
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(o, &size);
  if (data == nullptr) {
    PyErr_Clear();
    return Parse::kWrongType;
  }
  out.assign(data, static_cast<size_t>(size));
  return Parse::kOk;
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

// call<kName, Ret(Args...)>: a METH_FASTCALL function taking the op's arguments positionally, all of them (an op
// returning nothing, void, returns None).
template <typename Ret, typename... Args>
struct FastCall<Ret(Args...)> {
  template <const char* kName>
  static PyObject* call(PyObject* /*module*/, PyObject* const* args, Py_ssize_t nargs) {
    HANDLE_TH_ERRORS
    if (nargs != sizeof...(Args) || at::impl::torch_function_mode_enabled()) Py_RETURN_NOTIMPLEMENTED;
    static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow(kName, "").typed<Ret(Args...)>();
    std::tuple<typename Parsed<std::decay_t<Args>>::type...> values;
    Py_ssize_t bad = -1;  // the first argument that failed
    Parse parsed = Parse::kOk;
    std::apply([&](auto&... v) {
      Py_ssize_t i = 0;
      ((parsed == Parse::kOk ? (parsed = parse(args[i], v), bad = i) : 0, ++i), ...);
    }, values);
    if (parsed == Parse::kDecline) Py_RETURN_NOTIMPLEMENTED;
    if (parsed == Parse::kWrongType) {
      const auto& argument = op.schema().arguments()[bad];
      PyErr_Format(PyExc_TypeError, "%s(): argument '%s' (position %zd) must be %s, not %s", kName,
                   argument.name().c_str(), bad + 1, argument.type()->str().c_str(), Py_TYPE(args[bad])->tp_name);
      return nullptr;
    }
    const auto run = [&] {
      const pybind11::gil_scoped_release no_gil;
      return std::apply([&](auto&... v) { return op.call(v...); }, values);
    };
    if constexpr (std::is_void_v<Ret>) {  // an in-place op: returns None
      run();
      Py_RETURN_NONE;
    } else {
      return wrap(run());
    }
    END_HANDLE_TH_ERRORS
  }
};

}  // namespace fusedkernels::python
