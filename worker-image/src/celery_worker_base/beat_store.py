"""Where beat keeps its schedule's state when nobody chose: RedBeat in the broker's Redis, else the file.

Celery's default scheduler keeps each entry's ``last_run_at`` in a file (``celerybeat-schedule``);
on a pod's emptyDir that file dies with the pod, so every rollout starts the schedule from
nothing and skips whatever fell due while no beat ran. The ecosystem's store that outlives the
pod on a Redis broker is celery-redbeat (``redbeat.RedBeatScheduler``): the schedule lives in
Redis, read on every tick, and ``last_run_at`` is written as each entry is sent.

``CELERY_BEAT_REDBEAT_KEY_PREFIX`` (set by the operator when the pool names neither
``beat.scheduler`` nor ``beat.scheduleClaimName``) asks for that default: a ``celery ... beat``
without ``-S``/``--scheduler`` (and without ``CELERY_BEAT_SCHEDULER``) gets ``-S`` :data:`FACTORY`,
which decides once the app's configuration is loaded:

* the app configures ``beat_scheduler`` itself: that scheduler, untouched;
* the broker is Redis (``redis://``, ``rediss://``, ``redis+socket://``) and celery-redbeat is
  importable: :class:`FencedRedBeatScheduler` with its keys under ``global_keyprefix`` + the
  prefix, on a Redis client built from the broker connection exactly as kombu sees it (URL,
  ``broker_use_ssl``, password, username, database, socket options of
  ``broker_transport_options``), and RedBeat's own lock off (``redbeat_lock_key = None``): the
  entrypoint's beat lock (``CELERY_BEAT_LOCK``) is the singleton, and its fence proves the lock
  both before RedBeat records a send and before the message leaves;
* anything else (RabbitMQ, Sentinel, a credential provider, an image without celery-redbeat):
  Celery's file scheduler, as without the variable, with one log line saying why.

Nothing here crashes a beat that cannot use RedBeat: the fallback is the file, as before.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from . import beat_lock
from .beat_lock import log

PREFIX_ENV = "CELERY_BEAT_REDBEAT_KEY_PREFIX"
#: What the entrypoint passes as ``-S``: a factory, so the choice sees the loaded app.
FACTORY = "celery_worker_base.beat_store:default_scheduler"
#: Celery's file scheduler (its ``beat_scheduler`` default).
FILE_SCHEDULER = "celery.beat:PersistentScheduler"


def scheduler_option(celery_args: Sequence[str]) -> str | None:
    """The ``-S``/``--scheduler`` of a ``celery ... beat`` command line, if given."""
    for i, arg in enumerate(celery_args):
        if arg in ("-S", "--scheduler") and i + 1 < len(celery_args):
            return celery_args[i + 1]
        if arg.startswith("--scheduler="):
            return arg.split("=", 1)[1]
        if arg.startswith("-S") and len(arg) > 2:
            return arg[2:]
    return None


def with_default_scheduler(celery_args: list[str], env: dict[str, str] | os._Environ = os.environ) -> list[str]:
    """``celery_args`` with ``-S`` :data:`FACTORY` after ``beat`` when the default was asked for
    and nothing else chose a scheduler; else unchanged."""
    prefix = env.get(PREFIX_ENV, "").strip()
    if not prefix or beat_lock.celery_subcommand(celery_args) != "beat":
        return celery_args
    if scheduler_option(celery_args) is not None or env.get("CELERY_BEAT_SCHEDULER", "").strip():
        return celery_args
    at = _subcommand_index(celery_args)
    return [*celery_args[: at + 1], "-S", FACTORY, *celery_args[at + 1 :]]


def _subcommand_index(args: Sequence[str]) -> int:
    skip = False
    for i, arg in enumerate(args):
        if skip:
            skip = False
        elif arg in beat_lock._CELERY_VALUE_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            return i
    raise ValueError("no subcommand")


# ---------------------------------------------------------------------------- the choice

_chosen: dict[int, type] = {}


def default_scheduler(app: Any, **kwargs: Any) -> Any:
    """``-S`` target: builds the scheduler :func:`choose` picks (Celery calls this twice: once lazily
    for the banner, once for real)."""
    cls = _chosen.get(id(app))
    if cls is None:
        cls = _chosen[id(app)] = choose(app, os.environ.get(PREFIX_ENV, "").strip())
    return cls(app=app, **kwargs)


def app_scheduler(app: Any) -> str | None:
    """The app's own ``beat_scheduler``, if its configuration sets one."""
    from celery.app.defaults import DEFAULTS

    value = app.conf.beat_scheduler
    explicit = any("beat_scheduler" in layer for layer in app.conf.maps[:-1])
    return str(value) if explicit or value != DEFAULTS["beat_scheduler"] else None


def choose(app: Any, prefix: str) -> type:
    """The scheduler class for this beat (see the module doc), configured; logs the choice."""
    from celery.utils.imports import load_extension_class_names, symbol_by_name

    own = app_scheduler(app)
    if own is not None:
        log(f"beat: the app configures beat_scheduler {own}; {PREFIX_ENV} is ignored")
        aliases = dict(load_extension_class_names("celery.beat_schedulers"))
        return symbol_by_name(own, aliases=aliases)
    why = _redbeat_unusable(app)
    if why is None:
        try:
            from .beat_redbeat import FencedRedBeatScheduler, configure
        except ImportError as err:
            why = f"celery-redbeat is not installed in this image ({err})"
        else:
            key_prefix = configure(app, prefix)
            log(
                f"beat: schedule kept in Redis by RedBeat (broker {beat_lock.sanitize(broker_url(app))}, "
                f"keys {key_prefix}*, RedBeat's own lock off: the beat lock is the singleton)"
            )
            return FencedRedBeatScheduler
    log(f"beat: schedule kept in Celery's schedule file, not in Redis: {why}")
    return symbol_by_name(FILE_SCHEDULER)


def broker_url(app: Any) -> str:
    """The first broker URL the app uses (kombu's failover form ``a;b`` lists several)."""
    url = app.conf.broker_url or ""
    if isinstance(url, (list, tuple)):
        url = url[0] if url else ""
    return str(url).split(";")[0].strip()


def _redbeat_unusable(app: Any) -> str | None:
    if not beat_lock.held():
        return f"no beat lock is held ({beat_lock.LOCK_ENV}), and RedBeat's own lock stays off only behind it"
    url = broker_url(app)
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme == "sentinel":
        return "the broker is Redis behind Sentinel, where the beat lock (and so its fence) does not run"
    if scheme not in ("redis", "rediss", "redis+socket", "socket"):
        where = f"the broker is {scheme}://" if scheme else "no broker URL"
        return f"{where} (RedBeat keeps its state in Redis only)"
    if (app.conf.broker_transport_options or {}).get("credential_provider"):
        return "the broker authenticates with a credential_provider, which RedBeat's client is not given"
    return None
