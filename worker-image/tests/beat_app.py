"""The beat app of the schedule and fencing tests, copied into the test's directory (beat's cwd).

``BEAT_QUEUE``        prefix of the queues the entries send to: ``<prefix>.every``, ``<prefix>.minutely``
``BEAT_EVERY``        period of the ``every`` entry, in seconds (default 1)
``BEAT_MINUTELY=1``   adds ``minutely``, a crontab entry due at the start of every minute
``BEAT_GLOBAL_KEYPREFIX`` the broker's ``global_keyprefix`` (kombu prefixes its Redis keys with it)
``BEAT_HOLD_IN_DEL``  a directory: after the first send, beat waits inside an object's ``__del__`` (it
                      creates ``in-del`` there) until ``go`` appears, as Celery's ``AsyncResult.__del__``
                      briefly does; a signal handler's exception raised there is swallowed

Each message carries who published it and when (headers ``beat_pid``, ``beat_sent_at``), so a
test counts sends at the broker and tells which beat sent each one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery import Celery, signals
from celery.schedules import crontab

app = Celery("beat_app", broker=os.environ["CELERY_BROKER_URL"])
app.conf.timezone = "UTC"
if os.environ.get("BEAT_GLOBAL_KEYPREFIX"):
    app.conf.broker_transport_options = {"global_keyprefix": os.environ["BEAT_GLOBAL_KEYPREFIX"]}
_queue = os.environ["BEAT_QUEUE"]
app.conf.beat_schedule = {
    "every": {
        "task": "beat_app.every",
        "schedule": float(os.environ.get("BEAT_EVERY", "1")),
        "options": {"queue": f"{_queue}.every"},
    },
}
if os.environ.get("BEAT_MINUTELY") == "1":
    app.conf.beat_schedule["minutely"] = {
        "task": "beat_app.minutely",
        "schedule": crontab(minute="*"),
        "options": {"queue": f"{_queue}.minutely"},
    }


@signals.before_task_publish.connect(weak=False)
def _stamp(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if headers is not None:
        headers.update(beat_pid=os.getpid(), beat_sent_at=time.time())


class _HoldInDel:
    """Dropped right after a send: its ``__del__`` blocks, once, until the test says go."""

    def __del__(self) -> None:
        hold = Path(os.environ["BEAT_HOLD_IN_DEL"])
        if (hold / "in-del").exists():
            return
        (hold / "in-del").touch()
        deadline = time.monotonic() + 60
        while not (hold / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.01)


if os.environ.get("BEAT_HOLD_IN_DEL"):

    @signals.after_task_publish.connect(weak=False)
    def _hold(**_: Any) -> None:
        _HoldInDel()
