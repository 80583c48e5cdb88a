"""Build configuration shared by setup.py and the JIT loader: sources, architectures and compiler flags.

Environment knobs (all optional):
  FUSEDKERNELS_CUDA_ARCHS  semicolon list of targets, e.g. "90a;80" (default: the visible GPU, else 90a).
                           Append "+PTX" to also embed PTX for that target.
  FUSEDKERNELS_FAMILIES    comma list of kernel families to build, e.g. "norm" (default: all).
  FUSEDKERNELS_SKIP_CUDA   "1": install without the native module (every op runs the PyTorch reference).
  MAX_JOBS                 parallel compile jobs (read by torch's ninja build).
"""

from __future__ import annotations

import glob
import json
import os
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
FAMILIES = ("norm", "optim")
BUILD_INFO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")


def find_cuda_home() -> str | None:
    """The CUDA toolkit root. Torch guesses it from the `nvcc` on PATH, which is wrong when that nvcc is a
    wrapper script outside the toolkit (the link then fails with `cannot find -lcudart`)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for root in candidates:
        if os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
            os.path.join(root, "include", "cuda_runtime.h")
        ):
            return root
    return None


def selected_families() -> list[str]:
    raw = os.environ.get("FUSEDKERNELS_FAMILIES", "")
    chosen = [f.strip() for f in raw.split(",") if f.strip()] or list(FAMILIES)
    unknown = sorted(set(chosen) - set(FAMILIES))
    if unknown:
        raise ValueError(f"FUSEDKERNELS_FAMILIES: unknown families {unknown}; known: {list(FAMILIES)}")
    return chosen


def sources(families: list[str]) -> list[str]:
    """Absolute paths: the schema file, then each family's bindings and kernels."""
    files = [os.path.join(CSRC, "fusedkernels.cpp")]
    for family in families:
        folder = os.path.join(CSRC, family)
        files += sorted(glob.glob(os.path.join(folder, "*_api.cpp"))) + sorted(glob.glob(os.path.join(folder, "*.cu")))
    return files


def default_archs() -> list[str]:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return ["90a" if (major, minor) == (9, 0) else f"{major}{minor}"]
    except Exception:  # no usable GPU: build for the project's target
        pass
    return ["90a"]


def archs() -> list[str]:
    raw = os.environ.get("FUSEDKERNELS_CUDA_ARCHS", "")
    return [a.strip() for a in raw.replace(",", ";").split(";") if a.strip()] or default_archs()


def gencode_flags(arch_list: list[str]) -> list[str]:
    flags = []
    for arch in arch_list:
        ptx = arch.endswith("+PTX")
        arch = arch.removesuffix("+PTX").replace(".", "")
        if not arch[:2].isdigit():
            raise ValueError(f"FUSEDKERNELS_CUDA_ARCHS: cannot read {arch!r}; use e.g. 90a or 80")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags


def cxx_flags() -> list[str]:
    # No -std here: torch adds the standard its own headers ask for (C++20 in 2.14), so the bindings
    # follow whichever torch they are built against.
    return ["-O3"]


def nvcc_flags(arch_list: list[str]) -> list[str]:
    # Kernel files include no torch headers, so they can use C++20 whatever torch uses.
    # -lineinfo costs nothing at run time and lets compute-sanitizer name source lines.
    return ["-O3", "-std=c++20", "-lineinfo", *gencode_flags(arch_list)]


def include_dirs() -> list[str]:
    return [CSRC]


def write_build_info(arch_list: list[str], families: list[str]) -> None:
    with open(BUILD_INFO, "w") as f:
        json.dump({"archs": arch_list, "families": families}, f)


def read_build_info() -> dict:
    try:
        with open(BUILD_INFO) as f:
            return json.load(f)
    except OSError:
        return {}
