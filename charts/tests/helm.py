"""The real Helm engine (helm-sdkpy) driven the two ways it can be without a cluster.

helm-sdkpy 0.1.x exposes Lint, Show, Package, Install, Upgrade and friends, but no `helm template`:
- `lint(chart_dir)` runs Helm's linter on the chart's own values.yaml (the binding passes no values).
  Its messages keep Severity and Path only; the error text serializes as `{}`.
- `render(chart_dir, values)` installs the chart into FakeKube with the given values, which makes Helm
  validate the values against values.schema.json, render every template and return the manifest.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

import helm_sdkpy
from fake_kube import FakeKube

# Helm's lint severities (helm.sh/helm/v4/pkg/chart/v2/lint/support).
SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}

RELEASE = "celery-operator"
NAMESPACE = "celery-system"


@dataclass
class LintMessage:
    severity: str
    path: str

    def __str__(self) -> str:
        return f"[{self.severity}] {self.path}"


def lint(chart_dir: Path) -> list[LintMessage]:
    config = helm_sdkpy.Configuration(namespace=NAMESPACE)
    result = asyncio.run(helm_sdkpy.Lint(config).run(str(chart_dir)))
    return [
        LintMessage(SEVERITY.get(m["Severity"], str(m["Severity"])), m["Path"])
        for m in result.get("Messages") or []
    ]


def lint_with_values(chart_dir: Path, values: dict) -> list[LintMessage]:
    """Lint as `helm lint -f values`: the binding takes no values, so lint a copy whose values.yaml
    is the chart's defaults merged with `values` (Helm's own merge rules: maps merge, the rest replace)."""
    defaults = yaml.safe_load((chart_dir / "values.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / chart_dir.name
        shutil.copytree(chart_dir, copy)
        (copy / "values.yaml").write_text(yaml.safe_dump(merge_values(defaults, values)))
        return lint(copy)


def merge_values(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_values(merged[key], value)
        elif value is None:
            merged.pop(key, None)  # Helm: null deletes a default
        else:
            merged[key] = value
    return merged


@dataclass
class Rendered:
    objects: list[dict]
    manifest: str
    notes: str

    def of_kind(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict:
        found = [o for o in self.of_kind(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
        return found[0]


def render(chart_dir: Path, values: dict | None = None) -> Rendered:
    """Render the chart with `values` through Helm's install action against FakeKube.

    Raises helm_sdkpy.InstallError with Helm's message when schema validation or rendering fails."""
    with FakeKube() as kube:
        config = helm_sdkpy.Configuration(namespace=NAMESPACE, kubeconfig=kube.kubeconfig())
        release = asyncio.run(
            helm_sdkpy.Install(config).run(RELEASE, str(chart_dir), values=values or {}, wait=False)
        )
    manifest = release.get("manifest", "")
    objects = [doc for doc in yaml.safe_load_all(manifest) if doc]
    return Rendered(objects, manifest, release.get("info", {}).get("notes", ""))

