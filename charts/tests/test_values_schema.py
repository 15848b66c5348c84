"""values.schema.json documents and guards every value: defaults and CI values pass, typos fail."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

import helm
import helm_sdkpy
from conftest import BAD_VALUES, CI_VALUES, load_yaml


@pytest.fixture(scope="module")
def schema(chart_dir: Path) -> dict:
    return json.loads((chart_dir / "values.schema.json").read_text())


def _errors(schema: dict, values: dict) -> list[jsonschema.ValidationError]:
    return list(jsonschema.Draft7Validator(schema).iter_errors(values))


def _walk_schema(node: dict, path: str = ""):
    yield path, node
    for key, child in (node.get("properties") or {}).items():
        yield from _walk_schema(child, f"{path}.{key}" if path else key)


def test_schema_is_valid_draft_07(schema: dict) -> None:
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)


def test_every_value_is_documented(schema: dict) -> None:
    undocumented = [path for path, node in _walk_schema(schema) if path and not node.get("description")]
    assert not undocumented, f"schema properties without a description: {undocumented}"


def test_chart_owned_objects_reject_unknown_keys(schema: dict) -> None:
    # Objects with declared properties belong to the chart; Kubernetes pass-through types have none.
    open_objects = [
        path or "<root>"
        for path, node in _walk_schema(schema)
        if node.get("properties") and node.get("additionalProperties") is not False
    ]
    assert not open_objects, f"objects accepting unknown keys: {open_objects}"


def test_schema_and_values_yaml_declare_the_same_keys(schema: dict, default_values: dict) -> None:
    def keys(values: dict, node: dict, prefix: str = "") -> set[str]:
        found = set()
        for key, value in values.items():
            path = f"{prefix}{key}"
            found.add(path)
            child = (node.get("properties") or {}).get(key, {})
            if isinstance(value, dict) and child.get("properties"):
                found |= keys(value, child, path + ".")
        return found

    in_values = keys(default_values, schema)
    in_schema = {p for p, n in _walk_schema(schema) if p and p != "global"}
    # every default has a schema entry (additionalProperties would reject it otherwise) ...
    assert in_values <= in_schema
    # ... and every documented value has a default in values.yaml, so `helm show values` shows it.
    assert in_schema - in_values == set(), f"schema keys missing from values.yaml: {in_schema - in_values}"


def test_default_values_are_valid(schema: dict, default_values: dict) -> None:
    assert not _errors(schema, default_values)


@pytest.mark.parametrize("values_file", CI_VALUES, ids=lambda p: p.name)
def test_ci_values_are_valid(schema: dict, default_values: dict, values_file: Path) -> None:
    # Helm validates the defaults merged with the user's file, never the file alone.
    assert not _errors(schema, helm.merge_values(default_values, load_yaml(values_file)))


def _expected_path(values_file: Path) -> str:
    first = values_file.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{values_file.name} must start with '# expect: <key>'"
    return first.removeprefix("# expect: ").strip()


@pytest.mark.parametrize("values_file", BAD_VALUES, ids=lambda p: p.name)
def test_bad_values_are_rejected_by_the_schema(
    schema: dict, default_values: dict, values_file: Path
) -> None:
    errors = _errors(schema, helm.merge_values(default_values, load_yaml(values_file)))
    assert errors, f"{values_file.name} was accepted"
    expected = _expected_path(values_file)
    where = [" ".join(map(str, e.absolute_path)) + " " + e.message for e in errors]
    assert any(expected in w for w in where), f"expected an error about {expected!r}, got {where}"


@pytest.mark.parametrize("values_file", BAD_VALUES, ids=lambda p: p.name)
def test_bad_values_are_rejected_by_helm(chart_dir: Path, values_file: Path) -> None:
    # Helm validates values against the same schema before rendering: `helm install -f bad.yaml` fails.
    with pytest.raises(helm_sdkpy.InstallError) as failure:
        helm.render(chart_dir, yaml.safe_load(values_file.read_text()))
    assert "schema" in str(failure.value).lower(), str(failure.value)
    assert _expected_path(values_file) in str(failure.value), str(failure.value)


def test_readme_documents_every_value(schema: dict, chart_dir: Path) -> None:
    readme = (chart_dir / "README.md").read_text()
    leaves = [p for p, n in _walk_schema(schema) if p and p != "global" and not n.get("properties")]
    missing = [p for p in leaves if f"| `{p}` |" not in readme]
    assert not missing, f"README values table lacks {missing}"
