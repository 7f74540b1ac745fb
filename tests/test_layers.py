"""Import direction: the core of `vla/` never imports an application, and `envs`/`datasets` never
import `policies`. Every import statement counts, including those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder in the repository -> the package it installs as (pyproject's package-dir)
PACKAGES = {"vla": "vla", "envs": "vla.envs", "policies": "vla.policies", "datasets": "vla.datasets"}
CORE = ["__init__", "attention", "checkpoint", "flops", "flow", "model", "model_config", "normalize", "observation",
        "processor", "tokenizer", "text_encoder"]
APPLICATIONS = ["vla.training", "vla.evaluation", "vla.serving", "vla.commands", "vla.bench", "vla.cli",
                "vla.config", "vla.__main__"]


def imported_modules(source: str, package: str) -> set[str]:
    """Every module ``source`` imports (absolute names; relative imports resolved against ``package``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def package_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    return ".".join([PACKAGES[rel.parts[0]], *rel.parts[1:-1]])  # the folder, for modules and __init__ alike


def offending(path: Path, forbidden: list[str]) -> list[str]:
    found = imported_modules(path.read_text(), package_of(path))
    return sorted(n for n in found for f in forbidden if n == f or n.startswith(f + "."))


def core_files() -> list[Path]:
    return [ROOT / "vla" / f"{name}.py" for name in CORE if (ROOT / "vla" / f"{name}.py").exists()]


def test_the_core_list_names_every_top_level_module_of_vla():
    top = {p.stem for p in (ROOT / "vla").glob("*.py")}
    assert top - set(CORE) <= {"cli", "config", "__main__"}, "a new top-level module: core or application?"


@pytest.mark.parametrize("path", core_files(), ids=lambda p: p.name)
def test_core_imports_no_application_and_no_policy(path):
    assert offending(path, [*APPLICATIONS, "vla.policies"]) == []


@pytest.mark.parametrize("folder", ["envs", "datasets"])
def test_envs_and_datasets_import_no_policy_and_no_application(folder):
    bad = {str(p.relative_to(ROOT)): offending(p, ["vla.policies", *APPLICATIONS])
           for p in sorted((ROOT / folder).rglob("*.py"))}
    assert {k: v for k, v in bad.items() if v} == {}


def test_the_check_sees_imports_inside_functions_and_relative_ones():
    src = "def f():\n    from vla.policies import ExpertPolicy\n    from ..training import loop\n    import vla.bench\n"
    found = imported_modules(src, "vla.envs")
    assert {"vla.policies", "vla.policies.ExpertPolicy", "vla.training", "vla.training.loop", "vla.bench"} <= found
    assert package_of(ROOT / "envs" / "tabletop" / "env.py") == "vla.envs.tabletop"
    assert package_of(ROOT / "envs" / "__init__.py") == "vla.envs"
