"""Builds star_engine's extension star_engine._C from csrc/ through CMakeLists.txt; the
package's metadata is in pyproject.toml."""

import importlib.util
import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def torch_to_build_against():
    """The PyTorch the extension will run with. pip builds in an environment of its own,
    without the target environment's packages; PyTorch is looked for there too, since an
    extension built against another PyTorch would not load."""
    try:
        import torch
    except ImportError:
        sys.path.append(sysconfig.get_paths()["purelib"])
        try:
            import torch
        except ImportError:
            raise SystemExit("star_engine: PyTorch is needed to build the extension: install it first "
                             "(https://pytorch.org), then this package into the same environment with "
                             "pip install --no-build-isolation .") from None
    return torch


def nccl_root() -> str | None:
    """Where the nvidia-nccl wheel keeps NCCL's headers and library (for CUDA builds)."""
    try:
        spec = importlib.util.find_spec("nvidia.nccl")
    except ModuleNotFoundError:
        return None
    return list(spec.submodule_search_locations)[0] if spec and spec.submodule_search_locations else None


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt with Ninja into the extension's place."""

    def build_extension(self, ext: Extension) -> None:
        torch = torch_to_build_against()
        nccl = nccl_root()
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(
            ["cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
             f"-DPython_EXECUTABLE={sys.executable}",
             f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
             f"-DCMAKE_BUILD_TYPE={os.environ.get('CMAKE_BUILD_TYPE', 'Release')}",
             f"-DTORCH_CMAKE_PREFIX={torch.utils.cmake_prefix_path}",
             f"-DTORCH_HAS_CUDA={'ON' if torch.version.cuda else 'OFF'}",
             *([f"-DNCCL_ROOT={nccl}"] if nccl else []),
             *shlex.split(os.environ.get("CMAKE_ARGS", ""))],  # e.g. -DCMAKE_CUDA_ARCHITECTURES=90
            check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


setup(ext_modules=[CMakeExtension("star_engine._C")], cmdclass={"build_ext": CMakeBuild})
