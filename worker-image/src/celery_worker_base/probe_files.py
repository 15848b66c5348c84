"""The probe files: written from inside the worker, read by ``celery-probe``.

Standard library only. ``celery-probe`` imports this module, and a probe must
never import Celery, a broker client or the user's app: kubelet runs it every
few seconds in every pod, and it must answer even when the app or the broker
is broken.

Layout of ``$CELERY_PROBE_DIR`` (an emptyDir in the pod):

``alive``
    mtime refreshed periodically by the worker's own timer (and by the broker
    reconnect loop); liveness fails once it is older than the max age.
``ready``
    created on ``worker_ready`` (holds the node name), removed as soon as a
    shutdown starts.
``draining``
    created when a warm shutdown starts; liveness passes while it exists so a
    worker finishing its running tasks is not killed for a quiet heartbeat.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PROBE_DIR_ENV = "CELERY_PROBE_DIR"
LIVENESS_MAX_AGE_ENV = "CELERY_PROBE_LIVENESS_MAX_AGE"
HEARTBEAT_INTERVAL_ENV = "CELERY_PROBE_HEARTBEAT_INTERVAL"

DEFAULT_LIVENESS_MAX_AGE = 60.0
# Several heartbeats fit in one max age, so one late tick never fails a probe.
HEARTBEATS_PER_MAX_AGE = 6

ALIVE = "alive"
READY = "ready"
DRAINING = "draining"


class ProbeConfigError(ValueError):
    """An environment variable of the probe contract holds an unusable value."""


def liveness_max_age(env: Mapping[str, str] = os.environ) -> float:
    """Seconds after which the heartbeat counts as stale."""
    return _positive_seconds(env, LIVENESS_MAX_AGE_ENV, DEFAULT_LIVENESS_MAX_AGE)


def heartbeat_interval(env: Mapping[str, str] = os.environ) -> float:
    """Seconds between heartbeats; derived from the max age unless set."""
    derived = liveness_max_age(env) / HEARTBEATS_PER_MAX_AGE
    return _positive_seconds(env, HEARTBEAT_INTERVAL_ENV, derived)


def _positive_seconds(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise ProbeConfigError(f"{name}={raw!r} is not a positive number of seconds")
    return value


@dataclass(frozen=True)
class ProbeFiles:
    """The files in one probe directory."""

    directory: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ProbeFiles | None:
        """The probe directory named by ``CELERY_PROBE_DIR``, or None if unset."""
        raw = env.get(PROBE_DIR_ENV, "").strip()
        return cls(Path(raw)) if raw else None

    @property
    def alive(self) -> Path:
        return self.directory / ALIVE

    @property
    def ready(self) -> Path:
        return self.directory / READY

    @property
    def draining(self) -> Path:
        return self.directory / DRAINING

    def start_process(self) -> None:
        """Forget a previous container's state and count this process as alive.

        An emptyDir outlives container restarts: a ``ready`` or ``draining``
        file left by the previous container must not make the new one look
        ready (or immortal) before it has even imported the app.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        self.clear_ready()
        _remove(self.draining)
        self.touch_alive()

    def touch_alive(self) -> None:
        self.alive.touch()

    def mark_ready(self, nodename: str) -> None:
        _write_atomically(self.ready, nodename + "\n")

    def mark_draining(self, reason: str) -> None:
        _write_atomically(self.draining, reason + "\n")
        self.clear_ready()

    def clear_ready(self) -> None:
        _remove(self.ready)


@dataclass(frozen=True)
class Verdict:
    """A probe's answer: exit status 0 when ``ok``, and a one-line reason."""

    ok: bool
    reason: str


def check_liveness(files: ProbeFiles, max_age: float, now: float | None = None) -> Verdict:
    """Alive while the heartbeat is fresh, or while a warm shutdown drains."""
    now = time.time() if now is None else now
    draining = _read_line(files.draining)
    if draining is not None:
        return Verdict(True, f"alive: warm shutdown in progress ({draining})")
    try:
        mtime = files.alive.stat().st_mtime
    except FileNotFoundError:
        return Verdict(
            False,
            f"not alive: no heartbeat file {files.alive} (was the container started through celery-entrypoint?)",
        )
    age = now - mtime
    if age > max_age:
        return Verdict(
            False,
            f"not alive: last heartbeat {age:.1f}s ago, max age {max_age:g}s (worker main loop is stuck or frozen)",
        )
    return Verdict(True, f"alive: last heartbeat {max(age, 0.0):.1f}s ago, max age {max_age:g}s")


def check_readiness(files: ProbeFiles) -> Verdict:
    """Ready between ``worker_ready`` and the start of a shutdown."""
    draining = _read_line(files.draining)
    if draining is not None:
        return Verdict(False, f"not ready: shutting down ({draining})")
    nodename = _read_line(files.ready)
    if nodename is None:
        return Verdict(False, f"not ready: worker has not signalled worker_ready yet (no {files.ready})")
    return Verdict(True, f"ready: {nodename or 'worker'}")


def _read_line(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    return text.strip().splitlines()[0] if text.strip() else ""


def _write_atomically(path: Path, text: str) -> None:
    # A probe racing the writer sees the old file or the new one, never half.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
