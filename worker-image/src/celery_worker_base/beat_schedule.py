"""Beat's schedule store, as the entrypoint runs it: one process at a time, saved after every send,
visibly open while in use.

Saved after every send
    Celery's schedulers remember when each entry last ran (``last_run_at``) and write it to
    their store on ``sync()``: by default every 3 minutes (``beat_sync_every`` tasks = 0), and
    on a clean shutdown. A beat that ends any other way (SIGKILL, OOM, a node lost, the lock
    lost: ``os._exit``) leaves up to 3 minutes of sends unrecorded, and the next beat reading
    that store (the same pod's restarted container, or a new pod on a persistent volume)
    sends them again. With ``beat_sync_every`` unset, the entrypoint sets the scheduler's
    ``sync_every_tasks`` to 1: the store is written right after each send (Celery's own
    ``apply_async`` does it, in its ``finally``), whatever the scheduler class. An explicit
    ``beat_sync_every`` is left alone.

One process at a time (:class:`ScheduleFile`)
    On a volume that pods share (the pool's claim), the previous beat may still have the file
    open when the next one starts: a lock key that vanished lets a waiter take over while the
    old holder runs until its next send. Two processes on one shelve corrupt it, and with gdbm
    the second open fails, upon which Celery deletes the "corrupted" schedule and starts from
    nothing. So before Celery starts, the entrypoint takes an exclusive ``flock`` on
    ``.<schedule name>.lock`` beside the schedule file and holds it until the scheduler has
    stopped (or the process is gone): the next beat waits for it, alive and not ready.

Open while in use (:class:`ScheduleMarker`)
    Every beat started through the entrypoint, with or without a lock, keeps its schedule
    file open from ``beat_init`` until the scheduler has stopped: with every dbm backend, an
    open descriptor on the schedule file marks a running scheduler (Celery's shelve keeps
    one with gdbm or ndbm, but not with the ``dbm.dumb`` fallback). A scheduler that keeps
    no file (RedBeat, the default on Redis brokers) holds an empty ``celerybeat-schedule.running``
    open instead. The lock file's name does not start with the schedule's, so a beat waiting
    for it is not counted.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from .beat_lock import log

#: Celery's default schedule file (``beat_schedule_filename``), relative to the working directory.
DEFAULT_SCHEDULE = "celerybeat-schedule"
#: The marker a scheduler without a schedule file holds open instead (``celerybeat-schedule.running``).
RUNNING_SUFFIX = ".running"
#: Pause between two attempts to take the schedule file from a beat that still has it.
RETRY_EVERY = 0.2


class ScheduleMarker:
    """Keeps beat's schedule file open from ``beat_init`` until :meth:`close` (after beat stopped).

    Celery's shelve keeps the file open with gdbm or ndbm but not with ``dbm.dumb``; with the
    marker, the processes holding the schedule file open are the running schedulers whatever
    the backend (``fuser``, ``lsof``, ``/proc/*/fd``). Independent of the lock: every beat
    started through the entrypoint has it.
    """

    def __init__(self) -> None:
        self.file: IO[bytes] | None = None

    def install(self) -> None:
        from celery import signals

        signals.beat_init.connect(self.on_beat_init, weak=False)

    def on_beat_init(self, sender: Any = None, **_: Any) -> None:
        path = str(getattr(sender, "schedule_filename", "") or "")
        for candidate in (path, path + ".db", path + ".dat") if path else ():
            try:
                self.file = open(candidate, "rb")  # noqa: SIM115 - held until the scheduler stopped
                return
            except OSError:
                continue
        if path:
            # A scheduler that keeps no file (RedBeat, django-celery-beat): an empty marker beside
            # where the file would be, so "holds celerybeat-schedule* open" still means "schedules".
            try:
                self.file = open(path + RUNNING_SUFFIX, "ab")  # noqa: SIM115 - held until the scheduler stopped
            except OSError as err:
                log(f"cannot open the scheduler marker {path}{RUNNING_SUFFIX} ({err})")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def save_after_every_send(sender: Any = None, **_: Any) -> None:
    """``beat_init`` receiver: the scheduler writes its store right after each task it sends."""
    scheduler = getattr(sender, "scheduler", None)  # created by Service.start before beat_init
    if scheduler is None or scheduler.sync_every_tasks:
        return
    redbeat = sys.modules.get("redbeat.schedulers")
    if redbeat is not None and isinstance(scheduler, redbeat.RedBeatScheduler):
        return  # RedBeat writes each entry's last run to Redis as it sends it; its sync() does nothing
    scheduler.sync_every_tasks = 1
    log(f"beat: {type(scheduler).__name__} saves its schedule after every task sent (beat_sync_every=1)")


def stop_between_ticks(sender: Any = None, **_: Any) -> None:
    """``beat_init`` receiver: SIGTERM/SIGINT stop beat between two ticks, and never leave it ticking.

    Celery's handler (``Beat.install_sync_handler``) closes the scheduler inside the signal
    handler, then raises SystemExit. A signal that lands in a ``__del__`` (a result backend's
    ``AsyncResult.__del__`` unsubscribing right after a send) has its SystemExit swallowed
    ("Exception ignored in"): the tick goes on with a closed store (Celery's file scheduler
    dies with "invalid operation on closed shelf", exit 1) or, with a store that needs no
    opening (RedBeat), beat keeps ticking until SIGKILL. Instead the signal marks the shutdown
    and raises; a tick that swallowed it raises again when it returns; Celery's ``Service.start``
    then closes the scheduler in its ``finally``, as after any other SystemExit.
    """
    service = sender
    scheduler = getattr(service, "scheduler", None)
    shutdown = getattr(service, "_is_shutdown", None)
    if scheduler is None or shutdown is None:
        return
    tick = scheduler.tick

    def tick_then_maybe_stop(*args: Any, **kwargs: Any) -> Any:
        interval = tick(*args, **kwargs)
        if shutdown.is_set():
            raise SystemExit(0)
        return interval

    def stop(_signum: int, _frame: Any) -> None:
        shutdown.set()
        raise SystemExit(0)

    scheduler.tick = tick_then_maybe_stop
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)


def schedule_option(beat_args: Sequence[str]) -> str:
    """The schedule file of a ``celery ... beat`` command line (``-s``/``--schedule``, else Celery's default)."""
    for i, arg in enumerate(beat_args):
        if arg in ("-s", "--schedule") and i + 1 < len(beat_args):
            return beat_args[i + 1]
        if arg.startswith("--schedule="):
            return arg.split("=", 1)[1]
        if arg.startswith("-s") and len(arg) > 2 and not arg.startswith("--"):
            return arg[2:]
    return DEFAULT_SCHEDULE


def _exit_zero(_signum: int, _frame: Any) -> None:
    raise SystemExit(0)


class ScheduleFile:
    """Beat's schedule file as the entrypoint guards it: taken by one process at a time, saved
    after every send, visibly open while the scheduler runs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock_path = path.with_name(f".{path.name}.lock")
        self.lock_fd: int | None = None
        self.marker = ScheduleMarker()

    @classmethod
    def from_args(cls, beat_args: Sequence[str]) -> ScheduleFile:
        return cls(Path.cwd() / schedule_option(beat_args))

    def install(self) -> None:
        """Connect the schedule hooks; call before Celery loads the app."""
        from celery import signals

        signals.beat_init.connect(save_after_every_send, weak=False)
        signals.beat_init.connect(stop_between_ticks, weak=False)
        self.marker.install()

    def try_take(self) -> bool:
        """The lock on the schedule file, if no other process holds it (raises OSError when it cannot be made)."""
        if self.lock_fd is None:
            self.lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def wait_until_ours(self, heartbeat: Callable[[], None] | None, heartbeat_interval: float) -> None:
        """Returns once this process alone may open the schedule; SIGTERM meanwhile exits 0."""
        previous = {sig: signal.signal(sig, _exit_zero) for sig in (signal.SIGTERM, signal.SIGINT)}
        started, last_beat, said = time.monotonic(), -math.inf, False
        try:
            while True:
                try:
                    if self.try_take():
                        break
                except OSError as err:  # no such directory, read-only volume: Celery will say it better
                    log(f"cannot lock schedule file {self.path} ({err}); starting without the lock")
                    return
                if not said:
                    log(f"waiting for schedule file {self.path}: another beat on this volume still has it")
                    said = True
                now = time.monotonic()
                if heartbeat is not None and now - last_beat >= heartbeat_interval:
                    heartbeat()
                    last_beat = now
                time.sleep(RETRY_EVERY)
            if said:
                log(f"took schedule file {self.path} after {time.monotonic() - started:.1f}s")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def close(self) -> None:
        """After beat stopped: the marker's descriptor, then the lock (the next beat may open the file)."""
        self.marker.close()
        if self.lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.lock_fd)
            self.lock_fd = None
