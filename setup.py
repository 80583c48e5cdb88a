"""Builds fusedkernels._C whenever a CUDA toolkit (nvcc) is found, GPU or not. Knobs: fusedkernels/_build.py."""

import importlib.util
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
spec = importlib.util.spec_from_file_location("_build", os.path.join(ROOT, "fusedkernels", "_build.py"))
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)

import setuptools  # noqa: E402

if tuple(int(v) for v in setuptools.__version__.split(".")[:1]) < (77,):
    sys.exit(f"fusedkernels: building needs setuptools >= 77 (for the license expression of pyproject.toml), "
             f"found {setuptools.__version__}: pip install 'setuptools>=77'")

ext_modules, cmdclass = [], {}
if os.environ.get("FUSEDKERNELS_SKIP_CUDA") == "1":
    print("fusedkernels: FUSEDKERNELS_SKIP_CUDA=1, installing without the native module", file=sys.stderr)
    build.forget_native_module("FUSEDKERNELS_SKIP_CUDA=1 at install")
else:
    cuda_home = build.find_cuda_home()
    if cuda_home is None:
        print("fusedkernels: no CUDA toolkit (nvcc) found, installing without the native module; "
              "every op will run PyTorch's implementation", file=sys.stderr)
        build.forget_native_module("no CUDA toolkit (nvcc) at install")
    else:
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
        try:
            from torch.utils.cpp_extension import BuildExtension, CUDAExtension
        except ImportError:
            sys.exit("fusedkernels: building the CUDA extension needs torch installed first; "
                     "install it, then `pip install --no-build-isolation .`")
        arch_list, families = build.archs(), build.selected_families()
        print(f"fusedkernels: building families {families} for archs {arch_list} with {cuda_home}", file=sys.stderr)
        build.write_build_info(arch_list, families)

        ext_modules.append(
            CUDAExtension(
                name="fusedkernels._C",
                sources=[os.path.relpath(s, ROOT) for s in build.sources(families)],
                include_dirs=build.include_dirs(),
                extra_compile_args={"cxx": build.cxx_flags(), "nvcc": build.nvcc_flags(arch_list)},
            )
        )
        cmdclass["build_ext"] = build.build_ext_class(BuildExtension.with_options(use_ninja=True), arch_list)

setup(
    packages=find_packages(include=["fusedkernels", "fusedkernels.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
