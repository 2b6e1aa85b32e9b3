"""Operators manage locks in the admin: the row wins over the code, within seconds."""

from __future__ import annotations

import time

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import Permission, User
from django.urls import reverse

from django_celery_adv.exceptions import LockUnavailable
from django_celery_adv.locks import lock
from django_celery_adv.locks.backends import lock_backends
from django_celery_adv.locks.backends.base import Holder
from django_celery_adv.locks.definitions import REFRESH_SECONDS, policies
from django_celery_adv.models import LockDefinition

pytestmark = pytest.mark.django_db

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


def change_url(definition: LockDefinition) -> str:
    return reverse("admin:django_celery_adv_lockdefinition_change", args=[definition.pk])


def hold(definition: LockDefinition, count: int):
    backend = lock_backends[definition.backend]
    return [backend.acquire(definition.name, definition.capacity, Holder(task_id=f"task-{i}"),
                            60) for i in range(count)]


def test_list_shows_holders_now_and_paused(client, staff):
    busy = LockDefinition.objects.create(name="busy-lock", capacity=3)
    LockDefinition.objects.create(name="paused-lock", capacity=0)
    hold(busy, 2)

    page = client.get(reverse("admin:django_celery_adv_lockdefinition_changelist"))

    assert page.status_code == 200
    html = page.content.decode()
    assert "2 / 3" in html and "0 / 0" in html
    assert 'alt="True"' in html  # the paused lock's icon


def test_detail_lists_every_holder_with_its_token(client, staff):
    definition = LockDefinition.objects.create(name="detail-lock", capacity=2)
    leases = hold(definition, 2)

    html = client.get(change_url(definition)).content.decode()

    for lease in leases:
        assert f"<td>{lease.holder.task_id}</td>" in html
        assert f"<td>{lease.token}</td>" in html


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
        time.sleep(REFRESH_SECONDS + 0.1)  # what a worker process waits at most

        with pytest.raises(LockUnavailable), lock("lowered-lock"):
            pass
        assert all(lease.is_valid() for lease in (first, second, third))
        third_token = third.token
    del third_token
    with lock("lowered-lock") as again:  # all released: below capacity again
        assert again.is_valid()


def test_force_release_needs_its_own_permission_and_is_logged(client, staff):
    definition = LockDefinition.objects.create(name="stuck-lock", capacity=1)
    [stuck] = hold(definition, 1)
    url = reverse("admin:django_celery_adv_lockdefinition_changelist")
    action = {"action": "force_release", "_selected_action": [definition.pk]}

    client.post(url, action)
    assert len(lock_backends["default"].holders("stuck-lock")) == 1  # not allowed yet

    staff.user_permissions.add(Permission.objects.get(codename="force_release_lock"))
    response = client.post(url, action, follow=True)

    assert "Released 1 lease(s)." in response.content.decode()
    assert lock_backends["default"].holders("stuck-lock") == []
    entry = LogEntry.objects.get(object_id=str(definition.pk))
    assert str(stuck.token) in entry.change_message


def test_anonymous_users_are_sent_to_login(client):
    response = client.get(reverse("admin:django_celery_adv_lockdefinition_changelist"))

    assert response.status_code == 302 and "/login/" in response["Location"]
