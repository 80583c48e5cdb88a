"""`python -m fusedkernels.info`: what this install can do on this machine."""

from __future__ import annotations

import torch

import fusedkernels

from . import _build, _native


def _arch_of_device() -> str:
    major, minor = torch.cuda.get_device_capability()
    return "90a" if (major, minor) == (9, 0) else f"{major}{minor}"


def report() -> str:
    lines = [
        f"fusedkernels {fusedkernels.__version__}",
        f"torch {torch.__version__}, built with CUDA {torch.version.cuda}",
    ]
    info = _native.build_info()
    archs = info.get("archs", [])
    if _native.loaded:
        lines.append(f"native module: loaded ({_native.source}, {_native.module.__file__}); "
                     f"families {info.get('families', '?')}")
        lines.append(f"  machine code for: {', '.join('sm_' + a for a in archs) or '?'}"
                     " (another GPU: rebuild with FUSEDKERNELS_CUDA_ARCHS=<its arch>, e.g. 80 for an A100)")
    else:
        why = info.get("no_native_module") or _native.error
        lines.append(f"native module: not loaded ({why}); every op runs PyTorch's implementation")
    if torch.cuda.is_available():
        arch = _arch_of_device()
        runs = _native.loaded and _build.runs_on(archs, *torch.cuda.get_device_capability())
        lines.append(f"GPU: {torch.cuda.get_device_name()} (sm_{arch}), CUDA runtime {torch.version.cuda}; "
                     f"{'the kernels run on it' if runs else 'this build has no code for it'}")
    else:
        lines.append("GPU: none visible (the CUDA kernels cannot run here; CPU tensors run PyTorch's CPU kernels)")
    lines.append("")
    ops = _native.op_info()
    if ops:
        lines.append(f"{'family':<7} {'op':<13} dtypes / sizes with a native CUDA kernel")
        for family, op, dtypes, sizes in ops:
            lines.append(f"{family:<7} {op:<13} {dtypes}")
            lines.append(f"{'':<7} {'':<13} {sizes}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
