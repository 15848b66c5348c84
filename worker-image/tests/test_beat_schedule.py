"""Beat's schedule across restarts and rollouts, on a schedule directory that outlives the pod.

The beats share one schedule directory, as the pods of a pool mounting its beat
PersistentVolumeClaim do (``spec.beat.persistentVolumeClaim``), and take the beat lock
as the operator runs them. Sends are counted at the broker (``beat_app`` stamps each
message with its sender and time).
"""

from __future__ import annotations

import shelve
import signal
import time
import uuid
from pathlib import Path

import pytest
from conftest import RedisServer, Spawner, Worker, holds_schedule_open, redis_sends, start_beat, wait_until

from celery_worker_base.beat_schedule import schedule_option
from celery_worker_base.beat_store import PREFIX_ENV


def new_lock() -> str:
    return f"celery-operator:beat:test:{uuid.uuid4().hex[:8]}"


def first_pass(beat: Worker) -> str:
    """What beat logged from ``beat: Starting...`` to its first sleep (needs ``--loglevel DEBUG``).

    Celery's scheduler sends every due entry, one per tick, before it sleeps for the first
    time: the entries due when beat started are the ones sent in this first pass.
    """
    out = beat.output()
    start = out.index("beat: Starting...")
    end = out.index("beat: Waking up", start)
    return out[start:end]


def test_a_recreate_rollout_sends_the_ticks_due_during_it_once(spawn: Spawner, redis_server: RedisServer) -> None:
    """Old beat stopped (SIGTERM), and only after a minute boundary the new one starts.

    The crontab entry's minute came while no beat ran: the new beat sends it once, at once.
    So does the interval entry, overdue by then. A beat with a fresh schedule would skip the
    minute and wait a full period for the interval entry.
    """
    client = redis_server.client()
    lock, queue = new_lock(), f"rollout-{uuid.uuid4().hex[:8]}"
    schedule_dir = spawn.tmp_path / "schedule"
    schedule_dir.mkdir()
    env = {"BEAT_QUEUE": queue, "BEAT_EVERY": "2", "BEAT_MINUTELY": "1"}
    every, minutely = f"{queue}.every", f"{queue}.minutely"

    old = start_beat(spawn, redis_server.url, lock, "old", app="beat_app", schedule_dir=schedule_dir, **env)
    old.wait_ready()
    wait_until(lambda: redis_sends(client, every), 60, "the old beat to tick")
    old.proc.send_signal(signal.SIGTERM)
    assert old.proc.wait(timeout=60) == 0, old.output()
    stopped = time.time()
    # The rollout's gap spans the start of a minute: the crontab entry falls due while no beat runs.
    # It also lasts a full period of the interval entry after its last tick, or that entry is not
    # due yet when the new beat starts (the old beat stopped less than a period before the minute).
    last_tick, period = redis_sends(client, every)[-1].at, float(env["BEAT_EVERY"])
    wait_until(
        lambda: time.time() // 60 > stopped // 60 and time.time() > last_tick + period,
        90,
        "the next minute, a period after the last tick",
        interval=0.2,
    )

    new = start_beat(
        spawn, redis_server.url, lock, "new", app="beat_app", schedule_dir=schedule_dir, loglevel="DEBUG", **env
    )
    wait_until(lambda: "beat: Waking up" in new.output(), 60, "the new beat's first scheduler pass")
    new.proc.send_signal(signal.SIGTERM)
    assert new.proc.wait(timeout=60) == 0, new.output()

    sent_first = first_pass(new)
    assert sent_first.count("Sending due task minutely") == 1, sent_first
    assert sent_first.count("Sending due task every") == 1, sent_first
    # At the broker: the minute that came during the rollout was sent once, by the new beat.
    after = [s for s in redis_sends(client, minutely) if s.at > stopped]
    assert after and after[0].pid == new.proc.pid, after
    assert [s for s in after if s.at // 60 == after[0].at // 60] == after[:1], after
    ticks = redis_sends(client, every)
    assert {s.pid for s in ticks} == {old.proc.pid, new.proc.pid}, ticks


def stored_run_count(schedule_dir: Path, entry: str) -> int | None:
    """How many sends of ``entry`` beat's schedule file records (None while it is being written)."""
    try:
        with shelve.open(str(schedule_dir / "celerybeat-schedule"), flag="r") as store:
            return int(store["entries"][entry].total_run_count)
    except Exception:  # noqa: BLE001 - a file half-written by beat reads as "not yet"
        return None


def test_the_schedule_store_records_each_tick_as_it_is_sent(spawn: Spawner, redis_server: RedisServer) -> None:
    """Not every 3 minutes (Celery's default): a beat that dies without a warm shutdown (SIGKILL,
    OOM, a lost lock) leaves no sent tick unrecorded, so the next beat on the store does not send
    it again."""
    client = redis_server.client()
    queue = f"store-{uuid.uuid4().hex[:8]}"
    schedule_dir = spawn.tmp_path / "schedule"
    schedule_dir.mkdir()
    env = {"BEAT_QUEUE": queue, "BEAT_EVERY": "1"}
    beat = start_beat(spawn, redis_server.url, new_lock(), "store", app="beat_app", schedule_dir=schedule_dir, **env)
    beat.wait_ready()
    wait_until(lambda: len(redis_sends(client, f"{queue}.every")) >= 3, 60, "three ticks")
    wait_until(
        lambda: stored_run_count(schedule_dir, "every") == len(redis_sends(client, f"{queue}.every")),
        60,
        "the schedule file to count every tick sent",
    )
    assert "saves its schedule after every task sent" in beat.output()


def test_beats_sharing_a_schedule_file_take_turns(spawn: Spawner, redis_server: RedisServer) -> None:
    """A second beat on the same schedule file waits until the first is gone, then carries on its schedule.

    Pods sharing a claim meet this when a lost lock key lets a waiter take over while the old
    holder still runs (until its next send); here neither takes the broker lock, so the file is
    all that keeps them apart. Two processes on one shelve corrupt it (with gdbm the second open
    fails and Celery deletes the schedule).
    """
    client = redis_server.client()
    queue = f"turns-{uuid.uuid4().hex[:8]}"
    schedule_dir = spawn.tmp_path / "schedule"
    schedule_dir.mkdir()
    env = {"BEAT_QUEUE": queue, "BEAT_EVERY": "0.5"}
    first = start_beat(spawn, redis_server.url, None, "first", app="beat_app", schedule_dir=schedule_dir, **env)
    first.wait_ready()
    second = start_beat(spawn, redis_server.url, None, "second", app="beat_app", schedule_dir=schedule_dir, **env)
    wait_until(lambda: "waiting for schedule file" in second.output(), 60, "the second beat to wait for the file")

    def sent_by(beat: Worker) -> int:
        return sum(1 for s in redis_sends(client, f"{queue}.every") if s.pid == beat.proc.pid)

    waited_from = sent_by(first)
    wait_until(lambda: sent_by(first) >= waited_from + 2, 60, "the first beat to tick on while the second waits")
    assert second.proc.poll() is None and second.passes("liveness") and not second.passes("readiness")
    assert "beat: Starting..." not in second.output() and not holds_schedule_open(second.proc.pid)

    first.proc.send_signal(signal.SIGTERM)
    assert first.proc.wait(timeout=60) == 0, first.output()
    second.wait_ready()
    wait_until(lambda: sent_by(second) >= 1, 60, "the second beat to tick")
    assert "took schedule file" in second.output()
    assert "Removing corrupted schedule" not in second.output(), second.output()
    pids = [s.pid for s in redis_sends(client, f"{queue}.every")]
    assert pids == sorted(pids, key=lambda pid: pid == second.proc.pid), "the two beats' ticks interleave"


def test_the_schedule_file_is_found_on_the_beat_command_line() -> None:
    assert schedule_option(["-A", "proj", "beat", "--schedule", "/v/celerybeat-schedule"]) == "/v/celerybeat-schedule"
    assert schedule_option(["-A", "proj", "beat", "--schedule=/v/s", "-S", "x.Y"]) == "/v/s"
    assert schedule_option(["-A", "proj", "beat", "-s", "/v/s"]) == "/v/s"
    assert schedule_option(["-A", "proj", "beat", "-s/v/s"]) == "/v/s"
    assert schedule_option(["-A", "proj", "beat", "-S", "redbeat.RedBeatScheduler"]) == "celerybeat-schedule"


@pytest.mark.parametrize("store", ["file", "redbeat"])
def test_sigterm_inside_a_del_still_stops_beat_cleanly(spawn: Spawner, redis_server: RedisServer, store: str) -> None:
    """SIGTERM lands while beat runs a ``__del__`` right after a send (as Celery's
    ``AsyncResult.__del__`` does, unsubscribing from the result backend): Python swallows the
    SystemExit raised there. Beat still stops at the end of that tick, exits 0, closes its store
    once and sends nothing more (Celery's own handler left the file scheduler on a closed shelf,
    exit 1, and RedBeat ticking until SIGKILL)."""
    client = redis_server.client()
    queue = f"del-{uuid.uuid4().hex[:8]}"
    hold = spawn.tmp_path / f"hold-{store}"
    hold.mkdir()
    env = {"BEAT_QUEUE": queue, "BEAT_EVERY": "0.5", "BEAT_HOLD_IN_DEL": str(hold)}
    if store == "redbeat":
        env[PREFIX_ENV] = f"celery-operator:redbeat:test:{uuid.uuid4().hex[:8]}:"
    beat = start_beat(spawn, redis_server.url, new_lock(), f"del-{store}", app="beat_app", **env)
    wait_until(lambda: (hold / "in-del").exists(), 60, "beat to hold inside __del__ after its first send")
    beat.proc.send_signal(signal.SIGTERM)
    sent = len(redis_sends(client, f"{queue}.every"))
    (hold / "go").touch()
    assert beat.proc.wait(timeout=60) == 0, beat.output()
    out = beat.output()
    assert "Exception ignored in" in out, "the SIGTERM did not land inside __del__:\n" + out
    assert "closed shelf" not in out and "released beat lock" in out, out
    assert len(redis_sends(client, f"{queue}.every")) == sent, out
    assert ("schedule kept in Redis by RedBeat" in out) == (store == "redbeat"), out
