"""SIGTERM to the entrypoint (PID 1 in the pod) is a warm shutdown of Celery itself."""

from __future__ import annotations

import signal
from pathlib import Path

from conftest import RedisServer, Spawner, wait_until

from celery_example.app import RELEASE_KEY_PREFIX


def parent_pid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def test_sigterm_lets_the_running_task_finish_then_exits_zero(
    spawn: Spawner, redis_server: RedisServer, client_app
) -> None:
    worker = spawn(
        redis_server.url, env={"CELERY_PROBE_LIVENESS_MAX_AGE": "2", "CELERY_PROBE_HEARTBEAT_INTERVAL": "0.2"}
    )
    worker.wait_ready()
    app = client_app(redis_server.url)
    held = app.send_task("celery_example.hold", (worker.queue, 120), queue=worker.queue)
    started = wait_until(lambda: held.state == "STARTED" and held.info, 60, "the task to start")
    # Celery runs in the entrypoint process itself: the pool child's parent is it.
    assert parent_pid(started["pid"]) == worker.proc.pid

    worker.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: not worker.passes("readiness"), 30, "readiness to go away")
    assert "shutting down" in worker.probe("readiness").stdout
    # Liveness keeps passing for the whole drain, whatever the pool does with
    # its heartbeat meanwhile: kubelet must not kill the worker mid-task.
    wait_until(
        lambda: "warm shutdown in progress" in worker.probe("liveness").stdout, 30, "liveness to report the drain"
    )
    assert worker.proc.poll() is None, "the worker must wait for its running task"

    redis_server.client().set(RELEASE_KEY_PREFIX + worker.queue, 1)
    result = held.get(timeout=60)
    assert result["released"] is True
    assert result["hostname"] == f"pool@{worker.env['POD_NAME']}"
    assert worker.proc.wait(timeout=60) == 0
    assert "Warm shutdown" in worker.output()
    assert not worker.passes("readiness")


def test_sighup_restart_comes_back_through_the_entrypoint(
    spawn: Spawner, redis_server: RedisServer, client_app
) -> None:
    worker = spawn(redis_server.url)
    worker.wait_ready()
    pid = worker.proc.pid

    worker.proc.send_signal(signal.SIGHUP)
    # Celery re-execs `python sys.argv...` in the same pid; the entrypoint must
    # run again (it resets the probe files) and the worker must come back ready.
    wait_until(lambda: worker.output().count(" ready.") >= 2, 60, "the restarted worker to be ready")
    assert "Restarting celery worker" in worker.output()
    assert worker.proc.poll() is None and worker.proc.pid == pid
    worker.wait_ready()
    app = client_app(redis_server.url)
    assert app.send_task("celery_example.add", (1, 1), queue=worker.queue).get(timeout=60) == 2
