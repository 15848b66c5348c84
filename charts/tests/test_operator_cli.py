"""The Deployment the chart renders starts the operator binary with flags and environment variables
that `celery-operator run` actually accepts: a flag it does not know is a crash loop in production."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import CHART_DIR, REPO_ROOT
from test_render import SCENARIOS, operator_container, rendered

# May be read by the binary itself rather than through clap (downward API, tracing): not in --help.
READ_DIRECTLY = {"POD_NAME", "POD_NAMESPACE", "RUST_LOG"}


@pytest.fixture(scope="module")
def run_help() -> str:
    target = Path(os.environ.get("CARGO_TARGET_DIR", REPO_ROOT / "target"))
    binary = Path(os.environ.get("CELERY_OPERATOR_BIN", target / "debug" / "celery-operator"))
    if not binary.exists():
        cargo = shutil.which("cargo")
        if cargo is None:
            pytest.skip(f"{binary} not built and no cargo to build it")
        subprocess.run([cargo, "build", "-q", "-p", "celery-operator"], cwd=REPO_ROOT, check=True)
    result = subprocess.run([str(binary), "run", "--help"], capture_output=True, text=True, check=True)
    return result.stdout


def _long_flags(help_text: str) -> set[str]:
    return set(re.findall(r"(?m)^\s+(?:-\w, )?(--[a-z0-9-]+)", help_text))


def _env_vars(help_text: str) -> set[str]:
    return set(re.findall(r"\[env: ([A-Z0-9_]+)=", help_text))


def test_chart_flags_are_accepted_by_the_operator(run_help: str) -> None:
    unknown = {}
    for scenario in SCENARIOS:
        args = operator_container(rendered(scenario))["args"]
        assert args[0] == "run"
        flags = {a.split("=", 1)[0] for a in args[1:] if a.startswith("--")}
        unknown |= {flag: scenario for flag in flags - _long_flags(run_help)}
    assert not unknown, f"the chart passes {sorted(unknown)}, which `celery-operator run` rejects:\n{run_help}"


def test_chart_environment_is_read_by_the_operator(run_help: str) -> None:
    unread = {}
    for scenario in SCENARIOS:
        env = {e["name"] for e in operator_container(rendered(scenario))["env"]} - READ_DIRECTLY
        unread |= {name: scenario for name in env - _env_vars(run_help)}
    assert not unread, f"the chart sets {sorted(unread)}, which `celery-operator run` does not read:\n{run_help}"


def test_log_formats_offered_by_the_chart_exist(run_help: str) -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    offered = set(schema["properties"]["logFormat"]["enum"])
    line = next(line for line in run_help.splitlines() if "[env: LOG_FORMAT=]" in line)
    accepted = set(re.search(r"\[possible values: ([^\]]+)\]", line).group(1).split(", "))
    assert offered <= accepted
