"""``celery-entrypoint``: the container ENTRYPOINT of worker and beat pods.

``celery-entrypoint celery ...`` runs the Celery CLI in this very process (no
shell, no child): as PID 1 the SIGTERM from kubelet reaches Celery's main
process, whose handler starts a warm shutdown. Before Celery loads the app it
installs the probe hooks and the serialization policy.

``celery ... beat`` with ``CELERY_BEAT_LOCK`` set first waits for that lock
on the broker and holds it while beat runs (see ``beat_lock``). With
``CELERY_BEAT_REDBEAT_KEY_PREFIX`` set and no scheduler chosen, beat keeps its
schedule in the broker's Redis with RedBeat where it can (see ``beat_store``).

Anything else is exec'd as-is, so ``kubectl debug``-style commands and
one-off scripts work through the same image.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from .probe_files import ProbeConfigError, ProbeFiles, heartbeat_interval

USAGE = "usage: celery-entrypoint celery [-A APP] worker|beat|... [ARGS...]  |  celery-entrypoint COMMAND [ARGS...]"


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(USAGE, file=sys.stderr)
        return 2
    if os.path.basename(args[0]) == "celery":
        return run_celery(args[1:])
    return exec_command(args)


def exec_command(args: list[str]) -> int:
    try:
        os.execvp(args[0], args)
    except OSError as err:
        print(f"celery-entrypoint: cannot exec {args[0]!r}: {err.strerror}", file=sys.stderr)
        return 127 if isinstance(err, FileNotFoundError) else 126
    raise AssertionError("unreachable: execvp returned")


def run_celery(celery_args: list[str]) -> int:
    """Run the ``celery`` CLI in-process with probe hooks and safe serialization."""
    try:
        files = ProbeFiles.from_env()
        interval = heartbeat_interval()
        if files is not None:
            files.start_process()
    except (ProbeConfigError, OSError) as err:
        # Fail fast with the cause instead of a liveness restart loop later.
        print(f"celery-entrypoint: probe setup failed: {err}", file=sys.stderr)
        return 1

    # sys.argv stays the entrypoint's own: Celery's SIGHUP restart re-execs
    # `python sys.argv...`, which must come back through here.
    import celery

    # Exactly what `python -m celery` does first: gevent/eventlet pools must
    # monkey-patch before anything else imports socket or threading.
    if "multi" not in celery_args:
        celery.maybe_patch_concurrency(["celery", *celery_args])

    from kombu.exceptions import SerializerNotInstalled

    from . import serialization

    try:
        allowed = serialization.allowed_content()
    except SerializerNotInstalled as err:
        print(f"celery-entrypoint: {serialization.ACCEPT_CONTENT_ENV}: {err}", file=sys.stderr)
        return 2
    serialization.install(allowed)
    if files is not None:
        from . import hooks

        hooks.install(files, interval)

    from . import beat_lock

    try:
        settings = beat_lock.LockSettings.from_env(celery_args)
        backend = beat_lock.backend_for(settings) if settings is not None else None
    except beat_lock.LockConfigError as err:
        print(f"celery-entrypoint: {beat_lock.LOCK_ENV}: {err}", file=sys.stderr)
        return 2
    if settings is not None and backend is None:
        beat_lock.log(
            f"{beat_lock.LOCK_ENV}: cannot lock on a {settings.scheme}:// broker "
            f"(supported: redis, rediss, amqp, amqps); beat runs WITHOUT the lock"
        )
    schedule = None
    if beat_lock.celery_subcommand(celery_args) == "beat":
        from . import beat_schedule, beat_store

        # CELERY_BEAT_REDBEAT_KEY_PREFIX: the scheduler is chosen once the app is loaded.
        celery_args = beat_store.with_default_scheduler(celery_args)

        schedule = beat_schedule.ScheduleFile.from_args(celery_args)
        schedule.install()
    # While it waits (for the lock, for the schedule file) a beat is alive and not ready.
    heartbeat = hooks.Heartbeat(files) if files is not None else None
    held = None
    if settings is not None and backend is not None:
        # Before Celery starts: a beat that waits here has opened no schedule and sends nothing.
        held = beat_lock.acquire(settings, backend, heartbeat, interval)
        if held is None:
            return 0
        held.install_celery_hooks()
        held.start()

    from celery.bin.celery import celery as celery_cli

    try:
        if schedule is not None:
            # On a volume pods share, the previous beat may still have the file (a lost lock key).
            schedule.wait_until_ours(heartbeat, interval)
        # What `celery.bin.celery.main()` does, with our argv instead of sys.argv.
        return celery_cli.main(args=celery_args, prog_name="celery", auto_envvar_prefix="CELERY")
    finally:
        # Beat has stopped: its schedule is closed, then (and only then) the lock is given back.
        if schedule is not None:
            schedule.close()
        if held is not None:
            held.release()


if __name__ == "__main__":
    sys.exit(main())
