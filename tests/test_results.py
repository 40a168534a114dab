"""Where results go unless the user says, and the commit they name: the code's own, or none."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launcher import ROOT, run


def commit_seen_from(package_parent: Path, env: dict[str, str] | None = None) -> str:
    """What results written by the star_engine under package_parent name as their commit."""
    probe = "from star_engine.measure.results import code_commit; print(code_commit())"
    result = run([sys.executable, "-c", probe], timeout=120, cwd=package_parent,
                 env={"PYTHONPATH": str(package_parent), **(env or {})})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def copy_of_the_package(into: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "star_engine", into / "star_engine", ignore=shutil.ignore_patterns("__pycache__"))
    return into


def git(directory: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=directory,
                          capture_output=True, text=True, check=True).stdout.strip()


def test_results_name_the_commit_of_the_checkout_they_run_from():
    try:
        head = git(ROOT, "rev-parse", "--short", "HEAD")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("the tests do not run from a git checkout")
    assert commit_seen_from(ROOT) == head
    assert commit_seen_from(ROOT, env={"STAR_ENGINE_COMMIT": "abc1234"}) == "abc1234"


def test_a_package_that_is_not_its_checkout_s_own_files_names_no_commit_unless_told(tmp_path):
    copy = copy_of_the_package(tmp_path / "copy")
    assert commit_seen_from(copy) == "None"  # no checkout at all
    assert commit_seen_from(copy, env={"STAR_ENGINE_COMMIT": "abc1234"}) == "abc1234"

    # An installed package inside a checkout (a virtual environment in it), and a copy at a
    # checkout's top that it does not track: the checkout's commit is not the code's.
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    git(checkout, "init", "-q")
    (checkout / "README").write_text("another project\n")
    git(checkout, "add", "README")
    git(checkout, "commit", "-q", "-m", "first")
    installed = copy_of_the_package(checkout / "venv" / "site-packages")
    assert commit_seen_from(installed) == "None"
    copy_of_the_package(checkout)
    assert commit_seen_from(checkout) == "None"
    git(checkout, "add", "star_engine")
    git(checkout, "commit", "-q", "-m", "the package")
    assert commit_seen_from(checkout) == git(checkout, "rev-parse", "--short", "HEAD")


def test_bench_without_output_writes_into_the_results_directory_and_says_where(tmp_path):
    result = run([sys.executable, "-m", "star_engine", "bench", "--model", "tiny", "--attn", "dense", "--lengths",
                  "256", "--max-new-tokens", "2", "--query-tokens", "4"], timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    saved = tmp_path / "star_engine_results" / "e2e_tiny_1ranks.json"
    assert json.loads(saved.read_text())["rows"][0]["context"] == 256
    assert "results to star_engine_results/e2e_tiny_1ranks.json" in result.stderr
    assert "saved star_engine_results/e2e_tiny_1ranks.json" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["star_engine_results"]
