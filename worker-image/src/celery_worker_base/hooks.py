"""Probe hooks that run inside the Celery process started by the entrypoint.

Liveness: a worker bootstep refreshes ``alive`` from the worker's own timer,
which only fires while the main event loop turns (a thread with ``-P solo``,
whose tasks run on that loop). Celery's ``heartbeat_sent``
signal fires from the same timer but is off under ``--without-heartbeat`` and
whenever the broker connection is down, so it is not used. While the consumer
retries a lost broker connection the event loop is not running; the retry loop
refreshes ``alive`` instead, so a broker outage never gets healthy pods killed
(restarting them cannot bring the broker back, and kills running tasks).

Readiness: ``worker_ready`` writes ``ready``; the start of a shutdown removes
it and writes ``draining`` (which keeps liveness passing while running tasks
finish); ``worker_shutdown`` removes ``ready`` again as a backstop.

Beat: ``beat_init`` writes ``ready``; a daemon thread refreshes ``alive``
(beat has no timer to hook, so this proves the process is not frozen, not
that the scheduler loop progresses).
"""

from __future__ import annotations

import atexit
import logging
import threading
from collections.abc import Callable
from typing import Any

from celery import bootsteps, signals
from celery.concurrency.solo import TaskPool as SoloPool

from .probe_files import ProbeFiles

logger = logging.getLogger(__name__)


class Heartbeat:
    """Refreshes the ``alive`` file; a failed write is logged, never raised."""

    def __init__(self, files: ProbeFiles) -> None:
        self.files = files

    def __call__(self) -> None:
        try:
            self.files.touch_alive()
        except OSError as err:
            # Liveness will fail and say why; the worker itself keeps going.
            logger.error("celery-entrypoint: cannot refresh %s: %s", self.files.alive, err)


class ThreadHeartbeat:
    """Calls ``heartbeat`` every ``interval`` seconds from a daemon thread."""

    def __init__(self, heartbeat: Heartbeat, interval: float) -> None:
        self.heartbeat = heartbeat
        self.interval = interval
        self.stopped = threading.Event()

    def start(self) -> None:
        self.heartbeat()
        threading.Thread(target=self._run, name="celery-probe-heartbeat", daemon=True).start()

    def stop(self) -> None:
        self.stopped.set()

    def _run(self) -> None:
        while not self.stopped.wait(self.interval):
            self.heartbeat()


def heartbeat_step(heartbeat: Heartbeat, interval: float) -> type:
    """A worker bootstep that calls ``heartbeat`` every ``interval`` seconds.

    The worker's timer runs on the main loop, so a stuck loop stops the
    heartbeat. The solo pool runs tasks on that loop, though: a long task
    would read as stuck, so with solo a thread beats instead (proving only
    that the process is not frozen).
    """

    class ProbeHeartbeat(bootsteps.StartStopStep):
        requires = ("celery.worker.components:Timer",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.tref: Any = None
            self.thread: ThreadHeartbeat | None = None

        def start(self, worker: Any) -> None:
            if isinstance(worker.pool_cls, type) and issubclass(worker.pool_cls, SoloPool):
                self.thread = ThreadHeartbeat(heartbeat, interval)
                self.thread.start()
            else:
                heartbeat()
                self.tref = worker.timer.call_repeatedly(interval, heartbeat)

        def stop(self, worker: Any) -> None:
            if self.tref is not None:
                self.tref.cancel()
                self.tref = None
            if self.thread is not None:
                self.thread.stop()
                self.thread = None

    return ProbeHeartbeat


def install(files: ProbeFiles, interval: float) -> None:
    """Connect the probe hooks; call before Celery loads the app."""
    heartbeat = Heartbeat(files)
    step = heartbeat_step(heartbeat, interval)

    def on_celeryd_init(sender: Any = None, instance: Any = None, **_: Any) -> None:
        instance.app.steps["worker"].add(step)

    def on_worker_ready(sender: Any = None, **_: Any) -> None:
        files.mark_ready(str(getattr(sender, "hostname", "worker")))

    def on_worker_shutting_down(sender: Any = None, sig: Any = None, how: Any = None, **_: Any) -> None:
        files.mark_draining(f"{how} shutdown of {sender} on {sig}")

    def on_worker_shutdown(**_: Any) -> None:
        files.clear_ready()

    def on_beat_init(**_: Any) -> None:
        files.mark_ready("beat")
        atexit.register(files.clear_ready)
        ThreadHeartbeat(heartbeat, interval).start()

    for signal, receiver in (
        (signals.celeryd_init, on_celeryd_init),
        (signals.worker_ready, on_worker_ready),
        (signals.worker_shutting_down, on_worker_shutting_down),
        (signals.worker_shutdown, on_worker_shutdown),
        (signals.beat_init, on_beat_init),
    ):
        signal.connect(receiver, weak=False)
    _refresh_while_reconnecting(heartbeat)


def _refresh_while_reconnecting(heartbeat: Heartbeat) -> None:
    # kombu's retry loop calls the consumer's `maybe_shutdown` about once a
    # second while it waits for the broker (celery.worker.consumer.consumer
    # passes it as `callback=` to `ensure_connection`). Wrapping that module
    # global is the one hook into the retry loop that needs no user code.
    from celery.worker.consumer import consumer

    original: Callable[[], Any] | None = getattr(consumer, "maybe_shutdown", None)
    if original is None:  # a Celery that moved it: liveness then fails during outages
        logger.warning("celery-entrypoint: cannot hook the broker reconnect loop of this Celery version")
        return

    def maybe_shutdown() -> Any:
        heartbeat()
        return original()

    consumer.maybe_shutdown = maybe_shutdown
