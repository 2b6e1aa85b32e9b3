"""System checks of ``CELERY_ADV``: one test per mistake, asserting the exact ids.

Every test runs Django's real ``run_checks()`` under ``override_settings`` and
keeps only this library's messages, so a check that stops firing, fires twice
or fires under the wrong id fails here.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from django.conf import settings
from django.core.checks import ERROR, WARNING, CheckMessage, run_checks
from django.test import override_settings

from django_celery_adv import conf
from django_celery_adv.locks.backends.base import LockBackend

PREFIX = "django_celery_adv."
REDIS = "redis://127.0.0.1:6379/0"
DATABASE_BACKEND = "django_celery_adv.locks.backends.database.DatabaseBackend"
ZOOKEEPER_MODULE = "django_celery_adv.locks.backends.zookeeper"
ROOT = Path(__file__).resolve().parent.parent


class NeedsHostsBackend(LockBackend):
    """A backend that is only ever loaded by the checks, never instantiated."""

    required_options = ("hosts",)


def valid(**overrides: Any) -> dict[str, Any]:
    """A minimal correct ``CELERY_ADV`` with ``overrides`` laid over it."""
    config: dict[str, Any] = {"APPS": {"default": {"broker_url": REDIS}}}
    config.update(copy.deepcopy(overrides))
    return config


def messages(config: Any) -> list[CheckMessage]:
    """This library's check messages for ``CELERY_ADV = config``."""
    with override_settings(CELERY_ADV=config):
        return [m for m in run_checks() if m.id and m.id.startswith(PREFIX)]


def ids(config: Any) -> list[str]:
    """The ids (without prefix) of this library's messages, in the order emitted."""
    return [m.id.removeprefix(PREFIX) for m in messages(config)]


def one(config: Any, expected_id: str) -> CheckMessage:
    found = messages(config)
    assert [m.id for m in found] == [PREFIX + expected_id]
    return found[0]


@contextmanager
def missing_client(*names: str) -> Iterator[None]:
    """``importlib.util.find_spec`` reports ``names`` as not installed."""
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        if name in names:
            return None
        return real(name, *args, **kwargs)

    with mock.patch("importlib.util.find_spec", side_effect=find_spec):
        yield


# -- a valid configuration ----------------------------------------------------

def test_test_settings_produce_no_message_of_ours():
    assert isinstance(settings.CELERY_ADV, dict)
    found = [(m.id, m.msg) for m in run_checks() if m.id and m.id.startswith(PREFIX)]
    assert found == []


def test_minimal_valid_configuration_produces_no_message():
    assert ids(valid()) == []


def test_every_setting_given_and_valid_produces_no_message():
    config = valid(
        APPS={
            "default": {"broker_url": REDIS, "result_backend": REDIS,
                        "task_track_started": True},
            "global": {"broker_url": "amqp://guest:guest@127.0.0.1:5672//",
                       "result_backend": "rpc://"},
            "local": {"broker_url": "memory://"},
        },
        TASK_APPS={"reports.tasks.*": "global", "local.*": "local"},
        LOCK_BACKENDS={"default": {"BACKEND": DATABASE_BACKEND},
                       "custom": {"BACKEND": "tests.test_checks.NeedsHostsBackend",
                                  "OPTIONS": {"hosts": "127.0.0.1:2181"}}},
        LOCK_DEFAULTS={"TTL": 1, "RETRY_COUNTDOWN": 0, "RETRY_JITTER": 0.5,
                       "RETRY_BACKOFF": True, "WAIT": 0, "MAX_RETRIES": 0},
        LOGGING="logging.basicConfig",
        RECORD_FAILURES=False,
        FAILURE_RETENTION_DAYS=1,
        INSPECT_TIMEOUT=0.25,
    )
    assert ids(config) == []


def test_checks_are_registered_and_follow_override_settings():
    # Same process, two settings in a row: the cached config must not leak.
    assert ids(valid(INSPECT_TIMEOUT=0)) == ["E015"]
    assert ids(valid()) == []


# -- E001 / E002 ---------------------------------------------------------------

@pytest.mark.parametrize("value", [["APPS"], "APPS", None, 42])
def test_e001_celery_adv_not_a_dict(value):
    message = one(value, "E001")
    assert type(value).__name__ in message.msg
    assert message.level == ERROR


def test_celery_adv_absent_is_e003_only():
    try:
        with override_settings():
            del settings.CELERY_ADV
            conf.get_config.cache_clear()  # deleting sends no setting_changed
            found = [m.id for m in run_checks() if m.id and m.id.startswith(PREFIX)]
    finally:
        conf.get_config.cache_clear()
    assert found == [PREFIX + "E003"]


def test_e002_unknown_key():
    message = one(valid(TIMEOUT=3), "E002")
    assert "'TIMEOUT'" in message.msg
    assert "INSPECT_TIMEOUT" in message.hint


def test_e002_each_unknown_key_once_and_lowercase_apps_is_not_apps():
    assert ids({"apps": {"default": {"broker_url": REDIS}}, "BOGUS": 1}) == \
        ["E002", "E002", "E003"]


# -- E003 / E004 / E005 / W001 -----------------------------------------------------

@pytest.mark.parametrize("config", [
    pytest.param({}, id="no-APPS"),
    pytest.param({"APPS": {}}, id="empty"),
    pytest.param({"APPS": []}, id="list"),
    pytest.param({"APPS": "redis://127.0.0.1"}, id="string"),
    pytest.param({"APPS": {"main": {"broker_url": REDIS}}}, id="no-default"),
])
def test_e003_apps_missing_empty_or_without_default(config):
    assert ids(config) == ["E003"]


def test_e003_no_default_hint_says_why():
    message = one({"APPS": {"main": {"broker_url": REDIS}}}, "E003")
    assert "'default'" in message.msg


@pytest.mark.parametrize("app", [
    pytest.param({"result_backend": REDIS}, id="no-broker_url"),
    pytest.param({"broker_url": ""}, id="empty-broker_url"),
    pytest.param({"broker_url": None}, id="none-broker_url"),
    pytest.param({"broker_url": []}, id="empty-list"),
    pytest.param(REDIS, id="app-is-a-string"),
    pytest.param(None, id="app-is-none"),
])
def test_e004_app_without_broker_url(app):
    config = valid(APPS={"default": {"broker_url": REDIS}, "other": app})
    message = one(config, "E004")
    assert message.obj == "CELERY_ADV['APPS']['other']"


@pytest.mark.parametrize("url", [
    "kafkaa://x",
    "no-scheme",
    "redis",  # a transport name, but not a URL
    "redis:/127.0.0.1",
    "://127.0.0.1",
    f"{REDIS};bogus://127.0.0.1",
])
def test_e005_unsupported_scheme(url):
    message = one(valid(APPS={"default": {"broker_url": url}}), "E005")
    assert "redis" in message.hint  # lists kombu's transports


def test_e005_names_the_bad_scheme_and_each_bad_url():
    found = messages(valid(APPS={"default": {"broker_url": ["kafkaa://x", "nope://y"]}}))
    assert [m.id for m in found] == [PREFIX + "E005"] * 2
    assert "'kafkaa'" in found[0].msg
    assert "'nope'" in found[1].msg


@pytest.mark.parametrize("url", [
    "redis://localhost",
    "rediss://127.0.0.1:6380/1",
    "amqp://guest:guest@127.0.0.1:5672//",
    "pyamqp://127.0.0.1/vhost",
    "memory://",
    "sqla+sqlite:///tmp/x.db",
    "REDIS://127.0.0.1",
    "redis://127.0.0.1:6379/0;redis://127.0.0.1:6380/0",
])
def test_supported_schemes_raise_no_e005(url):
    # sqla needs SQLAlchemy, which may be absent (E007): only the scheme matters here.
    assert "E005" not in ids(valid(APPS={"default": {"broker_url": url}}))


def test_w001_typo_next_to_broker_url():
    config = valid(APPS={"default": {"broker_url": REDIS, "broker_ulr": REDIS}})
    message = one(config, "W001")
    assert message.level == WARNING
    assert not message.is_serious()
    assert "'broker_ulr'" in message.msg
    assert message.obj == "CELERY_ADV['APPS']['default']"


def test_w001_each_unknown_setting_once_and_celery_settings_pass():
    config = valid(APPS={"default": {
        "broker_url": REDIS, "beat_schedule": {}, "task_default_queue": "q",
        "BROKER_URL": REDIS, "task_alway_eager": True,
    }})
    found = messages(config)
    assert [m.id for m in found] == [PREFIX + "W001"] * 2
    assert "'BROKER_URL'" in found[0].msg
    assert "'task_alway_eager'" in found[1].msg


# -- E006 ---------------------------------------------------------------------

def test_e006_task_apps_names_an_unknown_alias():
    message = one(valid(TASK_APPS={"reports.*": "globl"}), "E006")
    assert "'globl'" in message.msg
    assert "default" in message.hint  # lists the known aliases


def test_e006_once_per_unknown_alias():
    config = valid(TASK_APPS={"a.*": "nope", "b.*": "default", "c.*": "nada"})
    assert ids(config) == ["E006", "E006"]


@pytest.mark.parametrize("task_apps", [["reports.*"], "global", None, 1])
def test_e006_task_apps_not_a_dict(task_apps):
    assert ids(valid(TASK_APPS=task_apps)) == ["E006"]


# -- E007 ---------------------------------------------------------------------

@pytest.mark.parametrize(("url", "client", "extra"), [
    (REDIS, "redis", "django-celery-adv[redis]"),
    ("rediss://127.0.0.1:6380/0", "redis", "django-celery-adv[redis]"),
    ("mongodb://127.0.0.1:27017/celery", "pymongo", "django-celery-adv[mongodb]"),
    ("zookeeper://127.0.0.1:2181/", "kazoo", "django-celery-adv[zookeeper]"),
])
def test_e007_transport_client_not_installed(url, client, extra):
    with missing_client(client):
        message = one(valid(APPS={"default": {"broker_url": url}}), "E007")
    assert f"'{client}'" in message.msg
    assert extra in message.hint
    assert message.obj == "CELERY_ADV['APPS']['default']"


def test_e007_not_raised_when_the_client_is_installed_or_not_needed():
    with missing_client("redis"):
        assert ids(valid(APPS={"default": {"broker_url": "amqp://127.0.0.1//"}})) == []
    assert ids(valid(APPS={"default": {"broker_url": REDIS}})) == []


# -- E016: the broker's kombu transport cannot be imported ----------------------------

@contextmanager
def transport_unimportable(transport_module: str, missing: str) -> Iterator[None]:
    """Importing ``transport_module`` afresh fails: ``missing`` is not installed.

    The transport (imported already by this process) is dropped from
    ``sys.modules`` and ``missing`` set to None there, which makes ``import
    missing`` raise ModuleNotFoundError; both are restored on exit.
    """
    with mock.patch.dict(sys.modules):
        for name in [n for n in sys.modules if n == missing or n.startswith(missing + ".")]:
            del sys.modules[name]
        sys.modules.pop(transport_module, None)
        sys.modules[missing] = None  # type: ignore[assignment]
        yield


@pytest.mark.parametrize(("url", "transport", "missing", "extra"), [
    # kombu's redis transport imports packaging (kombu[redis] brings it, plain kombu not).
    (REDIS, "kombu.transport.redis", "packaging", "django-celery-adv[redis]"),
    ("rediss://127.0.0.1:6380/0", "kombu.transport.redis", "packaging",
     "django-celery-adv[redis]"),
    ("sentinel://127.0.0.1:26379", "kombu.transport.redis", "packaging",
     "django-celery-adv[redis]"),
])
def test_e016_broker_transport_cannot_be_imported(url, transport, missing, extra):
    with transport_unimportable(transport, missing):
        message = one(valid(APPS={"default": {"broker_url": url}}), "E016")
    assert f"'{missing}'" in message.msg
    assert f"pip install '{extra}'" in message.hint
    assert message.obj == "CELERY_ADV['APPS']['default']"


def test_e016_names_the_missing_module_once_per_app():
    config = valid(APPS={"default": {"broker_url": REDIS},
                         "other": {"broker_url": "redis://127.0.0.1:6379/1",
                                   "task_default_queue": "other", "control_exchange": "other"},
                         "rabbit": {"broker_url": "amqp://guest:guest@127.0.0.1:5672//"}})
    with transport_unimportable("kombu.transport.redis", "packaging"):
        found = messages(config)
    assert [(m.id, m.obj) for m in found] == [
        (PREFIX + "E016", "CELERY_ADV['APPS']['default']"),
        (PREFIX + "E016", "CELERY_ADV['APPS']['other']"),
    ]


def test_e016_not_added_when_the_missing_module_is_the_client_of_e007():
    with transport_unimportable("kombu.transport.mongodb", "pymongo"):
        message = one(valid(APPS={"default": {"broker_url": "mongodb://127.0.0.1/c"}}), "E007")
    assert "pip install 'django-celery-adv[mongodb]'" in message.hint


def test_e016_not_raised_when_the_transport_imports():
    assert ids(valid(APPS={"default": {"broker_url": REDIS},
                           "rabbit": {"broker_url": "amqp://127.0.0.1//"}})) == []


def test_worker_would_fail_the_same_way_the_check_reports():
    # What the worker meets at start-up: kombu resolving the transport of the URL.
    from kombu.transport import resolve_transport

    with transport_unimportable("kombu.transport.redis", "packaging"), \
            pytest.raises(ModuleNotFoundError) as raised:
        resolve_transport("redis")
    assert raised.value.name.partition(".")[0] == "packaging"


def test_extras_bring_the_broker_transports_requirements():
    # kombu's own extras name what each transport needs (redis: redis + packaging).
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert "celery[redis]" in extras["redis"]
    assert "celery[mongodb]" in extras["mongodb"]
    assert "celery[zookeeper]" in extras["zookeeper"]


# -- E008 / E009: apps sharing a broker -------------------------------------------

SAME_BROKER = [
    pytest.param(REDIS, REDIS, id="same-url"),
    pytest.param("redis://localhost:6379", "redis://127.0.0.1:6379/0", id="localhost-default-db"),
    pytest.param("redis://LOCALHOST", "redis://127.0.0.1:6379/", id="no-port-no-db"),
    pytest.param("redis://:secret@127.0.0.1:6379/3", "redis://127.0.0.1/3", id="password"),
    pytest.param("redis://127.0.0.1/0;redis://10.0.0.2/0", REDIS, id="failover-first-url"),
    pytest.param("amqp://guest:guest@127.0.0.1:5672//", "pyamqp://127.0.0.1/",
                 id="amqp-default-vhost"),
]
DIFFERENT_BROKERS = [
    pytest.param(REDIS, "redis://127.0.0.1:6379/1", id="other-db"),
    pytest.param(REDIS, "redis://127.0.0.1:6380/0", id="other-port"),
    pytest.param(REDIS, "redis://10.0.0.2:6379/0", id="other-host"),
    pytest.param("amqp://127.0.0.1//", "amqp://127.0.0.1/other", id="other-vhost"),
    pytest.param(REDIS, "amqp://127.0.0.1:6379//", id="other-transport"),
]


@pytest.mark.parametrize(("url_a", "url_b"), SAME_BROKER)
def test_e008_same_broker_and_explicit_control_exchange(url_a, url_b):
    config = valid(APPS={
        "default": {"broker_url": url_a, "control_exchange": "ctl"},
        "twin": {"broker_url": url_b, "control_exchange": "ctl"},
    })
    message = one(config, "E008")
    assert "'default', 'twin'" in message.msg
    assert "'ctl'" in message.msg
    assert message.obj == "CELERY_ADV['APPS']['twin']"


@pytest.mark.parametrize(("url_a", "url_b"), DIFFERENT_BROKERS)
def test_no_e008_e009_on_different_brokers(url_a, url_b):
    config = valid(APPS={
        "default": {"broker_url": url_a, "control_exchange": "ctl",
                    "task_default_queue": "jobs"},
        "other": {"broker_url": url_b, "control_exchange": "ctl",
                  "task_default_queue": "jobs"},
    })
    assert ids(config) == []


@pytest.mark.parametrize(("url_a", "url_b"), SAME_BROKER)
def test_aliases_on_one_broker_without_explicit_names_are_isolated(url_a, url_b):
    config = valid(APPS={
        "default": {"broker_url": url_a},
        "twin": {"broker_url": url_b},
        "third": {"broker_url": url_a},
    })
    assert ids(config) == []


def test_e008_explicit_name_equal_to_another_alias_default():
    # "twin" gets control_exchange "celery.twin" by default; naming it again clashes.
    config = valid(APPS={
        "default": {"broker_url": REDIS, "control_exchange": "celery.twin"},
        "twin": {"broker_url": REDIS},
    })
    assert ids(config) == ["E008"]


def test_e008_filesystem_apps_sharing_a_control_folder(tmp_path):
    def app(queue: str) -> dict[str, Any]:
        return {"broker_url": "filesystem://", "control_exchange": "ctl",
                "broker_transport_options": {"control_folder": str(tmp_path / "control"),
                                             "data_folder_in": str(tmp_path / queue)}}

    assert ids(valid(APPS={"default": app("q"), "other": app("q")})) == ["E008"]
    assert ids(valid(APPS={"default": app("q1"), "other": app("q2")})) == []


def test_e009_explicit_identical_default_queue():
    config = valid(APPS={
        "default": {"broker_url": REDIS, "task_default_queue": "jobs"},
        "twin": {"broker_url": "redis://localhost:6379", "task_default_queue": "jobs"},
    })
    message = one(config, "E009")
    assert "'jobs'" in message.msg
    assert "task_default_queue" in message.hint


def test_e009_explicit_queue_equal_to_another_alias_default():
    config = valid(APPS={
        "default": {"broker_url": REDIS, "task_default_queue": "twin"},
        "twin": {"broker_url": REDIS},
    })
    assert ids(config) == ["E009"]


def test_e008_and_e009_together_and_only_for_the_clashing_pair():
    config = valid(APPS={
        "default": {"broker_url": REDIS, "control_exchange": "x",
                    "task_default_queue": "q"},
        "a": {"broker_url": REDIS, "control_exchange": "x", "task_default_queue": "q"},
        "b": {"broker_url": REDIS},
    })
    found = messages(config)
    assert [m.id for m in found] == [PREFIX + "E008", PREFIX + "E009"]
    assert all("'b'" not in m.msg for m in found)


def test_apps_with_a_bad_url_are_left_out_of_the_shared_broker_check():
    config = valid(APPS={
        "default": {"broker_url": REDIS, "control_exchange": "x"},
        "bad": {"broker_url": "nope://127.0.0.1", "control_exchange": "x"},
    })
    assert ids(config) == ["E005"]


# -- E010 / E011 / E012: LOCK_BACKENDS -----------------------------------------------

@pytest.mark.parametrize("backends", [
    pytest.param({}, id="empty"),
    pytest.param([], id="list"),
    pytest.param(None, id="none"),
    pytest.param({"main": {"BACKEND": DATABASE_BACKEND}}, id="no-default"),
])
def test_e010_lock_backends_without_default(backends):
    message = one(valid(LOCK_BACKENDS=backends), "E010")
    assert DATABASE_BACKEND in message.hint


@pytest.mark.parametrize("entry", [
    pytest.param({}, id="empty"),
    pytest.param({"OPTIONS": {"url": REDIS}}, id="no-BACKEND"),
    pytest.param({"BACKEND": 42}, id="BACKEND-not-a-string"),
    pytest.param(DATABASE_BACKEND, id="entry-is-a-string"),
])
def test_e010_entry_without_backend(entry):
    config = valid(LOCK_BACKENDS={"default": {"BACKEND": DATABASE_BACKEND}, "other": entry})
    message = one(config, "E010")
    assert message.obj == "CELERY_ADV['LOCK_BACKENDS']['other']"


@pytest.mark.parametrize("path", [
    "django_celery_adv.locks.backends.nosuch.NoSuchBackend",
    "django_celery_adv.locks.backends.database.NoSuchBackend",
    "NoDots",
    "os.path.join",  # importable, but not a LockBackend subclass
    "django_celery_adv.locks.backends.base.Lease",
])
def test_e011_backend_cannot_be_imported(path):
    message = one(valid(LOCK_BACKENDS={"default": {"BACKEND": path}}), "E011")
    assert path in message.msg
    assert "dotted path" in message.hint
    assert "pip install" not in message.hint


def test_e011_missing_client_library_names_the_pip_extra():
    path = f"{ZOOKEEPER_MODULE}.ZooKeeperBackend"
    config = valid(LOCK_BACKENDS={"default": {"BACKEND": DATABASE_BACKEND},
                                  "zk": {"BACKEND": path, "OPTIONS": {"hosts": "h:2181"}}})
    messages(config)  # import everything else once, outside the patched sys.modules
    with mock.patch.dict(sys.modules):
        for name in [n for n in sys.modules if n == "kazoo" or n.startswith("kazoo.")]:
            sys.modules[name] = None
        sys.modules["kazoo"] = None
        sys.modules.pop(ZOOKEEPER_MODULE, None)
        message = one(config, "E011")
    assert "kazoo" in message.msg
    assert "django-celery-adv[zookeeper]" in message.hint
    assert message.obj == "CELERY_ADV['LOCK_BACKENDS']['zk']"


@pytest.mark.parametrize(("path", "option"), [
    ("tests.test_checks.NeedsHostsBackend", "hosts"),
    (f"{ZOOKEEPER_MODULE}.ZooKeeperBackend", "hosts"),
    ("django_celery_adv.locks.backends.redis.RedisBackend", "url"),
])
@pytest.mark.parametrize("options", [None, {}, {"root": "/locks"}])
def test_e012_required_option_missing(path, option, options):
    entry: dict[str, Any] = {"BACKEND": path}
    if options is not None:
        entry["OPTIONS"] = options
    config = valid(LOCK_BACKENDS={"default": {"BACKEND": DATABASE_BACKEND}, "x": entry})
    message = one(config, "E012")
    assert f"'{option}'" in message.msg
    assert path.rpartition(".")[2] in message.hint
    assert option in message.hint
    assert message.obj == "CELERY_ADV['LOCK_BACKENDS']['x']"


def test_e012_not_raised_when_the_option_is_given():
    config = valid(LOCK_BACKENDS={
        "default": {"BACKEND": "tests.test_checks.NeedsHostsBackend",
                    "OPTIONS": {"hosts": "127.0.0.1:2181"}},
    })
    assert ids(config) == []


# -- E013: LOCK_DEFAULTS ------------------------------------------------------------

@pytest.mark.parametrize("defaults", [
    pytest.param({"TTL": 0}, id="TTL-0"),
    pytest.param({"TTL": 0.5}, id="TTL-below-1"),
    pytest.param({"TTL": "60"}, id="TTL-string"),
    pytest.param({"TTL": True}, id="TTL-bool"),
    pytest.param({"TIMEOUT": 5}, id="unknown-key"),
    pytest.param({"ttl": 5}, id="lowercase-key"),
    pytest.param({"MAX_RETRIES": -1}, id="MAX_RETRIES-negative"),
    pytest.param({"MAX_RETRIES": 1.5}, id="MAX_RETRIES-float"),
    pytest.param({"MAX_RETRIES": True}, id="MAX_RETRIES-bool"),
    pytest.param({"RETRY_COUNTDOWN": -1}, id="RETRY_COUNTDOWN-negative"),
    pytest.param({"RETRY_JITTER": None}, id="RETRY_JITTER-none"),
    pytest.param({"RETRY_BACKOFF": 1}, id="RETRY_BACKOFF-int"),
    pytest.param({"WAIT": -0.1}, id="WAIT-negative"),
    pytest.param([("TTL", 5)], id="not-a-dict"),
])
def test_e013_bad_lock_defaults(defaults):
    assert ids(valid(LOCK_DEFAULTS=defaults)) == ["E013"]


def test_e013_one_message_per_mistake_naming_it():
    found = messages(valid(LOCK_DEFAULTS={"TTL": 0, "BOGUS": 1, "MAX_RETRIES": -1}))
    assert [m.id for m in found] == [PREFIX + "E013"] * 3
    text = " ".join(m.msg for m in found)
    assert "'BOGUS'" in text
    assert "['TTL'] is 0" in text
    assert "['MAX_RETRIES'] is -1" in text


@pytest.mark.parametrize("defaults", [
    {"TTL": 1}, {"MAX_RETRIES": None}, {"MAX_RETRIES": 0}, {"WAIT": 0},
    {"RETRY_BACKOFF": True}, {},
])
def test_valid_lock_defaults_are_merged_without_message(defaults):
    assert ids(valid(LOCK_DEFAULTS=defaults)) == []


# -- E014 / E015 ---------------------------------------------------------------------

@pytest.mark.parametrize("logging", [
    42,
    ["handlers"],
    True,
    "django_celery_adv.conf.SETTING_NAME",  # importable but not callable
])
def test_e014_logging_not_none_dict_or_callable(logging):
    message = one(valid(LOGGING=logging), "E014")
    assert "must be None" in message.msg


@pytest.mark.parametrize("path", ["no_such_module.configure", "logging.no_such_function",
                                  "nodots"])
def test_e014_logging_path_cannot_be_imported(path):
    message = one(valid(LOGGING=path), "E014")
    assert "cannot be imported" in message.msg
    assert path in message.msg


@pytest.mark.parametrize("logging", [None, {}, {"version": 1}, "logging.basicConfig"])
def test_valid_logging_produces_no_message(logging):
    assert ids(valid(LOGGING=logging)) == []


@pytest.mark.parametrize("logging", [None, {"version": 1}, "logging.basicConfig"])
def test_an_apps_own_logging_key_is_not_a_w001(logging):
    # APPS[alias]["LOGGING"] is this library's per-app override, not a Celery setting.
    assert ids(valid(APPS={"default": {"broker_url": REDIS, "LOGGING": logging}})) == []


def test_e014_an_apps_own_logging_key_names_the_app():
    config = valid(APPS={"default": {"broker_url": REDIS, "LOGGING": 42},
                         "other": {"broker_url": REDIS, "LOGGING": "no_such_module.hook",
                                   "task_default_queue": "other",
                                   "control_exchange": "other"}})
    found = messages(config)
    assert [m.id for m in found] == [PREFIX + "E014"] * 2
    assert found[0].obj == "CELERY_ADV['APPS']['default']"
    assert "CELERY_ADV['APPS']['default']['LOGGING'] must be None" in found[0].msg
    assert found[1].obj == "CELERY_ADV['APPS']['other']"
    assert "cannot be imported" in found[1].msg


@pytest.mark.parametrize(("key", "value"), [
    ("INSPECT_TIMEOUT", 0),
    ("INSPECT_TIMEOUT", -1.0),
    ("INSPECT_TIMEOUT", "1"),
    ("INSPECT_TIMEOUT", True),
    ("INSPECT_TIMEOUT", None),
    ("RECORD_FAILURES", "yes"),
    ("RECORD_FAILURES", 1),
    ("RECORD_FAILURES", None),
    ("FAILURE_RETENTION_DAYS", 0),
    ("FAILURE_RETENTION_DAYS", 1.5),
    ("FAILURE_RETENTION_DAYS", True),
    ("FAILURE_RETENTION_DAYS", "90"),
])
def test_e015_bad_scalar(key, value):
    message = one(valid(**{key: value}), "E015")
    assert key in message.msg


def test_e015_one_message_per_bad_scalar():
    config = valid(INSPECT_TIMEOUT=0, RECORD_FAILURES="yes", FAILURE_RETENTION_DAYS=0)
    assert ids(config) == ["E015"] * 3


# -- several mistakes at once -----------------------------------------------------

def test_independent_mistakes_are_all_reported_in_order():
    config = {
        "APPS": {"default": {"broker_url": REDIS, "broker_ulr": REDIS},
                 "bad": {"broker_url": "kafkaa://x"}},
        "TASK_APPS": {"x.*": "nope"},
        "LOCK_BACKENDS": {"default": {"BACKEND": "tests.test_checks.NeedsHostsBackend"}},
        "LOCK_DEFAULTS": {"TTL": 0},
        "LOGGING": 42,
        "INSPECT_TIMEOUT": 0,
        "EXTRA": 1,
    }
    assert ids(config) == ["E002", "W001", "E005", "E006", "E012", "E013", "E014", "E015"]


# -- malformed values are reported, never a traceback --------------------------------

@pytest.mark.parametrize("url", ["redis://127.0.0.1:abc/0", "redis://127.0.0.1:99999/0",
                                 "redis://[::1/0"])
def test_malformed_broker_url_is_an_error(url):
    found = ids(valid(APPS={"default": {"broker_url": url}}))
    assert found and all(i.startswith("E") for i in found)


@pytest.mark.parametrize("config", [
    pytest.param(valid(TASK_APPS={"x.*": ["default"]}), id="TASK_APPS-alias-list"),
    pytest.param(valid(APPS={"default": {"broker_url": REDIS, "control_exchange": ["x"]},
                             "other": {"broker_url": REDIS, "control_exchange": ["x"]}}),
                 id="control_exchange-list"),
    pytest.param(valid(LOCK_BACKENDS={"default": {
        "BACKEND": "tests.test_checks.NeedsHostsBackend", "OPTIONS": 5}}),
        id="OPTIONS-not-iterable"),
])
def test_unhashable_or_non_dict_values_are_errors(config):
    found = ids(config)
    assert found and all(i.startswith("E") for i in found)


def test_amqps_default_port_is_5671():
    config = valid(APPS={
        "default": {"broker_url": "amqps://h", "control_exchange": "x"},
        "other": {"broker_url": "amqps://h:5671", "control_exchange": "x"},
    })
    assert ids(config) == ["E008"]


# -- manage.py check on the demo ---------------------------------------------------

def test_demo_manage_py_check_has_no_issues(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if k not in ("DEMO_DEFAULT_BROKER", "DEMO_GLOBAL_BROKER")}
    env.update(DJANGO_SETTINGS_MODULE="demo_project.settings", DEMO_VAR_DIR=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout
    assert PREFIX not in result.stdout + result.stderr
    assert (tmp_path / "broker" / "default").is_dir()  # the demo really used tmp_path
