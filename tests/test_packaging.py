"""The distribution maps the top-level folders under `vla`, and ships the Hydra configs."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER_TO_PACKAGE = {"vla": "vla", "envs": "vla.envs", "policies": "vla.policies",
                     "datasets": "vla.datasets", "configs": "vla.configs"}


def test_every_python_folder_is_a_listed_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for folder, package in FOLDER_TO_PACKAGE.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *rel.parts]))
    assert found <= listed, f"folders with __init__.py missing from pyproject packages: {sorted(found - listed)}"


def test_import_names():
    import vla.configs
    import vla.datasets
    import vla.envs
    import vla.policies

    assert Path(vla.datasets.__file__).parent.name == "datasets"
    assert Path(vla.envs.__file__).parent.name == "envs"
    assert Path(vla.policies.__file__).parent.name == "policies"
    assert (Path(vla.configs.__file__).parent / "train.yaml").exists()


def test_wheel_ships_configs_and_composes(tmp_path):
    """Build the wheel, install it (no deps) into a bare folder, and compose a config from there:
    the Hydra configs must be found from a wheel as well as from the editable checkout."""
    import subprocess
    import sys

    wheel_dir, site = tmp_path / "wheel", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(wheel_dir), str(ROOT)], check=True, capture_output=True, cwd=tmp_path)
    wheel = next(wheel_dir.glob("vla-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, cwd=tmp_path)
    code = ("import vla.configs, vla.config as c; "
            "cfg = c.compose('train', ['dataset.path=x', 'experts=dense', 'planner=off']); "
            "print(vla.configs.__file__); print(cfg.model.experts, cfg.model.planner, cfg.model.d_model)")
    # PYTHONPATH puts the wheel's copy ahead of the editable checkout; the first assert checks it won.
    env = {"PYTHONPATH": str(site) + ":" + ":".join(p for p in sys.path if "site-packages" in p and "vla" not in p)}
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env=env).stdout.splitlines()
    assert out[0].startswith(str(site)), out
    assert out[1].split() == ["dense", "False", "128"], out  # planner=off is stored as a bool
