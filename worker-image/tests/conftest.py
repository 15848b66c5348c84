"""Fixtures: a real redis-server (and RabbitMQ node) on free ports, and workers run through the real entrypoint."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest
import redis

if TYPE_CHECKING:
    from celery import Celery

BIN = Path(sys.executable).parent
ENTRYPOINT = str(BIN / "celery-entrypoint")
PROBE = str(BIN / "celery-probe")

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerExited(Exception):
    """A server process ended while the test waited for it to answer."""


class RedisServer:
    """A private redis-server process in a temp dir; never the machine's 6379."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.started_once = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.workdir.mkdir(parents=True, exist_ok=True)
        # free_port() releases the port before redis-server binds it: on a shared machine another
        # process may take it in between. A first start then moves to another port; a restart
        # must keep its port (clients hold the URL), so it fails instead.
        attempts = 1 if self.started_once else 5
        for attempt in range(attempts):
            if self._start_once(binary):
                self.started_once = True
                return self
            if attempt + 1 < attempts:
                self.port = free_port()
        raise AssertionError(f"redis-server did not start:\n{(self.workdir / 'redis.log').read_text()}")

    def server_args(self) -> list[str]:
        """redis-server's options (a subclass serves TLS, adds users, ...)."""
        return ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]

    def ping_client(self) -> redis.Redis:
        """A client that can ask the server for its pid while it starts."""
        return redis.Redis(port=self.port, socket_connect_timeout=0.2)

    def _start_once(self, binary: str) -> bool:
        with open(self.workdir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [binary, *self.server_args(), "--dir", str(self.workdir)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        client = self.ping_client()
        try:
            return wait_until(lambda: self._pings(client), 30, f"redis-server on port {self.port}")
        except ServerExited:
            self.proc = None
            return False
        finally:
            client.close()

    def _pings(self, client: redis.Redis) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise ServerExited(f"redis-server on port {self.port} exited")
        try:
            # Ours, not a server of someone else that took the port first.
            return int(client.info("server")["process_id"]) == self.proc.pid
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test alone: no key, queue or expiring lock of another test is in it,
    and the test may stop, restart or freeze it."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


class RabbitServer:
    """A private RabbitMQ node (own node name, ports, cookie and directories) in a temp dir.

    Runs straight from /usr/lib/rabbitmq/bin (the /usr/sbin wrapper would switch users and
    reset HOME), so the machine's own node is never touched. Boots in about 5 s.
    """

    BIN = Path("/usr/lib/rabbitmq/bin")

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.node = f"wi{os.getpid()}-{uuid.uuid4().hex[:6]}@localhost"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def env(self) -> dict[str, str]:
        d = self.workdir
        return {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(d / "rabbit.pid"),
            "RABBITMQ_FEATURE_FLAGS_FILE": str(d / "feature_flags"),
            "HOME": str(d / "home"),
        }

    def start(self) -> RabbitServer:
        if not (self.BIN / "rabbitmq-server").exists():
            pytest.skip("rabbitmq-server is not installed")
        for sub in ("mnesia", "log", "home"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        conf = f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n"
        (self.workdir / "rabbitmq.conf").write_text(conf)
        (self.workdir / "enabled_plugins").write_text("[].\n")
        (self.workdir / "rabbitmq-env.conf").write_text("ERL_EPMD_ADDRESS=127.0.0.1\n")
        env = {**self.env(), "RABBITMQ_DIST_PORT": str(free_port())}
        with open(self.workdir / "rabbitmq.log", "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.BIN / "rabbitmq-server")],
                env=env,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.ctl("wait", str(self.workdir / "rabbit.pid"), "--timeout", "120")
        return self

    def ctl(self, *args: str) -> str:
        result = subprocess.run(
            [str(self.BIN / "rabbitmqctl"), "-n", self.node, *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert result.returncode == 0, f"rabbitmqctl {' '.join(args)}: {result.stdout}{result.stderr}"
        return result.stdout

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def rabbit_server(tmp_path: Path) -> Iterator[RabbitServer]:
    """A RabbitMQ node of this test alone (about 5 s to boot): the test may close its connections or freeze it."""
    server = RabbitServer(tmp_path / "rabbit")
    try:
        yield server.start()
    finally:
        server.stop()


@dataclass
class Worker:
    """A process started through ``celery-entrypoint`` in its own process group."""

    proc: subprocess.Popen
    log: Path
    env: dict[str, str]
    probe_dir: Path
    queue: str

    def probe(self, check: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([PROBE, check, *extra], env=self.env, capture_output=True, text=True, timeout=30)

    def passes(self, check: str) -> bool:
        return self.probe(check).returncode == 0

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def wait_ready(self, timeout: float = 60) -> None:
        wait_until(lambda: self._alive_and(self.passes("readiness")), timeout, "readiness to pass")

    def _alive_and(self, value: bool) -> bool:
        assert self.proc.poll() is None, f"worker exited with {self.proc.returncode}:\n{self.output()}"
        return value

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.signal_group(signal.SIGCONT)
                self.signal_group(signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)


@dataclass
class Spawner:
    tmp_path: Path
    workers: list[Worker] = field(default_factory=list)

    def __call__(
        self,
        broker_url: str,
        *,
        app: str = "celery_example.app",
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
        concurrency: int = 1,
        pool: str = "prefork",
        probe_dir: Path | None = None,
    ) -> Worker:
        name = uuid.uuid4().hex[:8]
        queue = f"q-{name}"
        probe_dir = probe_dir or self.tmp_path / f"probe-{name}"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY")}
        full_env.update(
            CELERY_BROKER_URL=broker_url,
            CELERY_RESULT_BACKEND=broker_url,
            CELERY_PROBE_DIR=str(probe_dir),
            POD_NAME=f"pod-{name}",
            POD_NAMESPACE="default",
            PYTHONUNBUFFERED="1",
        )
        full_env.update(env or {})
        if command is None:
            # Exactly the shape of the operator's generated worker args.
            command = [
                "celery",
                "-A",
                app,
                "worker",
                "-Q",
                queue,
                "-c",
                str(concurrency),
                "-P",
                pool,
                "--prefetch-multiplier",
                "1",
                "--max-tasks-per-child",
                "1000",
                "--without-mingle",
                "--without-gossip",
                "-n",
                f"pool@{full_env['POD_NAME']}",
                "--loglevel",
                "INFO",
            ]
        argv = [ENTRYPOINT, *command]
        log = self.tmp_path / f"worker-{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv, env=full_env, cwd=self.tmp_path, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        worker = Worker(proc=proc, log=log, env=full_env, probe_dir=probe_dir, queue=queue)
        self.workers.append(worker)
        return worker


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawner]:
    spawner = Spawner(tmp_path)
    yield spawner
    for worker in spawner.workers:
        worker.stop()


@pytest.fixture
def client_app() -> Iterator[Callable[..., Celery]]:
    """Plain Celery client apps (no entrypoint, no example module) that send tasks by name."""
    from celery import Celery

    apps: list[Celery] = []

    def make(url: str, **conf: object) -> Celery:
        app = Celery(f"client-{len(apps)}", broker=url, backend=url)
        app.conf.update(conf)
        apps.append(app)
        return app

    yield make
    for app in apps:
        app.close()


# ------------------------------------------------------------------------------- beat

#: The lock ttl of the beat tests unless they say otherwise: short, so takeovers are quick.
BEAT_LOCK_TTL = "2"
#: The schedule test app (``beat_app.py`` beside this file), copied into the test's directory.
BEAT_APP = Path(__file__).with_name("beat_app.py")


def start_beat(
    spawn: Spawner,
    broker_url: str,
    lock: str | None,
    name: str,
    *,
    app: str = "celery_example",
    schedule_dir: Path | None = None,
    ttl: str = BEAT_LOCK_TTL,
    loglevel: str = "INFO",
    **env: str,
) -> Worker:
    """A beat as the operator runs it; ``lock`` None means no lock env.

    Each beat gets a schedule dir of its own (as pods with an emptyDir have) unless
    ``schedule_dir`` is given: beats sharing one are pods sharing a persistent volume.
    ``app="beat_app"`` runs the schedule test app instead of the example app.
    """
    if schedule_dir is None:
        schedule_dir = spawn.tmp_path / f"schedule-{name}"
        schedule_dir.mkdir()
    if app == "beat_app":
        shutil.copyfile(BEAT_APP, spawn.tmp_path / BEAT_APP.name)  # beat's cwd is tmp_path
    lock_env = {"CELERY_BEAT_LOCK": lock, "CELERY_BEAT_LOCK_TTL_SECONDS": ttl} if lock else {}
    beat = spawn(
        broker_url,
        env={
            "CELERY_EXAMPLE_TICK_SECONDS": "0.5",
            "CELERY_EXAMPLE_TICK_QUEUE": f"ticks-{name}",
            "CELERY_PROBE_HEARTBEAT_INTERVAL": "0.2",
            "CELERY_PROBE_LIVENESS_MAX_AGE": "3",
            "POD_NAME": f"beat-{name}",
            **lock_env,
            **env,
        },
        command=[
            "celery",
            "-A",
            app,
            "beat",
            "--schedule",
            str(schedule_dir / "celerybeat-schedule"),
            "--loglevel",
            loglevel,
        ],
    )
    beat.schedule_dir = schedule_dir  # type: ignore[attr-defined]
    return beat


def holds_schedule_open(pid: int) -> bool:
    """The process has a ``celerybeat-schedule*`` file open: it is a running scheduler."""
    fds = Path(f"/proc/{pid}/fd")
    links = []
    for fd in fds.iterdir():
        try:
            links.append(os.readlink(fd))
        except OSError:
            continue
    return any(Path(link).name.startswith("celerybeat-schedule") for link in links)


@dataclass(frozen=True)
class Send:
    """One message a ``beat_app`` beat published: by which process, and when (its clock)."""

    pid: int
    at: float


def redis_sends(client: redis.Redis, queue: str) -> list[Send]:
    """The messages waiting in a Redis queue (nobody consumes them), oldest first."""
    sends = []
    for raw in client.lrange(queue, 0, -1):
        headers = json.loads(raw)["headers"]
        sends.append(Send(pid=int(headers["beat_pid"]), at=float(headers["beat_sent_at"])))
    return sorted(sends, key=lambda s: s.at)
