"""RedBeat as the entrypoint runs it by default on a Redis broker (see ``beat_store``).

Imports celery-redbeat: importing this module fails with ImportError in an image without it,
which ``beat_store`` turns into the file scheduler and a log line.

RedBeat (2.4) keeps, under ``redbeat_key_prefix``: one hash per entry (``definition`` and
``meta`` = ``last_run_at``, ``total_run_count``), the sorted set ``<prefix>:schedule`` (entry
keys scored by when they are next due) and the set ``<prefix>:statics`` (entries that came
from ``beat_schedule``, so removed ones are deleted at the next start). Every tick reads the
due entries back from Redis; sending one first writes its new ``last_run_at`` (Celery's
``Scheduler.apply_async`` reserves the entry, RedBeat's ``_next_instance`` writes it), then
publishes. A beat killed between the two loses that one send rather than doubling it.

RedBeat's own lock (``redbeat_lock_key``, a redis-py Lock taken in ``beat_init`` and extended
every tick) is switched off: the entrypoint's beat lock already admits one scheduler, before
Celery starts, and fences every send. :class:`FencedRedBeatScheduler` also runs that fence
before RedBeat writes ``last_run_at``, so a holder that lost its lock exits without recording
a send it will never make (which would make the next holder skip that tick).
"""

from __future__ import annotations

import numbers
from typing import Any

from redbeat.schedulers import REDBEAT_REDIS_KEY, RedBeatConfig, RedBeatScheduler

from . import beat_lock


class FencedRedBeatScheduler(RedBeatScheduler):
    """RedBeat whose every send first proves the beat lock, before its state is written."""

    def reserve(self, entry: Any) -> Any:
        beat_lock.fence()
        return super().reserve(entry)


def configure(app: Any, prefix: str) -> str:
    """Points RedBeat at the broker's Redis under ``global_keyprefix`` + ``prefix``, lock off.

    Returns the key prefix. The client is built from the broker connection as kombu parses it
    (URL, then ``broker_use_ssl``; kombu's own default for a ``rediss://`` URL without options),
    so RedBeat reaches exactly the server, database and credentials the broker uses.
    """
    from . import beat_store

    url = beat_store.broker_url(app)
    options = dict(app.conf.broker_transport_options or {})
    key_prefix = str(options.get("global_keyprefix") or "") + prefix
    conn = app.connection_for_write(url=url)
    try:
        client = redis_client(conn, options)
    finally:
        conn.release()
    app.conf.update(
        redbeat_redis_url=url,  # only shown (sanitized) in the banner: the client below is used
        redbeat_redis_options={},
        redbeat_key_prefix=key_prefix,
        redbeat_lock_key=None,
    )
    setattr(app, REDBEAT_REDIS_KEY, client)
    app.redbeat_conf = RedBeatConfig(app)  # not one cached before this configuration
    return key_prefix


def redis_client(conn: Any, transport_options: dict[str, Any]) -> Any:
    """A redis-py client (``decode_responses``, as RedBeat needs) for a kombu Redis connection."""
    import redis
    from kombu.utils.url import _parse_url

    kwargs: dict[str, Any] = {"decode_responses": True, "username": conn.userid, "password": conn.password}
    host = conn.hostname or "127.0.0.1"
    if "://" in host:  # redis+socket:///path?virtual_host=N: kombu keeps the whole URL as the host
        _scheme, _host, _port, user, password, path, query = _parse_url(host)
        kwargs.update(username=user, password=password, unix_socket_path="/" + (path or ""))
        kwargs["db"] = _db(query.get("virtual_host"))
    else:
        kwargs.update(host=host, port=conn.port or 6379, db=_db(conn.virtual_host))
        if conn.ssl:
            kwargs["ssl"] = True
            if isinstance(conn.ssl, dict):
                kwargs.update(conn.ssl)
    # kombu's socket options of broker_transport_options (a unix socket takes only the timeout).
    keys = ("socket_timeout", "health_check_interval")
    if "unix_socket_path" not in kwargs:
        keys += ("socket_connect_timeout", "socket_keepalive", "socket_keepalive_options")
    kwargs.update({key: transport_options[key] for key in keys if transport_options.get(key) is not None})
    return redis.Redis(**kwargs)


def _db(vhost: Any) -> int:
    """kombu's reading of the virtual host as a Redis database number."""
    if isinstance(vhost, numbers.Integral):
        return int(vhost)
    if not vhost or vhost == "/":
        return 0
    return int(str(vhost).lstrip("/"))
