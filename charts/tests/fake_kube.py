"""A minimal stand-in for a Kubernetes API server, just enough for Helm's install action.

helm-sdkpy exposes no `helm template`; its Install is the only entry point that renders a chart with
given values. Install needs an API server for discovery and for creating the rendered objects. This
server answers discovery for the kinds the chart uses, says 404 to every GET (nothing exists yet), and
accepts every create, so Helm renders and "applies" the chart and returns the release manifest. Release
storage stays in Helm's in-memory driver (HELM_DRIVER=memory), so nothing here stores state.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# (group, version, kind, plural, namespaced) for every kind the chart can render, plus the kinds the
# operator itself touches (harmless, and keeps `.Capabilities.APIVersions` realistic).
RESOURCES = [
    ("", "v1", "Namespace", "namespaces", False),
    ("", "v1", "ConfigMap", "configmaps", True),
    ("", "v1", "Secret", "secrets", True),
    ("", "v1", "Service", "services", True),
    ("", "v1", "ServiceAccount", "serviceaccounts", True),
    ("", "v1", "Pod", "pods", True),
    ("", "v1", "Event", "events", True),
    ("apps", "v1", "Deployment", "deployments", True),
    ("rbac.authorization.k8s.io", "v1", "ClusterRole", "clusterroles", False),
    ("rbac.authorization.k8s.io", "v1", "ClusterRoleBinding", "clusterrolebindings", False),
    ("rbac.authorization.k8s.io", "v1", "Role", "roles", True),
    ("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings", True),
    ("policy", "v1", "PodDisruptionBudget", "poddisruptionbudgets", True),
    ("networking.k8s.io", "v1", "NetworkPolicy", "networkpolicies", True),
    ("coordination.k8s.io", "v1", "Lease", "leases", True),
    ("events.k8s.io", "v1", "Event", "events", True),
    ("apiextensions.k8s.io", "v1", "CustomResourceDefinition", "customresourcedefinitions", False),
    ("monitoring.coreos.com", "v1", "ServiceMonitor", "servicemonitors", True),
    ("monitoring.coreos.com", "v1", "PrometheusRule", "prometheusrules", True),
]

KUBE_VERSION = {"major": "1", "minor": "33", "gitVersion": "v1.33.0", "platform": "linux/amd64"}


def _resource_list(group: str, version: str) -> dict:
    group_version = f"{group}/{version}" if group else version
    resources = [
        {
            "name": plural,
            "singularName": kind.lower(),
            "namespaced": namespaced,
            "kind": kind,
            "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
        }
        for g, v, kind, plural, namespaced in RESOURCES
        if (g, v) == (group, version)
    ]
    return {"kind": "APIResourceList", "groupVersion": group_version, "resources": resources}


def _group_list() -> dict:
    groups: dict[str, list[str]] = {}
    for group, version, *_ in RESOURCES:
        if group and version not in groups.setdefault(group, []):
            groups[group].append(version)
    return {
        "kind": "APIGroupList",
        "apiVersion": "v1",
        "groups": [
            {
                "name": name,
                "versions": [{"groupVersion": f"{name}/{v}", "version": v} for v in versions],
                "preferredVersion": {"groupVersion": f"{name}/{versions[0]}", "version": versions[0]},
            }
            for name, versions in groups.items()
        ],
    }


_GROUP_VERSION_PATH = re.compile(r"^/apis/([^/]+)/([^/]+)$")
# /api/v1[/namespaces/<ns>]/<plural>[/<name>] and /apis/<group>/<version>[/namespaces/<ns>]/<plural>[/<name>]
_OBJECT_PATH = re.compile(
    r"^/(?:api/(?P<cv>v1)|apis/(?P<g>[^/]+)/(?P<v>[^/]+))(?:/namespaces/[^/]+)?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?$"
)


def _kind_of(path: str) -> tuple[str, str, bool] | None:
    """(apiVersion, kind, is_collection) for an object or collection path, None otherwise."""
    m = _OBJECT_PATH.match(path)
    if not m:
        return None
    group, version = (m["g"], m["v"]) if m["g"] else ("", m["cv"])
    for g, v, kind, plural, _ in RESOURCES:
        if (g, v, plural) == (group, version, m["plural"]):
            return (f"{g}/{v}" if g else v), kind, m["name"] is None
    return None


class _Handler(BaseHTTPRequestHandler):
    server: "FakeKube"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _not_found(self) -> None:
        self._send(
            404,
            {"kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "NotFound", "code": 404},
        )

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        path = self.path.split("?", 1)[0]
        self.server.record("GET", path, None)
        if path == "/version":
            self._send(200, KUBE_VERSION)
        elif path == "/api":
            self._send(200, {"kind": "APIVersions", "versions": ["v1"]})
        elif path == "/api/v1":
            self._send(200, _resource_list("", "v1"))
        elif path == "/apis":
            self._send(200, _group_list())
        elif m := _GROUP_VERSION_PATH.match(path):
            listing = _resource_list(m.group(1), m.group(2))
            self._send(200, listing) if listing["resources"] else self._not_found()
        elif (found := _kind_of(path)) and found[2]:
            api_version, kind, _ = found
            self._send(200, {"apiVersion": api_version, "kind": f"{kind}List", "metadata": {}, "items": []})
        else:
            self._not_found()  # nothing exists yet

    def _write(self, code: int) -> None:
        path = self.path.split("?", 1)[0]
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        is_json = "json" in self.headers.get("Content-Type", "")
        # Helm's release storage speaks protobuf for Secrets; the chart's own objects arrive as JSON.
        body = json.loads(raw) if is_json and raw else None
        self.server.record(self.command, path, body)
        if body is None:
            found = _kind_of(path)
            api_version, kind = (found[0], found[1]) if found else ("v1", "Status")
            body = {"apiVersion": api_version, "kind": kind, "metadata": {"name": "opaque"}}
        meta = body.setdefault("metadata", {})
        meta.setdefault("uid", f"uid-{len(self.server.requests)}")
        meta.setdefault("resourceVersion", "1")
        meta.setdefault("creationTimestamp", "2026-11-21T00:00:00Z")
        self._send(code, body)

    def do_POST(self) -> None:  # noqa: N802
        self._write(201)

    def do_PUT(self) -> None:  # noqa: N802
        self._write(200)

    def do_PATCH(self) -> None:  # noqa: N802
        self._write(200)


class FakeKube(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[tuple[str, str, dict | None]] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    def record(self, method: str, path: str, body: dict | None) -> None:
        with self._lock:
            self.requests.append((method, path, body))

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def kubeconfig(self) -> str:
        return (
            "apiVersion: v1\nkind: Config\ncurrent-context: fake\n"
            f"clusters:\n- name: fake\n  cluster:\n    server: {self.url}\n"
            "contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n"
            "users:\n- name: fake\n  user:\n    token: fake\n"
        )

    def __enter__(self) -> "FakeKube":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
