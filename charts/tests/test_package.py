"""`helm package` (real Helm) ships what the templates read and leaves test-only files out."""

from __future__ import annotations

import asyncio
import tarfile
from pathlib import Path

import helm_sdkpy

import helm


def test_packaged_chart_carries_crds_and_dashboard(chart_dir: Path, tmp_path: Path) -> None:
    config = helm_sdkpy.Configuration(namespace=helm.NAMESPACE)
    archive = Path(asyncio.run(helm_sdkpy.Package(config).run(str(chart_dir), dest_dir=str(tmp_path))))
    assert archive.name == "celery-operator-0.1.0.tgz"
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    for needed in (
        "celery-operator/files/crds/taskqueues.yaml",
        "celery-operator/files/crds/workerpools.yaml",
        "celery-operator/files/dashboards/celery-operator.json",
        "celery-operator/values.schema.json",
        "celery-operator/README.md",
    ):
        assert needed in names
    assert not [n for n in names if n.startswith("celery-operator/ci/")], "ci/ values are for tests only"
