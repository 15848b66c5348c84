#!/usr/bin/env bash
# Chart tests: helm lint, values schema, rendering, PSS, RBAC and CRD checks (charts/tests/).
# Uses the venv in $CHART_VENV (default: target/chart-venv), creating it when missing.
# Extra arguments go to pytest, e.g. `charts/test.sh -k rbac -x`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${CHART_VENV:-$root/target/chart-venv}"
python="${PYTHON:-python3}"

# helm-sdkpy declares Python >= 3.12 but its lint and install bindings work on 3.11 (this machine's).
packages=("helm-sdkpy>=0.1.32,<0.2" cffi "jsonschema>=4" pyyaml pytest "kubernetes-validate>=1.33" lupa)
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import helm_sdkpy, cffi, jsonschema, yaml, pytest, kubernetes_validate, lupa" 2>/dev/null; then
  "$venv/bin/pip" install --quiet --disable-pip-version-check --ignore-requires-python "${packages[@]}"
fi

cd "$root"
exec "$venv/bin/python" -m pytest -p no:cacheprovider charts/tests "$@"
