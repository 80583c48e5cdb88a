"""`python -m fusedkernels.info`: what this install can do on this machine."""

from __future__ import annotations

import torch

import fusedkernels

from . import _build, _native
from .ops import norm as _norm
from .ops import optim as _optim

_FAMILY_SUPPORT = {"norm": _norm.SUPPORT, "optim": _optim.SUPPORT}


def report() -> str:
    lines = [
        f"fusedkernels {fusedkernels.__version__}",
        f"torch {torch.__version__}, built with CUDA {torch.version.cuda}",
    ]
    if _native.loaded:
        info = _build.read_build_info()
        lines.append(
            f"native module: loaded ({_native.source}); archs {info.get('archs', '?')}, "
            f"families {info.get('families', '?')}"
        )
    else:
        lines.append(f"native module: NOT loaded ({_native.error}); every op runs the PyTorch reference")
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        lines.append(f"GPU: {torch.cuda.get_device_name()} (sm_{major}{minor}), CUDA runtime {torch.version.cuda}")
    else:
        lines.append("GPU: none visible (CUDA kernels cannot run here; CPU runs the reference)")
    lines.append("")
    lines.append(f"{'op':<14} {'native CUDA kernel':<19} dtypes / sizes")
    for family, ops in _FAMILY_SUPPORT.items():
        for op, support in ops.items():
            native = "yes" if _native.has_cuda_kernel(support["kernel"]) else "no (reference)"
            lines.append(f"{op:<14} {native:<19} {support['dtypes']}")
            lines.append(f"{'':<14} {'':<19} {support['sizes']}")
    return "\n".join(lines)


def main() -> None:
    print(report())


if __name__ == "__main__":
    main()
