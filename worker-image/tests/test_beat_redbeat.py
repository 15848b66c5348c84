"""The default beat schedule store on a Redis broker: RedBeat, behind the beat lock.

Beats run as the operator runs a pool with neither ``beat.scheduler`` nor
``beat.scheduleClaimName``: ``CELERY_BEAT_LOCK`` and ``CELERY_BEAT_REDBEAT_KEY_PREFIX`` set, and
each beat with a fresh schedule directory of its own (a new pod's emptyDir). What carries the
schedule from one beat to the next is Redis alone. Sends are counted at the broker.
"""

from __future__ import annotations

import json
import shutil
import signal
import ssl
import subprocess
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
from conftest import (
    RabbitServer,
    RedisServer,
    Spawner,
    Worker,
    holds_schedule_open,
    redis_sends,
    start_beat,
    wait_until,
)
from test_beat_lock import FENCE_EVERY, assert_one_scheduler_at_a_time, take_over_after_deleted_keys
from test_beat_schedule import first_pass

from celery_worker_base import beat_store
from celery_worker_base.beat_store import FACTORY, PREFIX_ENV, with_default_scheduler

CHOSE_REDBEAT = "beat: schedule kept in Redis by RedBeat"
CHOSE_FILE = "beat: schedule kept in Celery's schedule file, not in Redis"


def names() -> tuple[str, str, str]:
    """A lock, a key prefix and a queue prefix of this test alone."""
    tag = uuid.uuid4().hex[:8]
    return f"celery-operator:beat:test:{tag}", f"celery-operator:redbeat:test:{tag}:", f"q-{tag}"


def redbeat_beat(spawn: Spawner, url: str, lock: str, prefix: str, name: str, **env: str) -> Worker:
    return start_beat(spawn, url, lock, name, app="beat_app", **{PREFIX_ENV: prefix, **env})


def test_a_beat_restarted_with_a_fresh_directory_carries_on_the_schedule(
    spawn: Spawner, redis_server: RedisServer
) -> None:
    """A Recreate rollout with emptyDirs: the old beat stops, and only after a minute boundary (and a
    period of the interval entry) does the new one start, in a new schedule directory.

    The minute that came while no beat ran is sent once, at once, by the new beat; so is the
    overdue interval tick, and nothing is doubled. A beat with a fresh file schedule would skip
    the minute.
    """
    client = redis_server.client()
    lock, prefix, queue = names()
    env = {"BEAT_QUEUE": queue, "BEAT_EVERY": "2", "BEAT_MINUTELY": "1"}
    every, minutely = f"{queue}.every", f"{queue}.minutely"

    old = redbeat_beat(spawn, redis_server.url, lock, prefix, "old", **env)
    old.wait_ready()
    wait_until(lambda: redis_sends(client, every), 60, "the old beat to tick")
    assert CHOSE_REDBEAT in old.output(), old.output()
    assert holds_schedule_open(old.proc.pid), "the scheduler marker the e2e sampler counts"
    old.proc.send_signal(signal.SIGTERM)
    assert old.proc.wait(timeout=60) == 0, old.output()
    stopped = time.time()
    last_tick, period = redis_sends(client, every)[-1].at, float(env["BEAT_EVERY"])
    wait_until(
        lambda: time.time() // 60 > stopped // 60 and time.time() > last_tick + period,
        90,
        "the next minute, a period after the last tick",
        interval=0.2,
    )

    new = redbeat_beat(spawn, redis_server.url, lock, prefix, "new", loglevel="DEBUG", **env)
    assert new.schedule_dir != old.schedule_dir  # type: ignore[attr-defined]
    wait_until(lambda: "beat: Waking up" in new.output(), 60, "the new beat's first scheduler pass")
    new.proc.send_signal(signal.SIGTERM)
    assert new.proc.wait(timeout=60) == 0, new.output()

    sent_first = first_pass(new)
    assert sent_first.count("Sending due task minutely") == 1, sent_first
    assert sent_first.count("Sending due task every") == 1, sent_first
    after = [s for s in redis_sends(client, minutely) if s.at > stopped]
    assert after and after[0].pid == new.proc.pid, after
    assert [s for s in after if s.at // 60 == after[0].at // 60] == after[:1], after
    ticks = redis_sends(client, every)
    assert {s.pid for s in ticks} == {old.proc.pid, new.proc.pid}, ticks
    doubled = [(a, b) for a, b in zip(ticks, ticks[1:], strict=False) if b.at - a.at < period / 2]
    assert not doubled, ticks
    # RedBeat's state is under the pool's prefix; its own lock was never taken.
    keys = {k.decode() for k in client.keys(f"{prefix}*")}
    assert {f"{prefix}every", f"{prefix}minutely", f"{prefix}:schedule"} <= keys, keys
    assert f"{prefix}:lock" not in keys and not client.keys("redbeat:*"), keys
    assert "beat: Acquired lock" not in old.output() + new.output()


def test_a_deleted_lock_key_never_lets_two_redbeat_beats_send_the_same_tick(
    spawn: Spawner, redis_server: RedisServer
) -> None:
    """The fencing test of ``test_beat_lock``, with the schedule shared in Redis: the key vanishes
    while a second beat waits; the waiter takes over (RedBeat's own lock, which would have kept
    it out, is off) and the old holder exits at its next send without sending or recording it."""
    client = redis_server.client()
    lock, prefix, queue = names()

    def beat(name: str) -> Worker:
        env = {"BEAT_QUEUE": queue, "BEAT_EVERY": str(FENCE_EVERY)}
        return redbeat_beat(spawn, redis_server.url, lock, prefix, name, ttl="30", **env)

    holders = take_over_after_deleted_keys(client, lock, f"{queue}.every", beat, 3)

    assert all(CHOSE_REDBEAT in b.output() for b in holders)
    assert_one_scheduler_at_a_time(redis_sends(client, f"{queue}.every"), holders)
    # Redis counts every send exactly once: no holder recorded a tick it did not send.
    stored = client.hget(f"{prefix}every", "meta")
    assert stored is not None
    assert json.loads(stored)["total_run_count"] == len(redis_sends(client, f"{queue}.every"))


def test_two_pools_on_one_redis_keep_separate_schedules(spawn: Spawner, redis_server: RedisServer) -> None:
    """Same app, same entry names, one Redis database: each pool's beat (its own lock and prefix)
    keeps and counts its own entries."""
    client = redis_server.client()
    pools = [names(), names()]
    beats = [
        redbeat_beat(spawn, redis_server.url, lock, prefix, f"pool-{i}", BEAT_QUEUE=queue, BEAT_EVERY=every)
        for i, ((lock, prefix, queue), every) in enumerate(zip(pools, ("0.5", "60"), strict=True))
    ]
    for beat in beats:
        beat.wait_ready()
    (_, fast_prefix, fast_queue), (_, slow_prefix, slow_queue) = pools
    wait_until(lambda: len(redis_sends(client, f"{fast_queue}.every")) >= 4, 60, "the fast pool to tick")

    def stored(prefix: str) -> tuple[float, int]:
        """The ``every`` entry RedBeat keeps under a prefix: its period and how often it was sent."""
        schedule = json.loads(client.hget(f"{prefix}every", "definition"))["schedule"]
        assert schedule["__type__"] == "interval", schedule
        meta = json.loads(client.hget(f"{prefix}every", "meta") or "{}")
        return float(schedule["every"]), int(meta.get("total_run_count", 0))

    fast_every, fast_runs = stored(fast_prefix)
    slow_every, slow_runs = stored(slow_prefix)
    assert (fast_every, slow_every) == (0.5, 60.0)
    assert fast_runs >= 4 and slow_runs == 0, (fast_runs, slow_runs)
    assert not redis_sends(client, f"{slow_queue}.every")
    fast_keys = {k.decode() for k in client.keys(f"{fast_prefix}*")}
    slow_keys = {k.decode() for k in client.keys(f"{slow_prefix}*")}
    assert fast_keys and slow_keys and not fast_keys & slow_keys


def test_without_redbeat_in_the_image_beat_falls_back_to_the_file(
    spawn: Spawner, redis_server: RedisServer, tmp_path: Path
) -> None:
    """An image built without celery-redbeat (here: a ``redbeat`` that fails to import, first on
    the path) runs Celery's file scheduler, says why, and schedules: no crash loop."""
    shadow = tmp_path / "shadow" / "redbeat"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named redbeat (test)')\n")
    lock, prefix, queue = names()
    beat = redbeat_beat(
        spawn, redis_server.url, lock, prefix, "no-redbeat", BEAT_QUEUE=queue, PYTHONPATH=str(tmp_path / "shadow")
    )
    beat.wait_ready()
    wait_until(lambda: redis_sends(redis_server.client(), f"{queue}.every"), 60, "the file scheduler to tick")
    out = beat.output()
    assert f"{CHOSE_FILE}: celery-redbeat is not installed in this image" in out, out
    assert "PersistentScheduler" in out and holds_schedule_open(beat.proc.pid)
    assert not redis_server.client().keys(f"{prefix}*")


def test_on_rabbitmq_the_default_is_the_schedule_file(spawn: Spawner, rabbit_server: RabbitServer) -> None:
    """A RabbitMQ pool gets the same environment from the operator: beat takes the lock (an
    exclusive queue), keeps Celery's file scheduler, says why, and schedules."""
    lock, prefix, _ = names()
    # No result backend: the example app would otherwise use the broker URL for results too.
    beat = start_beat(spawn, rabbit_server.url, lock, "amqp", CELERY_RESULT_BACKEND="", **{PREFIX_ENV: prefix})
    beat.wait_ready()
    out = beat.output()
    assert f"{CHOSE_FILE}: the broker is amqp://" in out and "acquired beat lock" in out, out
    assert "PersistentScheduler" in out and holds_schedule_open(beat.proc.pid)
    assert any(
        p.name == "celerybeat-schedule" or p.name.startswith("celerybeat-schedule.")
        for p in beat.schedule_dir.iterdir()
    )  # type: ignore[attr-defined]
    assert not (beat.schedule_dir / "celerybeat-schedule.running").exists()  # type: ignore[attr-defined]


def test_without_a_beat_lock_redbeat_is_not_the_default(spawn: Spawner, redis_server: RedisServer) -> None:
    """RedBeat's own lock stays off only behind the beat lock: with no lock, the file scheduler."""
    _, prefix, queue = names()
    beat = start_beat(
        spawn, redis_server.url, None, "no-lock", app="beat_app", BEAT_QUEUE=queue, **{PREFIX_ENV: prefix}
    )
    beat.wait_ready()
    assert f"{CHOSE_FILE}: no beat lock is held" in beat.output(), beat.output()
    assert not redis_server.client().keys(f"{prefix}*")


class SecureRedis(RedisServer):
    """TLS only (certificates from a throw-away CA), the default user off, one ACL user with a
    password: a broker as a managed Redis offers it. Its URL names database 3."""

    USER, PASSWORD = "beat", "s3cr@t:pw"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        if shutil.which("openssl") is None:
            pytest.skip("openssl is not installed")
        workdir.mkdir(parents=True, exist_ok=True)
        self.ca = workdir / "ca.crt"
        ext = workdir / "server.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for cmd in (
            ["req", "-x509", "-days", "2", *ec, "-subj", "/CN=test CA", "-keyout", "ca.key", "-out", "ca.crt"],
            ["req", *ec, "-subj", "/CN=127.0.0.1", "-keyout", "server.key", "-out", "server.csr"],
            ["x509", "-req", "-days", "2", "-set_serial", "2", "-in", "server.csr", "-CA", "ca.crt"]
            + ["-CAkey", "ca.key", "-extfile", "server.ext", "-out", "server.crt"],
        ):
            subprocess.run(["openssl", *cmd], cwd=workdir, check=True, capture_output=True)

    @property
    def url(self) -> str:
        auth = f"{self.USER}:{quote(self.PASSWORD, safe='')}"
        return f"rediss://{auth}@127.0.0.1:{self.port}/3?ssl_cert_reqs=required&ssl_ca_certs={self.ca}"

    def server_args(self) -> list[str]:
        d = self.workdir
        return [
            *["--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            *["--tls-cert-file", str(d / "server.crt"), "--tls-key-file", str(d / "server.key")],
            *["--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "no"],
            *["--user", "default", "off", "--user", self.USER, "on", f">{self.PASSWORD}", "~*", "&*", "+@all"],
        ]

    def ping_client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(
            port=self.port,
            db=db,
            username=self.USER,
            password=self.PASSWORD,
            ssl=True,
            ssl_ca_certs=str(self.ca),
            socket_connect_timeout=0.2,
        )


def test_redbeat_follows_a_tls_broker_with_an_acl_user_a_database_and_a_global_keyprefix(
    spawn: Spawner, tmp_path: Path
) -> None:
    """``rediss://user:password@host/3?ssl_cert_reqs=required&ssl_ca_certs=...`` and
    ``global_keyprefix``: RedBeat's state goes where the broker's keys go (database 3, behind the
    prefix), over TLS with the certificate checked, as the ACL user; the password is in no log line."""
    server = SecureRedis(tmp_path / "redis-tls").start()
    try:
        lock, prefix, queue = names()
        beat = redbeat_beat(spawn, server.url, lock, prefix, "tls", BEAT_QUEUE=queue, BEAT_GLOBAL_KEYPREFIX="tenant:")
        beat.wait_ready()
        db3, db0 = server.ping_client(3), server.ping_client(0)
        wait_until(lambda: len(redis_sends(db3, f"tenant:{queue}.every")) >= 2, 60, "ticks on database 3")
        out = beat.output()
        assert CHOSE_REDBEAT in out and "keys tenant:celery-operator:redbeat:" in out, out
        keys = {k.decode() for k in db3.keys(f"tenant:{prefix}*")}
        assert {f"tenant:{prefix}every", f"tenant:{prefix}:schedule"} <= keys, keys
        stored = json.loads(db3.hget(f"tenant:{prefix}every", "meta"))
        assert stored["total_run_count"] >= 2, stored
        assert not db3.keys(f"{prefix}*") and not db0.keys("*celery-operator:redbeat:*")
        assert SecureRedis.PASSWORD not in out and quote(SecureRedis.PASSWORD, safe="") not in out
        beat.proc.send_signal(signal.SIGTERM)
        assert beat.proc.wait(timeout=60) == 0, beat.output()
    finally:
        server.stop()


# ------------------------------------------------------------------------------- the choice, in-process


def test_the_factory_goes_after_beat_unless_something_chose_a_scheduler() -> None:
    env = {PREFIX_ENV: "p:"}
    args = ["-A", "proj", "beat", "--schedule", "/s", "--loglevel", "INFO"]
    assert with_default_scheduler(args, env) == [
        "-A",
        "proj",
        "beat",
        "-S",
        FACTORY,
        "--schedule",
        "/s",
        "--loglevel",
        "INFO",
    ]
    assert with_default_scheduler(["--app", "proj", "beat"], env) == ["--app", "proj", "beat", "-S", FACTORY]
    for chosen in (["-S", "x.Y"], ["--scheduler", "x.Y"], ["--scheduler=x.Y"], ["-Sx.Y"]):
        assert with_default_scheduler([*args, *chosen], env) == [*args, *chosen]
    assert with_default_scheduler(args, {**env, "CELERY_BEAT_SCHEDULER": "x.Y"}) == args
    assert with_default_scheduler(args, {}) == args
    assert with_default_scheduler(["-A", "proj", "worker"], env) == ["-A", "proj", "worker"]


def app_with(**conf: object):
    from celery import Celery

    app = Celery(f"choice-{uuid.uuid4().hex[:6]}", set_as_current=False)
    app.conf.update(conf)
    return app


@pytest.fixture
def lock_held(monkeypatch: pytest.MonkeyPatch) -> None:
    from celery_worker_base import beat_lock

    monkeypatch.setattr(beat_lock, "_fence", lambda: None)


def test_the_apps_own_scheduler_and_non_redis_brokers_keep_their_scheduler(
    lock_held: None, capfd: pytest.CaptureFixture[str]
) -> None:
    from celery.beat import PersistentScheduler

    from celery_worker_base.beat_redbeat import FencedRedBeatScheduler

    assert beat_store.app_scheduler(app_with(broker_url="redis://h/0")) is None
    own = app_with(broker_url="redis://h/0", beat_scheduler="celery.beat:Scheduler")
    from celery.beat import Scheduler

    assert beat_store.choose(own, "p:") is Scheduler
    explicit_file = app_with(broker_url="redis://h/0", beat_scheduler="celery.beat:PersistentScheduler")
    assert beat_store.choose(explicit_file, "p:") is PersistentScheduler
    for url in ("amqp://guest@h//", "sentinel://h:26379;sentinel://h2:26379", "sqs://"):
        assert beat_store.choose(app_with(broker_url=url), "p:") is PersistentScheduler, url
    creds = app_with(broker_url="redis://h/0", broker_transport_options={"credential_provider": "x.Y"})
    assert beat_store.choose(creds, "p:") is PersistentScheduler
    err = capfd.readouterr().err
    assert "the broker is amqp://" in err and "Sentinel" in err and "credential_provider" in err
    assert "the app configures beat_scheduler celery.beat:Scheduler" in err
    # Redis, no scheduler of its own: RedBeat (choose connects to nothing).
    assert beat_store.choose(app_with(broker_url="redis://h:1/2;redis://h2:1/2"), "p:") is FencedRedBeatScheduler


def redbeat_client(**conf: object):
    """The Redis client RedBeat is given for a broker configuration, and the app."""
    from redbeat.schedulers import get_redis

    from celery_worker_base.beat_redbeat import configure

    app = app_with(**conf)
    key_prefix = configure(app, "celery-operator:redbeat:ns:pool:")
    client = get_redis(app)
    return client.connection_pool.connection_kwargs, client.connection_pool.connection_class, app, key_prefix


def test_redbeats_client_follows_the_broker_connection(lock_held: None) -> None:
    import redis

    kwargs, cls, app, prefix = redbeat_client(broker_url="redis://:p%40ss@h:1234/3")
    assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["password"]) == ("h", 1234, 3, "p@ss")
    assert kwargs["decode_responses"] and cls is redis.Connection
    assert prefix == "celery-operator:redbeat:ns:pool:"
    assert app.redbeat_conf.lock_key is None and app.redbeat_conf.key_prefix == prefix
    assert app.redbeat_conf.schedule_key == prefix + ":schedule"

    kwargs, cls, _, _ = redbeat_client(
        broker_url="rediss://user:pw@h:6380/2?ssl_cert_reqs=required&ssl_ca_certs=/ca.pem",
        broker_transport_options={"socket_timeout": 4, "socket_connect_timeout": 2, "global_keyprefix": "tenant:"},
    )
    assert cls is redis.SSLConnection
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("user", "pw", 2)
    assert kwargs["ssl_cert_reqs"] == ssl.CERT_REQUIRED and kwargs["ssl_ca_certs"] == "/ca.pem"
    assert (kwargs["socket_timeout"], kwargs["socket_connect_timeout"]) == (4, 2)

    # broker_use_ssl when the URL has no ssl_ options; kombu's own default (no verification) otherwise.
    kwargs, cls, _, _ = redbeat_client(
        broker_url="rediss://h/0", broker_use_ssl={"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/b.pem"}
    )
    assert cls is redis.SSLConnection and kwargs["ssl_ca_certs"] == "/b.pem"
    kwargs, cls, _, _ = redbeat_client(broker_url="rediss://h/0")
    assert cls is redis.SSLConnection and kwargs["ssl_cert_reqs"] == ssl.CERT_NONE

    kwargs, cls, _, _ = redbeat_client(broker_url="redis+socket:///run/redis.sock?virtual_host=5")
    assert cls is redis.UnixDomainSocketConnection
    assert (kwargs["path"], kwargs["db"]) == ("/run/redis.sock", 5)

    _, _, app, prefix = redbeat_client(broker_url="redis://h/0", broker_transport_options={"global_keyprefix": "t:"})
    assert prefix == "t:celery-operator:redbeat:ns:pool:" and app.redbeat_conf.key_prefix == prefix
