"""helm lint, by the real Helm engine, must be clean: any WARNING or ERROR fails."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import helm
from conftest import CI_VALUES, load_yaml

FAILING = {"WARNING", "ERROR", "UNKNOWN"}


def _failures(messages: list[helm.LintMessage]) -> list[str]:
    return [str(m) for m in messages if m.severity in FAILING]


def test_lint_is_clean_with_default_values(chart_dir: Path) -> None:
    messages = helm.lint(chart_dir)
    assert not _failures(messages), f"helm lint (error text is not exposed by helm-sdkpy): {_failures(messages)}"


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.name)
def test_lint_is_clean_with_ci_values(chart_dir: Path, values_file: Path) -> None:
    messages = helm.lint_with_values(chart_dir, load_yaml(values_file))
    assert not _failures(messages), f"helm lint -f {values_file.name}: {_failures(messages)}"


def test_lint_reports_a_broken_template_by_path(chart_dir: Path, tmp_path: Path) -> None:
    # Guards the guard: lint through helm-sdkpy must still see template errors and say where.
    copy = tmp_path / chart_dir.name
    shutil.copytree(chart_dir, copy)
    (copy / "templates" / "service.yaml").write_text("{{ .Values.metrics.port | nosuchfunction }}\n")
    messages = helm.lint(copy)
    # Helm names the template directory, not the file, for a template that fails to parse.
    assert any(m.severity == "ERROR" and m.path.startswith("templates/") for m in messages), messages
