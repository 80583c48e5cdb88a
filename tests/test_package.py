"""Packaging and plumbing: import without a GPU, the native module, build knobs, info."""

import os
import subprocess
import sys

import pytest

import fusedkernels
from fusedkernels import _build, _native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=300
    )


def test_import_does_not_initialise_cuda():
    r = _run(
        "import torch, fusedkernels, fusedkernels.nn, fusedkernels.ops\n"
        "assert not torch.cuda.is_initialized(), 'import initialised CUDA'\nprint('ok')"
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


@pytest.mark.skipif(os.environ.get("FUSEDKERNELS_REQUIRE_NATIVE") != "1", reason="only where the build is required")
def test_native_module_built_and_loaded():
    assert _native.loaded, f"native module failed to load: {_native.error}"
    for op in ("layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd"):
        assert _native.has_cuda_kernel(op), op


def test_info_reports_versions_and_ops():
    r = _run("import fusedkernels.info as i; i.main()")
    assert r.returncode == 0, r.stderr
    for text in (fusedkernels.__version__, "torch", "native module:", "GPU:", "layer_norm", "rms_norm"):
        assert text in r.stdout


def test_lazy_submodules():
    assert fusedkernels.nn.FusedLayerNorm is not None
    with pytest.raises(AttributeError):
        fusedkernels.does_not_exist  # noqa: B018


def test_arch_flags(monkeypatch):
    assert _build.gencode_flags(["90a", "80+PTX"]) == [
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_80,code=compute_80",
    ]
    monkeypatch.setenv("FUSEDKERNELS_CUDA_ARCHS", "90a; 8.0")
    assert _build.archs() == ["90a", "8.0"]
    assert _build.gencode_flags(_build.archs())[1] == "-gencode=arch=compute_80,code=sm_80"
    with pytest.raises(ValueError, match="cannot read"):
        _build.gencode_flags(["hopper"])


def test_family_selection(monkeypatch):
    monkeypatch.setenv("FUSEDKERNELS_FAMILIES", "norm")
    assert _build.selected_families() == ["norm"]
    assert any(s.endswith("norm_api.cpp") for s in _build.sources(["norm"]))
    monkeypatch.setenv("FUSEDKERNELS_FAMILIES", "norm,warp_drive")
    with pytest.raises(ValueError, match="unknown families"):
        _build.selected_families()


def test_kernel_files_do_not_include_torch():
    for family in _build.FAMILIES:
        for src in _build.sources([family]):
            if src.endswith((".cu", ".cuh")):
                with open(src) as f:
                    text = f.read()
                assert "torch/" not in text and "ATen/" not in text, f"{src} includes torch headers"
