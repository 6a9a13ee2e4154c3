"""What an install carries: a wheel holds the library and its presets and refuses the command in one
line; an editable build maps the clone's four packages (setup.py)."""

import shutil
import subprocess
import sys
import tarfile
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "LICENSE", "README.md", "configs", "tagdit", "flows", "tasks",
           "models")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A copy of the project's sources: building writes build/ and *.egg-info beside them."""
    src = tmp_path_factory.mktemp("install") / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(ROOT / name, src / name)
    return src


def build(kind: str, src: Path, dst: Path) -> zipfile.ZipFile:
    """setuptools' PEP 517 hook (`build_wheel` or `build_editable`), run as pip would, without build isolation."""
    dst.mkdir()
    code = f"from setuptools import build_meta; print(build_meta.{kind}({str(dst)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return zipfile.ZipFile(dst / done.stdout.strip().splitlines()[-1])


def test_a_wheel_carries_tagdit_and_its_presets_and_its_command_refuses_in_one_line(source, tmp_path):
    wheel = build("build_wheel", source, tmp_path / "wheel")
    names = wheel.namelist()
    assert {n.split("/")[0] for n in names} == {"tagdit", "tagdit-0.1.0.dist-info"}  # no flows/, tasks/, models/
    assert wheel.read("tagdit/configs/demo.yaml") == (ROOT / "configs/demo.yaml").read_bytes()
    assert "tagdit-0.1.0.dist-info/licenses/LICENSE" in names
    assert "License-Expression: Apache-2.0" in wheel.read("tagdit-0.1.0.dist-info/METADATA").decode()

    env_dir = tmp_path / "venv"  # a fresh venv, outside the clone, with the wheel alone
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python, out = env_dir / "bin" / "python", tmp_path / "elsewhere"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index"]
    subprocess.run([*pip, wheel.filename], check=True, timeout=60)
    out.mkdir()
    tagdit = str(env_dir / "bin" / "tagdit")
    run = lambda *cmd: subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=60)  # noqa: E731
    assert run(tagdit, "--version").stdout == "tagdit 0.1.0\n"
    refused = run(tagdit, "sample", "--help")
    assert refused.returncode == 2 and refused.stdout == "" and len(refused.stderr.splitlines()) == 1
    assert "pip install -e ." in refused.stderr and "make venv" in refused.stderr
    found = run(str(python), "-c", "from tagdit.presets import preset_path; print(preset_path('demo'))")
    assert Path(found.stdout.strip()) == env_dir / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" \
        / "site-packages" / "tagdit" / "configs" / "demo.yaml", found.stderr


def test_an_sdist_carries_the_presets_for_the_wheel_built_from_it(source, tmp_path):
    (tmp_path / "sdist").mkdir()
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path / 'sdist')!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with tarfile.open(tmp_path / "sdist" / done.stdout.strip().splitlines()[-1]) as sdist:
        names = sdist.getnames()
    assert "tagdit-0.1.0/configs/demo.yaml" in names and "tagdit-0.1.0/setup.py" in names


def test_an_editable_build_maps_the_clones_four_packages(source, tmp_path):
    wheel = build("build_editable", source, tmp_path / "editable")
    finder = next(n for n in wheel.namelist() if n.endswith("_finder.py"))
    mapping = next(line for line in wheel.read(finder).decode().splitlines() if line.startswith("MAPPING"))
    for package in ("tagdit", "flows", "tasks", "models"):
        assert f"'{package}': '{source / package}'" in mapping
    assert "tagdit = tagdit.__main__:main" in wheel.read("tagdit-0.1.0.dist-info/entry_points.txt").decode()


def test_presets_are_found_by_name_in_the_clone():
    from tagdit.presets import preset_path

    assert preset_path("demo") == ROOT / "configs" / "demo.yaml"
    assert preset_path("configs/demo.yaml") is None and preset_path("nope") is None
