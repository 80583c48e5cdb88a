"""Packaging and plumbing: import without a GPU, the native module, the build (families, the arch axis,
incremental builds), the include rules of csrc/, the scripts, info, documented names."""

import os
import re
import subprocess
import sys
import types

import pytest
import torch

import fusedkernels
from fusedkernels import _build, _native

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **env):
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env}, timeout=300
    )


def _read(path):
    with open(os.path.join(ROOT, path)) as f:
        return f.read()


def test_import_does_not_initialise_cuda():
    r = _run(
        "import torch, fusedkernels, fusedkernels.nn, fusedkernels.ops, fusedkernels.optim\n"
        "assert not torch.cuda.is_initialized(), 'import initialised CUDA'\nprint('ok')"
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


@pytest.mark.skipif(os.environ.get("FUSEDKERNELS_REQUIRE_NATIVE") != "1", reason="only where the build is required")
def test_native_module_built_and_loaded():
    assert _native.loaded, f"native module failed to load: {_native.error}"
    # ... from this checkout, not an install of another one
    assert os.path.dirname(os.path.abspath(fusedkernels.__file__)) == os.path.join(ROOT, "fusedkernels")
    assert os.path.dirname(os.path.abspath(_native.module.__file__)) == os.path.join(ROOT, "fusedkernels")
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    for op in ("layer_norm", "rms_norm", "conv2d_bias_relu", "batch_norm_relu", "apply_rotary",
               "linear_cross_entropy"):  # public ops: composites that route each input
        assert has_kernel(f"fusedkernels::{op}", "CompositeImplicitAutograd"), op
    for op in ("layer_norm_fwd", "rms_norm_bwd", "adam_step_", "sgd_step_", "lamb_step_", "grad_norm", "sm90_double",
               "conv2d_bias_relu_fwd", "batch_norm_relu_fwd", "batch_norm_relu_bwd", "rotary_fwd", "rotary_",
               "linear_cross_entropy_fwd", "linear_cross_entropy_bwd"):
        assert _native.has_op(op), op
        assert has_kernel(f"fusedkernels::{op}", "Meta"), op  # fake tensors: torch.compile, export
    for op in ("layer_norm_fwd", "layer_norm_bwd", "rms_norm_fwd", "rms_norm_bwd", "adam_step_", "grad_norm",
               "conv2d_bias_relu_fwd", "batch_norm_relu_fwd", "batch_norm_relu_bwd", "rotary_fwd", "rotary_",
               "linear_cross_entropy_fwd", "linear_cross_entropy_bwd"):
        assert has_kernel(f"fusedkernels::{op}", "CUDA"), op


def test_info_reports_versions_archs_and_ops():
    r = _run("import fusedkernels.info as i; i.main()")
    assert r.returncode == 0, r.stderr
    for text in (fusedkernels.__version__, "torch", "native module:", "GPU:"):
        assert text in r.stdout
    if _native.loaded:
        # the machine code this build holds, and how to build for another GPU
        for arch in _build.read_build_info()["archs"]:
            assert f"sm_{arch}" in r.stdout
        assert "FUSEDKERNELS_CUDA_ARCHS" in r.stdout
        for op in ("layer_norm", "rms_norm", "adam_step_", "lamb_step_"):
            assert op in r.stdout


def test_lazy_submodules():
    assert fusedkernels.nn.FusedLayerNorm is not None
    with pytest.raises(AttributeError):
        fusedkernels.does_not_exist  # noqa: B018


def test_documented_names_are_importable():
    """Every `ops.x` / `nn.X` / `optim.X` name the README and docs/ mention exists where they say."""
    texts = [_read("README.md")] + [_read(os.path.join("docs", f)) for f in os.listdir(os.path.join(ROOT, "docs"))
                                    if f.endswith(".md")]
    names = set()
    for text in texts:
        # torch's own names (nn.Module, optim.AdamW) appear too: ours are ops.*, nn.Fused*, optim.Fused*, clip
        names |= set(re.findall(r"`(?:fusedkernels\.)?(ops\.\w+|nn\.Fused\w+|optim\.Fused\w+|optim\.clip_grad_norm_)",
                                text))
    assert "ops.lamb_step_" in names and "optim.FusedLAMB" in names
    for name in sorted(names):
        module, attr = name.split(".")
        assert hasattr(getattr(fusedkernels, module), attr), f"the docs name fusedkernels.{name}, which does not exist"
        assert attr in getattr(fusedkernels, module).__all__, f"fusedkernels.{name} is not in {module}.__all__"


def test_arch_flags(monkeypatch):
    assert _build.gencode_flags(["90a", "80+PTX"]) == [
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_80,code=compute_80",
    ]
    monkeypatch.setenv("FUSEDKERNELS_CUDA_ARCHS", "90a; 8.0")
    assert _build.archs() == ["90a", "80"]
    assert _build.gencode_flags(_build.archs())[1] == "-gencode=arch=compute_80,code=sm_80"
    for bad in ("hopper", "80 90", "80+ptx", "8", "90A", "1000", "60"):
        with pytest.raises(ValueError, match="cannot read"):
            _build.normalize_arch(bad)
    # which builds have code a GPU runs: its own target, an older same-major one, or PTX
    assert _build.runs_on(["90a", "80"], 9, 0) and _build.runs_on(["80"], 8, 6) and _build.runs_on(["80+PTX"], 9, 0)
    assert not _build.runs_on(["90a"], 10, 0) and not _build.runs_on(["80"], 9, 0)
    assert "-DFUSEDKERNELS_SM90A_BUILT" in _build.nvcc_flags(["90a"]) and "-DFUSEDKERNELS_SM90A_BUILT" not in \
        _build.nvcc_flags(["90", "80+PTX"])  # sm90/ kernels have a body only in a 90a build


def test_sm90_sources_compile_for_sm90a_alone():
    sources = _build.sources(_build.families())
    sm90 = [s for s in sources if _build.is_sm90_only(s)]
    assert sm90, "the tree needs at least one sm_90a-only source (csrc/<family>/sm90/)"
    groups = dict((tuple(g), flags) for flags, g in _build.arch_groups(sources, ["90a", "80"]))
    sm90_flags = groups[tuple(sm90)]
    assert "-gencode=arch=compute_90a,code=sm_90a" in sm90_flags
    assert not any("compute_80" in f for f in sm90_flags)
    rest = [s for s in sources if s not in sm90]
    assert any("compute_80" in f for f in groups[tuple(rest)])
    # A build without 90a still compiles them (their device code empties), so every symbol links.
    assert _build.archs_for(sm90[0], ["80"]) == ["80"]


def test_families_are_discovered(monkeypatch):
    assert {"conv", "llm", "norm", "optim"} <= set(_build.families())
    assert "common" not in _build.families()
    monkeypatch.setenv("FUSEDKERNELS_FAMILIES", "norm")
    assert _build.selected_families() == ["norm"]
    assert any(s.endswith("norm_ops.cpp") for s in _build.sources(["norm"]))
    monkeypatch.setenv("FUSEDKERNELS_FAMILIES", "norm,warp_drive")
    with pytest.raises(ValueError, match="unknown families"):
        _build.selected_families()


def test_build_folder_outlives_the_run_and_sources_get_their_targets():
    """setup.py's build_ext keeps its objects in build/temp (pip's editable builds would use a fresh temporary
    folder and recompile everything) and compiles each arch group with its own flags."""

    class FakeCompiler:
        def __init__(self):
            self.calls = []

        def compile(self, sources, output_dir=None, macros=None, include_dirs=None, debug=0, extra_preargs=None,
                    extra_postargs=None, depends=None):
            self.calls.append((sources, extra_postargs["nvcc"]))
            return [s + ".o" for s in sources]

    class FakeBase:
        def __init__(self):
            self.build_temp = "/tmp/pip-xyz"
            self.compiler = FakeCompiler()

        def finalize_options(self):
            pass

        def build_extension(self, ext):
            self.objects = self.compiler.compile(ext, extra_postargs={"cxx": [], "nvcc": ["-O3"]})

    cmd = _build.build_ext_class(FakeBase, ["90a", "80"])()
    cmd.finalize_options()
    assert cmd.build_temp == os.path.join(ROOT, "build", "temp")
    sources = _build.sources(_build.families())
    cmd.build_extension(sources)
    assert sorted(cmd.objects) == sorted(s + ".o" for s in sources)
    assert len(cmd.compiler.calls) == 2


def test_scripts_take_python_extra_args_and_show_skips(monkeypatch):
    test_sh = _read("scripts/test.sh")
    assert '"$@"' in test_sh and "-rs" in test_sh and "${PYTHON:-python3}" in test_sh
    assert "paths=" in test_sh  # test paths given as arguments replace the whole suite
    assert "native_required" in test_sh
    assert "${PYTHON:-python3}" in _read("scripts/bench.sh") and '"$@"' in _read("scripts/bench.sh")
    monkeypatch.setenv("FUSEDKERNELS_SKIP_CUDA", "1")
    assert not _build.native_required()  # a toolkit may be here, the native module is not asked for


def _includes(path):
    return re.findall(r'#include [<"]([^>"]+)[>"]', _read(path))


def _csrc_files():
    for folder, _, files in os.walk(_build.CSRC):
        for name in files:
            yield os.path.relpath(os.path.join(folder, name), ROOT)


def test_include_rules():
    """Kernels never see torch (nvcc stays fast); device headers hold no host code; host helpers hold no
    device code or torch; the torch-side kit is for the binding files only; families include only common/ (and
    conv's kernel headers gemm's)."""
    torchy = ("torch/", "ATen/", "c10/", "Python.h", "common/torch/", "common/python/")
    for path in _csrc_files():
        includes = _includes(path)
        family = path.split(os.sep)[1]
        if path.endswith((".cu", ".cuh")) or "common/device" in path or "common/host" in path:
            bad = [i for i in includes if i.startswith(torchy)]
            assert not bad, f"{path} includes {bad}"
        if "common/device" in path:
            assert not [i for i in includes if i.startswith("common/host")], path
        if "common/host" in path:
            assert not [i for i in includes if i.startswith("common/device")], path
        if "common/torch" in path or "common/python" in path:
            continue
        if path.endswith(".h") and family != "common":
            assert not [i for i in includes if i.startswith(torchy)], f"{path}: params headers stay torch-free"
        others = [i for i in includes if "/" in i and i.split("/")[0] in _build.families() and i.split("/")[0] != family]
        # the one edge between families: conv's kernels are gemm's kernel as an implicit GEMM (headers only, each
        # family still builds and links alone)
        others = [i for i in others if not (family == "conv" and i.startswith("gemm/") and path.endswith(".cuh"))]
        assert not others, f"{path} includes another family: {others}"
        if "common/python" in " ".join(includes):
            assert path == os.path.join("csrc", "fusedkernels.cpp"), f"{path}: only the module file uses Python"


def test_install_without_native_module_removes_a_stale_one(tmp_path, monkeypatch):
    """FUSEDKERNELS_SKIP_CUDA=1 (or no nvcc) after an in-place build: the old _C would still load."""
    monkeypatch.setattr(_build, "PACKAGE", str(tmp_path))
    monkeypatch.setattr(_build, "BUILD_INFO", str(tmp_path / "_build_info.json"))
    (tmp_path / "_C.cpython-311-x86_64-linux-gnu.so").write_text("stale")
    _build.forget_native_module("FUSEDKERNELS_SKIP_CUDA=1 at install")
    assert not list(tmp_path.glob("_C*.so"))
    assert _build.read_build_info()["no_native_module"].startswith("FUSEDKERNELS_SKIP_CUDA")


def test_setup_refuses_an_old_setuptools_clearly():
    assert "setuptools >= 77" in _read("setup.py") and "setuptools>=77" in _read("scripts/setup.sh")


def test_a_native_module_of_another_checkout_is_not_loaded(monkeypatch, tmp_path):
    """An editable install of another copy can serve its _C to this package: it is refused, with where it was."""
    stranger = types.SimpleNamespace(__file__=str(tmp_path / "fusedkernels" / "_C.so"))
    monkeypatch.setattr(_native.importlib, "import_module", lambda name: stranger)
    monkeypatch.delenv("FUSEDKERNELS_JIT", raising=False)
    for name in ("loaded", "error", "source", "module"):
        monkeypatch.setattr(_native, name, getattr(_native, name))
    _native.loaded, _native.error = False, None
    _native._load()
    assert not _native.loaded and _native.module is None
    assert str(tmp_path) in _native.error and "another copy" in _native.error


def test_models_suite_runs_each_impl_in_a_process_and_takes_the_median_of_its_rounds(monkeypatch):
    monkeypatch.chdir(ROOT)  # the worker runs `python -m bench.models` from the repository's root
    from bench import models

    worker = models._in_a_process(models.TORCH)  # a real worker process: its result line, parsed
    if not torch.cuda.is_available():
        assert set(worker) == {"skipped"} and worker["skipped"]
    rounds = [{"ms": ms, "peak_MiB": peak, "loss_first": 10.5, "loss_last": 10.25, "fused": "report"}
              for ms, peak in [(47.0, 6900.0), (45.0, 6934.0), (49.0, 6901.0)]]
    row = models._row(models.LIGER, rounds)
    assert row.ms == 47.0 and row.peak_MiB == 6934.0 and row.extra["ms_rounds"] == [47.0, 45.0, 49.0]
    assert row.extra["fused"] == "report" and row.extra["loss_last"] == 10.25
    skipped = models._row(models.LIGER, [{"skipped": "liger_kernel is not importable"}])
    assert skipped.ms is None and skipped.extra == {"skipped": "liger_kernel is not importable"}


def test_bench_cases_selects_the_case_suites_rows_by_name(monkeypatch):
    monkeypatch.chdir(ROOT)
    from bench import attention, common, conv, gemm

    monkeypatch.delenv("BENCH_CASES", raising=False)
    every = {name: {p["case"] for p in suite.plan()} for name, suite in [("gemm", gemm), ("conv", conv)]}
    every["attention"] = {p["case"] for p in attention.plan()}
    monkeypatch.setenv("BENCH_CASES", r"fwd\+bwd .*gelu|bias|x64")
    for name, suite in [("gemm", gemm), ("conv", conv), ("attention", attention)]:
        chosen = {p["case"] for p in suite.plan()}
        assert chosen < every[name] or not chosen, name
    assert {p["case"] for p in gemm.plan()} == {c for c in every["gemm"] if c.startswith("fwd+bwd") and "gelu" in c}
    assert {p["case"] for p in attention.plan()} == {c for c in every["attention"] if "bias" in c or "x64" in c}
    assert common.selected([1, 2, 3], lambda c: f"case {c}") == []  # no name matches
    monkeypatch.setenv("BENCH_CASES", "")
    assert common.selected([1, 2], str) == [1, 2]  # empty: every case


def test_overhead_times_the_impls_of_a_row_in_turns(monkeypatch):
    """The shared GPU host drifts over seconds: each repeat times every impl once, in a rotating order, and each impl
    gets the median of its own repeats (bench/overhead.py)."""
    monkeypatch.chdir(ROOT)
    from bench import overhead

    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    order = []
    times = overhead.interleaved_host_and_wall_ms({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                                  calls=2, repeats=3, warmup=1)
    assert "".join(order) == "a" + "b" + "aabb" + "bbaa" + "aabb"  # warm-up, then the loops in turns
    assert set(times) == {"a", "b"} and all(host <= wall for host, wall in times.values())
    host, wall = overhead.host_and_wall_ms(lambda: None, calls=3, repeats=2, warmup=0)
    assert 0 <= host <= wall
