"""Builds star_engine and its extension star_engine._C (csrc/, through CMakeLists.txt)."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt with Ninja into the extension's place."""

    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.run(
            ["cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
             f"-DPython_EXECUTABLE={sys.executable}",
             f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
             f"-DCMAKE_BUILD_TYPE={os.environ.get('CMAKE_BUILD_TYPE', 'Release')}",
             *shlex.split(os.environ.get("CMAKE_ARGS", ""))],  # e.g. -DCMAKE_CUDA_ARCHITECTURES=90
            check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


setup(
    name="star_engine",
    version="0.1.0",
    description="Long-context LLM inference over many GPUs with Star Attention, "
                "beside Ring Attention and dense baselines",
    packages=find_packages(include=["star_engine", "star_engine.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "mpi4py>=3.1",
        "safetensors",
        "transformers>=4.45",
        "gguf>=0.10",
        "accelerate",
        "matplotlib",
    ],
    extras_require={"test": ["pytest"]},
    ext_modules=[CMakeExtension("star_engine._C")],
    cmdclass={"build_ext": CMakeBuild},
    entry_points={"console_scripts": ["star-engine=star_engine.cli:main"]},
)
