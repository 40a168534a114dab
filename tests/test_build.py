"""How the extension is built: what CMakeLists.txt decides before anything compiles."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch.utils

from tests.launcher import ROOT

NO_SHARED_LIBSTDCXX = """#!/bin/sh
# g++ as a GCC installed without its shared libstdc++ behaves: libstdc++.so is not found,
# so -lstdc++ takes the static archive.
for arg in "$@"; do
    [ "$arg" = "-print-file-name=libstdc++.so" ] && { echo libstdc++.so; exit 0; }
done
exec g++ -static-libstdc++ "$@"
"""


def configure(build: Path, compiler: str) -> subprocess.CompletedProcess:
    return subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), "-G", "Ninja",
                           f"-DCMAKE_CXX_COMPILER={compiler}", f"-DPython_EXECUTABLE={sys.executable}",
                           f"-DTORCH_CMAKE_PREFIX={torch.utils.cmake_prefix_path}", "-DTORCH_HAS_CUDA=OFF"],
                          capture_output=True, text=True, timeout=300)


def extension_link_line(build: Path) -> str:
    ninja = (build / "build.ninja").read_text()
    target = ninja.index("build _C.")  # the extension's link rule
    start = ninja.index("LINK_LIBRARIES =", target)
    return ninja[start:ninja.index("\n", start)]


@pytest.mark.skipif(None in (shutil.which("g++"), shutil.which("cmake"), shutil.which("ninja")),
                    reason="no g++, cmake or ninja")
def test_a_compiler_without_the_shared_libstdcxx_links_the_systems_one_into_the_extension(tmp_path):
    """Else the extension holds a static copy of the C++ streams beside the one PyTorch
    loads, and the first number an error message formats crashes the process."""
    wrapper = tmp_path / "g++"
    wrapper.write_text(NO_SHARED_LIBSTDCXX)
    wrapper.chmod(0o755)
    result = configure(tmp_path / "without", str(wrapper))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "has no shared libstdc++; linking " in result.stdout
    assert "libstdc++.so.6" in extension_link_line(tmp_path / "without")

    usual = configure(tmp_path / "usual", shutil.which("g++"))
    assert usual.returncode == 0, usual.stdout[-4000:] + usual.stderr[-4000:]
    assert "has no shared libstdc++" not in usual.stdout
    assert "libstdc++.so.6" not in extension_link_line(tmp_path / "usual")
