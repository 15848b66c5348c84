"""The chart's CRDs are the generated ones: same files, rendered unchanged but for Helm metadata."""

from __future__ import annotations

import re

import yaml

import helm
from conftest import CHART_DIR, REPO_ROOT

GENERATED = REPO_ROOT / "crds"
IN_CHART = CHART_DIR / "files" / "crds"
EXPECTED_FILES = {"taskqueues.yaml", "workerpools.yaml"}
HOW_TO_FIX = (
    "regenerate with `cargo run -p celery-operator -- crd --out-dir crds`, then run charts/sync-crds.sh"
)
KEEP = {"helm.sh/resource-policy": "keep"}


def _documents(text: str) -> list[str]:
    """YAML documents that hold an object (the generator's comment header is not one)."""
    return [d for d in re.split(r"(?m)^---[ \t]*\n", text) if re.search(r"(?m)^kind:", d)]


def _rendered_crds() -> list[str]:
    manifest = helm.render(CHART_DIR).manifest
    chunks = manifest.split("---\n# Source: celery-operator/templates/crds.yaml\n")[1:]
    return [re.split(r"(?m)^---\n# Source: ", chunk)[0] for chunk in chunks]


def test_chart_crds_are_copies_of_generated_crds() -> None:
    generated = {p.name for p in GENERATED.glob("*.yaml")}
    assert generated == EXPECTED_FILES, f"crds/ holds {sorted(generated)}, expected {sorted(EXPECTED_FILES)}: {HOW_TO_FIX}"
    in_chart = {p.name for p in IN_CHART.glob("*.yaml")}
    assert in_chart == generated, f"chart has {sorted(in_chart)}, crds/ has {sorted(generated)}: {HOW_TO_FIX}"
    for name in sorted(generated):
        assert (IN_CHART / name).read_bytes() == (GENERATED / name).read_bytes(), (
            f"charts/celery-operator/files/crds/{name} differs from crds/{name}: {HOW_TO_FIX}"
        )


def test_chart_crds_define_the_api() -> None:
    kinds = {}
    for path in IN_CHART.glob("*.yaml"):
        (crd,) = [yaml.safe_load(d) for d in _documents(path.read_text())]
        assert crd["kind"] == "CustomResourceDefinition"
        assert crd["spec"]["group"] == "celery-operator.dev"
        assert crd["spec"]["scope"] == "Namespaced"
        assert "v1alpha1" in [v["name"] for v in crd["spec"]["versions"] if v["served"]]
        for version in crd["spec"]["versions"]:
            assert "status" in version.get("subresources", {}), f"{path.name} {version['name']}: no status subresource"
        kinds[crd["spec"]["names"]["kind"]] = crd["metadata"]["name"]
    assert kinds == {"TaskQueue": "taskqueues.celery-operator.dev", "WorkerPool": "workerpools.celery-operator.dev"}


def test_rendered_crds_are_the_chart_files_plus_keep_annotation_and_labels() -> None:
    expected = {}
    for path in IN_CHART.glob("*.yaml"):
        for doc in _documents(path.read_text()):
            crd = yaml.safe_load(doc)
            expected[crd["metadata"]["name"]] = crd
    rendered = {}
    for text in _rendered_crds():
        crd = yaml.safe_load(text)
        annotations = crd["metadata"].pop("annotations")
        labels = crd["metadata"].pop("labels")
        assert annotations == KEEP, "CRDs must survive `helm uninstall`"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        rendered[crd["metadata"]["name"]] = crd
    assert rendered == expected


def test_rendered_crds_keep_the_generated_text() -> None:
    # Beyond equal data: no key reordering, no number reformatting. Removing the spliced-in lines must
    # give back each generated document exactly.
    files = sorted(d.strip() for p in IN_CHART.glob("*.yaml") for d in _documents(p.read_text()))
    rendered = []
    for text in _rendered_crds():
        lines = text.splitlines()
        start = lines.index("metadata:") + 1
        end = next(i for i in range(start, len(lines)) if re.match(r"^\s+name:", lines[i]))
        assert "helm.sh/resource-policy: keep" in "\n".join(lines[start:end])
        rendered.append("\n".join(lines[:start] + lines[end:]).strip())
    assert sorted(rendered) == files


def test_crds_fit_the_client_side_apply_annotation() -> None:
    # kubectl apply and Argo CD (without ServerSideApply=true) store the whole object as JSON in the
    # last-applied-configuration annotation, which the API server caps at 256 KiB in total.
    import json

    for path in IN_CHART.glob("*.yaml"):
        for doc in _documents(path.read_text()):
            size = len(json.dumps(yaml.safe_load(doc), separators=(",", ":")))
            assert size < 262144, f"{path.name}: {size} bytes of JSON; only server-side apply can install it"
