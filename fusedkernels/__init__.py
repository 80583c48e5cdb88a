"""fusedkernels: fused CUDA kernels for PyTorch, as functional ops, drop-in modules and optimizers.

`import fusedkernels` is cheap and never touches the GPU: the submodules (`ops`, `nn`, `optim`, `fusion`,
`integrations`, `info`) and `fuse` (fusedkernels.fusion.fuse) load on first access, and the native module with them.
"""

import importlib

__version__ = "0.1.0"
__all__ = ["fuse", "ops", "nn", "optim", "fusion", "integrations", "info", "__version__"]


def __getattr__(name):
    if name in ("ops", "nn", "optim", "fusion", "integrations", "info"):
        return importlib.import_module(f".{name}", __name__)
    if name == "fuse":
        return importlib.import_module(".fusion", __name__).fuse
    raise AttributeError(f"module 'fusedkernels' has no attribute {name!r}")
