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
