#!/usr/bin/env bash
# The GPU numbers in one command (see scripts/device_check.py). Run from the repository root on
# the lent GPU machine, with the wheels scripts/device_wheels.sh put in .device/wheels carried:
#   bash scripts/device_check.sh            # everything under $OUT (else ./device-check)
#   bash scripts/device_check.sh --cpu      # the same steps at tiny sizes on this CPU (CI runs it)
# The image's Python holds torch, triton and transformers; the check installs cir into it.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-/opt/torch/.venv/bin/python3}
[ -x "$PY" ] || PY=$(command -v python3)
exec "$PY" scripts/device_check.py "$@"
