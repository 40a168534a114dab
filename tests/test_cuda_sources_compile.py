"""The CUDA kernels and the NCCL communicator compile, also on machines without a GPU."""

from __future__ import annotations

import importlib.util
import re
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
    assert {"lse_merge.cu.o", "decode_attention.cu.o", "shared_context_attention.cu.o", "nccl_comm.cpp.o"} <= objects


# The CUDA headers of PyTorch name a few CUDA math libraries that the glue and the KV arena
# never call; a CPU machine has neither them nor the CUDA build's generated macro header.
# Empty stand-ins let the compiler check everything these sources themselves write.
_STAND_INS = {
    "c10/cuda/impl/cuda_cmake_macros.h": "",
    "cusparse.h": "typedef struct cusparseContext* cusparseHandle_t; typedef int cusparseStatus_t;",
    "cublas_v2.h": "typedef struct cublasContext* cublasHandle_t; typedef int cublasStatus_t;",
    "cublasLt.h": "typedef struct cublasLtContext* cublasLtHandle_t;",
    "cusolverDn.h": "typedef struct cusolverDnContext* cusolverDnHandle_t; typedef int cusolverStatus_t;",
    "cusolver_common.h": "",
}


@pytest.mark.skipif(nvcc() is None, reason="no CUDA compiler (nvcc) on this machine")
@pytest.mark.skipif(not nccl_headers(), reason="no NCCL headers (pip install nvidia-nccl-cu13)")
@pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler (g++)")
def test_the_pytorch_side_of_the_cuda_code_compiles_against_pytorchs_headers(tmp_path):
    """The glue, and the KV arena's path to its kernel."""
    import sysconfig

    import nvidia.nccl
    import torch.utils.cpp_extension

    for name, text in _STAND_INS.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"#pragma once\n{text}\n")
    # The toolkit's headers, where nvcc itself looks for them.
    dry_run = subprocess.run([nvcc(), "--dryrun", "-x", "cu", "-c", "/dev/null", "-o", "/dev/null"],
                             capture_output=True, text=True).stderr
    cuda_includes = re.findall(r'INCLUDES="-I([^"]+?)"', dry_run)
    assert cuda_includes, dry_run
    includes = [str(ROOT / "csrc"), str(Path(list(nvidia.nccl.__path__)[0]) / "include"), str(tmp_path),
                *torch.utils.cpp_extension.include_paths(), *cuda_includes, sysconfig.get_paths()["include"]]
    for source in ("csrc/cuda_glue.cpp", "csrc/bindings.cpp", "csrc/kv_arena.cpp"):
        check = subprocess.run(["g++", "-std=gnu++17", "-fsyntax-only", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-DSTAR_ENGINE_WITH_CUDA", *[f"-I{i}" for i in includes], str(ROOT / source)],
                               capture_output=True, text=True, timeout=600)
        assert check.returncode == 0, check.stderr[-8000:]
