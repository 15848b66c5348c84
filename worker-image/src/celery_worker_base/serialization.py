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
from typing import Any, List, Mapping

from celery import Celery, signals
from celery._state import connect_on_app_finalize
from kombu.serialization import prepare_accept_content, registry

ACCEPT_CONTENT_ENV = "CELERY_ACCEPT_CONTENT"
ALLOW_PICKLE_ENV = "CELERY_ALLOW_PICKLE"

SERIALIZER_SETTINGS = ("task_serializer", "result_serializer", "event_serializer")

logger = logging.getLogger(__name__)


def allowed_content(env: Mapping[str, str] = os.environ) -> List[str]:
    """The allow-list from the environment; raises if a name is unknown to kombu."""
    names = [n.strip() for n in env.get(ACCEPT_CONTENT_ENV, "json").split(",") if n.strip()]
    if _truthy(env.get(ALLOW_PICKLE_ENV, "")):
        names.append("pickle")
    allowed = list(dict.fromkeys(names)) or ["json"]
    prepare_accept_content(allowed)  # SerializerNotInstalled for a typo, at startup
    return allowed


def enforce(app: Celery, allowed: List[str]) -> None:
    """Restrict ``app`` to the ``allowed`` content types; idempotent."""
    conf = app.conf
    allowed_types = prepare_accept_content(allowed)
    changes: dict[str, Any] = {}
    for key in ("accept_content", "result_accept_content"):
        current = conf.get(key)
        if current is None or prepare_accept_content(current) != allowed_types:
            changes[key] = list(allowed)
    fallback = "json" if "application/json" in allowed_types else allowed[0]
    for key in SERIALIZER_SETTINGS:
        name = conf.get(key)
        if registry.name_to_type.get(name, name) not in allowed_types:
            changes[key] = fallback
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


def install(allowed: List[str]) -> None:
    """Enforce the allow-list on every app this process loads.

    ``connect_on_app_finalize`` runs before tasks bind their serializer (so
    beat and other commands send JSON); ``celeryd_init`` runs before the
    worker checks privileges and builds its consumer, for an app that was
    finalized early by user code.
    """

    def on_finalize(app: Celery) -> None:
        enforce(app, allowed)

    def on_celeryd_init(sender: Any = None, instance: Any = None, **_: Any) -> None:
        enforce(instance.app, allowed)

    connect_on_app_finalize(on_finalize)
    signals.celeryd_init.connect(on_celeryd_init, weak=False)


def _truthy(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")
