"""JSON-only unless opted in: pickle messages are refused without the app's cooperation."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path

import pytest
from celery import Celery
from conftest import ENTRYPOINT, RedisServer, Spawner, wait_until
from kombu.exceptions import SerializerNotInstalled

from celery_worker_base.serialization import allowed_content, enforce, enforce_on_tasks

# An app that trusts pickle, as plenty of legacy projects do.
PICKLE_APP = """
import os
from celery import Celery

app = Celery("pickly", broker=os.environ["CELERY_BROKER_URL"], backend=os.environ["CELERY_RESULT_BACKEND"])
app.conf.update(accept_content=["pickle", "json"], result_accept_content=["pickle", "json"],
                task_serializer="pickle", result_serializer="pickle")


@app.task(name="pickly.add")
def add(x, y):
    return x + y
"""


@pytest.fixture
def pickle_app(tmp_path: Path) -> str:
    (tmp_path / "pickly.py").write_text(PICKLE_APP)  # workers run with cwd=tmp_path
    return "pickly"


def send_pickle_then_json(client_app, url: str, queue: str, result_serializer: str):
    # Redis stores results without a content type: the client must decode with the worker's serializer.
    client = client_app(
        url,
        accept_content=["json", "pickle"],
        result_accept_content=["json", "pickle"],
        result_serializer=result_serializer,
    )
    pickled = client.send_task("pickly.add", (1, 2), queue=queue, serializer="pickle")
    jsoned = client.send_task("pickly.add", (2, 3), queue=queue, serializer="json")
    return pickled, jsoned


def test_worker_refuses_pickle_even_when_the_app_accepts_it(
    spawn: Spawner, redis_server: RedisServer, client_app, pickle_app: str
) -> None:
    worker = spawn(redis_server.url, app=pickle_app)
    worker.wait_ready()
    pickled, jsoned = send_pickle_then_json(client_app, redis_server.url, worker.queue, "json")

    # One slot, prefetch 1, FIFO: the pickle message was handled first.
    assert jsoned.get(timeout=60) == 5
    wait_until(
        lambda: "Refusing to deserialize untrusted content of type pickle" in worker.output(),
        30,
        "the worker to refuse the pickle message",
    )
    assert pickled.state == "PENDING"
    assert "serialization restricted to json; overrode app settings" in worker.output()


def test_pickle_runs_when_opted_in(spawn: Spawner, redis_server: RedisServer, client_app, pickle_app: str) -> None:
    # C_FORCE_ROOT: Celery itself refuses pickle as root, and CI runs as root.
    worker = spawn(redis_server.url, app=pickle_app, env={"CELERY_ALLOW_PICKLE": "1", "C_FORCE_ROOT": "1"})
    worker.wait_ready()
    pickled, jsoned = send_pickle_then_json(client_app, redis_server.url, worker.queue, "pickle")
    assert pickled.get(timeout=60) == 3
    assert jsoned.get(timeout=60) == 5


def test_beat_sends_json_even_when_the_app_configures_pickle(
    spawn: Spawner, redis_server: RedisServer, tmp_path: Path, pickle_app: str
) -> None:
    (tmp_path / "pickly.py").write_text(
        PICKLE_APP + '\napp.conf.beat_schedule = {"add": {"task": "pickly.add", "schedule": 0.5, '
        '"args": (1, 1), "options": {"queue": os.environ["BEAT_QUEUE"]}}}\n'
    )
    queue = f"beat-json-{uuid.uuid4().hex[:8]}"
    beat = spawn(
        redis_server.url,
        env={"BEAT_QUEUE": queue},
        command=[
            "celery",
            "-A",
            pickle_app,
            "beat",
            "--schedule",
            str(tmp_path / "celerybeat-schedule"),
            "--loglevel",
            "INFO",
        ],
    )
    client = redis_server.client()
    raw = wait_until(lambda: client.lindex(queue, 0), 60, "beat to send a message")
    assert json.loads(raw)["content-type"] == "application/json"
    beat.stop()


def test_enforce_overrides_namespaced_django_style_settings() -> None:
    class Settings:
        CELERY_ACCEPT_CONTENT = ["pickle"]
        CELERY_TASK_SERIALIZER = "pickle"
        CELERY_RESULT_SERIALIZER = "pickle"

    app = Celery("namespaced", set_as_current=False)
    app.config_from_object(Settings, namespace="CELERY")
    assert app.conf.accept_content == ["pickle"]
    enforce(app, ["json"])
    assert app.conf.accept_content == ["json"]
    assert app.conf.result_accept_content == ["json"]
    assert app.conf.task_serializer == "json"
    assert app.conf.result_serializer == "json"


def test_enforce_keeps_an_allowed_serializer_and_is_idempotent() -> None:
    app = Celery("allowed", set_as_current=False)
    app.conf.update(accept_content=["application/json", "pickle"], task_serializer="pickle")
    enforce(app, ["json", "pickle"])
    assert app.conf.task_serializer == "pickle"
    assert app.conf.result_serializer == "json"
    before = dict(app.conf.changes)
    enforce(app, ["json", "pickle"])
    assert dict(app.conf.changes) == before


def test_tasks_bound_with_pickle_are_moved_to_json() -> None:
    app = Celery("bound", set_as_current=False)
    app.conf.update(task_serializer="pickle")

    @app.task(name="bound.default")
    def default() -> None: ...

    @app.task(name="bound.explicit", serializer="pickle")
    def explicit() -> None: ...

    app.finalize()
    assert app.tasks["bound.default"].serializer == "pickle"
    enforce(app, ["json"])
    enforce_on_tasks(app, ["json"])
    assert app.tasks["bound.default"].serializer == "json"
    assert app.tasks["bound.explicit"].serializer == "json"


def test_allowed_content_from_env() -> None:
    assert allowed_content({}) == ["json"]
    assert allowed_content({"CELERY_ALLOW_PICKLE": "1"}) == ["json", "pickle"]
    assert allowed_content({"CELERY_ACCEPT_CONTENT": "json, yaml", "CELERY_ALLOW_PICKLE": "no"}) == ["json", "yaml"]
    with pytest.raises(SerializerNotInstalled):
        allowed_content({"CELERY_ACCEPT_CONTENT": "json,jsno"})


def test_entrypoint_refuses_to_start_with_an_unknown_accept_content(tmp_path: Path) -> None:
    result = subprocess.run(
        [ENTRYPOINT, "celery", "--version"],
        env={"CELERY_ACCEPT_CONTENT": "jsno", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "CELERY_ACCEPT_CONTENT" in result.stderr and "jsno" in result.stderr
