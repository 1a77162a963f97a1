"""Packaging, reviewed: the wheel holds every module and the kernel sources the operators compile at
run time (so a non-editable install keeps its native and CUDA backends), every third-party module
the package imports is a declared dependency, and pytest runs with a per-test timeout."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
IMPORT_TO_DIST = {"PIL": "pillow", "cupy": "cupy-cuda13x"}  # import name -> distribution, where they differ


def _sources(root: Path, pattern: str) -> list[Path]:
    return sorted(p for p in root.rglob(pattern) if "__pycache__" not in p.parts)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built by setuptools (no network, no build isolation) from a copy of the sources."""
    pytest.importorskip("setuptools", minversion="77")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("dcnbench", "kernels"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    dist = tmp_path_factory.mktemp("dist")
    code = "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", code, str(dist)], cwd=src, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return dist / done.stdout.strip().splitlines()[-1]


def test_wheel_holds_every_module_and_the_kernel_sources(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"dcnbench/{p.relative_to(REPO / 'dcnbench').as_posix()}" for p in _sources(REPO / "dcnbench", "*.py")}
    expected |= {f"dcnbench/csrc/{p.name}" for p in _sources(REPO / "dcnbench" / "csrc", "*.cpp")}
    expected |= {f"dcnbench/kernels/{p.name}" for p in (REPO / "kernels").iterdir() if p.is_file()}
    assert "dcnbench/kernels/dcn_math.h" in expected
    assert sorted(expected - names) == []


def test_installed_wheel_finds_its_packaged_kernels(wheel, tmp_path):
    """From the unpacked wheel alone (no checkout beside it), the native and CUDA backends resolve
    ``kernels/`` to the copy inside the package."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = ("import dcnbench, dcnbench.ops.native as n, dcnbench.ops.cuda as c; "
            "print(dcnbench.__file__); print(n._kernels_dir()); print(c.KERNEL_DIR)")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(site), "PATH": ""},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    package_file, native_dir, cuda_dir = done.stdout.strip().splitlines()[-3:]
    if not Path(package_file).is_relative_to(site):
        pytest.skip(f"this interpreter imports dcnbench from {package_file}, ahead of PYTHONPATH")
    assert Path(native_dir) == Path(cuda_dir) == site / "dcnbench" / "kernels"


def test_every_third_party_import_is_a_declared_dependency():
    """``numpy`` and ``PIL`` count: imported directly, they must not rely on arriving through torchvision."""
    declared = {d.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip().lower()
                for d in PYPROJECT["project"]["dependencies"] + PYPROJECT["project"]["optional-dependencies"]["cuda"]}
    imported = set()
    for path in _sources(REPO / "dcnbench", "*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"dcnbench", "__future__"}
    assert sorted(m for m in third_party if IMPORT_TO_DIST.get(m, m).lower() not in declared) == []


def test_pytest_runs_with_a_per_test_timeout(request):
    """pytest-timeout (a dev dependency) is configured, so a hung test fails instead of stalling CI."""
    assert float(request.config.getini("timeout") or 0) > 0


@pytest.mark.parametrize("args", [["ablate", "--table", "1", "--tier", "smoke", "--out", "{tmp}"],
                                  ["table", "1", "--out", "{tmp}"], ["figures", "--out", "{tmp}"],
                                  ["check", "--no-smoke"], ["runtime", "--params-only", "--results-dir", "{tmp}"]])
def test_commands_that_read_the_checkout_say_so_without_one(args, tmp_path, monkeypatch):
    """From a wheel (no experiments/ or results/ beside the package) these commands stop with one
    clear error instead of a FileNotFoundError traceback, or `check` passing with nothing checked.
    Outputs go under tmp_path: the commands' defaults are the checkout's results/, fixed at import,
    which a regression would have written into."""
    args = [a.format(tmp=tmp_path / "out") for a in args]
    from click.testing import CliRunner

    import dcnbench.report.paper as paper
    import dcnbench.runner.experiment as experiment
    from dcnbench.cli import main

    monkeypatch.setattr(experiment, "EXPERIMENTS_DIR", tmp_path / "experiments")
    monkeypatch.setattr(paper, "RESULTS_DIR", tmp_path / "results")
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "install dcnbench editable from a clone" in result.output, result.output
