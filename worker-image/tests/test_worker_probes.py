"""Liveness and readiness of a real Celery worker started through the entrypoint."""

from __future__ import annotations

import signal
from pathlib import Path

from conftest import RedisServer, Spawner, free_port, wait_until

from celery_example.app import RELEASE_KEY_PREFIX
from celery_worker_base.probe_files import ProbeFiles

FAST_HEARTBEAT = {"CELERY_PROBE_LIVENESS_MAX_AGE": "2", "CELERY_PROBE_HEARTBEAT_INTERVAL": "0.2"}


def test_readiness_fails_until_the_worker_is_ready_even_with_a_previous_ready_file(
    spawn: Spawner, tmp_path: Path
) -> None:
    # The emptyDir still holds the files of a previous container of the pod.
    leftovers = ProbeFiles(tmp_path / "probe-reused")
    leftovers.start_process()
    leftovers.mark_ready("pool@previous-container")
    leftovers.mark_draining("Warm shutdown of pool@previous-container on SIGTERM")
    port = free_port()  # nothing listens yet: the worker cannot become ready
    worker = spawn(f"redis://127.0.0.1:{port}/0", probe_dir=leftovers.directory)

    wait_until(lambda: "Cannot connect to" in worker.output(), 60, "the worker to retry the absent broker")
    not_ready = worker.probe("readiness")
    assert not_ready.returncode == 1, not_ready.stdout
    assert "has not signalled worker_ready" in not_ready.stdout
    assert worker.passes("liveness"), "a worker waiting for its broker is alive"

    broker = RedisServer(tmp_path / "late-redis", port=port).start()
    try:
        worker.wait_ready()
        assert leftovers.ready.read_text().strip() == f"pool@{worker.env['POD_NAME']}"
    finally:
        worker.stop()
        broker.stop()


def test_liveness_stays_fresh_while_healthy_and_goes_stale_when_frozen(
    spawn: Spawner, redis_server: RedisServer
) -> None:
    worker = spawn(redis_server.url, env=FAST_HEARTBEAT)
    worker.wait_ready()
    files = ProbeFiles(worker.probe_dir)
    first_beat = files.alive.stat().st_mtime

    def passes_and_has_beaten_for_two_max_ages() -> bool:
        assert worker.probe("liveness").returncode == 0, worker.probe("liveness").stdout
        return files.alive.stat().st_mtime > first_beat + 2 * 2

    wait_until(passes_and_has_beaten_for_two_max_ages, 30, "heartbeats spanning two max ages")

    worker.signal_group(signal.SIGSTOP)
    stale = wait_until(lambda: (r := worker.probe("liveness")).returncode == 1 and r, 30, "liveness to fail")
    assert stale.stdout.startswith("not alive: last heartbeat")

    worker.signal_group(signal.SIGCONT)
    wait_until(lambda: worker.passes("liveness"), 30, "liveness to recover after SIGCONT")


def test_liveness_stays_fresh_while_the_worker_retries_a_lost_broker(
    spawn: Spawner, redis_server: RedisServer, client_app
) -> None:
    worker = spawn(redis_server.url, env=FAST_HEARTBEAT)
    worker.wait_ready()
    redis_server.stop()

    def passes_until_retry_gaps_exceed_max_age() -> bool:
        result = worker.probe("liveness")
        assert result.returncode == 0, f"{result.stdout}\n{worker.output()}"
        # Retries come after 2 s then 4 s: the second gap is twice the max age.
        return worker.output().count("Cannot connect to") >= 3

    wait_until(passes_until_retry_gaps_exceed_max_age, 60, "three broker reconnect attempts")

    redis_server.start()
    wait_until(lambda: worker.output().count("Connected to redis://") >= 2, 60, "the worker to reconnect")
    app = client_app(redis_server.url)
    assert app.send_task("celery_example.add", (2, 3), queue=worker.queue).get(timeout=60) == 5
    assert worker.passes("readiness")


def test_liveness_stays_fresh_while_a_solo_pool_runs_a_long_task(
    spawn: Spawner, redis_server: RedisServer, client_app
) -> None:
    # -P solo runs tasks on the worker's main loop, which stops its timer.
    worker = spawn(redis_server.url, env=FAST_HEARTBEAT, pool="solo")
    worker.wait_ready()
    app = client_app(redis_server.url)
    held = app.send_task("celery_example.hold", (worker.queue, 120), queue=worker.queue)
    wait_until(lambda: held.state == "STARTED", 60, "the task to start")
    alive = ProbeFiles(worker.probe_dir).alive
    started_beat = alive.stat().st_mtime

    def passes_for_two_max_ages_of_running_task() -> bool:
        result = worker.probe("liveness")
        assert result.returncode == 0, result.stdout
        return alive.stat().st_mtime > started_beat + 2 * 2

    wait_until(passes_for_two_max_ages_of_running_task, 30, "heartbeats during the task")
    redis_server.client().set(RELEASE_KEY_PREFIX + worker.queue, 1)
    assert held.get(timeout=60)["released"] is True
