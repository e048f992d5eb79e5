"""The wheel is what a cluster image or `pip install circuitray` gets: it must hold every
module, the shipped configs (so `circuitray demo` runs from a plain install), py.typed, and
no torch cap below a GPU image's torch."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the tracked sources, so the build leaves nothing in the checkout."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("circuitray", "conf"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps",
                           "--no-build-isolation", "-w", str(root / "dist"), "-q"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (built,) = (root / "dist").glob("circuitray-*.whl")
    return built


def test_wheel_holds_every_module_the_configs_and_py_typed(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {p.relative_to(REPO).as_posix() for p in (REPO / "circuitray").rglob("*.py")
               if "__pycache__" not in p.parts}
    assert modules - names == set(), "pyproject.toml's packages list misses a subpackage"
    configs = {f"circuitray/conf/{p.name}" for p in (REPO / "conf").glob("*.yaml")}
    assert {"circuitray/conf/demo.yaml", "circuitray/conf/zoo-demo.yaml"} <= configs <= names
    assert "circuitray/py.typed" in names


def test_wheel_metadata_does_not_cap_torch(wheel: Path) -> None:
    import circuitray

    with zipfile.ZipFile(wheel) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(meta_name).decode())
    assert meta["Version"] == circuitray.__version__
    requires = {r.split(">")[0].split("<")[0].split("=")[0].strip(): r
                for r in meta.get_all("Requires-Dist") if "extra ==" not in r}
    for name in ("torch", "torchvision"):
        assert "<" not in requires[name], requires[name]


def test_installed_wheel_resolves_the_demo_configs_outside_the_repository(wheel: Path,
                                                                          tmp_path) -> None:
    """Installed without the repository (a wheel unpacked into a throwaway folder, run from an
    empty folder): `demo` and `conf/zoo-demo.yaml` come from the package's own copy."""
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)  # a pure-Python wheel installs by unpacking
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = ("import circuitray, sys; from circuitray.cli import main, resolve_config; "
            "print(circuitray.__file__); print(resolve_config('conf/zoo-demo.yaml')); "
            "sys.exit(main(['config', 'show', 'demo']))")
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    package = target / "circuitray"
    assert lines[0] == str(package / "__init__.py")  # not the repository's copy
    assert lines[1] == str(package / "conf" / "zoo-demo.yaml")
    assert lines[2] == f"# {package / 'conf' / 'demo.yaml'}"
    assert "name: demo" in done.stdout and f"output_dir: {cwd}/runs/demo/job" in done.stdout
