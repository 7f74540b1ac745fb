"""The offline bundle (scripts/offline_bundle.sh) and `scripts/setup.sh --offline DIR`: arguments,
requirement lists and error messages. Nothing here downloads; the whole round trip (bundle, then an
install with the network blocked) is a manual step, written up in the README."""

import importlib.util
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLE_SH = ROOT / "scripts" / "offline_bundle.sh"


def load_bundle_module():
    spec = importlib.util.spec_from_file_location("offline_bundle", ROOT / "scripts" / "offline_bundle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bundle(*args, cwd=ROOT):
    return subprocess.run(["bash", str(BUNDLE_SH), *map(str, args)], capture_output=True, text=True, cwd=cwd)


def run_setup(tmp_path, *args):
    """setup.sh from a copy in tmp_path, so that a check that failed to stop it could only touch tmp_path."""
    (tmp_path / "scripts").mkdir(exist_ok=True)
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    result = subprocess.run(["bash", str(tmp_path / "scripts" / "setup.sh"), *map(str, args)], capture_output=True,
                            text=True, cwd=tmp_path)
    assert not (tmp_path / ".venv").exists(), "setup.sh created .venv before refusing its arguments"
    return result


def fake_bundle(folder: Path, python: str, vla_wheels=("vla-0.1.0-py3-none-any.whl",)) -> Path:
    folder.mkdir()
    (folder / "MANIFEST.txt").write_text(f"# vla offline bundle\npython: {python}\ndev extras: not included\n")
    for name in vla_wheels:
        (folder / name).write_bytes(b"")
    return folder


def test_requirements_follow_pyproject():
    bundle = load_bundle_module()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = [r for r in project["dependencies"] if not r.startswith("torch")]
    torch_range = [r for r in project["dependencies"] if r.startswith("torch")]
    pyproject = ROOT / "pyproject.toml"

    assert bundle.bundle_requirements(pyproject, False, bundle.TORCH_PIN, False) == runtime
    assert bundle.bundle_requirements(pyproject, True, "torch==2.9.0", False) == runtime + torch_range + [
        "torch==2.9.0"]
    assert bundle.bundle_requirements(pyproject, False, bundle.TORCH_PIN, True) == (
        runtime + project["optional-dependencies"]["dev"])


def test_torch_pin_is_the_one_setup_installs():
    pins = set(re.findall(r"torch==[0-9.]+", (ROOT / "scripts" / "setup.sh").read_text()))
    assert pins == {load_bundle_module().TORCH_PIN}


def test_project_names_are_normalized():
    bundle = load_bundle_module()
    assert bundle.project_name("opencv-python-headless>=4.8") == "opencv-python-headless"
    assert bundle.project_name("Antlr4_Python3.Runtime==4.9.*") == "antlr4-python3-runtime"
    assert bundle.wheel_project("antlr4_python3_runtime-4.9.3-py3-none-any.whl") == "antlr4-python3-runtime"
    assert bundle.wheel_project("torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl") == "torch"


TOP_LEVEL_MISSING = """Collecting mujoco==3.3.0
ERROR: Could not find a version that satisfies the requirement mujoco==3.3.0 (from versions: 3.3.1)
ERROR: No matching distribution found for mujoco==3.3.0
"""
TRANSITIVE_MISSING = """ERROR: Cannot install hydra-core==1.3.7 and hydra-core==1.3.8 because these package versions have conflicting dependencies.

The conflict is caused by:
    hydra-core 1.3.8 depends on antlr4-python3-runtime==4.9.*
    hydra-core 1.3.7 depends on antlr4-python3-runtime==4.9.*

To fix this you could try to:
"""  # noqa: E501  (pip's own line)
PARENTS_DISAGREE = """The conflict is caused by:
    a 1.0 depends on x<2
    b 1.0 depends on x>=2
"""
TORCH_PULLED_IN = """The conflict is caused by:
    somepkg 1.0 depends on torch
    The user requested (constraint) torch<0
"""


def test_missing_requirement_is_read_from_pip_output():
    bundle = load_bundle_module()
    assert bundle.missing_requirement(TOP_LEVEL_MISSING) == "mujoco==3.3.0"
    assert bundle.missing_requirement(TRANSITIVE_MISSING) == "antlr4-python3-runtime==4.9.*"
    assert bundle.missing_requirement(PARENTS_DISAGREE) is None
    assert bundle.missing_requirement(TORCH_PULLED_IN) is None
    assert bundle.missing_requirement("ERROR: HTTP error 503 while getting https://...") is None


def test_messages_name_package_python_and_tags():
    bundle = load_bundle_module()
    message = bundle.no_wheel_message("mujoco==3.3.0", "3.12", ["manylinux_2_28_x86_64"])
    assert "no wheel of mujoco==3.3.0 for Python 3.12 with platform tags [manylinux_2_28_x86_64]" in message
    assert "--platform manylinux_2_17_x86_64" in message and "pypi.org/project/mujoco/" in message
    assert "--with-torch" in bundle.torch_required_message(TORCH_PULLED_IN)
    assert bundle.torch_required_message(TRANSITIVE_MISSING) is None


@pytest.mark.parametrize("args, error", [
    ([], "the following arguments are required: DIR"),
    (["out", "--python", "3"], "--python expects a version like 3.12, got '3'"),
    (["out", "--platform", "many linux"], "--platform expects a tag like manylinux_2_28_x86_64, got 'many linux'"),
    (["out", "--torch-spec", "torch==2.13.0"], "--torch-spec only applies with --with-torch"),
    (["out", "--with-torch", "--torch-spec", "numpy"], "--torch-spec expects a torch requirement"),
    (["out", "--with-cuda"], "unrecognized arguments: --with-cuda"),
])
def test_bundle_refuses_bad_arguments(tmp_path, args, error):
    result = run_bundle(*args, cwd=tmp_path)
    assert result.returncode == 2, result
    assert error in result.stderr
    assert not (tmp_path / "out").exists()


def test_bundle_refuses_a_folder_that_is_no_bundle(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = run_bundle(tmp_path)
    assert result.returncode == 1
    assert f"{tmp_path} is not empty and holds no MANIFEST.txt" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("")
    assert "exists and is not a folder" in run_bundle(tmp_path / "file").stderr


def test_bundle_dry_run_lists_requirements_and_downloads_nothing(tmp_path):
    result = run_bundle(tmp_path / "out", "--dry-run", "--platform", "manylinux_2_28_x86_64")
    assert result.returncode == 0, result.stderr
    listed = result.stdout.split("pip:")[0].split()[1:]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert listed == [r for r in project["dependencies"] if not r.startswith("torch")]
    assert "--only-binary=:all:" in result.stdout and "--platform manylinux_2_28_x86_64" in result.stdout
    assert not (tmp_path / "out").exists()


def test_setup_offline_refuses_a_missing_folder(tmp_path):
    result = run_setup(tmp_path, "--offline", tmp_path / "nowhere")
    assert result.returncode == 1
    assert f"bundle folder '{tmp_path / 'nowhere'}' does not exist" in result.stderr
    assert "offline_bundle.sh" in result.stderr


@pytest.mark.parametrize("args", [["--offline"], ["--ofline", "x"], ["--offline", "a", "b"]])
def test_setup_refuses_other_arguments(tmp_path, args):
    result = run_setup(tmp_path, *args)
    assert result.returncode == 2
    assert "usage: bash scripts/setup.sh" in result.stderr and "unexpected arguments" in result.stderr


def test_setup_offline_refuses_an_unfinished_or_foreign_bundle(tmp_path):
    (tmp_path / "partial").mkdir()
    result = run_setup(tmp_path, "--offline", tmp_path / "partial")
    assert result.returncode == 1 and "has no MANIFEST.txt: not a finished bundle" in result.stderr

    fake_bundle(tmp_path / "novla", "3.11", vla_wheels=())
    result = run_setup(tmp_path, "--offline", tmp_path / "novla")
    assert result.returncode == 1 and "expected exactly one vla-*.whl" in result.stderr

    fake_bundle(tmp_path / "old", "2.7")
    result = run_setup(tmp_path, "--offline", tmp_path / "old")
    assert result.returncode == 1
    assert "is for Python '2.7', but python3 here is 3." in result.stderr
    assert "--python 3." in result.stderr
