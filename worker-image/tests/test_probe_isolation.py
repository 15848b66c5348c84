"""`celery-probe` never imports Celery, a broker client or the user's app."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import PROBE

from celery_worker_base.probe_files import ProbeFiles

POISONED = ("celery", "kombu", "redis", "amqp", "billiard", "celery_example", "myproject")


def poisoned_path(tmp_path: Path) -> Path:
    """Modules that kill the interpreter on import, shadowing the real ones."""
    root = tmp_path / "poison"
    for name in POISONED:
        pkg = root / name
        pkg.mkdir(parents=True)
        (pkg / "__init__.py").write_text("import os\nos._exit(97)\n")
    return root


def test_probes_answer_with_celery_broker_clients_and_app_unimportable(tmp_path: Path) -> None:
    files = ProbeFiles(tmp_path / "probe")
    files.start_process()
    files.mark_ready("pool@pod")
    env = {
        **os.environ,
        "PYTHONPATH": str(poisoned_path(tmp_path)),
        "CELERY_PROBE_DIR": str(files.directory),
        "CELERY_BROKER_URL": "redis://127.0.0.1:1/0",
    }
    control = subprocess.run([sys.executable, "-c", "import celery"], env=env, timeout=30)
    assert control.returncode == 97, "the poisoned celery package must shadow the real one"
    for check, expected in (("liveness", "alive:"), ("readiness", "ready: pool@pod")):
        result = subprocess.run([PROBE, check], env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, (result.stdout, result.stderr)
        assert result.stdout.startswith(expected)
        assert result.stdout.count("\n") == 1, "one line"


def test_probe_imports_only_the_standard_library_and_its_own_modules(tmp_path: Path) -> None:
    files = ProbeFiles(tmp_path / "probe")
    files.start_process()
    code = (
        "import json, sys\n"
        "from celery_worker_base import probe\n"
        "probe.run(['liveness', '--dir', sys.argv[1]])\n"
        "probe.run(['readiness', '--dir', sys.argv[1]])\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(files.directory)], capture_output=True, text=True, timeout=30, check=True
    )
    loaded = json.loads(result.stdout)
    third_party = [m for m in loaded if m.split(".")[0] in POISONED]
    assert third_party == []
    assert "socket" not in loaded, "a probe has no business opening connections"


def test_probe_fails_with_a_reason_when_misconfigured(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_PROBE")}
    result = subprocess.run([PROBE, "liveness"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "CELERY_PROBE_DIR is not set" in result.stdout

    env.update(CELERY_PROBE_DIR=str(tmp_path), CELERY_PROBE_LIVENESS_MAX_AGE="soon")
    result = subprocess.run([PROBE, "liveness"], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "CELERY_PROBE_LIVENESS_MAX_AGE='soon'" in result.stdout


def test_max_age_flag_overrides_env(tmp_path: Path) -> None:
    files = ProbeFiles(tmp_path / "probe")
    files.start_process()
    os.utime(files.alive, (1.0, 1.0))
    env = {**os.environ, "CELERY_PROBE_DIR": str(files.directory), "CELERY_PROBE_LIVENESS_MAX_AGE": "1"}
    stale = subprocess.run([PROBE, "liveness"], env=env, capture_output=True, text=True, timeout=30)
    assert stale.returncode == 1 and stale.stdout.startswith("not alive:")
    forever = subprocess.run(
        [PROBE, "liveness", "--max-age", "1e12"], env=env, capture_output=True, text=True, timeout=30
    )
    assert forever.returncode == 0, forever.stdout
