#!/usr/bin/env bash
# Runs the worker-image tests against real Celery and a private redis-server.
#
#   WORKER_IMAGE_VENV  venv to create or reuse (default: <repo>/target/worker-image-venv)
#   PYTHON             interpreter that creates the venv (default: python3)
#   extra arguments    passed to pytest, e.g. ./test.sh -k warm_shutdown
#
# Needs python3 (3.10+) with the venv module and redis-server on PATH. Exits
# non-zero when any test fails.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${WORKER_IMAGE_VENV:-$here/../target/worker-image-venv}"
python="${PYTHON:-python3}"

if ! command -v redis-server >/dev/null 2>&1; then
    echo "test.sh: redis-server not found on PATH (Debian: apt-get install redis-server)" >&2
    exit 1
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "test.sh: creating venv $venv"
    "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)

# (Re)install only when the pins or the package metadata changed. The package
# is installed in editable mode, so later runs test the current sources with no
# network access at all.
stamp="$venv/.worker-image-stamp"
wanted="$(cat "$here/requirements.txt" "$here/pyproject.toml")"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    "${pip[@]}" install -r "$here/requirements.txt" pytest
    "${pip[@]}" install --no-deps --editable "$here"
    printf '%s' "$wanted" > "$stamp"
fi

cd "$here"
exec "$venv/bin/python" -m pytest -p no:cacheprovider -ra "$@"
