"""The beat singleton: a lock on the broker, taken before ``celery beat`` starts.

When ``CELERY_BEAT_LOCK`` names a lock and the command is ``celery ... beat``,
the entrypoint takes the lock on the broker (``CELERY_BROKER_URL``, or the
``-b/--broker`` option) before Celery is even invoked, keeps it while beat
runs, and gives it back on exit. A second beat of the same lock waits (alive,
never ready) until the first is gone, so two schedulers never overlap: not
after ``kubectl scale --replicas 3``, not while the operator is down, not in a
rollout.

Redis (``redis://``, ``rediss://``, ``redis+socket://``)
    ``SET <name> <holder> NX PX <ttl>``. A thread renews it every ttl/3 with a
    compare-and-PEXPIRE script. Each attempt is bounded by a socket timeout;
    failed attempts are retried only while an attempt can still finish before
    the key could expire (ttl after the last successful renewal was *sent*,
    minus a margin). When the key is gone or names another holder, or when
    time runs out, the process exits at once (``os._exit``), before anyone
    else can take the key. A warm shutdown (SIGTERM) releases the key with a
    compare-and-DEL, so the next beat (a Recreate rollout's new pod) starts at
    once; a killed beat's key expires after the ttl. The key is exactly the
    lock name: Celery's ``global_keyprefix`` is not applied (the key is not
    kombu's, and the operator's name already carries namespace and app).

RabbitMQ (``amqp://``, ``amqps://``)
    An exclusive queue named after the lock, declared on a dedicated
    connection, is the lock: a second declare gets RESOURCE_LOCKED and is
    retried every second. The broker deletes the queue when the connection
    goes (at once when the process dies, after missed heartbeats when the
    network does). The holder checks its queue every third of a lease
    (the negotiated heartbeat, at most the ttl); a failed check or a lost
    connection exits the process at once.

Other broker schemes (``sentinel://``, SQS, ...) get a warning and no lock.

Fencing: before every message beat publishes, the holder renews the lock
(one broker round trip) and exits instead of sending if the lock is no longer
its own, or if its lease ran out by the clock (a process frozen by SIGSTOP or
a VM pause and then resumed). A lost key thus stops the old holder at its
next send, not at its next renewal.

The schedule itself (what beat sends when) is ``beat_schedule``'s concern; the
entrypoint closes it before the lock is released.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

LOCK_ENV = "CELERY_BEAT_LOCK"
TTL_ENV = "CELERY_BEAT_LOCK_TTL_SECONDS"
DEFAULT_TTL = 10.0
MIN_TTL = 1.0
#: Exit status when the lock is lost while beat runs (EX_TEMPFAIL); kubelet restarts the container.
LOST_EXIT_CODE = 75
#: How often a waiting beat says it is still waiting.
STILL_WAITING_EVERY = 30.0
#: Longest pause between two attempts to take a held lock.
RETRY_EVERY = 1.0

REDIS_SCHEMES = ("redis", "rediss", "redis+socket", "socket")
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")

# Celery's global options that take a value (so the subcommand is found after them).
_CELERY_VALUE_OPTIONS = ("-A", "--app", "-b", "--broker", "--result-backend", "--loader", "--config", "--workdir")

_RENEW = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, holder}
end
if holder then return {0, holder} end
return {0}
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class LockConfigError(ValueError):
    """The lock's environment or the broker URL is unusable."""


class LockUnavailable(Exception):
    """The broker could not be asked (connection refused, timeout, ...): try again later."""


class LockLost(Exception):
    """The lock is definitely not ours any more."""


def log(message: str) -> None:
    """One line on stderr (the container log); never contains the broker password.

    The process's own stderr, also once Celery has redirected ``sys.stderr`` into its logger.
    """
    print(f"celery-entrypoint: {message}", file=sys.__stderr__ or sys.stderr, flush=True)


# ---------------------------------------------------------------------------- settings


def celery_subcommand(args: Sequence[str]) -> str | None:
    """The subcommand of a ``celery`` command line (``beat`` in ``-A app beat -S x``)."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in _CELERY_VALUE_OPTIONS:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def broker_option(args: Sequence[str]) -> str | None:
    """The value of ``-b``/``--broker`` anywhere on the command line, if given."""
    for i, arg in enumerate(args):
        if arg in ("-b", "--broker") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--broker="):
            return arg.split("=", 1)[1]
    return None


def sanitize(url: str) -> str:
    """The broker URL without its password, for messages."""
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))


@dataclass(frozen=True)
class Timing:
    """When a holder renews and when it must give up, as a function of its lease.

    ``lease`` is how long the lock stays ours after a successful renewal was
    sent (Redis: the ttl; RabbitMQ: the heartbeat timeout). The holder renews
    every lease/3 and starts an attempt only if it can end (connect plus
    command, each bounded by ``attempt_timeout``) before ``give_up_at``,
    which leaves a margin of lease/10 before the lock could pass to another.
    """

    lease: float

    @property
    def renew_every(self) -> float:
        return self.lease / 3

    @property
    def attempt_timeout(self) -> float:
        return self.lease / 6

    @property
    def margin(self) -> float:
        return self.lease / 10

    def renew_at(self, last_sent: float) -> float:
        return last_sent + self.renew_every

    def give_up_at(self, last_sent: float) -> float:
        return last_sent + self.lease - self.margin

    def may_attempt(self, now: float, last_sent: float) -> bool:
        return now + 2 * self.attempt_timeout <= self.give_up_at(last_sent)


@dataclass(frozen=True)
class LockSettings:
    name: str
    ttl: float
    broker_url: str
    holder: str

    @classmethod
    def from_env(cls, celery_args: Sequence[str], env: Mapping[str, str] = os.environ) -> LockSettings | None:
        """The lock to take, or None when this is not a beat or no lock is configured."""
        name = env.get(LOCK_ENV, "").strip()
        if not name or celery_subcommand(celery_args) != "beat":
            return None
        raw_ttl = env.get(TTL_ENV, "").strip()
        try:
            ttl = float(raw_ttl) if raw_ttl else DEFAULT_TTL
        except ValueError:
            ttl = -1.0
        if not (MIN_TTL <= ttl < math.inf):
            raise LockConfigError(f"{TTL_ENV}={raw_ttl!r} is not a number of seconds >= {MIN_TTL:g}")
        broker = broker_option(celery_args) or env.get("CELERY_BROKER_URL", "").strip()
        if not broker:
            raise LockConfigError(f"{LOCK_ENV} is set but there is no broker: set CELERY_BROKER_URL")
        # kombu's failover form `url1;url2`: the lock lives on the first broker.
        broker = broker.split(";")[0].strip()
        pod = env.get("POD_NAME", "").strip() or socket.gethostname()
        holder = f"{pod}:{os.getpid()}:{secrets.token_hex(4)}"
        return cls(name=name, ttl=ttl, broker_url=broker, holder=holder)

    @property
    def scheme(self) -> str:
        return self.broker_url.split("://", 1)[0].lower() if "://" in self.broker_url else ""


# ---------------------------------------------------------------------------- backends


class Backend(Protocol):
    #: What the lock lives on, without credentials.
    where: str

    def try_acquire(self) -> tuple[bool, str | None, float]:
        """(taken, current holder if known, lease) — raises LockUnavailable."""
        ...

    def renew(self, timeout: float) -> None:
        """Extends (or checks) the lock — raises LockLost or LockUnavailable."""
        ...

    def release(self) -> None:
        """Gives the lock back, best effort."""
        ...


class RedisBackend:
    def __init__(self, settings: LockSettings) -> None:
        import redis
        from kombu.utils.url import url_to_parts
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.settings = settings
        self.where = sanitize(settings.broker_url)
        self.ttl_ms = max(1, int(settings.ttl * 1000))
        self.timing = Timing(settings.ttl)
        parts = url_to_parts(settings.broker_url)
        kwargs: dict[str, Any] = {
            "username": parts.username,
            "password": parts.password,
            "socket_timeout": self.timing.attempt_timeout,
            "socket_connect_timeout": self.timing.attempt_timeout,
            # Our own deadline decides about retries: redis-py's must not stretch an attempt.
            "retry": Retry(NoBackoff(), 0),
            "decode_responses": True,
        }
        if parts.scheme in ("redis+socket", "socket"):
            kwargs["unix_socket_path"] = "/" + (parts.path or "")
            kwargs["db"] = int(parts.query.get("virtual_host") or 0)
        else:
            kwargs["host"] = parts.hostname or "localhost"
            kwargs["port"] = parts.port or 6379
            try:
                kwargs["db"] = int((parts.path or "0").strip("/") or 0)
            except ValueError as err:
                raise LockConfigError(f"broker {self.where}: the database is not a number") from err
            if parts.scheme == "rediss":
                kwargs["ssl"] = True
                reqs = parts.query.get("ssl_cert_reqs", "required").lower().replace("cert_", "")
                kwargs["ssl_cert_reqs"] = reqs
                for key in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
                    if parts.query.get(key):
                        kwargs[key] = parts.query[key]
        self.client = redis.Redis(**kwargs)
        self.errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)

    def try_acquire(self) -> tuple[bool, str | None, float]:
        try:
            if self.client.set(self.settings.name, self.settings.holder, nx=True, px=self.ttl_ms):
                return True, self.settings.holder, self.settings.ttl
            return False, self.client.get(self.settings.name), self.settings.ttl
        except self.errors as err:
            raise LockUnavailable(str(err)) from err

    def renew(self, timeout: float) -> None:
        try:
            reply = self.client.eval(_RENEW, 1, self.settings.name, self.settings.holder, self.ttl_ms)
        except self.errors as err:
            raise LockUnavailable(str(err)) from err
        if not reply or int(reply[0]) != 1:
            holder = reply[1] if reply and len(reply) > 1 else None
            raise LockLost(f"the key now belongs to {holder}" if holder else "the key is gone")

    def release(self) -> None:
        try:
            self.client.eval(_RELEASE, 1, self.settings.name, self.settings.holder)
        except self.errors as err:
            log(f"could not release beat lock {self.settings.name} ({err}); it expires by itself")
        with contextlib.suppress(*self.errors):
            self.client.close()


class AmqpBackend:
    def __init__(self, settings: LockSettings) -> None:
        import amqp
        from kombu.utils.url import url_to_parts

        self.amqp = amqp
        self.settings = settings
        self.where = sanitize(settings.broker_url)
        parts = url_to_parts(settings.broker_url)
        tls = parts.scheme == "amqps"
        self.params: dict[str, Any] = {
            "host": f"{parts.hostname or 'localhost'}:{parts.port or (5671 if tls else 5672)}",
            "userid": parts.username or "guest",
            "password": parts.password or "guest",
            "virtual_host": parts.path or "/",
            "ssl": tls,
            "heartbeat": max(1, math.ceil(settings.ttl)),
            "connect_timeout": Timing(settings.ttl).attempt_timeout,
            "read_timeout": Timing(settings.ttl).attempt_timeout,
            "write_timeout": Timing(settings.ttl).attempt_timeout,
            "client_properties": {"connection_name": f"celery beat lock {settings.holder}"},
        }
        self.conn: Any = None
        self.channel: Any = None
        self.errors: tuple[type[BaseException], ...] = (amqp.exceptions.AMQPError, OSError, socket.timeout)

    def _connect(self) -> Any:
        if self.conn is None:
            conn = self.amqp.Connection(**self.params)
            conn.connect()
            self.conn = conn
        return self.conn

    def _drop(self) -> None:
        conn, self.conn, self.channel = self.conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.collect()

    def lease(self) -> float:
        # The broker drops a silent connection (and with it the queue) no sooner than one
        # heartbeat timeout after it last heard from us; with heartbeats off, only TCP tells.
        negotiated = float(getattr(self.conn, "heartbeat", 0) or 0)
        if not 0 < negotiated < self.settings.ttl:
            return self.settings.ttl
        # The broker asked for shorter heartbeats than the ttl: bound each check by that lease.
        timeout = Timing(negotiated).attempt_timeout
        sec, usec = int(timeout), int((timeout - int(timeout)) * 1_000_000)
        with contextlib.suppress(OSError, AttributeError):
            for option in (socket.SO_SNDTIMEO, socket.SO_RCVTIMEO):
                self.conn.transport.sock.setsockopt(socket.SOL_SOCKET, option, struct.pack("ll", sec, usec))
        return negotiated

    def try_acquire(self) -> tuple[bool, str | None, float]:
        try:
            conn = self._connect()
            channel = conn.channel()
            try:
                channel.queue_declare(
                    queue=self.settings.name,
                    exclusive=True,
                    durable=False,
                    auto_delete=False,
                    arguments={"x-queue-type": "classic"},
                )
            except self.amqp.exceptions.ResourceLocked:
                return False, "another connection", self.settings.ttl
            self.channel = channel
            return True, self.settings.holder, self.lease()
        except self.errors as err:
            self._drop()
            raise LockUnavailable(str(err) or type(err).__name__) from err

    def renew(self, timeout: float) -> None:
        # Any failure means the connection (and so the exclusive queue) may be gone.
        try:
            self.channel.queue_declare(queue=self.settings.name, passive=True)
        except Exception as err:  # noqa: BLE001 - every failure is a lost lock here
            raise LockLost(f"the lock's connection failed: {str(err) or type(err).__name__}") from err

    def release(self) -> None:
        conn, self.conn, self.channel = self.conn, None, None
        if conn is not None:
            try:
                conn.close()  # the exclusive queue goes with the connection
            except Exception:  # noqa: BLE001
                with contextlib.suppress(Exception):
                    conn.collect()


def backend_for(settings: LockSettings) -> Backend | None:
    if settings.scheme in REDIS_SCHEMES:
        return RedisBackend(settings)
    if settings.scheme in AMQP_SCHEMES:
        return AmqpBackend(settings)
    return None


# ---------------------------------------------------------------------------- holding


class Terminated(BaseException):
    """SIGTERM/SIGINT arrived while waiting for the lock."""


def _lost(message: str) -> None:
    # os.write, not print: no buffer or lock between us and the exit.
    with contextlib.suppress(OSError):
        os.write(2, f"celery-entrypoint: {message}; stopping beat now\n".encode())
    os._exit(LOST_EXIT_CODE)


#: The held lock's fence (:meth:`HeldLock.on_before_publish`), once beat runs under the lock.
_fence: Callable[[], None] | None = None


def held() -> bool:
    """This process holds the beat lock (and fences its sends)."""
    return _fence is not None


def fence() -> None:
    """Proves on the broker that the beat lock is still ours, or exits the process; a no-op without a lock.

    Before every publish anyway (``before_task_publish``); a scheduler that records a send
    elsewhere first (RedBeat writes ``last_run_at`` before it publishes) calls it before that too.
    """
    if _fence is not None:
        _fence()


class HeldLock:
    """The lock while beat runs: renewal thread, publish guard, schedule marker, release."""

    def __init__(self, settings: LockSettings, backend: Backend, lease: float, sent: float) -> None:
        self.settings = settings
        self.backend = backend
        self.timing = Timing(lease)
        self.last_sent = sent
        self.mutex = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="celery-beat-lock", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def ensure_valid(self) -> None:
        """Exit at once if the lease may have run out (e.g. after SIGSTOP/SIGCONT)."""
        if not self.stopped.is_set() and time.monotonic() >= self.timing.give_up_at(self.last_sent):
            _lost(f"beat lock {self.settings.name} was not renewed in time")

    def _run(self) -> None:
        while not self.stopped.wait(max(0.0, self.timing.renew_at(self.last_sent) - time.monotonic())):
            with self.mutex:
                if self.stopped.is_set():
                    return
                # A send may have renewed while this thread slept: then the next renewal is later.
                if time.monotonic() >= self.timing.renew_at(self.last_sent):
                    self._renew_once()

    def _renew_once(self, when: str = "") -> None:
        last_error = "no attempt fitted"
        while True:
            now = time.monotonic()
            if not self.timing.may_attempt(now, self.last_sent):
                _lost(f"could not renew beat lock {self.settings.name}{when} on {self.backend.where} ({last_error})")
            try:
                self.backend.renew(self.timing.attempt_timeout)
            except LockLost as err:
                _lost(f"lost beat lock {self.settings.name}{when}: {err}")
            except LockUnavailable as err:
                last_error = str(err)
                time.sleep(min(0.1, self.timing.attempt_timeout))
                continue
            self.last_sent = now
            return

    def on_before_publish(self, **_: Any) -> None:
        """Fencing: each message beat is about to publish first proves, on the broker, that the lock is ours.

        The clock alone is not enough: a key that vanishes (a Redis restarted without persistence,
        FLUSHDB, eviction) lets a waiter take over while this process's lease still looks valid.
        The proof is the renewal itself (one round trip: Redis compare-and-PEXPIRE, RabbitMQ
        passive declare of the lock queue), so it also extends the lease. A lock that is gone
        exits the process before the message leaves; a broker that does not answer is retried
        until the lease could end, as a renewal is. Celery's signal dispatcher swallows
        exceptions, so exiting is the only way to stop the send.
        """
        with self.mutex:
            self.ensure_valid()
            if not self.stopped.is_set():
                self._renew_once(" before sending a task")

    def install_celery_hooks(self) -> None:
        # before_task_publish: every scheduler class (Celery's, redbeat, django-celery-beat, ...)
        # sends through Scheduler.apply_async -> app.send_task -> amqp.send_task_message, which
        # sends this signal right before producer.publish.
        from celery import signals

        global _fence
        signals.before_task_publish.connect(self.on_before_publish, weak=False)
        _fence = self.on_before_publish

    def release(self) -> None:
        """After the scheduler stopped (and its schedule was closed): stop renewing, give the lock back."""
        self.stopped.set()
        with self.mutex:
            self.backend.release()
        log(f"released beat lock {self.settings.name}")


def _raise_terminated(signum: int, _frame: Any) -> None:
    raise Terminated(signum)


def _raise_exit(signum: int, _frame: Any) -> None:
    raise SystemExit(0)


def acquire(
    settings: LockSettings,
    backend: Backend,
    heartbeat: Callable[[], None] | None = None,
    heartbeat_interval: float = 10.0,
) -> HeldLock | None:
    """Waits for the lock; None when SIGTERM/SIGINT came first (after trying to give it back)."""
    previous = {sig: signal.signal(sig, _raise_terminated) for sig in (signal.SIGTERM, signal.SIGINT)}
    pause = min(RETRY_EVERY, settings.ttl / 4)
    started = last_said = time.monotonic()
    last_beat = -math.inf
    said_waiting = said_unavailable = False
    try:
        while True:
            now = time.monotonic()
            if heartbeat is not None and now - last_beat >= heartbeat_interval:
                heartbeat()
                last_beat = now
            try:
                sent = time.monotonic()
                taken, holder, lease = backend.try_acquire()
            except LockUnavailable as err:
                if not said_unavailable or now - last_said >= STILL_WAITING_EVERY:
                    log(f"cannot reach {backend.where} for beat lock {settings.name}: {err}; retrying")
                    said_unavailable, last_said = True, now
            else:
                if taken:
                    log(
                        f"acquired beat lock {settings.name} as {settings.holder} on {backend.where} "
                        f"(lease {lease:g}s) after {now - started:.1f}s"
                    )
                    # Until Celery installs its own handlers, a SIGTERM exits through the release.
                    for sig in previous:
                        signal.signal(sig, _raise_exit)
                    return HeldLock(settings, backend, lease, sent)
                if not said_waiting:
                    log(f"waiting for beat lock {settings.name} held by {holder or 'nobody (expiring)'}")
                    said_waiting, last_said = True, now
                elif now - last_said >= STILL_WAITING_EVERY:
                    log(f"still waiting for beat lock {settings.name} held by {holder} ({now - started:.0f}s)")
                    last_said = now
            time.sleep(pause)
    except Terminated as sig:
        for sig_num, handler in previous.items():
            signal.signal(sig_num, handler)
        log(f"{signal.Signals(sig.args[0]).name} while waiting for beat lock {settings.name}; exiting")
        # A SET that went through just before the signal would otherwise block others for a ttl.
        with contextlib.suppress(Exception):
            backend.release()
        return None
