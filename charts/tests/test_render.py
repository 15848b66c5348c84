"""What the chart renders, through Helm's own engine, for the defaults and every ci/ values file."""

from __future__ import annotations

import json
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

import helm
import helm_sdkpy
import pss
from conftest import CHART_DIR, CI_VALUES, load_yaml

# The Kubernetes minor the operator's client is built against (k8s-openapi feature v1_33).
KUBE_VERSION = "1.33.0"
NAMESPACE = helm.NAMESPACE
SCENARIOS = {"defaults": {}} | {p.stem: load_yaml(p) for p in CI_VALUES}


def _triples(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _grant(group: str, resources: list[str], verbs: list[str]) -> set[tuple[str, str, str]]:
    return {(group, r, v) for r in resources for v in verbs}


# Every API call the operator makes, recorded from the control-plane double's request log by
# operator/tests/rbac.rs (which fails when the operator's calls change and this file is stale). The
# chart must grant exactly these: nothing missing, nothing extra.
_OBSERVED = {
    (c["apiGroup"], c["resource"], c["verb"])
    for c in json.loads((Path(__file__).parent / "rbac-observed.json").read_text())
}
WATCHED_NAMESPACE_GRANTS = {c for c in _OBSERVED if c[0] != "coordination.k8s.io"}
LEASE_GRANTS = {c for c in _OBSERVED if c[0] == "coordination.k8s.io"}

_cache: dict[str, helm.Rendered] = {}


def rendered(scenario: str) -> helm.Rendered:
    if scenario not in _cache:
        _cache[scenario] = helm.render(CHART_DIR, SCENARIOS[scenario])
    return _cache[scenario]


def operator_container(r: helm.Rendered) -> dict:
    (container,) = r.one("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_object_is_valid_kubernetes(scenario: str) -> None:
    r = rendered(scenario)
    assert r.objects, "nothing rendered"
    for obj in r.objects:
        if obj["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # not a built-in kind; checked in test_service_monitor_scrapes_the_metrics_service
        # strict: an unknown or misspelled field anywhere is an error, not silently dropped
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_kubernetes_validation_rejects_a_misspelled_field() -> None:
    deployment = json.loads(json.dumps(rendered("defaults").one("Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContxt"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_every_object_carries_the_standard_labels(scenario: str) -> None:
    for obj in rendered(scenario).objects:
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/name") == "celery-operator", obj["metadata"]["name"]
        assert labels.get("app.kubernetes.io/instance") == helm.RELEASE
        assert labels.get("app.kubernetes.io/managed-by") == "Helm"
        assert labels.get("helm.sh/chart") == "celery-operator-0.1.0"


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_operator_deployment_meets_pod_security_restricted(scenario: str) -> None:
    pod = rendered(scenario).one("Deployment")["spec"]["template"]["spec"]
    assert pss.restricted_violations(pod) == []
    assert operator_container(rendered(scenario))["securityContext"]["readOnlyRootFilesystem"] is True


def test_pss_check_flags_a_privileged_root_pod() -> None:
    pod = {
        "hostNetwork": True,
        "securityContext": {"runAsUser": 0},
        "volumes": [{"name": "root", "hostPath": {"path": "/"}}],
        "containers": [{"name": "c", "securityContext": {"privileged": True, "capabilities": {"add": ["SYS_ADMIN"]}}}],
    }
    problems = "\n".join(pss.restricted_violations(pod))
    for expected in ("hostNetwork", "hostPath", "runAsUser", "privileged", "allowPrivilegeEscalation",
                     "runAsNonRoot", "seccompProfile", "drop must include ALL", "SYS_ADMIN"):
        assert expected in problems


def test_operator_runs_with_the_cli_contract() -> None:
    r = rendered("defaults")
    deployment = r.one("Deployment")
    container = operator_container(r)
    assert deployment["metadata"]["namespace"] == NAMESPACE
    assert deployment["spec"]["replicas"] == 2
    assert container["image"] == "ghcr.io/celery-operator/celery-operator:0.1.0"  # appVersion
    assert container["args"] == ["run", "--metrics-addr=0.0.0.0:8080", f"--lease-name={helm.RELEASE}"]
    env = env_of(container)
    assert "WATCH_NAMESPACES" not in env  # unset: all namespaces
    assert env["LEADER_ELECTION"]["value"] == "true"
    assert env["LOG_FORMAT"]["value"] == "json"
    assert env["RUST_LOG"]["value"] == "info"
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert container["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    assert not container.get("volumeMounts"), "the operator needs no writable filesystem"


def test_pod_selector_matches_pod_labels() -> None:
    deployment = rendered("defaults").one("Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items()
    assert set(selector) == {"app.kubernetes.io/name", "app.kubernetes.io/instance"}  # immutable: keep small


def test_watch_namespaces_reach_the_operator() -> None:
    env = env_of(operator_container(rendered("namespaced-rbac-values")))
    assert env["WATCH_NAMESPACES"]["value"] == "team-a,team-b"


def test_one_replica_without_leader_election() -> None:
    r = rendered("crds-off-values")
    assert r.one("Deployment")["spec"]["replicas"] == 1
    assert env_of(operator_container(r))["LEADER_ELECTION"]["value"] == "false"
    assert not [o for o in r.of_kind("Role") if "leader-election" in o["metadata"]["name"]]


def test_several_replicas_without_leader_election_are_refused() -> None:
    with pytest.raises(helm_sdkpy.InstallError, match="leaderElection"):
        helm.render(CHART_DIR, {"replicaCount": 2, "leaderElection": {"enabled": False}})


def test_image_digest_pins_the_image() -> None:
    image = operator_container(rendered("crds-off-values"))["image"]
    assert image == "ghcr.io/celery-operator/celery-operator:0.1.0@sha256:" + "0" * 64


def test_cluster_wide_rbac_grants_exactly_the_operator_permissions() -> None:
    r = rendered("defaults")
    role = r.one("ClusterRole", helm.RELEASE)
    assert _triples(role["rules"]) == WATCHED_NAMESPACE_GRANTS
    binding = r.one("ClusterRoleBinding", helm.RELEASE)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": helm.RELEASE}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": helm.RELEASE, "namespace": NAMESPACE}]
    assert r.one("ServiceAccount")["metadata"]["name"] == helm.RELEASE
    assert r.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == helm.RELEASE


def test_leader_election_role_is_limited_to_the_release_namespace_and_its_lease() -> None:
    r = rendered("defaults")
    role = r.one("Role", f"{helm.RELEASE}-leader-election")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert _triples(role["rules"]) == LEASE_GRANTS
    for rule in role["rules"]:
        if rule["verbs"] != ["create"]:  # create cannot be limited by name
            assert rule["resourceNames"] == [helm.RELEASE]
    binding = r.one("RoleBinding", f"{helm.RELEASE}-leader-election")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["metadata"]["namespace"] == NAMESPACE


def test_namespaced_rbac_grants_only_the_watched_namespaces() -> None:
    r = rendered("namespaced-rbac-values")
    assert not r.of_kind("ClusterRole") and not r.of_kind("ClusterRoleBinding")
    roles = {o["metadata"]["namespace"]: o for o in r.of_kind("Role") if o["metadata"]["name"] == helm.RELEASE}
    assert set(roles) == {"team-a", "team-b"}
    for role in roles.values():
        assert _triples(role["rules"]) == WATCHED_NAMESPACE_GRANTS
    bindings = {o["metadata"]["namespace"]: o for o in r.of_kind("RoleBinding") if o["metadata"]["name"] == helm.RELEASE}
    assert set(bindings) == {"team-a", "team-b"}
    for binding in bindings.values():
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": helm.RELEASE, "namespace": NAMESPACE}]
    lease_role = r.one("Role", f"{helm.RELEASE}-leader-election")
    assert lease_role["metadata"]["namespace"] == NAMESPACE
    assert {n for rule in lease_role["rules"] for n in rule.get("resourceNames", [])} == {"celery-operator-team-ab"}


def test_user_roles_aggregate_into_admin_edit_view() -> None:
    r = rendered("defaults")
    edit = r.one("ClusterRole", f"{helm.RELEASE}-edit")["metadata"]["labels"]
    view = r.one("ClusterRole", f"{helm.RELEASE}-view")["metadata"]["labels"]
    assert edit["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert edit["rbac.authorization.k8s.io/aggregate-to-admin"] == "true"
    assert view["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    # user roles are aggregated, never bound by the chart
    assert [b["roleRef"]["name"] for b in r.of_kind("ClusterRoleBinding")] == [helm.RELEASE]


def test_metrics_service_selects_the_operator_pods() -> None:
    r = rendered("defaults")
    service = r.one("Service")
    pod_labels = r.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]
    assert not r.of_kind("ServiceMonitor") and not r.of_kind("ConfigMap") and not r.of_kind("NetworkPolicy")


def test_service_monitor_scrapes_the_metrics_service() -> None:
    r = rendered("monitoring-values")
    monitor = r.one("ServiceMonitor")
    service = r.one("Service")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["endpoints"] == [
        {"port": "metrics", "path": "/metrics", "honorLabels": True, "interval": "15s", "scrapeTimeout": "10s"}
    ]


def test_service_monitor_without_the_service_is_refused() -> None:
    with pytest.raises(helm_sdkpy.InstallError, match="metrics.service.enabled"):
        helm.render(CHART_DIR, {"metrics": {"service": {"enabled": False}, "serviceMonitor": {"enabled": True}}})


def test_grafana_dashboard_configmap_holds_the_dashboard() -> None:
    configmap = rendered("monitoring-values").one("ConfigMap")
    assert configmap["metadata"]["namespace"] == "monitoring"
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert configmap["metadata"]["annotations"] == {"grafana_folder": "Celery"}
    shipped = json.loads((CHART_DIR / "files" / "dashboards" / "celery-operator.json").read_text())
    assert json.loads(configmap["data"]["celery-operator.json"]) == shipped


def test_network_policy_admits_only_scrapers_and_listed_egress() -> None:
    r = rendered("monitoring-values")
    policy = r.one("NetworkPolicy")
    pod_labels = r.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    (ingress,) = policy["spec"]["ingress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert ingress["from"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "monitoring"}
    dns, api_server, brokers = policy["spec"]["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert {p["port"] for p in brokers["ports"]} == {6379, 5672, 15672}


def test_pod_disruption_budget_keeps_a_replica_during_drains() -> None:
    r = rendered("defaults")
    pdb = r.one("PodDisruptionBudget")
    assert pdb["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": r.one("Deployment")["spec"]["selector"]["matchLabels"]},
    }
    assert not rendered("crds-off-values").of_kind("PodDisruptionBudget")


def test_crds_can_be_left_out() -> None:
    assert len(rendered("defaults").of_kind("CustomResourceDefinition")) == 2
    assert not rendered("crds-off-values").of_kind("CustomResourceDefinition")


def test_notes_tell_what_was_installed() -> None:
    assert "all namespaces (ClusterRole)" in rendered("defaults").notes
    assert "namespaces team-a, team-b" in rendered("namespaced-rbac-values").notes
    assert "crds.install=false" in rendered("crds-off-values").notes


def test_manifest_documents_are_plain_yaml() -> None:
    # The manifest Helm applies must be parseable by any YAML 1.1 tool (kubectl, Argo CD, Flux).
    for scenario in SCENARIOS:
        docs = [d for d in yaml.safe_load_all(rendered(scenario).manifest) if d is not None]
        assert all(isinstance(d, dict) and d.get("kind") for d in docs)
