"""Loads the native module once (the prebuilt `fusedkernels._C`, or a JIT build when FUSEDKERNELS_JIT=1), and
the one place in Python that chooses between a native op and PyTorch's own implementation.

Loading registers the `torch.ops.fusedkernels` ops. It does not initialise CUDA. When it fails, `error` says
why and every op runs PyTorch's implementation. Ops on single tensors (norm) choose per input in C++ (their
public op is a composite that routes); ops on tensor lists (optim) choose here, per list, with `route`.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Callable, Optional

import torch

from . import _build

loaded = False
error: Optional[str] = None
source = ""  # "prebuilt" or "jit"
module: Optional[ModuleType] = None
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _jit_load() -> ModuleType:
    from torch.utils import cpp_extension

    if not os.path.isdir(_build.CSRC):
        raise RuntimeError(f"FUSEDKERNELS_JIT=1 needs the source tree; {_build.CSRC} is missing")
    cuda_home = _build.find_cuda_home()
    if cuda_home is None:
        raise RuntimeError("FUSEDKERNELS_JIT=1 needs a CUDA toolkit (nvcc); none found (set CUDA_HOME)")
    os.environ.setdefault("CUDA_HOME", cuda_home)
    cpp_extension.CUDA_HOME = os.environ["CUDA_HOME"]
    arch_list, families = _build.archs(), _build.selected_families()
    build_dir = os.environ.get(
        "FUSEDKERNELS_JIT_DIR", os.path.join(os.path.expanduser("~"), ".cache", "fusedkernels", "jit")
    )
    os.makedirs(build_dir, exist_ok=True)
    # torch rebuilds when a source or a flag changes, and reuses the build otherwise. One set of flags for
    # every source: sm90/ sources compile for every target, their device code empty off sm_90a.
    built = cpp_extension.load(
        name="fusedkernels_C",
        sources=_build.sources(families),
        extra_include_paths=_build.include_dirs(),
        extra_cflags=_build.cxx_flags(),
        extra_cuda_cflags=_build.nvcc_flags(arch_list),
        build_directory=build_dir,
        is_python_module=True,
        verbose=os.environ.get("FUSEDKERNELS_JIT_VERBOSE") == "1",
    )
    _build.write_build_info(arch_list, families, build_dir)
    return built


def _load() -> None:
    global loaded, error, source, module
    try:
        if os.environ.get("FUSEDKERNELS_JIT") == "1":
            module, source = _jit_load(), "jit"
        else:
            module, source = importlib.import_module("fusedkernels._C"), "prebuilt"
            here = os.path.dirname(os.path.abspath(__file__))
            found = os.path.dirname(os.path.abspath(module.__file__))
            # an editable install of another checkout can serve its _C to this package: another build's ops
            if found != here:
                module = None
                raise ImportError(f"fusedkernels._C was found at {found}, not beside this package ({here}): "
                                  "a build of another copy; build this one (README)")
        loaded = True
    except Exception as e:  # report, never fail the import: PyTorch's implementations still work
        error = f"{type(e).__name__}: {e}"


def build_info() -> dict:
    """archs and families of the loaded native module (from beside it), or why there is none."""
    if loaded:
        return _build.read_build_info(os.path.dirname(os.path.abspath(module.__file__)))
    return _build.read_build_info()


def op_info() -> list[tuple[str, str, str, str]]:
    """(family, op, dtypes, sizes) of every op with a native kernel in this build."""
    return module.op_info() if loaded else []


def has_op(name: str) -> bool:
    """Whether this build registered `fusedkernels::<name>` (its family was built)."""
    return loaded and hasattr(torch.ops.fusedkernels, name)


_warned: set[str] = set()


def autocast_casts(device: str, *tensors):
    """The casts of a native op's autocast kernel, for the references that run without it: floating tensors on the
    autocast device to its autocast dtype, float64 and other devices' tensors left (None passes through)."""
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    eligible = lambda t: t is not None and t.is_floating_point() and t.dtype != torch.float64  # noqa: E731
    return tuple(t.to(dtype) if eligible(t) and t.device.type == device else t for t in tensors)


def warn_fallback(op: str, why: str, instead: str) -> None:
    """One warning per (op, reason): a CUDA tensor is about to take PyTorch's implementation."""
    key = f"{op}:{why}"
    if key not in _warned:
        _warned.add(key)
        # UserWarning, as the C++ ops' TORCH_WARN: one category for every fallback
        warnings.warn(f"fusedkernels.{op}: {why}; running {instead} instead", UserWarning, stacklevel=3)


def route(op: str, t: torch.Tensor, fallback: Callable, instead: str) -> Callable:
    """`torch.ops.fusedkernels.<op>` when it has a CUDA kernel for t's dtype, else `fallback` (PyTorch's
    implementation, `instead` names it): always for CPU tensors, with one warning for CUDA ones."""
    if t.device.type != "cuda":
        # Under torch.compile the custom op (whose CPU kernel is `fallback`) keeps the graph functional.
        return getattr(torch.ops.fusedkernels, op).default if has_op(op) and torch.compiler.is_compiling() else fallback
    if not loaded:
        warn_fallback(op, f"the native module is not loaded ({error})", instead)
    elif not has_op(op):
        warn_fallback(op, "this build has no kernels for its family (see FUSEDKERNELS_FAMILIES)", instead)
    elif t.dtype not in KERNEL_DTYPES:  # float64, complex: PyTorch's op (which refuses what it cannot take)
        warn_fallback(op, f"{t.dtype} has no fused kernel", instead)
    else:
        return getattr(torch.ops.fusedkernels, op).default
    return fallback


def public_op(op: str, fallback: Callable, instead: str) -> Callable:
    """A callable for the public op `fusedkernels::<op>` (which routes each input itself in C++), taking its
    arguments positionally: in eager mode the module's direct entry point (common/python/fast_call.h),
    under torch.compile / torch.export or when that declines an argument, `torch.ops.fusedkernels.<op>`.
    Without the op in this build, `fallback`, with one warning for CUDA tensors."""
    if has_op(op):
        via_torch_ops = getattr(torch.ops.fusedkernels, op).default
        direct = getattr(module, op, None)
        if direct is None:
            return via_torch_ops
        is_compiling = torch.compiler.is_compiling

        def call(*args):
            if not is_compiling():
                out = direct(*args)
                if out is not NotImplemented:
                    return out
            return via_torch_ops(*args)

        call.__name__ = op
        return call
    why = f"the native module is not loaded ({error})" if not loaded else "this build has no kernels for its family"

    def without_native(x, *args, **kwargs):
        if isinstance(x, torch.Tensor) and x.is_cuda:
            warn_fallback(op, why, instead)
        return fallback(x, *args, **kwargs)

    return without_native


_load()
