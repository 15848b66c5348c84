"""The operator image's Dockerfile agrees with the workspace and the chart (no container engine here,
so these are the checks that do not need a build)."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib

from conftest import REPO_ROOT, load_yaml, CHART_DIR

DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()
DOCKERIGNORE = [
    line.strip()
    for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]


def _instructions(name: str) -> list[str]:
    joined = DOCKERFILE.replace("\\\n", " ")
    return [m.group(1).strip() for m in re.finditer(rf"(?m)^{name}\s+(.+)$", joined)]


def _ignored(path: str) -> bool:
    for pattern in DOCKERIGNORE:
        pattern = pattern.rstrip("/")
        candidates = [pattern, pattern.removeprefix("**/")]
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        tails = ["/".join(parts[i:]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, c) for c in candidates for p in prefixes + (tails if pattern.startswith("**/") else [])):
            return True
    return False


def test_builds_the_operator_binary_reproducibly() -> None:
    operator = tomllib.loads((REPO_ROOT / "operator" / "Cargo.toml").read_text())
    package = operator["package"]["name"]
    binaries = [b["name"] for b in operator.get("bin", [])] or [package]
    assert "celery-operator" in binaries
    (build,) = [r for r in _instructions("RUN") if "cargo build" in r]
    assert f"-p {package}" in build and "--locked" in build and "--release" in build
    assert (REPO_ROOT / "Cargo.lock").exists(), "--locked needs the checked-in Cargo.lock"


def test_runtime_image_is_distroless_nonroot_with_the_chart_user() -> None:
    stages = _instructions("FROM")
    assert stages[0].startswith("rust:") and "bookworm" in stages[0]
    assert stages[-1] == "gcr.io/distroless/cc-debian12:nonroot"
    (user,) = _instructions("USER")
    uid, gid = user.split(":")
    assert uid.isdigit() and uid != "0", "numeric, so the kubelet can check runAsNonRoot"
    pod = load_yaml(CHART_DIR / "values.yaml")["podSecurityContext"]
    assert (int(uid), int(gid)) == (pod["runAsUser"], pod["runAsGroup"])


def test_the_image_smoke_test_runs_the_operator_as_the_chart_does() -> None:
    # images/test.sh runs the built image read-only, all capabilities dropped, as the image's USER
    # (the chart's runAsUser, above), with nothing writable: the chart mounts no volumes either
    # (test_render.test_operator_runs_with_the_cli_contract).
    script = (REPO_ROOT / "images" / "test.sh").read_text().replace("\\\n", " ")
    restricted = next(line for line in script.splitlines() if line.startswith("restricted=("))
    for flag in ("--read-only ", "--read-only-tmpfs=false", "--cap-drop ALL", "no-new-privileges"):
        assert flag in restricted, restricted
    chart = load_yaml(CHART_DIR / "values.yaml")["securityContext"]
    assert chart["readOnlyRootFilesystem"] is True and chart["capabilities"]["drop"] == ["ALL"]
    assert chart["allowPrivilegeEscalation"] is False
    runs = [line for line in script.splitlines() if '"$operator_image"' in line and "podman run" in line]
    assert len(runs) >= 4, runs  # --version, crd, check-broker, run
    for run in runs:
        assert '"${restricted[@]}"' in run and "--user" not in run and "--tmpfs" not in run, run
        mounts = [chunk.split(" -")[0].strip() for chunk in run.split(" -v ")[1:]]
        assert all(m.rstrip('"').endswith(":ro") for m in mounts), f"a writable mount: {mounts}"


def test_entrypoint_runs_the_operator() -> None:
    assert [json.loads(e) for e in _instructions("ENTRYPOINT")] == [["/celery-operator"]]
    assert [json.loads(c) for c in _instructions("CMD")] == [["run"]]
    assert "8080" in _instructions("EXPOSE")[0]


def test_oci_labels_are_set() -> None:
    labels = " ".join(_instructions("LABEL"))
    for key in ("title", "description", "source", "licenses", "version", "revision", "created"):
        assert f"org.opencontainers.image.{key}=" in labels


def test_build_context_keeps_every_workspace_member_and_drops_build_outputs() -> None:
    workspace = tomllib.loads((REPO_ROOT / "Cargo.toml").read_text())["workspace"]
    for member in workspace["members"]:
        assert not _ignored(member), f".dockerignore drops workspace member {member}: cargo cannot load the workspace"
    for needed in ("Cargo.toml", "Cargo.lock", "operator/src/main.rs"):
        assert not _ignored(needed)
    for junk in ("target", "e2e/target", ".git", "e2e/.venv", "worker-image/src/__pycache__"):
        assert _ignored(junk), f"{junk} would be sent to the builder"
