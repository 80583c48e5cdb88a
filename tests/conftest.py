import pytest
import torch

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible on this machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    # A machine that skips everything selected has still passed.
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.OK


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["default", "portable", "sm90-wide", "sm90-cooperative"])
def kernels(request, monkeypatch):
    """The gemm kernel tests' FUSEDKERNELS_GEMM_KERNEL. portable: the mma.sync kernel where the Hopper kernel would run
    by default; sm90-wide / sm90-cooperative: the Hopper kernel's 256-wide ping-pong / 128 x 256 cooperative tiles,
    which small shapes (most in the tests) would not take."""
    if request.param == "default":
        monkeypatch.delenv("FUSEDKERNELS_GEMM_KERNEL", raising=False)
    else:
        monkeypatch.setenv("FUSEDKERNELS_GEMM_KERNEL", request.param)
    return request.param
