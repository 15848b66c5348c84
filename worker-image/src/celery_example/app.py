"""The example app: a few tasks with realistic production settings.

Environment:

``CELERY_BROKER_URL``            broker (the operator injects it from a Secret)
``CELERY_RESULT_BACKEND``        result backend, e.g. ``redis://host:6379/1`` (default: none)
``CELERY_ACKS_LATE=1``           ack after the task ran, redeliver if the worker is lost
``CELERY_EXAMPLE_TICK_SECONDS``  beat interval of the ``tick`` task (default 5)
``CELERY_EXAMPLE_TICK_QUEUE``    queue the ticks go to (default: ``celery``)
``CELERY_EXAMPLE_MINUTELY_QUEUE`` if set, beat also sends ``tick`` there at the start of every
                                 minute (a crontab entry, ``minutely``)
``CELERY_EXAMPLE_REDIS_URL``     Redis that ``hold`` watches for its release key
                                 (default: the result backend or broker, if Redis)
``CELERY_EXAMPLE_QUORUM_QUEUES`` comma-separated queues declared as RabbitMQ quorum queues on
                                 topic exchanges of their own name, so Celery (>= 5.5) sends their
                                 countdown/eta tasks through native delayed delivery
``CELERY_EXAMPLE_DEFAULT_QUEUE`` ``task_default_queue``. Celery 5.7 routes a retry
                                 (``self.retry``, ``autoretry_for``) to the default queue's
                                 exchange type: a retry of a task on a quorum queue goes through
                                 native delayed delivery only when that queue is the default;
                                 otherwise it goes straight to its queue and a worker holds it

Prefetch, concurrency and time limits come from the worker command line the
operator generates, not from here.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from celery.schedules import crontab

RELEASE_KEY_PREFIX = "celery-example:release:"


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


app = Celery("celery_example")
app.conf.update(
    broker_url=os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0"),
    result_backend=os.environ.get("CELERY_RESULT_BACKEND") or None,
    broker_connection_retry_on_startup=True,
    task_acks_late=_flag("CELERY_ACKS_LATE"),
    task_reject_on_worker_lost=_flag("CELERY_ACKS_LATE"),
    task_track_started=True,
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    timezone="UTC",
)

_quorum = [q for q in os.environ.get("CELERY_EXAMPLE_QUORUM_QUEUES", "").split(",") if q]
if _quorum:
    from kombu import Exchange, Queue

    app.conf.task_queues = [
        Queue(q, Exchange(q, type="topic"), routing_key=q, queue_arguments={"x-queue-type": "quorum"})
        for q in _quorum
    ]
    app.conf.broker_transport_options = {"confirm_publish": True}

if os.environ.get("CELERY_EXAMPLE_DEFAULT_QUEUE"):
    app.conf.task_default_queue = os.environ["CELERY_EXAMPLE_DEFAULT_QUEUE"]

_tick_seconds = float(os.environ.get("CELERY_EXAMPLE_TICK_SECONDS", "5"))
_tick_options: dict[str, Any] = {"expires": _tick_seconds}  # a stale tick is useless
if os.environ.get("CELERY_EXAMPLE_TICK_QUEUE"):
    _tick_options["queue"] = os.environ["CELERY_EXAMPLE_TICK_QUEUE"]
app.conf.beat_schedule = {
    "tick": {"task": "celery_example.tick", "schedule": _tick_seconds, "options": _tick_options},
}
if os.environ.get("CELERY_EXAMPLE_MINUTELY_QUEUE"):
    app.conf.beat_schedule["minutely"] = {
        "task": "celery_example.tick",
        "schedule": crontab(minute="*"),
        "options": {"queue": os.environ["CELERY_EXAMPLE_MINUTELY_QUEUE"]},
    }


def _identity(task: Any) -> dict[str, Any]:
    return {"hostname": task.request.hostname, "task_id": task.request.id, "pid": os.getpid()}


@app.task(name="celery_example.add")
def add(x: float, y: float) -> float:
    return x + y


@app.task(bind=True, name="celery_example.sleep")
def sleep(self: Any, seconds: float) -> dict[str, Any]:
    started = time.time()
    time.sleep(float(seconds))
    return {**_identity(self), "slept": float(seconds), "started": started}


@app.task(bind=True, name="celery_example.hold")
def hold(self: Any, name: str, timeout: float = 300.0) -> dict[str, Any]:
    """Keep a worker slot busy until ``SET celery-example:release:<name> 1`` (or timeout)."""
    client = _hold_redis()
    started = time.monotonic()
    deadline = started + float(timeout)
    released = False
    while time.monotonic() < deadline:
        if client is not None and client.exists(RELEASE_KEY_PREFIX + name):
            released = True
            break
        time.sleep(0.1)
    return {**_identity(self), "name": name, "released": released, "held_seconds": time.monotonic() - started}


@app.task(
    bind=True,
    name="celery_example.flaky",
    autoretry_for=(RuntimeError,),
    retry_backoff=120,
    retry_backoff_max=600,
    retry_jitter=False,
    max_retries=3,
)
def flaky(self: Any) -> None:
    """Always fails; Celery retries it with exponential backoff (after 120 s, 240 s, 480 s), as
    ``autoretry_for`` with ``retry_backoff`` does for a task whose dependency is down. Each retry
    is a new message with an ETA that a worker holds until due."""
    raise RuntimeError("failing on purpose, to be retried with backoff")


@app.task(
    bind=True,
    name="celery_example.recovering",
    autoretry_for=(RuntimeError,),
    retry_backoff=5,
    retry_backoff_max=60,
    retry_jitter=False,
    max_retries=5,
)
def recovering(self: Any, failures: int, seconds: float) -> dict[str, Any]:
    """Fails its first ``failures`` attempts, as a task whose dependency is briefly down; Celery
    retries it with exponential backoff (after 5 s, 10 s, 20 s, ...), each retry a new message
    with an ETA that a worker holds until due. Then sleeps ``seconds`` and reports when this
    attempt started and when it was due (``eta``, None for a first attempt)."""
    started = time.time()
    if self.request.retries < int(failures):
        raise RuntimeError(f"failing attempt {self.request.retries + 1} of {failures} on purpose")
    time.sleep(float(seconds))
    eta = self.request.eta  # the ETA header, an ISO 8601 string
    return {**_identity(self), "started": started, "eta": eta, "retries": self.request.retries}


@app.task(bind=True, name="celery_example.tick")
def tick(self: Any) -> dict[str, Any]:
    return {**_identity(self), "at": time.time()}


def _hold_redis() -> Any | None:
    for url in (
        os.environ.get("CELERY_EXAMPLE_REDIS_URL"),
        os.environ.get("CELERY_RESULT_BACKEND"),
        os.environ.get("CELERY_BROKER_URL"),
    ):
        if url and url.startswith(("redis://", "rediss://")):
            import redis

            return redis.Redis.from_url(url)
    return None
