"""The Argo CD health check documented in the chart README, run in Lua 5.1 (Argo CD's gopher-lua
dialect) against TaskQueue/WorkerPool objects in each kstatus state."""

from __future__ import annotations

import re

import lupa.lua51 as lua
import pytest
import yaml

from conftest import CHART_DIR, TESTS_DIR

SCRIPT = (TESTS_DIR.parent / "argocd" / "health.lua").read_text()


def health(obj: dict) -> tuple[str, str]:
    runtime = lua.LuaRuntime(unpack_returned_tuples=True)
    runtime.globals().obj = runtime.table_from(obj, recursive=True)
    result = runtime.execute(SCRIPT)
    return result["status"], result["message"]


def pool(generation: int = 3, observed: int | None = 3, *conditions: dict) -> dict:
    obj = {
        "apiVersion": "celery-operator.dev/v1alpha1",
        "kind": "WorkerPool",
        "metadata": {"name": "mail", "namespace": "shop", "generation": generation},
        "status": {"conditions": list(conditions)},
    }
    if observed is not None:
        obj["status"]["observedGeneration"] = observed
    return obj


def cond(type_: str, status: str, reason: str, message: str = "") -> dict:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def test_ready_true_is_healthy() -> None:
    assert health(pool(3, 3, cond("Ready", "True", "Available", "4/4 workers ready"))) == (
        "Healthy",
        "Available: 4/4 workers ready",
    )


def test_unobserved_generation_is_progressing_even_when_ready() -> None:
    status, message = health(pool(4, 3, cond("Ready", "True", "Available")))
    assert status == "Progressing" and "generation 4" in message


def test_missing_status_is_progressing() -> None:
    obj = pool()
    del obj["status"]
    assert health(obj)[0] == "Progressing"


def test_stalled_is_degraded_whatever_ready_says() -> None:
    obj = pool(3, 3, cond("Ready", "True", "Available"), cond("Stalled", "True", "InvalidSpec", "spec.queues is empty"))
    assert health(obj) == ("Degraded", "InvalidSpec: spec.queues is empty")


def test_reconciling_is_progressing() -> None:
    obj = pool(3, 3, cond("Ready", "False", "QueueNotFound"), cond("Reconciling", "True", "RollingOut", "2/4 updated"))
    assert health(obj) == ("Progressing", "RollingOut: 2/4 updated")


@pytest.mark.parametrize("reason", ["Creating", "RollingOut"])
def test_not_ready_while_converging_is_progressing(reason: str) -> None:
    assert health(pool(3, 3, cond("Ready", "False", reason)))[0] == "Progressing"


@pytest.mark.parametrize("reason", ["QueueNotFound", "BrokerUnreachable", "BeatConflict"])
def test_not_ready_for_a_problem_is_degraded(reason: str) -> None:
    status, message = health(pool(3, 3, cond("Ready", "False", reason, "see the conditions")))
    assert status == "Degraded" and message.startswith(reason)


def test_no_ready_condition_yet_is_progressing() -> None:
    assert health(pool(3, 3, cond("BrokerSafe", "True", "NoEviction")))[0] == "Progressing"


def test_readme_carries_the_tested_script() -> None:
    readme = (CHART_DIR / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, flags=re.S)
    (snippet,) = [yaml.safe_load(b) for b in blocks if "resource.customizations.health" in b]
    for kind in ("TaskQueue", "WorkerPool"):
        assert snippet["data"][f"resource.customizations.health.celery-operator.dev_{kind}"] == SCRIPT, (
            f"README's Argo CD health check for {kind} differs from charts/argocd/health.lua"
        )
