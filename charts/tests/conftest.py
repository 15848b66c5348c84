from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

TESTS_DIR = Path(__file__).resolve().parent
CHART_DIR = TESTS_DIR.parent / "celery-operator"
REPO_ROOT = TESTS_DIR.parent.parent

# Helm reads its cache/config/data locations when its library loads: point them at a scratch directory
# before helm_sdkpy is imported, so tests never touch the user's Helm repositories or registry logins.
_helm_home = Path(tempfile.mkdtemp(prefix="chart-tests-helm-"))
for _var, _sub in (("HELM_CACHE_HOME", "cache"), ("HELM_CONFIG_HOME", "config"), ("HELM_DATA_HOME", "data")):
    os.environ[_var] = str(_helm_home / _sub)

sys.path.insert(0, str(TESTS_DIR))

CI_VALUES = sorted((CHART_DIR / "ci").glob("*.yaml"))
BAD_VALUES = sorted((TESTS_DIR / "bad-values").glob("*.yaml"))


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


@pytest.fixture(scope="session")
def chart_dir() -> Path:
    return CHART_DIR


@pytest.fixture(scope="session")
def default_values() -> dict:
    return load_yaml(CHART_DIR / "values.yaml")
