#!/usr/bin/env bash
# Copy the generated CRDs (crds/*.yaml, written by `celery-operator crd --out-dir crds`) into the chart,
# which can only read files inside its own directory. charts/tests/test_crds.py fails until they match.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
src="$root/crds"
dst="$root/charts/celery-operator/files/crds"
shopt -s nullglob
generated=("$src"/*.yaml)
if [ ${#generated[@]} -eq 0 ]; then
  echo "no CRDs in $src: run 'cargo run -p celery-operator -- crd --out-dir crds' first" >&2
  exit 1
fi
rm -f "$dst"/*.yaml
cp "${generated[@]}" "$dst/"
echo "copied ${#generated[@]} CRD file(s) into ${dst#"$root"/}"
