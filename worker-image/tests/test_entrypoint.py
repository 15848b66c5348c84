"""`celery-entrypoint`: exec for anything but celery; beat gets probes too."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from conftest import ENTRYPOINT, RedisServer, Spawner, wait_until


def test_other_commands_are_execed_in_place() -> None:
    proc = subprocess.Popen(
        [ENTRYPOINT, sys.executable, "-c", "import os; print(os.getpid())"], stdout=subprocess.PIPE, text=True
    )
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert int(out) == proc.pid, "exec, not a child process"


def test_missing_command_and_missing_args_fail_with_a_message() -> None:
    missing = subprocess.run([ENTRYPOINT, "no-such-command-xyz"], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 127
    assert "cannot exec 'no-such-command-xyz'" in missing.stderr
    empty = subprocess.run([ENTRYPOINT], capture_output=True, text=True, timeout=60)
    assert empty.returncode == 2
    assert "usage: celery-entrypoint celery" in empty.stderr


def test_unusable_probe_dir_fails_fast_with_the_cause(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    env = {**os.environ, "CELERY_PROBE_DIR": str(blocker / "probe")}
    result = subprocess.run([ENTRYPOINT, "celery", "--version"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "probe setup failed" in result.stderr and str(blocker) in result.stderr


def test_celery_cli_runs_without_probe_dir() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY")}
    result = subprocess.run([ENTRYPOINT, "celery", "--version"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("5.")


def test_beat_is_ready_sends_ticks_and_stops_on_sigterm(
    spawn: Spawner, redis_server: RedisServer, tmp_path: Path
) -> None:
    tick_queue = f"ticks-{os.getpid()}-{tmp_path.name}"
    beat = spawn(
        redis_server.url,
        env={"CELERY_EXAMPLE_TICK_SECONDS": "0.5", "CELERY_EXAMPLE_TICK_QUEUE": tick_queue},
        # The operator's beat args, with the schedule on a writable volume.
        command=[
            "celery",
            "-A",
            "celery_example",
            "beat",
            "--schedule",
            str(tmp_path / "celerybeat-schedule"),
            "--loglevel",
            "INFO",
        ],
    )
    beat.wait_ready()
    assert beat.probe("readiness").stdout.startswith("ready: beat")
    assert beat.passes("liveness")
    client = redis_server.client()
    wait_until(lambda: client.llen(tick_queue) >= 2, 60, "beat to send ticks")

    beat.proc.send_signal(signal.SIGTERM)
    assert beat.proc.wait(timeout=60) == 0
    assert not beat.passes("readiness")
