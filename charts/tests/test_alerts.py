"""The chart's alerts: the rule file passes `promtool check rules`, its unit tests
(alerts.test.yaml) pass with `promtool test rules` against the file and against the PrometheusRule
Helm renders, and the PrometheusRule values do what they say. operator/tests/monitoring.rs runs
every expression against a live operator."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import helm
import helm_sdkpy
from conftest import CHART_DIR, TESTS_DIR, load_yaml

RULE_FILE = CHART_DIR / "files" / "alerts" / "celery-operator.rules.yaml"
UNIT_TESTS = TESTS_DIR / "alerts.test.yaml"
RULES = load_yaml(RULE_FILE)
ALERTS = [rule for group in RULES["groups"] for rule in group["rules"]]
ENABLED = {"metrics": {"prometheusRule": {"enabled": True}}}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not on PATH (Debian: apt-get install prometheus; .ci/run installs it)")
    return path


def _promtool(promtool: str, *args: str) -> str:
    result = subprocess.run([promtool, *args], capture_output=True, text=True)
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _rendered_groups(values: dict) -> list[dict]:
    return helm.render(CHART_DIR, values).one("PrometheusRule")["spec"]["groups"]


def test_rule_file_passes_promtool_check(promtool: str) -> None:
    out = _promtool(promtool, "check", "rules", str(RULE_FILE))
    assert f"SUCCESS: {len(ALERTS)} rules found" in out


def test_unit_tests_pass_on_the_rule_file(promtool: str) -> None:
    _promtool(promtool, "test", "rules", str(UNIT_TESTS))


def test_unit_tests_pass_on_the_rendered_prometheus_rule(promtool: str, tmp_path: Path) -> None:
    # What users install is the PrometheusRule Helm renders, not the file.
    rules = tmp_path / "rendered.rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": _rendered_groups(ENABLED)}, sort_keys=False))
    tests = load_yaml(UNIT_TESTS)
    tests["rule_files"] = [str(rules)]
    (tmp_path / "alerts.test.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    _promtool(promtool, "test", "rules", str(tmp_path / "alerts.test.yaml"))


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    tested = {}
    for case in load_yaml(UNIT_TESTS)["tests"]:
        for check in case["alert_rule_test"]:
            tested.setdefault(check["alertname"], set()).add(bool(check["exp_alerts"]))
    for alert in ALERTS:
        assert tested.get(alert["alert"]) == {True, False}, f"{alert['alert']}: test both a firing and a quiet case"


def test_every_alert_says_what_and_where_to_look() -> None:
    readme = (CHART_DIR / "README.md").read_text()
    anchors = {re.sub(r"[^a-z0-9-]", "", h.strip().lower().replace(" ", "-")) for h in re.findall(r"(?m)^#+ (.+)$", readme)}
    for alert in ALERTS:
        name = alert["alert"]
        assert re.fullmatch(r"Celery[A-Za-z]+", name)
        assert alert["labels"]["severity"] in {"warning", "critical"}, name
        assert alert.get("for"), f"{name} fires on a single evaluation"
        annotations = alert["annotations"]
        assert annotations["summary"] and annotations["description"], name
        url = annotations["runbook_url"]
        assert url.endswith("charts/celery-operator/README.md#" + name.lower()), url
        assert name.lower() in anchors, f"README.md has no '{name}' section for the runbook link"


def test_prometheus_rule_is_off_by_default() -> None:
    assert not helm.render(CHART_DIR, {}).of_kind("PrometheusRule")


def test_prometheus_rule_embeds_the_rule_file() -> None:
    rule = helm.render(CHART_DIR, ENABLED).one("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == helm.NAMESPACE
    assert rule["spec"]["groups"] == RULES["groups"]


def test_rule_labels_reach_every_alert_and_the_alerts_severity_wins() -> None:
    values = load_yaml(CHART_DIR / "ci" / "monitoring-values.yaml")
    rule = helm.render(CHART_DIR, values).one("PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    expected = copy.deepcopy(RULES["groups"])
    for group in expected:
        for alert in group["rules"]:
            alert["labels"] = {"team": "platform", **alert["labels"]}
    assert rule["spec"]["groups"] == expected


def test_disabled_alerts_are_left_out() -> None:
    values = {"metrics": {"prometheusRule": {"enabled": True, "disabledAlerts": ["CeleryQueueBacklogGrowing"]}}}
    names = [r["alert"] for g in _rendered_groups(values) for r in g["rules"]]
    assert names == [a["alert"] for a in ALERTS if a["alert"] != "CeleryQueueBacklogGrowing"]


def test_disabling_an_unknown_alert_is_refused() -> None:
    values = {"metrics": {"prometheusRule": {"enabled": True, "disabledAlerts": ["CeleryBacklogGrowing"]}}}
    with pytest.raises(helm_sdkpy.InstallError, match='"CeleryBacklogGrowing" is not one of the chart.s alerts'):
        helm.render(CHART_DIR, values)
