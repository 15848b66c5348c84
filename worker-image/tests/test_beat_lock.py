"""``CELERY_BEAT_LOCK``: at most one beat schedules, whatever runs how many beat entrypoints.

Real beats through the real entrypoint, each with its own schedule directory (as
separate pods would have), against a private redis-server (and a private
RabbitMQ node for the AMQP lock). A ttl of 2 s keeps the takeovers short.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    ENTRYPOINT,
    RabbitServer,
    RedisServer,
    Send,
    Spawner,
    Worker,
    holds_schedule_open,
    redis_sends,
    start_beat,
    wait_until,
)

from celery_worker_base import beat_lock
from celery_worker_base.beat_lock import LockConfigError, LockSettings, Timing, celery_subcommand

LOST = beat_lock.LOST_EXIT_CODE


def schedules(beat: Worker) -> bool:
    """Celery's beat service started: it logged so, and it created its schedule."""
    started = "beat: Starting..." in beat.output()
    created = any(beat.schedule_dir.iterdir())  # type: ignore[attr-defined]
    assert started == created or not started, f"log and schedule disagree:\n{beat.output()}"
    return started and created


def waiting(beat: Worker, lock: str) -> bool:
    assert beat.proc.poll() is None, f"beat exited with {beat.proc.returncode}:\n{beat.output()}"
    return f"waiting for beat lock {lock} held by" in beat.output()


def assert_waits_without_scheduling(beat: Worker, lock: str, holder_pod: str) -> None:
    out = beat.output()
    assert f"waiting for beat lock {lock} held by {holder_pod}:" in out, out
    assert out.count("celery-entrypoint: waiting for beat lock") == 1, "said once (then every 30 s)"
    assert not schedules(beat) and not holds_schedule_open(beat.proc.pid)
    assert beat.passes("liveness"), beat.probe("liveness").stdout
    assert not beat.passes("readiness")


def renewals(client, key: str, count: int) -> None:
    """Waits until the key's remaining ttl went up ``count`` times (each rise is a renewal)."""
    seen = {"rises": 0, "last": None}

    def rose() -> bool:
        pttl = client.pttl(key)
        assert pttl > 0, f"the key {key} is gone (pttl {pttl})"
        if seen["last"] is not None and pttl > seen["last"]:
            seen["rises"] += 1
        seen["last"] = pttl
        return seen["rises"] >= count

    wait_until(rose, 60, f"{count} renewals of {key}", interval=0.02)


def new_lock() -> str:
    return f"celery-operator:beat:test:{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------------------- Redis


def test_one_beat_schedules_the_others_wait_and_take_over_on_sigterm_and_sigkill(
    spawn: Spawner, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    lock = new_lock()
    a = start_beat(spawn, redis_server.url, lock, "a")
    a.wait_ready()
    assert client.get(lock).decode().startswith(f"beat-a:{a.proc.pid}:")
    assert schedules(a) and holds_schedule_open(a.proc.pid)

    b = start_beat(spawn, redis_server.url, lock, "b")
    c = start_beat(spawn, redis_server.url, lock, "c")
    wait_until(lambda: waiting(b, lock) and waiting(c, lock), 60, "b and c to wait for the lock")
    renewals(client, lock, 3)  # a keeps the lock for longer than a ttl; b and c keep waiting
    assert client.get(lock).decode().startswith("beat-a:")
    assert_waits_without_scheduling(b, lock, "beat-a")
    assert_waits_without_scheduling(c, lock, "beat-a")

    # SIGTERM while waiting: exits 0 and leaves the lock alone.
    c.proc.send_signal(signal.SIGTERM)
    assert c.proc.wait(timeout=60) == 0, c.output()
    assert "SIGTERM while waiting for beat lock" in c.output()
    assert not schedules(c)
    assert client.get(lock).decode().startswith("beat-a:")

    # SIGTERM to the holder: warm shutdown, then the key is released (not left to expire).
    a.proc.send_signal(signal.SIGTERM)
    assert a.proc.wait(timeout=60) == 0, a.output()
    holder = client.get(lock)
    assert holder is None or holder.decode().startswith("beat-b:"), f"a left its key behind: {holder!r}"
    assert f"released beat lock {lock}" in a.output()
    b.wait_ready()
    assert schedules(b) and holds_schedule_open(b.proc.pid)
    assert client.get(lock).decode().startswith(f"beat-b:{b.proc.pid}:")

    # SIGKILL to the holder: nothing is released, the next beat takes over once the key expired.
    d = start_beat(spawn, redis_server.url, lock, "d")
    wait_until(lambda: waiting(d, lock), 60, "d to wait for the lock")
    b.signal_group(signal.SIGKILL)
    b.proc.wait(timeout=60)
    assert client.get(lock).decode().startswith("beat-b:"), "a killed beat cannot release"
    d.wait_ready()
    assert schedules(d) and client.get(lock).decode().startswith("beat-d:")
    assert "acquired beat lock" in d.output()


def test_a_holder_whose_key_is_taken_or_deleted_exits_at_once(spawn: Spawner, redis_server: RedisServer) -> None:
    client = redis_server.client()
    for how, name in (("taken", "x"), ("deleted", "y")):
        lock = new_lock()
        beat = start_beat(spawn, redis_server.url, lock, name)
        beat.wait_ready()
        if how == "taken":
            client.set(lock, "intruder")
        else:
            client.delete(lock)
        assert beat.proc.wait(timeout=60) == LOST, beat.output()
        expected = "the key now belongs to intruder" if how == "taken" else "the key is gone"
        # Found by the renewal thread or by the check before the next tick, whichever came first.
        assert re.search(
            rf"lost beat lock {re.escape(lock)}( before sending a task)?: {expected}; stopping beat now", beat.output()
        ), beat.output()
        # A hard exit: no release, no warm shutdown (the intruder's key stays).
        assert f"released beat lock {lock}" not in beat.output()
        assert client.get(lock) == (b"intruder" if how == "taken" else None)


#: Period of the fencing test's periodic task: two sends closer than half of it are one tick sent twice.
FENCE_EVERY = 0.25
#: Takeovers in the fencing test: each deletion lands at another point of the holder's renewal cycle.
FENCE_TRIALS = 4
#: Takeovers in the RabbitMQ fencing test (each closes a connection with rabbitmqctl, about 2 s).
AMQP_FENCE_TRIALS = 3


def test_a_deleted_lock_key_never_lets_two_beats_send_the_same_tick(
    spawn: Spawner, redis_server: RedisServer
) -> None:
    """The key vanishes (FLUSHDB, a Redis restarted without persistence, eviction) while another beat waits.

    The waiter takes the key within a second. With a ttl of 30 s the holder's next renewal is
    up to 10 s away, so only the check before each send stops it from ticking on beside the
    new holder. Each beat has a schedule directory of its own (pods with an emptyDir): beats
    sharing one would be kept apart by the schedule file lock as well, which would hide a
    missing check. Sends are counted at the broker; two schedulers with one period send ticks
    closer than half a period apart.
    """
    client = redis_server.client()
    lock = new_lock()
    queue = f"fence-{uuid.uuid4().hex[:8]}"

    def beat(name: str) -> Worker:
        env = {"BEAT_QUEUE": queue, "BEAT_EVERY": str(FENCE_EVERY)}
        return start_beat(spawn, redis_server.url, lock, name, app="beat_app", ttl="30", **env)

    holders = take_over_after_deleted_keys(client, lock, f"{queue}.every", beat, FENCE_TRIALS)
    assert_one_scheduler_at_a_time(redis_sends(client, f"{queue}.every"), holders)


def take_over_after_deleted_keys(
    client, lock: str, ticks: str, beat: Callable[[str], Worker], trials: int
) -> list[Worker]:
    """``trials`` times: a new beat waits, the holder ticks twice, the lock key is deleted; the
    holder must exit with LOST and the waiter take over and tick twice. The holders, in order."""

    def sent_by(beat: Worker) -> int:
        return sum(1 for s in redis_sends(client, ticks) if s.pid == beat.proc.pid)

    holders = [beat("fence-0")]
    holders[0].wait_ready()
    for trial in range(1, trials + 1):
        holder, waiter = holders[-1], beat(f"fence-{trial}")
        wait_until(lambda: waiting(waiter, lock), 60, f"trial {trial}: the next beat to wait")  # noqa: B023
        wait_until(lambda: sent_by(holder) >= 2, 60, f"trial {trial}: the holder to tick")  # noqa: B023
        client.delete(lock)
        assert holder.proc.wait(timeout=60) == LOST, holder.output()
        waiter.wait_ready()
        wait_until(lambda: sent_by(waiter) >= 2, 60, f"trial {trial}: the new holder to tick")  # noqa: B023
        holders.append(waiter)
    return holders


def assert_one_scheduler_at_a_time(sends: list[Send], holders: list[Worker]) -> None:
    """No tick sent twice (two sends closer than half a period), and no old holder sending after
    its successor's first send."""
    order = {beat.proc.pid: i for i, beat in enumerate(holders)}
    timeline = "\n".join(f"{s.at:.3f} beat {order.get(s.pid, s.pid)}" for s in sends)
    doubled = [(a, b) for a, b in zip(sends, sends[1:], strict=False) if b.at - a.at < FENCE_EVERY / 2]
    assert not doubled, f"ticks sent twice: {doubled}\n{timeline}"
    assert [order[s.pid] for s in sends] == sorted(order[s.pid] for s in sends), timeline


def test_a_holder_that_cannot_renew_exits_before_its_key_expires(spawn: Spawner, redis_server: RedisServer) -> None:
    lock = new_lock()
    beat = start_beat(spawn, redis_server.url, lock, "frozen-broker")
    beat.wait_ready()
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        assert beat.proc.wait(timeout=60) == LOST, beat.output()
        assert f"could not renew beat lock {lock}" in beat.output()
        # The broker was frozen all along: nobody else could have taken the lock meanwhile,
        # and the holder gave up by its own clock (the deadline arithmetic is pinned below).
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)


def test_a_frozen_holder_that_resumes_after_a_takeover_exits_without_sending(
    spawn: Spawner, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    lock = new_lock()
    a = start_beat(spawn, redis_server.url, lock, "paused")
    a.wait_ready()
    wait_until(lambda: client.llen("ticks-paused") >= 1, 60, "a to send a tick")
    b = start_beat(spawn, redis_server.url, lock, "next")
    wait_until(lambda: waiting(b, lock), 60, "b to wait")

    a.signal_group(signal.SIGSTOP)  # a VM pause, a stuck node: a's key expires, b takes over
    b.wait_ready()
    sent_by_a = client.llen("ticks-paused")
    a.signal_group(signal.SIGCONT)
    assert a.proc.wait(timeout=60) == LOST, a.output()
    assert client.llen("ticks-paused") == sent_by_a, "the resumed beat published after losing its lock"
    assert client.get(lock).decode().startswith("beat-next:"), "the resumed beat touched b's key"
    wait_until(lambda: client.llen("ticks-next") >= 1, 60, "b to send ticks")


def test_without_the_lock_env_beat_runs_as_before(spawn: Spawner, redis_server: RedisServer) -> None:
    client = redis_server.client()
    keys_before = set(client.keys("celery-operator:*"))
    beats = [start_beat(spawn, redis_server.url, None, f"free-{i}") for i in range(2)]
    for beat in beats:
        beat.wait_ready()
    assert all(schedules(b) for b in beats), "without a lock nothing stops a second beat"
    # Each scheduler holds its schedule open, lock or not: what the e2e sampler counts.
    assert all(holds_schedule_open(b.proc.pid) for b in beats)
    assert all("beat lock" not in b.output() for b in beats)
    assert set(client.keys("celery-operator:*")) == keys_before


def test_an_unreachable_broker_is_retried_without_the_password_and_sigterm_still_exits(
    spawn: Spawner, tmp_path: Path
) -> None:
    port = RedisServer(tmp_path / "unused").port  # a free port nobody listens on
    lock = new_lock()
    beat = start_beat(spawn, f"redis://:s3cret-pw@127.0.0.1:{port}/0", lock, "nobroker")
    wait_until(lambda: "cannot reach" in beat.output(), 60, "the unreachable broker to be reported")
    assert f"cannot reach redis://:**@127.0.0.1:{port}/0 for beat lock {lock}" in beat.output()
    assert beat.passes("liveness") and not beat.passes("readiness")
    beat.proc.send_signal(signal.SIGTERM)
    assert beat.proc.wait(timeout=60) == 0
    assert "s3cret-pw" not in beat.output()
    assert not schedules(beat)


def test_bad_lock_settings_fail_fast_with_a_message(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY")}
    cases = [
        ({"CELERY_BEAT_LOCK": "l", "CELERY_BEAT_LOCK_TTL_SECONDS": "soon", "CELERY_BROKER_URL": "redis://h/0"}, "soon"),
        ({"CELERY_BEAT_LOCK": "l", "CELERY_BEAT_LOCK_TTL_SECONDS": "0.1", "CELERY_BROKER_URL": "redis://h/0"}, ">= 1"),
        ({"CELERY_BEAT_LOCK": "l"}, "set CELERY_BROKER_URL"),
    ]
    for extra, message in cases:
        result = subprocess.run(
            [ENTRYPOINT, "celery", "-A", "celery_example", "beat"],
            env={**env, **extra},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 2, (extra, result.stderr)
        assert "CELERY_BEAT_LOCK" in result.stderr and message in result.stderr, result.stderr


# ------------------------------------------------------------------------------- RabbitMQ


def test_amqp_exclusive_queue_is_the_lock_and_a_lost_connection_stops_beat(
    spawn: Spawner, rabbit_server: RabbitServer
) -> None:
    lock = new_lock()
    # No result backend: the example app would otherwise use the broker URL for results too.
    env = {"CELERY_RESULT_BACKEND": ""}
    a = start_beat(spawn, rabbit_server.url, lock, "amqp-a", **env)
    a.wait_ready()
    assert schedules(a) and holds_schedule_open(a.proc.pid)
    b = start_beat(spawn, rabbit_server.url, lock, "amqp-b", **env)
    wait_until(lambda: waiting(b, lock), 60, "b to wait for the queue")
    assert f"waiting for beat lock {lock} held by another connection" in b.output()
    assert not schedules(b) and not b.passes("readiness") and b.passes("liveness")

    # A killed holder's connection closes with it: the broker drops the queue at once.
    a.signal_group(signal.SIGKILL)
    a.proc.wait(timeout=60)
    b.wait_ready()
    assert schedules(b) and "acquired beat lock" in b.output()

    # Losing the lock's connection stops beat at once; a waiter reconnects and takes over.
    c = start_beat(spawn, rabbit_server.url, lock, "amqp-c", **env)
    wait_until(lambda: waiting(c, lock), 60, "c to wait for the queue")
    rabbit_server.ctl("close_all_connections", "test: lock connection lost")
    assert b.proc.wait(timeout=60) == LOST, b.output()
    # Found by the check every third of a lease or by the one before the next tick, whichever came first.
    lost = rf"lost beat lock {re.escape(lock)}( before sending a task)?: the lock's connection failed"
    assert re.search(lost, b.output()), b.output()
    c.wait_ready()
    assert schedules(c)

    # A broker that stops answering: the holder's check times out and it exits by itself.
    os.killpg(rabbit_server.proc.pid, signal.SIGSTOP)
    try:
        assert c.proc.wait(timeout=60) == LOST, c.output()
        assert f"lost beat lock {lock}" in c.output()
    finally:
        os.killpg(rabbit_server.proc.pid, signal.SIGCONT)


class AmqpSends:
    """Takes the messages of a RabbitMQ queue as they arrive (the test is their consumer), as Sends."""

    def __init__(self, url: str, queue: str) -> None:
        import amqp
        from kombu.utils.url import url_to_parts

        parts = url_to_parts(url)
        self.conn = amqp.Connection(f"{parts.hostname}:{parts.port}", userid="guest", password="guest")
        self.conn.connect()
        self.channel = self.conn.channel()
        # The queue as Celery declares it before its first publish (durable, no arguments).
        self.channel.queue_declare(queue=queue, durable=True, auto_delete=False)
        self.queue = queue
        self.sends: list[Send] = []

    def poll(self) -> list[Send]:
        while (message := self.channel.basic_get(queue=self.queue, no_ack=True)) is not None:
            headers = message.headers or {}
            self.sends.append(Send(pid=int(headers["beat_pid"]), at=float(headers["beat_sent_at"])))
        return sorted(self.sends, key=lambda s: s.at)

    def close(self) -> None:
        self.conn.close()


def close_lock_connection(rabbit: RabbitServer, holder: Worker) -> None:
    """Closes only the beat lock's own connection of ``holder`` (named ``celery beat lock <holder id>``)."""
    rows = rabbit.ctl("list_connections", "pid", "client_properties", "--no-table-headers", "--quiet")
    name = f"celery beat lock {holder.env['POD_NAME']}:{holder.proc.pid}:"
    pids = [line.split("\t")[0] for line in rows.splitlines() if name in line]
    assert len(pids) == 1, f"no lock connection {name!r} in:\n{rows}"
    rabbit.ctl("close_connection", pids[0], "test: the lock's connection is lost")


def test_a_lost_amqp_lock_connection_never_lets_two_beats_send_the_same_tick(
    spawn: Spawner, rabbit_server: RabbitServer
) -> None:
    """RabbitMQ's form of a vanished key: the holder's lock connection closes (a network blip, a
    broker restart, a `close_connection`) and its exclusive queue goes with it, while another beat
    waits. The waiter declares the queue within a second; the holder's periodic check is up to
    10 s away (lease 30 s), so only the check before each send stops it. Sends are taken from the
    broker by the test as they arrive; each beat has a schedule directory of its own, as in the
    Redis test."""
    lock = new_lock()
    queue = f"fence-{uuid.uuid4().hex[:8]}"
    ticks = AmqpSends(rabbit_server.url, f"{queue}.every")

    def beat(name: str) -> Worker:
        env = {"BEAT_QUEUE": queue, "BEAT_EVERY": str(FENCE_EVERY), "CELERY_RESULT_BACKEND": ""}
        return start_beat(spawn, rabbit_server.url, lock, name, app="beat_app", ttl="30", **env)

    def sent_by(beat: Worker) -> int:
        return sum(1 for s in ticks.poll() if s.pid == beat.proc.pid)

    try:
        holders = [beat("amqp-fence-0")]
        holders[0].wait_ready()
        for trial in range(1, AMQP_FENCE_TRIALS + 1):
            holder, waiter = holders[-1], beat(f"amqp-fence-{trial}")
            wait_until(lambda: waiting(waiter, lock), 60, f"trial {trial}: the next beat to wait")  # noqa: B023
            wait_until(lambda: sent_by(holder) >= 2, 60, f"trial {trial}: the holder to tick")  # noqa: B023
            close_lock_connection(rabbit_server, holder)
            assert holder.proc.wait(timeout=60) == LOST, holder.output()
            waiter.wait_ready()
            wait_until(lambda: sent_by(waiter) >= 2, 60, f"trial {trial}: the new holder to tick")  # noqa: B023
            holders.append(waiter)
        assert_one_scheduler_at_a_time(ticks.poll(), holders)
    finally:
        ticks.close()


# ------------------------------------------------------------------------------- pure parts


def test_the_subcommand_is_found_after_global_options() -> None:
    assert celery_subcommand(["-A", "proj", "beat", "--schedule", "/s"]) == "beat"
    assert celery_subcommand(["--app=proj", "-b", "redis://h", "beat"]) == "beat"
    assert celery_subcommand(["-A", "proj", "worker", "-B"]) == "worker"
    assert celery_subcommand(["--version"]) is None


def test_settings_need_a_beat_and_a_lock_name() -> None:
    env = {"CELERY_BEAT_LOCK": "l", "CELERY_BROKER_URL": "redis://h/0;redis://h2/0", "POD_NAME": "p-1"}
    settings = LockSettings.from_env(["-A", "x", "beat"], env)
    assert settings is not None
    assert (settings.name, settings.ttl, settings.broker_url) == ("l", 10.0, "redis://h/0")
    assert settings.holder.startswith(f"p-1:{os.getpid()}:")
    assert LockSettings.from_env(["-A", "x", "beat", "-b", "amqp://g:g@r//"], env).broker_url == "amqp://g:g@r//"
    assert LockSettings.from_env(["-A", "x", "worker"], env) is None
    assert LockSettings.from_env(["-A", "x", "beat"], {**env, "CELERY_BEAT_LOCK": " "}) is None
    with pytest.raises(LockConfigError):
        LockSettings.from_env(["beat"], {**env, "CELERY_BEAT_LOCK_TTL_SECONDS": "inf"})
    unsupported = LockSettings.from_env(["beat"], {**env, "CELERY_BROKER_URL": "sqs://"})
    assert beat_lock.backend_for(unsupported) is None


@pytest.mark.parametrize("lease", [1.0, 2.0, 10.0, 60.0])
def test_a_holder_gives_up_before_its_lease_can_end(lease: float) -> None:
    t = Timing(lease)
    last = 1000.0
    # A renewal has room for a full attempt (connect + command) and, when that fails fast, retries.
    assert t.may_attempt(t.renew_at(last), last)
    assert t.may_attempt(t.renew_at(last) + t.attempt_timeout, last)
    # No attempt starts that could end after the give-up point, which precedes the lease's end.
    now = last
    while t.may_attempt(now, last):
        assert now + 2 * t.attempt_timeout <= t.give_up_at(last)
        now += lease / 1000
    assert t.give_up_at(last) <= last + lease - t.margin < last + lease
