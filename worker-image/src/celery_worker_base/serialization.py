"""JSON-only serialization, enforced on the user's app without its cooperation.

A worker that accepts pickle executes whatever bytes anyone with write access
to the broker sends it. The entrypoint therefore overrides the app's
``accept_content``/``result_accept_content`` with an allow-list (``json``
unless the operator of the pod opts in), and moves ``task_serializer``,
``result_serializer`` and ``event_serializer`` to ``json`` when the app
configured something outside that list.

Opt-in, by environment (both may be combined):

``CELERY_ACCEPT_CONTENT=json,msgpack``
    the allow-list, comma separated (serializer names or content types).
``CELERY_ALLOW_PICKLE=1``
    adds ``pickle`` to the allow-list.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from celery import Celery, signals
from celery._state import connect_on_app_finalize
from kombu.serialization import prepare_accept_content, registry

ACCEPT_CONTENT_ENV = "CELERY_ACCEPT_CONTENT"
ALLOW_PICKLE_ENV = "CELERY_ALLOW_PICKLE"

SERIALIZER_SETTINGS = ("task_serializer", "result_serializer", "event_serializer")

logger = logging.getLogger(__name__)


def allowed_content(env: Mapping[str, str] = os.environ) -> list[str]:
    """The allow-list from the environment; raises if a name is unknown to kombu."""
    names = [n.strip() for n in env.get(ACCEPT_CONTENT_ENV, "json").split(",") if n.strip()]
    if _truthy(env.get(ALLOW_PICKLE_ENV, "")):
        names.append("pickle")
    allowed = list(dict.fromkeys(names)) or ["json"]
    prepare_accept_content(allowed)  # SerializerNotInstalled for a typo, at startup
    return allowed


def enforce(app: Celery, allowed: list[str]) -> None:
    """Restrict ``app``'s settings to the ``allowed`` content types; idempotent."""
    conf = app.conf
    allowed_types = prepare_accept_content(allowed)
    changes: dict[str, Any] = {}
    for key in ("accept_content", "result_accept_content"):
        current = conf.get(key)
        if current is None or prepare_accept_content(current) != allowed_types:
            changes[key] = list(allowed)
    for key in SERIALIZER_SETTINGS:
        if not _is_allowed(conf.get(key), allowed_types):
            changes[key] = _fallback(allowed, allowed_types)
    if not changes:
        return
    overridden = {k: conf.get(k) for k in changes if conf.get(k) is not None}
    for key, value in changes.items():
        conf[key] = value
    if overridden:
        logger.warning(
            "celery-entrypoint: serialization restricted to %s; overrode app settings %s. "
            "Set %s or %s=1 to allow more.",
            ",".join(allowed),
            ", ".join(f"{k}={v!r}" for k, v in sorted(overridden.items())),
            ACCEPT_CONTENT_ENV,
            ALLOW_PICKLE_ENV,
        )


def enforce_on_tasks(app: Celery, allowed: list[str]) -> None:
    """Move bound tasks whose ``serializer`` is not allowed to the fallback.

    Tasks copy ``task_serializer`` when they bind; Celery's own finalizers
    may bind them before ours has changed the setting (they run in set
    order), and a task may name its own serializer.
    """
    allowed_types = prepare_accept_content(allowed)
    for task in app.tasks.values():
        if not _is_allowed(task.serializer, allowed_types):
            logger.warning(
                "celery-entrypoint: task %s: serializer %r not allowed, using %r",
                task.name,
                task.serializer,
                _fallback(allowed, allowed_types),
            )
            type(task).serializer = _fallback(allowed, allowed_types)


def _is_allowed(serializer: Any, allowed_types: set[str]) -> bool:
    return registry.name_to_type.get(serializer, serializer) in allowed_types


def _fallback(allowed: list[str], allowed_types: set[str]) -> str:
    return "json" if "application/json" in allowed_types else allowed[0]


def install(allowed: list[str]) -> None:
    """Enforce the allow-list on every app this process loads.

    At finalize (every command: beat must send JSON too) the settings are
    changed, and once all tasks are bound, their serializers. ``celeryd_init``
    repeats the settings check before the worker checks privileges and
    builds its consumer, for an app finalized before ours could run.
    """

    def on_finalize(app: Celery) -> None:
        enforce(app, allowed)
        app.on_after_finalize.connect(on_after_finalize, weak=False)

    def on_after_finalize(sender: Celery, **_: Any) -> None:
        enforce_on_tasks(sender, allowed)

    def on_celeryd_init(sender: Any = None, instance: Any = None, **_: Any) -> None:
        enforce(instance.app, allowed)

    connect_on_app_finalize(on_finalize)
    signals.celeryd_init.connect(on_celeryd_init, weak=False)


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")
