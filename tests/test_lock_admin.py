"""Operators manage locks in the admin: the row wins over the code, within seconds; a lock
server that is down gives messages, never a 500; a lock cannot be detached by an edit."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC
from urllib.parse import urlsplit

import pytest
from django.conf import settings
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission, User
from django.test import override_settings
from django.urls import reverse

from django_celery_adv.exceptions import LockUnavailable
from django_celery_adv.locks import force_release, lock
from django_celery_adv.locks.backends import lock_backends
from django_celery_adv.locks.backends.base import Holder, Lease, LockBackend
from django_celery_adv.locks.definitions import CHECK_SECONDS, policies
from django_celery_adv.masking import MASK
from django_celery_adv.models import LockDefinition
from tests.faults.proxy import TcpProxy
from tests.faults.servers import spare_port

pytestmark = pytest.mark.django_db

SECRET = "lock-server-secret"
#: The "redis" test backend's keys: a lock taken through another alias is seen through it.
REDIS_PREFIX = settings.CELERY_ADV["LOCK_BACKENDS"]["redis"]["OPTIONS"]["prefix"]
CHANGELIST = "admin:django_celery_adv_lockdefinition_changelist"
FORM = {"backend": "default", "capacity": "3", "description": "", "ttl": "30", "wait": "0",
        "on_busy": "retry", "retry_countdown": "5", "retry_jitter": "1", "max_retries": ""}


@pytest.fixture(autouse=True)
def fresh_policies():
    lock_backends.reset()
    policies.invalidate()
    yield
    lock_backends.reset()


@pytest.fixture
def staff(client):
    user = User.objects.create_user("operator", password="pw", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(
        content_type__app_label="django_celery_adv", codename__endswith="lockdefinition"))
    client.force_login(user)
    return user


@pytest.fixture
def releaser(client, staff):
    staff.user_permissions.add(Permission.objects.get(codename="force_release_lock"))
    return staff


@contextmanager
def redis_lock_backend(alias: str, url: str, **options: object) -> Iterator[LockBackend]:
    """The test settings plus a Redis lock backend ``alias`` at ``url``."""
    backends = {**settings.CELERY_ADV["LOCK_BACKENDS"], alias: {
        "BACKEND": "django_celery_adv.locks.backends.redis.RedisBackend",
        "OPTIONS": {"url": url, "socket_timeout": 0.5, **options}}}
    with override_settings(CELERY_ADV={**settings.CELERY_ADV, "LOCK_BACKENDS": backends}):
        lock_backends.reset()
        try:
            yield lock_backends[alias]
        finally:
            lock_backends.reset()


def after_holders(backend: LockBackend, callback: Callable[[], None]) -> None:
    """Call ``callback`` after each ``holders()`` of ``backend`` (on this instance only)."""
    read = backend.holders

    def holders(name: str) -> list[Lease]:
        try:
            return read(name)
        finally:
            callback()

    backend.holders = holders


class DownBackend:
    """Lock backend ``down``: Redis on a port nobody listens on, its URL carrying a
    password; counts the calls of the backend's ``holders``."""

    def __init__(self) -> None:
        self.port = spare_port()
        self.holders_calls = 0

    def count(self) -> None:
        self.holders_calls += 1


@contextmanager
def down_lock_backend() -> Iterator[DownBackend]:
    """``with down_lock_backend() as down:`` the settings with lock backend "down"."""
    down = DownBackend()
    with redis_lock_backend("down", f"redis://:{SECRET}@127.0.0.1:{down.port}/0") as backend:
        after_holders(backend, down.count)
        yield down


def change_url(definition: LockDefinition) -> str:
    return reverse("admin:django_celery_adv_lockdefinition_change", args=[definition.pk])


def hold(definition: LockDefinition, count: int) -> list[Lease]:
    backend = lock_backends[definition.backend]
    return [backend.acquire(definition.name, definition.capacity, Holder(task_id=f"task-{i}"),
                            60) for i in range(count)]


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


# -- what the list and the change page show ------------------------------------------------

def test_list_shows_holders_now_and_a_plain_state(client, staff):
    busy = LockDefinition.objects.create(name="busy-lock", capacity=3)
    LockDefinition.objects.create(name="paused-lock", capacity=0)
    hold(busy, 2)

    page = client.get(reverse(CHANGELIST))

    assert page.status_code == 200
    html = page.content.decode()
    assert "2 / 3" in html and "0 / 0" in html
    states = re.findall(r'<td class="field-state">([^<]*)</td>', html)
    assert states == ["active", "paused"]  # ordered by name; no yes/no icon for a normal lock
    assert 'alt="False"' not in html


def test_detail_lists_every_holder_by_host_pid_and_token_to_the_second(client, staff):
    definition = LockDefinition.objects.create(name="detail-lock", capacity=2)
    leases = hold(definition, 2)

    html = client.get(change_url(definition)).content.decode()

    for lease in leases:
        assert f"<code>{lease.holder.task_id}</code>" in html
        assert f"{lease.holder.hostname} (pid {lease.holder.pid})" in html
        assert f'<td class="dca-token">{lease.token}</td>' in html
        assert lease.acquired_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC") in html
    assert not re.search(r"\d\d:\d\d:\d\d\.\d", html), "times are shown to the second"
    assert ">Host</th>" in html and ">Worker</th>" not in html


def test_holders_table_is_an_overridable_template(client, staff):
    definition = LockDefinition.objects.create(name="custom-lock", capacity=2)
    hold(definition, 2)
    templates = [{**settings.TEMPLATES[0], "APP_DIRS": False, "OPTIONS": {
        **settings.TEMPLATES[0]["OPTIONS"],
        "loaders": [("django.template.loaders.locmem.Loader", {
            "admin/django_celery_adv/lockdefinition/holders.html":
                "<p id='ours'>{{ definition.name }}: {{ leases|length }} holders</p>"}),
            "django.template.loaders.app_directories.Loader"]}}]

    with override_settings(TEMPLATES=templates):
        html = client.get(change_url(definition)).content.decode()

    assert "<p id='ours'>custom-lock: 2 holders</p>" in html


# -- edits that would detach a lock or double its holders ----------------------------------

def test_an_existing_lock_cannot_be_renamed(client, staff):
    definition = LockDefinition.objects.create(name="named-lock", capacity=1)

    form_html = client.get(change_url(definition)).content.decode()
    response = client.post(change_url(definition), {**FORM, "name": "renamed-lock"})

    assert response.status_code == 302
    assert LockDefinition.objects.get(pk=definition.pk).name == "named-lock"
    assert not LockDefinition.objects.filter(name="renamed-lock").exists()
    assert 'name="name"' not in form_html  # shown read-only, not as an input
    add_html = client.get(reverse("admin:django_celery_adv_lockdefinition_add")).content
    assert b'name="name"' in add_html  # a new lock still gets its name


def test_backend_cannot_change_while_the_old_backend_lists_holders(client, staff):
    definition = LockDefinition.objects.create(name="moving-lock", capacity=2)
    [lease] = hold(definition, 1)

    response = client.post(change_url(definition), {**FORM, "name": definition.name,
                                                    "backend": "redis"})

    assert response.status_code == 200  # the form again
    [error] = response.context["adminform"].form.errors["backend"]
    holder = lease.holder
    assert f"task {holder.task_id} on host {holder.hostname} (pid {holder.pid})" in error
    assert LockDefinition.objects.get(pk=definition.pk).backend == "default"
    assert lock_backends["redis"].holders("moving-lock") == []


def test_backend_cannot_change_while_the_old_backend_cannot_be_read(client, staff):
    with down_lock_backend():
        definition = LockDefinition.objects.create(name="stranded-lock", backend="down")
        response = client.post(change_url(definition), {**FORM, "name": definition.name,
                                                        "backend": "default"})

        assert response.status_code == 200
        [error] = response.context["adminform"].form.errors["backend"]
        assert "cannot be read" in error and "Connection" in error
        assert SECRET not in error and f":{MASK}@" in error
        assert LockDefinition.objects.get(pk=definition.pk).backend == "down"


def test_backend_of_a_free_lock_can_change(client, staff):
    definition = LockDefinition.objects.create(name="free-lock", capacity=2)

    response = client.post(change_url(definition), {**FORM, "name": definition.name,
                                                    "backend": "redis"})

    assert response.status_code == 302
    assert LockDefinition.objects.get(pk=definition.pk).backend == "redis"


def test_a_lock_on_a_backend_no_longer_configured_can_be_moved(client, staff):
    definition = LockDefinition.objects.create(name="orphan-lock", backend="removed")

    response = client.post(change_url(definition), {**FORM, "name": definition.name})

    assert response.status_code == 302
    assert LockDefinition.objects.get(pk=definition.pk).backend == "default"


@pytest.mark.parametrize(("field", "value"), [
    ("capacity", "-1"), ("ttl", "0.5"), ("name", "bad name/with slash"), ("backend", "nope"),
    ("retry_countdown", "-2"),
])
def test_bad_values_are_form_errors(client, staff, field, value):
    url = reverse("admin:django_celery_adv_lockdefinition_add")
    response = client.post(url, {**FORM, "name": "good-name", field: value})

    assert response.status_code == 200  # the form again, not a redirect
    assert field in response.context["adminform"].form.errors
    assert not LockDefinition.objects.filter(name__in=["good-name", value]).exists()


def test_capacity_lowered_in_the_admin_stops_new_grants_holders_keep_theirs(client, staff):
    definition = LockDefinition.objects.create(name="lowered-lock", capacity=3, wait=0)
    with lock("lowered-lock", capacity=3) as first, lock("lowered-lock") as second, \
            lock("lowered-lock") as third:
        response = client.post(change_url(definition), {**FORM, "name": "lowered-lock",
                                                        "capacity": "2"})
        assert response.status_code == 302
        time.sleep(CHECK_SECONDS + 0.1)  # what a worker process waits at most

        with pytest.raises(LockUnavailable), lock("lowered-lock"):
            pass
        held = {lease.token for lease in lock_backends["default"].holders("lowered-lock")}
        assert held == {first.token, second.token, third.token}
    with lock("lowered-lock") as again:  # all released: below capacity again
        assert [lease.token for lease in lock_backends["default"].holders("lowered-lock")] \
            == [again.token]


# -- force release ----------------------------------------------------------------------------

def test_force_release_needs_its_own_permission_and_is_logged_once(client, staff):
    definition = LockDefinition.objects.create(name="stuck-lock", capacity=2)
    stuck = hold(definition, 2)
    action = {"action": "force_release", "_selected_action": [definition.pk]}

    client.post(reverse(CHANGELIST), action)
    assert len(lock_backends["default"].holders("stuck-lock")) == 2  # not allowed yet

    staff.user_permissions.add(Permission.objects.get(codename="force_release_lock"))
    response = client.post(reverse(CHANGELIST), action, follow=True)

    assert "Released 2 lease(s)." in messages_of(response)
    assert lock_backends["default"].holders("stuck-lock") == []
    [entry] = LogEntry.objects.filter(object_id=str(definition.pk))
    assert all(str(lease.token) in entry.change_message for lease in stuck)


def test_force_release_on_a_backend_that_is_down_is_a_message(client, releaser):
    with down_lock_backend():
        down = LockDefinition.objects.create(name="unreachable-lock", backend="down")
        also_down = LockDefinition.objects.create(name="unreachable-too", backend="down")
        working = LockDefinition.objects.create(name="reachable-lock", capacity=1)
        hold(working, 1)
        action = {"action": "force_release",
                  "_selected_action": [down.pk, also_down.pk, working.pk]}

        response = client.post(reverse(CHANGELIST), action)
        page = client.get(response["Location"]) if response.status_code == 302 else response

    assert response.status_code == 302, response.status_code
    [error, skipped, released] = messages_of(page)
    assert error.startswith("unreachable-lock: ") and "Connection refused" in error
    assert SECRET not in error
    assert skipped == "Not tried, their backend failed above: unreachable-too."
    assert released == "Released 1 lease(s)."
    assert list(LogEntry.objects.values_list("object_id", flat=True)) == [str(working.pk)]


@pytest.fixture
def flaky_lock() -> Iterator[str]:
    """A lock name on the shared Redis, where no transaction rolls a holder back."""
    name = "flaky-lock"
    force_release(name, backend="redis")
    yield name
    force_release(name, backend="redis")


def test_force_release_when_the_server_fails_mid_action_is_a_message(client, releaser,
                                                                     flaky_lock):
    """The server answers the holders listing, then goes away before the release."""
    redis_url = urlsplit(settings.REDIS_LOCK_URL)
    proxy = TcpProxy(redis_url.port or 6379)
    try:
        with redis_lock_backend("flaky", f"redis://127.0.0.1:{proxy.port}{redis_url.path}",
                                prefix=REDIS_PREFIX) as backend:
            definition = LockDefinition.objects.create(name=flaky_lock, backend="flaky")
            [lease] = hold(definition, 1)
            assert lease is not None
            after_holders(backend, proxy.blackhole)  # from now on nothing passes either way
            action = {"action": "force_release", "_selected_action": [definition.pk]}

            response = client.post(reverse(CHANGELIST), action)
            page = client.get(response["Location"])
    finally:
        proxy.close()

    assert response.status_code == 302, response.status_code
    [error] = messages_of(page)
    assert error.startswith("flaky-lock: nothing released: lock backend 'flaky'"), error
    assert not LogEntry.objects.exists()
    assert [held.token for held in lock_backends["redis"].holders(flaky_lock)] \
        == [lease.token]  # still held: nothing was released behind the operator's back


def test_list_asks_a_backend_that_is_down_once_per_request(client, staff):
    with down_lock_backend() as down:
        for i in range(5):
            LockDefinition.objects.create(name=f"down-lock-{i}", backend="down")
        LockDefinition.objects.create(name="up-lock", capacity=2)

        page = client.get(reverse(CHANGELIST))

    assert page.status_code == 200
    assert down.holders_calls == 1
    html = page.content.decode()
    assert html.count(">unavailable</span>") == 5 and "0 / 2" in html
    assert SECRET not in html


def test_anonymous_users_are_sent_to_login(client):
    response = client.get(reverse(CHANGELIST))

    assert response.status_code == 302 and "/login/" in response["Location"]
