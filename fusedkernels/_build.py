"""Build configuration shared by setup.py and the JIT loader: sources, architectures and compiler flags.

Environment knobs (all optional):
  FUSEDKERNELS_CUDA_ARCHS  semicolon list of targets, e.g. "90a;80" (default: the visible GPU, else 90a).
                           Append "+PTX" to also embed PTX for that target.
  FUSEDKERNELS_FAMILIES    comma list of kernel families to build, e.g. "norm" (default: all, which are the
                           folders of csrc/ but common/).
  FUSEDKERNELS_SKIP_CUDA   "1": install without the native module (every op runs the PyTorch reference).
  MAX_JOBS                 parallel compile jobs (read by torch's ninja build).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")
PACKAGE = os.path.dirname(os.path.abspath(__file__))
BUILD_INFO = os.path.join(PACKAGE, "_build_info.json")
# Sources under a folder of this name use sm_90a-only instructions (wgmma, TMA, setmaxnreg): they compile
# for the 90a target alone.
SM90_FOLDER = "sm90"


def families() -> list[str]:
    """Every folder of csrc/ but common/ is a kernel family."""
    if not os.path.isdir(CSRC):
        return []
    return sorted(d for d in os.listdir(CSRC) if d != "common" and os.path.isdir(os.path.join(CSRC, d)))


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
    known = families()
    raw = os.environ.get("FUSEDKERNELS_FAMILIES", "")
    chosen = [f.strip() for f in raw.split(",") if f.strip()] or known
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise ValueError(f"FUSEDKERNELS_FAMILIES: unknown families {unknown}; known: {known}")
    return chosen


def sources(families: list[str]) -> list[str]:
    """Absolute paths: the library file, then each family's bindings (*.cpp) and kernels (*.cu), in
    subfolders too (instances, sm90/)."""
    files = [os.path.join(CSRC, "fusedkernels.cpp")]
    for family in families:
        folder = os.path.join(CSRC, family)
        for ext in ("cpp", "cu"):
            files += sorted(glob.glob(os.path.join(folder, "**", f"*.{ext}"), recursive=True))
    return files


def is_sm90_only(source: str) -> bool:
    return SM90_FOLDER in os.path.normpath(source).split(os.sep)


def default_archs() -> list[str]:
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return ["90a" if (major, minor) == (9, 0) else f"{major}{minor}"]
    except Exception:  # no usable GPU: build for the project's target
        pass
    return ["90a"]


_ARCH = re.compile(r"^(\d)\.?(\d)([af]?)(\+PTX)?$")


def normalize_arch(arch: str) -> str:
    """"90a", "8.0" -> "80", "80+PTX": the build's spelling of a target; ValueError for anything else."""
    m = _ARCH.match(arch.strip())
    if not m or int(m.group(1)) < 7:
        raise ValueError(f"FUSEDKERNELS_CUDA_ARCHS: cannot read {arch!r}; use targets such as 90a, 80 or 80+PTX, "
                         "separated by ';' (sm_70 or newer)")
    return f"{m.group(1)}{m.group(2)}{m.group(3)}{m.group(4) or ''}"


def archs() -> list[str]:
    raw = os.environ.get("FUSEDKERNELS_CUDA_ARCHS", "")
    return [normalize_arch(a) for a in raw.replace(",", ";").split(";") if a.strip()] or default_archs()


def gencode_flags(arch_list: list[str]) -> list[str]:
    flags = []
    for arch in map(normalize_arch, arch_list):
        ptx = arch.endswith("+PTX")
        arch = arch.removesuffix("+PTX")
        flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    return flags


def runs_on(arch_list: list[str], major: int, minor: int) -> bool:
    """Whether a build for these targets has code a device of this compute capability runs: its exact
    target, an older one of the same major version (not an arch-specific 'a' one), or PTX to compile."""
    for arch in map(normalize_arch, arch_list):
        m = _ARCH.match(arch)
        a_major, a_minor, special, ptx = int(m.group(1)), int(m.group(2)), m.group(3), m.group(4)
        if (a_major, a_minor) == (major, minor):
            return True
        if a_major == major and a_minor < minor and not special:
            return True
        if ptx and (a_major, a_minor) < (major, minor) and not special:
            return True
    return False


def cxx_flags() -> list[str]:
    # No -std here: torch adds the standard its own headers ask for (C++20 in 2.14), so the bindings
    # follow whichever torch they are built against.
    return ["-O3"]


def nvcc_flags(arch_list: list[str]) -> list[str]:
    # Kernel files include no torch headers, so they can use C++20 whatever torch uses.
    # -lineinfo costs nothing at run time and lets compute-sanitizer name source lines.
    # FUSEDKERNELS_SM90A_BUILT: the build holds sm_90a code, the only place sm90/ kernels have a body.
    sm90a = ["-DFUSEDKERNELS_SM90A_BUILT"] if "90a" in [normalize_arch(a).removesuffix("+PTX") for a in arch_list] else []
    return ["-O3", "-std=c++20", "-lineinfo", *sm90a, *gencode_flags(arch_list)]


def archs_for(source: str, arch_list: list[str]) -> list[str]:
    """The targets a source compiles for: sm90/ sources for 90a alone when the build has it; otherwise for
    every target (their device code then compiles to nothing, see common/device/sm90.cuh, and the ops never
    pick them)."""
    if is_sm90_only(source):
        sm90a = [a for a in arch_list if a.removesuffix("+PTX") == "90a"]
        return sm90a or arch_list
    return arch_list


def arch_groups(sources: list[str], arch_list: list[str]) -> list[tuple[list[str], list[str]]]:
    """(nvcc flags, sources) per distinct target list, for a build that can give each group its own flags."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for source in sources:
        groups.setdefault(tuple(archs_for(source, arch_list)), []).append(source)
    return [(nvcc_flags(list(targets)), group) for targets, group in groups.items()]


# setup.py's build folder. pip's editable builds use a fresh temporary one, which recompiles everything;
# this one outlives the run, so ninja rebuilds only the sources (and headers) that changed.
BUILD_TEMP = os.path.join(ROOT, "build", "temp")


def build_ext_class(base: type, arch_list: list[str]) -> type:
    """setup.py's build_ext: torch's BuildExtension (`base`) with the build folder above and per-source
    targets (sm90/ sources compile for sm_90a alone: `arch_groups`)."""

    class BuildExt(base):
        def finalize_options(self):
            super().finalize_options()
            self.build_temp = BUILD_TEMP

        def build_extension(self, ext):
            compile_all = self.compiler.compile  # torch's ninja compile: one set of flags for every source

            def compile_by_arch(sources, output_dir=None, macros=None, include_dirs=None, debug=0,
                                extra_preargs=None, extra_postargs=None, depends=None):
                objects = []
                for nvcc, group in arch_groups(sources, arch_list):
                    post = dict(extra_postargs, nvcc=nvcc)
                    objects += compile_all(group, output_dir, macros, include_dirs, debug, extra_preargs, post,
                                           depends)
                return objects

            self.compiler.compile = compile_by_arch
            try:
                super().build_extension(ext)
            finally:
                self.compiler.compile = compile_all

    return BuildExt


def native_required() -> bool:
    """Whether this machine's install must have built the native module: a CUDA toolkit is here and
    FUSEDKERNELS_SKIP_CUDA is not set (scripts/test.sh then fails on a build that did not load)."""
    return os.environ.get("FUSEDKERNELS_SKIP_CUDA") != "1" and find_cuda_home() is not None


def include_dirs() -> list[str]:
    return [CSRC]


def write_build_info(arch_list: list[str], families: list[str], folder: str | None = None) -> None:
    """What a build holds, beside its native module (the package for setup.py, the JIT folder for JIT)."""
    try:
        with open(os.path.join(folder or PACKAGE, "_build_info.json"), "w") as f:
            json.dump({"archs": arch_list, "families": families}, f)
    except OSError:  # a read-only install: info then says '?'
        pass


def forget_native_module(reason: str) -> None:
    """An install without the native module: remove a native module an earlier in-place build left in the
    package (it would still load), and record why there is none."""
    for stale in glob.glob(os.path.join(PACKAGE, "_C*.so")) + glob.glob(os.path.join(PACKAGE, "_C*.pyd")):
        os.remove(stale)
    with open(BUILD_INFO, "w") as f:
        json.dump({"archs": [], "families": [], "no_native_module": reason}, f)


def read_build_info(folder: str | None = None) -> dict:
    try:
        with open(os.path.join(folder or PACKAGE, "_build_info.json")) as f:
            return json.load(f)
    except OSError:
        return {}
