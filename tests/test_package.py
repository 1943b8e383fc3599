"""The package foundation: imports, backend choice."""

import importlib.util
import os

import pytest
import torch

import sslfast
from sslfast._backend import resolve_backend
from tests.utils import ROOT


def test_public_api():
    for name in ("ModelEMA", "update_momentum", "cosine_schedule", "functional", "MemoryBank",
                 "MemoryBankModule", "NTXentLoss", "InfoNCELoss", "CLIPLoss"):
        assert hasattr(sslfast, name)
    assert callable(sslfast.functional.ema_)
    assert isinstance(sslfast.__version__, str)


def test_extension_is_built_here():
    """The dev/CI set-up builds the extension; a silent fallback would hide it."""
    if os.environ.get("SSLFAST_NO_EXTENSION"):
        pytest.skip("extension disabled")
    assert sslfast.has_cpu_kernels()
    assert hasattr(torch.ops.sslfast, "ema_")


def test_resolve_backend(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    impl = ("cuda", "cpu", "reference")
    monkeypatch.delenv("SSLFAST_BACKEND", raising=False)
    assert resolve_backend("auto", cpu, "op", impl) == "cpu"
    assert resolve_backend("auto", cuda, "op", impl) == "cuda"
    assert resolve_backend("auto", cuda, "op", ("triton", "cpu"), gpu_default="triton") == "triton"
    assert resolve_backend("reference", cuda, "op", impl) == "reference"
    monkeypatch.setenv("SSLFAST_BACKEND", "reference")
    assert resolve_backend("auto", cpu, "op", impl) == "reference"
    monkeypatch.setenv("SSLFAST_BACKEND", "cuda")  # an op written in Triton takes it as triton
    assert resolve_backend("auto", cuda, "op", ("triton", "cpu"), gpu_default="triton") == "triton"
    monkeypatch.setenv("SSLFAST_BACKEND", "triton")  # and a CUDA C++ op as cuda
    assert resolve_backend("auto", cuda, "op", impl) == "cuda"
    monkeypatch.setenv("SSLFAST_BACKEND", "reference")
    assert resolve_backend("cpu", cpu, "op", impl) == "cpu"  # the argument wins
    with pytest.raises(ValueError, match="backend 'cpu' needs CPU tensors"):
        resolve_backend("cpu", cuda, "op", impl)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", cpu, "op", ("triton",)) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        resolve_backend("triton", cpu, "op", ("triton",))


def test_sdist_holds_every_file_the_build_needs(tmp_path):
    """An sdist of this tree holds the headers its sources include (MANIFEST.in):
    without them `pip install sslfast-*.tar.gz` fails to compile. `make dist-check`
    goes on to build a wheel from the sdist and run it."""
    if not os.path.isdir(os.path.join(ROOT, ".git")):
        pytest.skip("needs the git checkout (its file list)")
    spec = importlib.util.spec_from_file_location(
        "dist_check", os.path.join(ROOT, "tools", "dist_check.py"))
    dist_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dist_check)
    sdist, missing = dist_check.build_sdist(str(tmp_path))
    assert os.path.isfile(sdist)
    assert missing == []
    assert "csrc/common/sslfast_common.h" in dist_check.needed_in_sdist(dist_check.tree_files())
