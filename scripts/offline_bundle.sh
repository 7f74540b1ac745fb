#!/usr/bin/env bash
# Downloads the wheels of vla and of its dependencies into one folder, for `scripts/setup.sh --offline DIR`
# on a machine without network. Usage and options: `bash scripts/offline_bundle.sh --help`;
# the work is done by scripts/offline_bundle.py (PYTHON picks the interpreter, default python3 >= 3.11).
set -euo pipefail
exec "${PYTHON:-python3}" "$(dirname "$0")/offline_bundle.py" "$@"
