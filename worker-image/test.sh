#!/usr/bin/env bash
# Runs the worker-image tests against real Celery and a private redis-server.
#
#   WORKER_IMAGE_VENV  venv to create or reuse (default: <repo>/target/worker-image-venv)
#   PYTHON             interpreter that creates the venv (default: python3)
#   extra arguments    passed to pytest, e.g. ./test.sh -k warm_shutdown
#
# Needs python3 (3.9+) with the venv module and redis-server on PATH. Exits
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

# Reinstall the pins only when requirements.txt changed.
stamp="$venv/.worker-image-requirements"
if ! cmp -s "$here/requirements.txt" "$stamp"; then
    "${pip[@]}" install -r "$here/requirements.txt" pytest
    cp "$here/requirements.txt" "$stamp"
fi
# Always reinstall the package itself: it is what is under test.
"${pip[@]}" install --no-deps --force-reinstall "$here"

cd "$here"
exec "$venv/bin/python" -m pytest -p no:cacheprovider -ra "$@"
