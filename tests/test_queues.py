"""Queue depths on real Redis and RabbitMQ, "not supported" elsewhere, purge, celery_status."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from io import StringIO
from urllib.parse import unquote, urlsplit

import pytest
import redis
from celery.app import control as celery_control
from django.conf import settings
from django.core.management import CommandError, call_command
from django.test import override_settings
from kombu import Exchange, Queue

from django_celery_adv.exceptions import BrokerError
from django_celery_adv.monitoring import AppStatus, Status, WorkerStatus
from django_celery_adv.queues import purge_queue, read_app, read_queues
from django_celery_adv.registry import apps
from tests.test_monitoring import SECRET, with_down_apps

MESSAGES = 1000
PRIORITIES = 10


def with_apps(**extra: dict) -> override_settings:
    return override_settings(CELERY_ADV={**settings.CELERY_ADV,
                                         "APPS": {**settings.CELERY_ADV["APPS"], **extra}})


def fill(alias: str, name: str, count: int, *, priorities: int = PRIORITIES) -> Queue:
    """Publish ``count`` messages to a fresh queue ``name``, priorities cycling 0..9."""
    queue = Queue(name, Exchange(name, type="direct"), routing_key=name,
                  queue_arguments={"x-max-priority": priorities})
    with apps[alias].connection_for_write() as connection:
        producer = connection.Producer()
        producer.declare = []
        queue(connection.default_channel).declare()
        for index in range(count):
            producer.publish({"i": index}, exchange=queue.exchange, routing_key=name,
                             priority=index % priorities, retry=False)
    return queue


def drop(alias: str, queue: Queue) -> None:
    with apps[alias].connection_for_write() as connection:
        bound = queue(connection.default_channel)
        bound.delete()
        bound.exchange.delete()


@pytest.fixture
def stalling_port() -> Iterator[int]:
    """A port that accepts connections and never answers (a broker that stalls)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: [held.append(server.accept()[0]) for _ in range(16)],
                     daemon=True).start()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()
        for sock in held:
            sock.close()


@pytest.fixture
def no_broadcast(monkeypatch):
    """Any inspect or control broadcast fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("a broadcast was sent")

    monkeypatch.setattr(celery_control.Control, "broadcast", refuse)
    monkeypatch.setattr(celery_control.Inspect, "_request", refuse)


def rabbitmq_count(name: str) -> int | None:
    """messages_ready of ``name`` as rabbitmqctl reports it (None without rabbitmqctl)."""
    if shutil.which("rabbitmqctl") is None:
        return None
    vhost = unquote(urlsplit(settings.AMQP_URL).path[1:]) or "/"
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name",
                          "messages_ready", "--no-table-headers"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    counts = dict(line.split("\t") for line in out.splitlines() if "\t" in line)
    return int(counts[name])


# -- counts ----------------------------------------------------------------------

def test_redis_count_is_llen_summed_over_kombus_priority_lists(no_broadcast):
    name = f"hops-prio-{uuid.uuid4().hex[:8]}"
    queue = fill("default", name, MESSAGES)
    try:
        client = redis.Redis.from_url(settings.REDIS_URL)
        # kombu's default priority_steps [0, 3, 6, 9], sep "\x06\x16".
        keys = [name] + [f"{name}\x06\x16{step}" for step in (3, 6, 9)]
        lengths = [client.llen(key) for key in keys]
        assert sum(lengths) == MESSAGES and all(lengths), lengths  # spread over all four
        assert client.llen(name) < MESSAGES  # what a bare LLEN (celery-exporter #272) says

        reading = read_app("default", extra=[name])
        assert reading.readable and reading.transport == "redis"
        depth = reading.queue(name)
        assert depth.ready == MESSAGES
        assert depth.consumers is None and depth.unacked is None  # Redis cannot say
        assert reading.unacked == client.hlen("unacked")
    finally:
        drop("default", queue)


def test_redis_custom_priority_steps_separator_and_prefix(no_broadcast):
    options = {"priority_steps": list(range(PRIORITIES)), "sep": ":",
               "global_keyprefix": "hops:"}
    with with_apps(prio={"broker_url": settings.REDIS_URL,
                         "broker_transport_options": options}):
        name = f"hops-steps-{uuid.uuid4().hex[:8]}"
        queue = fill("prio", name, MESSAGES)
        try:
            client = redis.Redis.from_url(settings.REDIS_URL)
            keys = [f"hops:{name}"] + [f"hops:{name}:{step}" for step in range(1, PRIORITIES)]
            lengths = [client.llen(key) for key in keys]
            assert sum(lengths) == MESSAGES and all(lengths), lengths
            assert read_app("prio", extra=[name]).queue(name).ready == MESSAGES
            assert purge_queue("prio", name) == MESSAGES
            assert sum(client.llen(key) for key in keys) == 0
        finally:
            drop("prio", queue)


def test_rabbitmq_count_and_consumers_from_a_passive_declare(no_broadcast):
    name = f"hops-prio-{uuid.uuid4().hex[:8]}"
    queue = fill("global", name, MESSAGES)
    try:
        reading = read_app("global", extra=[name, "hops-never-declared"])
        assert reading.readable and reading.transport == "amqp"
        depth = reading.queue(name)
        assert (depth.ready, depth.consumers, depth.exists) == (MESSAGES, 0, True)
        assert depth.unacked is None  # not in queue.declare-ok; never a made-up 0
        assert reading.queue("hops-never-declared").exists is False
        assert reading.queue("hops-never-declared").ready is None
        counted = rabbitmq_count(name)
        assert counted in (None, MESSAGES)
        assert purge_queue("global", name) == MESSAGES
        assert read_app("global", extra=[name]).queue(name).ready == 0
    finally:
        drop("global", queue)


def test_workers_queues_come_from_the_reading_passed_in(no_broadcast):
    status = AppStatus(alias="default", broker="", reachable=True, error=None, workers=[
        WorkerStatus(name="a@h", status=Status.ONLINE, queues=["celery", "hops-extra"]),
        WorkerStatus(name="b@h", status=Status.ONLINE, queues=["hops-extra"])])
    reading = read_queues(["default"], statuses={"default": status})["default"]
    assert [(q.name, q.configured, q.workers) for q in reading.queues] == [
        ("celery", True, ["a@h"]), ("hops-extra", False, ["a@h", "b@h"])]
    assert reading.queue("hops-extra").ready == 0
    # Without a reading: the configured queues only, still no broadcast.
    assert [q.name for q in read_queues(["twin"])["twin"].queues] == ["twin"]


def test_filesystem_transport_is_not_supported(tmp_path, no_broadcast):
    folder = str(tmp_path)
    with with_apps(files={"broker_url": "filesystem://", "broker_transport_options": {
            "data_folder_in": folder, "data_folder_out": folder,
            "control_folder": folder}}):
        reading = read_queues(["files"])["files"]
        assert (reading.transport, reading.supported, reading.error) == \
            ("filesystem", False, None)
        assert [(q.name, q.ready, q.unacked, q.consumers) for q in reading.queues] == [
            ("files", None, None, None)]
        with pytest.raises(BrokerError, match="not supported on the filesystem"):
            purge_queue("files", "files")


def test_a_dead_broker_is_a_masked_error_per_app(no_broadcast):
    with with_down_apps():
        started = time.monotonic()
        readings = read_queues(["down_redis", "down_amqp", "default"], timeout=0.5)
        assert time.monotonic() - started < 3
    for alias in ("down_redis", "down_amqp"):
        reading = readings[alias]
        assert reading.error and SECRET not in reading.error and SECRET not in reading.broker
        assert all(q.ready is None for q in reading.queues)
    assert readings["default"].readable


# -- celery_status queues --------------------------------------------------------

def test_celery_status_queues_text_and_json(tmp_path):
    name = f"hops-status-{uuid.uuid4().hex[:8]}"
    with with_apps(statusq={"broker_url": settings.REDIS_URL, "task_default_queue": name},
                   files={"broker_url": "filesystem://", "broker_transport_options": {
                       "data_folder_in": str(tmp_path), "data_folder_out": str(tmp_path),
                       "control_folder": str(tmp_path)}}):
        queue = fill("statusq", name, 7)
        try:
            out = StringIO()
            with pytest.raises(CommandError):  # no worker online: exit 1 as before
                call_command("celery_status", "queues", "--app", "statusq", "--app", "files",
                             "--timeout", "0.2", stdout=out)
            text = out.getvalue()
            assert any(line.split()[:2] == [name, "7"] for line in text.splitlines()), text
            assert "not supported on the filesystem transport" in text

            out = StringIO()
            with pytest.raises(CommandError):
                call_command("celery_status", "queues", "--app", "statusq", "--json",
                             "--timeout", "0.2", stdout=out)
            data = json.loads(out.getvalue())["statusq"]["queues"]
            assert (data["transport"], data["supported"], data["error"]) == \
                ("redis", True, None)
            assert [(q["name"], q["ready"]) for q in data["queues"]] == [(name, 7)]
        finally:
            drop("statusq", queue)


def test_purge_refuses_a_redis_key_that_is_not_a_queue():
    client = redis.Redis.from_url(settings.REDIS_URL)
    key = f"hops-hash-{uuid.uuid4().hex[:8]}"
    client.hset(key, "field", "value")
    try:
        with pytest.raises(BrokerError, match="is not a queue"):
            purge_queue("default", key)
        assert client.hget(key, "field") == b"value"
    finally:
        client.delete(key)


def test_a_broker_that_accepts_and_stalls_is_an_error_within_the_timeout(stalling_port):
    from django_celery_adv.control import pool_grow

    port = stalling_port
    with with_apps(stall_amqp={"broker_url": f"amqp://u:{SECRET}@127.0.0.1:{port}//"},
                   stall_redis={"broker_url": f"redis://:{SECRET}@127.0.0.1:{port}/0"}):
        started = time.monotonic()
        readings = read_queues(["stall_amqp", "stall_redis"], timeout=0.5)
        assert time.monotonic() - started < 2.5
        for reading in readings.values():
            assert reading.error and SECRET not in reading.error
        started = time.monotonic()
        reply = pool_grow("stall_redis", "w@h")
        assert time.monotonic() - started < 2.5
        assert not reply.ok and "Timeout" in reply.message and SECRET not in reply.message


def test_a_read_that_outlives_every_socket_timeout_is_given_up(monkeypatch):
    from django_celery_adv import queues

    monkeypatch.setattr(queues, "read_app", lambda *args, **kwargs: time.sleep(5))
    started = time.monotonic()
    reading = read_queues(["default"], timeout=0.1)["default"]
    assert time.monotonic() - started < 2
    assert reading.error.startswith("no answer from the broker within")
    assert [(q.name, q.ready) for q in reading.queues] == [("celery", None)]


def test_a_rabbitmq_that_stalls_after_the_handshake_is_an_error_within_the_timeout(monkeypatch):
    """A partition after connecting: every later read and write is bounded too."""
    from django_celery_adv import control, queues
    from tests.faults.proxy import TcpProxy

    amqp = urlsplit(settings.AMQP_URL)
    proxy = TcpProxy(amqp.port or 5672)
    url = amqp._replace(netloc=f"{amqp.username}:{amqp.password}@127.0.0.1:{proxy.port}")
    read_amqp, broadcast = queues._read_amqp, celery_control.Control.broadcast

    def partitioned(original):
        def call(*args, **kwargs):
            proxy.blackhole()  # connected; from now on nothing passes either way
            return original(*args, **kwargs)
        return call

    monkeypatch.setattr(queues, "_read_amqp", partitioned(read_amqp))
    monkeypatch.setattr(celery_control.Control, "broadcast", partitioned(broadcast))
    outcomes: dict[str, object] = {}

    def run(what, call):
        started = time.monotonic()
        outcomes[what] = (call(), time.monotonic() - started)

    try:
        with with_apps(stalled={"broker_url": url.geturl()}):
            for what, call in (("read", lambda: read_app("stalled", timeout=0.5)),
                               ("control", lambda: control.send_command(
                                   "stalled", "w@h", "ping", timeout=0.5))):
                proxy.forward()
                thread = threading.Thread(target=run, args=(what, call), daemon=True)
                thread.start()
                thread.join(5)
                assert what in outcomes, f"{what}: still waiting after 5 s"
    finally:
        proxy.close()
    reading, seconds = outcomes["read"]
    assert reading.error and "timeout" in reading.error.lower() and seconds < 2.5, \
        (reading.error, seconds)
    reply, seconds = outcomes["control"]
    assert not reply.ok and seconds < 2.5, (reply, seconds)


def test_celery_status_queues_keeps_to_its_timeout_on_a_stalled_broker(stalling_port):
    port = stalling_port
    apps_setting = {**settings.CELERY_ADV["APPS"],
                    "stall_redis": {"broker_url": f"redis://:{SECRET}@127.0.0.1:{port}/0"}}
    # A long default: only --timeout can make the command quick.
    with override_settings(CELERY_ADV={**settings.CELERY_ADV, "APPS": apps_setting,
                                       "INSPECT_TIMEOUT": 5.0}):
        out = StringIO()
        started = time.monotonic()
        with pytest.raises(CommandError):
            call_command("celery_status", "queues", "--app", "stall_redis", "--fresh",
                         "--timeout", "0.3", stdout=out)
        seconds = time.monotonic() - started
    assert "Queues: ?" in out.getvalue() and SECRET not in out.getvalue()
    assert seconds < 3, seconds
