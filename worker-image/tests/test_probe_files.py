"""The probe verdicts as pure functions of the files and the clock."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from celery_worker_base.probe_files import (
    ProbeConfigError,
    ProbeFiles,
    check_liveness,
    check_readiness,
    heartbeat_interval,
    liveness_max_age,
)


@pytest.fixture
def files(tmp_path: Path) -> ProbeFiles:
    files = ProbeFiles(tmp_path / "probe")
    files.start_process()
    return files


def set_heartbeat(files: ProbeFiles, at: float) -> None:
    os.utime(files.alive, (at, at))


def test_liveness_passes_while_heartbeat_is_younger_than_max_age(files: ProbeFiles) -> None:
    set_heartbeat(files, 1000.0)
    verdict = check_liveness(files, max_age=60, now=1059.0)
    assert verdict.ok, verdict.reason
    assert "59.0s ago" in verdict.reason


def test_liveness_fails_once_heartbeat_is_older_than_max_age(files: ProbeFiles) -> None:
    set_heartbeat(files, 1000.0)
    verdict = check_liveness(files, max_age=60, now=1060.5)
    assert not verdict.ok
    assert "60.5s ago" in verdict.reason and "max age 60s" in verdict.reason


def test_liveness_fails_without_heartbeat_file(tmp_path: Path) -> None:
    verdict = check_liveness(ProbeFiles(tmp_path), max_age=60)
    assert not verdict.ok
    assert "no heartbeat file" in verdict.reason


def test_liveness_passes_with_stale_heartbeat_while_draining(files: ProbeFiles) -> None:
    set_heartbeat(files, 1000.0)
    files.mark_draining("Warm shutdown of pool@a on SIGTERM")
    verdict = check_liveness(files, max_age=60, now=5000.0)
    assert verdict.ok
    assert "Warm shutdown of pool@a on SIGTERM" in verdict.reason


def test_readiness_follows_ready_file_and_fails_while_draining(files: ProbeFiles) -> None:
    assert not check_readiness(files).ok
    files.mark_ready("pool@pod-1")
    verdict = check_readiness(files)
    assert verdict.ok and "pool@pod-1" in verdict.reason
    files.mark_draining("Warm shutdown of pool@pod-1 on SIGTERM")
    assert not files.ready.exists()
    assert not check_readiness(files).ok


def test_start_process_forgets_a_previous_containers_ready_and_draining(files: ProbeFiles) -> None:
    files.mark_ready("pool@old")
    files.mark_draining("old shutdown")
    set_heartbeat(files, 1000.0)
    files.start_process()
    assert not check_readiness(files).ok
    assert not files.draining.exists()
    assert check_liveness(files, max_age=60).ok


def test_max_age_and_interval_come_from_env_with_interval_derived() -> None:
    assert liveness_max_age({}) == 60.0
    assert heartbeat_interval({}) == 10.0
    assert liveness_max_age({"CELERY_PROBE_LIVENESS_MAX_AGE": "12"}) == 12.0
    assert heartbeat_interval({"CELERY_PROBE_LIVENESS_MAX_AGE": "12"}) == 2.0
    assert heartbeat_interval({"CELERY_PROBE_HEARTBEAT_INTERVAL": "0.5"}) == 0.5


@pytest.mark.parametrize("raw", ["abc", "0", "-5", "inf", "nan"])
def test_unusable_max_age_is_rejected_with_the_variable_name(raw: str) -> None:
    with pytest.raises(ProbeConfigError, match="CELERY_PROBE_LIVENESS_MAX_AGE"):
        liveness_max_age({"CELERY_PROBE_LIVENESS_MAX_AGE": raw})


def test_probe_dir_unset_means_no_probe_files() -> None:
    assert ProbeFiles.from_env({}) is None
    assert ProbeFiles.from_env({"CELERY_PROBE_DIR": "/var/run/celery"}) == ProbeFiles(Path("/var/run/celery"))
