#!/usr/bin/env bash
# Creates .venv in the repository root (if missing) and installs vla with its dependencies.
# CPU torch comes from `torch==2.13.0` (a plain `torch` would pull a multi-GB CUDA build here).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }; }
python -c "import torch" 2>/dev/null || quiet pip install -q torch==2.13.0
quiet pip install -q -e ".[dev]"
# The real openpi client, for tests/test_openpi.py (vla serve protocol=openpi). Not in the dev extra:
# openpi-client 0.1.2 pins numpy<2: as a dependency pip would downgrade the whole venv to numpy 1.26
# (and pull dm-tree), so every test would run on a numpy we do not ship with. The modules we use
# (websocket_client_policy, msgpack_numpy) need only websockets, msgpack, numpy and typing_extensions,
# which we have, so it goes in without its dependencies.
python -c "import openpi_client" 2>/dev/null || quiet pip install -q --no-deps "openpi-client==0.1.2"
python -c "import vla, torch, mujoco, metaworld, zarr" || { echo "setup: import check failed" >&2; exit 1; }
