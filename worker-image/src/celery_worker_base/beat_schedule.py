"""Beat's schedule store, as the entrypoint runs it: saved after every send, visibly open while in use.

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

Open while in use (:class:`ScheduleMarker`)
    Every beat started through the entrypoint, with or without a lock, keeps its schedule
    file open from ``beat_init`` until the scheduler has stopped: with every dbm backend, an
    open descriptor on the schedule file marks a running scheduler (Celery's shelve keeps
    one with gdbm or ndbm, but not with the ``dbm.dumb`` fallback).
"""

from __future__ import annotations

from typing import IO, Any

from .beat_lock import log


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

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def save_after_every_send(sender: Any = None, **_: Any) -> None:
    """``beat_init`` receiver: the scheduler writes its store right after each task it sends."""
    scheduler = getattr(sender, "scheduler", None)  # created by Service.start before beat_init
    if scheduler is None or scheduler.sync_every_tasks:
        return
    scheduler.sync_every_tasks = 1
    log(f"beat: {type(scheduler).__name__} saves its schedule after every task sent (beat_sync_every=1)")


def install() -> ScheduleMarker:
    """Connect the schedule hooks (before Celery loads the app); the marker to close after beat."""
    from celery import signals

    signals.beat_init.connect(save_after_every_send, weak=False)
    marker = ScheduleMarker()
    marker.install()
    return marker
