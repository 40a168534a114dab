"""The CUDA kernels and the NCCL communicator compile, also on machines without a GPU."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launcher import ROOT


def nvcc() -> str | None:
    return shutil.which("nvcc") or next((str(p) for p in [Path("/usr/local/cuda/bin/nvcc")] if p.exists()), None)


def nccl_headers() -> bool:
    try:
        return importlib.util.find_spec("nvidia.nccl") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(nvcc() is None, reason="no CUDA compiler (nvcc) on this machine")
@pytest.mark.skipif(not nccl_headers(), reason="no NCCL headers (pip install nvidia-nccl-cu13)")
def test_cuda_and_nccl_sources_compile_for_hopper(tmp_path):
    configure = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-G", "Ninja", "-DSTAR_ENGINE_CUDA_CHECK=ON",
         "-DCMAKE_CUDA_ARCHITECTURES=90", f"-DCMAKE_CUDA_COMPILER={nvcc()}", f"-DPython_EXECUTABLE={sys.executable}"],
        capture_output=True, text=True)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    build = subprocess.run(["cmake", "--build", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-8000:] + build.stderr[-8000:]
    objects = {p.name for p in tmp_path.rglob("*.o")}
    assert {"lse_merge.cu.o", "decode_attention.cu.o", "nccl_comm.cpp.o"} <= objects
