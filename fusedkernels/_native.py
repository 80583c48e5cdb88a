"""Loads the native module once: the prebuilt `fusedkernels._C`, or a JIT build when FUSEDKERNELS_JIT=1.

Loading registers the `torch.ops.fusedkernels` schemas and their CUDA kernels. It does not initialise
CUDA. When it fails, `error` says why and the ops run the PyTorch reference.
"""

from __future__ import annotations

import importlib
import os
import warnings

import torch

from . import _build

loaded = False
error: str | None = None
source = ""  # "prebuilt" or "jit"


def _jit_load() -> None:
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
    # torch rebuilds when a source or a flag changes, and reuses the build otherwise.
    cpp_extension.load(
        name="fusedkernels_C",
        sources=_build.sources(families),
        extra_include_paths=_build.include_dirs(),
        extra_cflags=_build.cxx_flags(),
        extra_cuda_cflags=_build.nvcc_flags(arch_list),
        build_directory=build_dir,
        is_python_module=False,
        verbose=os.environ.get("FUSEDKERNELS_JIT_VERBOSE") == "1",
    )
    _build.write_build_info(arch_list, families)


def _read_cuda_kernels() -> None:
    global cuda_kernels
    names = torch._C._dispatch_get_registrations_for_dispatch_key("CUDA")
    cuda_kernels = frozenset(n.split("::", 1)[1].split(".")[0] for n in names if n.startswith("fusedkernels::"))


def _load() -> None:
    global loaded, error, source
    try:
        if os.environ.get("FUSEDKERNELS_JIT") == "1":
            _jit_load()
            source = "jit"
        else:
            importlib.import_module("fusedkernels._C")
            source = "prebuilt"
        loaded = True
        _read_cuda_kernels()
    except Exception as e:  # report, never fail the import: the reference path still works
        error = f"{type(e).__name__}: {e}"


cuda_kernels: frozenset[str] = frozenset()  # ops of this build with a CUDA kernel, read once at load


def has_cuda_kernel(op: str) -> bool:
    """Whether `fusedkernels::<op>` has a native CUDA kernel in this build (a plain set lookup, so
    torch.compile traces through it)."""
    return op in cuda_kernels


_warned: set[str] = set()


def warn_fallback(op: str, why: str) -> None:
    """One warning per (op, reason): a CUDA tensor is about to take the PyTorch reference path."""
    key = f"{op}:{why}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"fusedkernels.{op}: {why}; running the PyTorch reference instead", RuntimeWarning, stacklevel=3)


_load()
