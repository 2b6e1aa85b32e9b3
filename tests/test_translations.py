"""The Russian catalogue: complete, compiled, in step with the code, and used by the admin.

Python only, no GNU gettext binaries: the ``.po`` is parsed here, the ``.mo`` is
read with the standard library's :mod:`gettext`, the strings the code marks are
found with :mod:`ast` (Python) and Django's own template parser (templates, so
a msgid is exactly what ``{% translate %}``/``{% blocktranslate %}`` look up at
run time). The pages test renders every admin page of ours with Russian active
and looks for any msgid of our catalogue, in English, in the visible text.

When a test here fails after a code change: ``cd django_celery_adv &&
django-admin makemessages -l ru --add-location=file --ignore 'migrations/*'``,
translate the new entries (glossary at the top of the ``.po``), then
``django-admin compilemessages -l ru``.
"""

from __future__ import annotations

import ast
import datetime
import gettext
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from io import StringIO
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.template import engines
from django.templatetags.i18n import BlockTranslateNode, TranslateNode
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone, translation

import django_celery_adv

PACKAGE = Path(django_celery_adv.__file__).resolve().parent
LC_MESSAGES = PACKAGE / "locale" / "ru" / "LC_MESSAGES"
PO_PATH = LC_MESSAGES / "django.po"
MO_PATH = LC_MESSAGES / "django.mo"
#: Django's Russian catalogues use four plural forms (the fourth for fractions).
NPLURALS = 4


# -- the .po file -------------------------------------------------------------------------

@dataclass
class Entry:
    msgid: str = ""
    msgid_plural: str | None = None
    msgctxt: str | None = None
    msgstr: str = ""
    msgstr_plural: dict[int, str] = field(default_factory=dict)
    flags: set[str] = field(default_factory=set)
    locations: list[str] = field(default_factory=list)
    obsolete: bool = False

    @property
    def key(self) -> tuple[str | None, str]:
        return self.msgctxt, self.msgid

    @property
    def translations(self) -> list[str]:
        return list(self.msgstr_plural.values()) if self.msgid_plural is not None \
            else [self.msgstr]


def parse_po(text: str) -> list[Entry]:
    """The entries of a ``.po`` file as makemessages writes it (header included)."""
    entries: list[Entry] = []
    entry, target = Entry(), None

    def flush() -> None:
        nonlocal entry, target
        if target is not None:
            entries.append(entry)
        entry, target = Entry(), None

    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            flush()
        elif line.startswith("#~"):
            entry.obsolete = True
            target = target or "obsolete"
        elif line.startswith("#,"):
            entry.flags.update(flag.strip() for flag in line[2:].split(","))
        elif line.startswith("#:"):
            entry.locations += line[2:].split()
        elif line.startswith("#"):
            continue
        elif line.startswith('"'):
            _append(entry, target, ast.literal_eval(line))
        else:
            keyword, _, value = line.partition(" ")
            target = keyword
            _append(entry, target, ast.literal_eval(value), start=True)
    flush()
    return entries


def _append(entry: Entry, target: str | None, text: str, start: bool = False) -> None:
    match = re.fullmatch(r"msgstr\[(\d+)\]", target or "")
    if match:
        index = int(match[1])
        entry.msgstr_plural[index] = ("" if start else entry.msgstr_plural[index]) + text
    elif target in ("msgid", "msgid_plural", "msgctxt", "msgstr"):
        current = getattr(entry, target)
        setattr(entry, target, text if start or current is None else current + text)
    else:
        raise AssertionError(f"unexpected .po line for {target!r}: {text!r}")


@pytest.fixture(scope="module")
def po_entries() -> list[Entry]:
    return [e for e in parse_po(PO_PATH.read_text(encoding="utf-8")) if not e.obsolete]


@pytest.fixture(scope="module")
def messages(po_entries) -> list[Entry]:
    """The catalogue's messages, without the header entry."""
    return [e for e in po_entries if e.msgid]


def test_header_is_russian_with_four_plural_forms(po_entries):
    header = next(e for e in po_entries if e.msgid == "")
    assert "fuzzy" not in header.flags
    assert "Language: ru\n" in header.msgstr
    assert "Content-Type: text/plain; charset=UTF-8\n" in header.msgstr
    assert f"Plural-Forms: nplurals={NPLURALS};" in header.msgstr


def test_every_message_is_translated_and_not_fuzzy(messages):
    assert len(messages) > 150  # the catalogue is the real one, not a stub
    fuzzy = [e.msgid for e in messages if "fuzzy" in e.flags]
    assert not fuzzy, f"fuzzy entries (check the translation, drop the flag): {fuzzy}"
    for e in messages:
        if e.msgid_plural is not None:
            assert sorted(e.msgstr_plural) == list(range(NPLURALS)), e.msgid
        assert all(text.strip() for text in e.translations), f"untranslated: {e.msgid!r}"


#: Python-format placeholders: %(name)s, %(n).1f, %d ...
PLACEHOLDER = re.compile(r"%(?:\((\w+)\))?[-#0 +]*\d*(?:\.\d+)?[diouxXeEfFgGcrsa%]")


def _placeholders(text: str) -> tuple[set[str], int]:
    found = PLACEHOLDER.findall(text)
    return {name for name in found if name}, sum(1 for m in PLACEHOLDER.finditer(text)
                                                  if not m[1] and m[0] != "%%")


def test_translations_keep_the_placeholders(messages):
    for e in messages:
        names, positional = _placeholders(e.msgid)
        if e.msgid_plural is not None:
            plural_names, _ = _placeholders(e.msgid_plural)
            for index, text in e.msgstr_plural.items():
                got, got_positional = _placeholders(text)
                # A singular form may leave the count out ("одна задача"); no new names.
                assert got <= names | plural_names and got_positional <= positional, \
                    (e.msgid, index, text)
        else:
            assert _placeholders(e.msgstr) == (names, positional), (e.msgid, e.msgstr)


def test_mo_is_compiled_from_this_po(messages):
    """The committed .mo holds exactly the .po's translations (re-run compilemessages)."""
    with MO_PATH.open("rb") as f:
        catalog = gettext.GNUTranslations(f)._catalog
    expected: dict[object, str] = {}
    for e in messages:
        key = e.msgid if e.msgctxt is None else f"{e.msgctxt}\x04{e.msgid}"
        if e.msgid_plural is None:
            expected[key] = e.msgstr
        else:
            expected.update({(key, i): text for i, text in e.msgstr_plural.items()})
    compiled = {k: v for k, v in catalog.items() if k != ""}
    assert compiled == expected


# -- the code's marked strings ------------------------------------------------------------

#: gettext function -> (index of msgctxt or None, index of msgid, index of msgid_plural).
GETTEXT_FUNCTIONS = {
    "_": (None, 0, None), "gettext": (None, 0, None), "gettext_lazy": (None, 0, None),
    "gettext_noop": (None, 0, None), "ngettext": (None, 0, 1), "ngettext_lazy": (None, 0, 1),
    "pgettext": (0, 1, None), "pgettext_lazy": (0, 1, None),
    "npgettext": (0, 1, 2), "npgettext_lazy": (0, 1, 2),
}


def python_msgids() -> dict[tuple[str | None, str], str]:
    """(msgctxt, msgid) -> where, for every gettext call with literal strings in our code.

    Calls through any name bound by ``from django.utils.translation import ...``
    count, also an alias makemessages does not know (``gettext as _n``): such a
    string is missing from the catalogue, and the test below says where.
    """
    found: dict[tuple[str | None, str], str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if "migrations" in path.parts:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names = {name: name for name in GETTEXT_FUNCTIONS if name != "_"}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "django.utils.translation":
                names.update({alias.asname or alias.name: alias.name for alias in node.names
                              if alias.name in GETTEXT_FUNCTIONS})
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name not in names:
                continue
            context, singular, _plural = GETTEXT_FUNCTIONS[names[name]]
            args = node.args
            if len(args) <= singular or not _is_str(args[singular]):
                continue
            msgctxt = args[context].value if context is not None and _is_str(args[context]) \
                else None
            found[(msgctxt, args[singular].value)] = \
                f"{path.relative_to(PACKAGE)}:{node.lineno}"
    return found


def _is_str(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def template_msgids() -> dict[tuple[str | None, str], str]:
    """(msgctxt, msgid) -> template, as {% translate %} and {% blocktranslate %} look them up."""
    engine = engines["django"].engine
    found: dict[tuple[str | None, str], str] = {}
    for path in sorted((PACKAGE / "templates").rglob("*.html")):
        where = str(path.relative_to(PACKAGE))
        nodelist = engine.from_string(path.read_text(encoding="utf-8")).nodelist
        for node in nodelist.get_nodes_by_type(TranslateNode):
            literal = node.filter_expression.var.literal
            if isinstance(literal, str) and not node.noop:
                found[(_context(node), str(literal).replace("%", "%%"))] = where
        for node in nodelist.get_nodes_by_type(BlockTranslateNode):
            singular, _vars = node.render_token_list(node.singular)
            found[(_context(node), singular)] = where
    return found


def _context(node) -> str | None:
    context = node.message_context
    return None if context is None else str(context.var.literal)


def test_catalogue_has_every_string_the_code_marks(messages):
    catalogue = {e.key for e in messages}
    marked = {**python_msgids(), **template_msgids()}
    assert len(marked) > 150  # the scanners work (they found the strings)
    missing = {f"{where}: {msgid!r}" for (ctx, msgid), where in marked.items()
               if (ctx, msgid) not in catalogue}
    assert not missing, ("marked in code but not in the ru catalogue (run makemessages, "
                         "translate, compilemessages):\n" + "\n".join(sorted(missing)))


# -- the admin pages in Russian -------------------------------------------------------------

class VisibleText(HTMLParser):
    """What a reader sees: text nodes and the attributes shown as text, not code or data."""

    SKIPPED = {"script", "style", "code", "pre", "textarea"}
    SHOWN_ATTRIBUTES = {"title", "alt", "aria-label", "placeholder"}

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.chunks: list[str] = []
        self._skipping = 0
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag in self.SKIPPED:
            self._skipping += 1
        self.chunks += [value for name, value in attrs.items()
                        if name in self.SHOWN_ATTRIBUTES and value]
        if tag == "input" and attrs.get("type") in ("submit", "button") and attrs.get("value"):
            self.chunks.append(attrs["value"])

    def handle_endtag(self, tag):
        if tag in self.SKIPPED and self._skipping:
            self._skipping -= 1

    def handle_data(self, data):
        if not self._skipping:
            self.chunks.append(data)

    @property
    def text(self) -> str:
        return " ".join(" ".join(self.chunks).split())


def english_patterns(messages: list[Entry]) -> list[tuple[str, re.Pattern]]:
    """(msgid, pattern) for each English piece of our msgids worth looking for.

    A msgid is cut at its placeholders and HTML tags; a piece is looked for
    case-insensitively as a whole phrase, not inside a word, host name or
    path. Not looked for: pieces with fewer than three letters, pieces the
    translation itself keeps ("Celery", "PID", "TTL"), and single words cut
    out of a longer msgid ("Task" of "Task %(id)s cannot be retried"), which
    would be found in any English text.
    """
    patterns = []
    for e in messages:
        kept = " ".join(e.translations).lower()
        for msgid in filter(None, (e.msgid, e.msgid_plural)):
            pieces = re.split(r"%(?:\(\w+\))?[-#0 +]*\d*(?:\.\d+)?[a-zA-Z]|<[^>]*>", msgid)
            for piece in pieces:
                piece = " ".join(piece.split()).strip(" .,:;()\"'")
                if len(re.findall(r"[A-Za-z]", piece)) < 3 or piece.lower() in kept \
                        or (len(pieces) > 1 and " " not in piece):
                    continue
                patterns.append((msgid, re.compile(
                    r"(?<![\w@./:-])" + re.escape(piece).replace(r"\ ", r"\s+") + r"(?![\w@/-])",
                    re.IGNORECASE)))
    return patterns


def english_of_ours(html: str, patterns) -> list[str]:
    text = VisibleText(html).text
    return sorted({f"{msgid!r} in ...{text[max(m.start() - 40, 0):m.end() + 40]}..."
                   for msgid, pattern in patterns if (m := pattern.search(text))})


@pytest.fixture
def admin_data(db):
    """Rows for every page of ours: locks (one held), a failure with history, beats."""
    from django_celery_adv.locks.backends import lock_backends
    from django_celery_adv.locks.backends.base import Holder
    from django_celery_adv.models import (
        BeatNode,
        LockDefinition,
        TaskFailure,
        TaskFailureDay,
        TaskRecord,
    )

    now = timezone.now()
    held = LockDefinition.objects.create(name="ru-probe-held", capacity=2)
    LockDefinition.objects.create(name="ru-probe-paused", capacity=0)
    lock_backends.reset()
    lease = lock_backends["default"].acquire(held.name, 2, Holder(task_id="t-ru-1"), 60)
    failure = TaskFailure.objects.create(
        fingerprint="f" * 64, task_name="tests.ru_probe", exception_type="builtins.KeyError",
        location="tests/ru_probe.py:run", app_alias="default", count=3, first_seen=now,
        last_seen=now, last_message="KeyError: 'x'", last_traceback="Traceback ...",
        last_task_id="t-ru-2", last_args="[1]", last_kwargs="{}", last_hostname="w1@ru-probe")
    for days_ago, count in ((0, 2), (3, 1)):
        TaskFailureDay.objects.create(failure=failure, count=count,
                                      day=now.date() - datetime.timedelta(days=days_ago))
    common = {"app_alias": "default", "lock_backend": "default", "max_interval": 5,
              "started_at": now, "next_due_name": "ru-probe-entry",
              "next_due_at": now + datetime.timedelta(seconds=30)}
    BeatNode.objects.create(hostname="b1.ru-probe", pid=11, role=BeatNode.Role.LEADER,
                            token=7, leader_since=now, last_tick=now, sent=4, **common)
    BeatNode.objects.create(hostname="b2.ru-probe", pid=12, role=BeatNode.Role.STANDBY,
                            last_tick=now - datetime.timedelta(seconds=1), **common)
    record = TaskRecord.objects.create(
        app_alias="default", task_id="t-ru-3", name="tests.ru_probe",
        state=TaskRecord.State.FAILURE, worker="w1@ru-probe", args="[1]", kwargs="{}",
        retryable=True, exception="KeyError('x')", traceback="Traceback ...",
        received_at=now, started_at=now, failed_at=now, runtime=0.5, queue_wait=0.1,
        updated_at=now)
    TaskRecord.objects.create(app_alias="default", task_id="t-ru-4", name="tests.ru_child",
                              state=TaskRecord.State.SUCCESS, parent_id=record.task_id,
                              root_id=record.task_id, received_at=now, updated_at=now)
    yield {"lock": held, "failure": failure, "record": record}
    lock_backends["default"].release(lease)
    lock_backends.reset()


def admin_pages(data) -> list[str | tuple[str, str]]:
    """Every admin page of ours; (url, module): only that module's strings are ours there."""
    lock, failure, record = data["lock"], data["failure"], data["record"]
    worker = ("default", "w1@ru-probe")
    pages = [
        reverse("admin:index"),
        reverse("admin:app_list", args=["django_celery_adv"]),
        reverse("admin:django_celery_adv_lockdefinition_changelist"),
        reverse("admin:django_celery_adv_lockdefinition_add"),
        reverse("admin:django_celery_adv_lockdefinition_change", args=[lock.pk]),
        reverse("admin:django_celery_adv_taskfailure_changelist"),
        reverse("admin:django_celery_adv_taskfailure_change", args=[failure.pk]),
        reverse("admin:django_celery_adv_beatnode_changelist"),
        # django-celery-beat's page with our "App" field: its own English is not ours.
        (reverse("admin:django_celery_beat_periodictask_add"), "admin/beat.py"),
        reverse("admin:django_celery_adv_monitoring_locks"),
        reverse("admin:django_celery_adv_monitoring_changelist"),
        reverse("admin:django_celery_adv_monitoring_worker", args=worker),
        reverse("admin:django_celery_adv_monitoring_worker_control", args=worker),
        reverse("admin:django_celery_adv_monitoring_worker_action", args=[*worker, "shutdown"]),
        reverse("admin:django_celery_adv_monitoring_queues"),
        # The confirmation, or (no such queue on the broker) the queues page with why not.
        reverse("admin:django_celery_adv_monitoring_purge_queue") + "?app=default&queue=celery",
        reverse("admin:django_celery_adv_taskrecord_changelist"),
        reverse("admin:django_celery_adv_taskrecord_change", args=[record.pk]),
    ]
    return pages


def fake_readings(aliases=None, *args, **kwargs):
    """Every worker state the pages show, without a broker round trip."""
    from django_celery_adv.monitoring import AppStatus, Status, WorkerStatus
    from django_celery_adv.monitoring.readings import ActiveTask

    now = timezone.now()
    active = ActiveTask(id="t-ru-5", name="tests.ru_probe", args="[2]", kwargs="{}",
                        worker_pid=101, started=now, runtime=1.5)
    statuses = {}
    for alias in aliases or ("default",):
        statuses[alias] = AppStatus(alias=alias, broker="redis://127.0.0.1:6379/0",
                                    reachable=True, error=None, duration=0.2, workers=[
            WorkerStatus(name="w1@ru-probe", status=Status.ONLINE, concurrency=2,
                         completed=5, running=1, queues=["celery"], active=[active],
                         pool="prefork", uptime=60.0, prefetch=8, pid=100, last_seen=now),
            WorkerStatus(name="w2@ru-probe", status=Status.NO_REPLY, last_seen=now),
            WorkerStatus(name="w3@ru-probe", status=Status.OFFLINE, last_seen=now),
        ])
    return statuses


@pytest.fixture(autouse=True)
def no_broadcasts(monkeypatch):
    """The monitoring pages read ``fake_readings``: their words are the point, not a fleet."""
    from django_celery_adv.admin import monitoring, queues

    monkeypatch.setattr(monitoring, "inspect_all", fake_readings)
    monkeypatch.setattr(queues, "inspect_all", fake_readings)


@pytest.fixture
def superuser_client(client, db):
    client.force_login(User.objects.create_superuser("ru-root", password="pw"))
    return client


@override_settings(LANGUAGE_CODE="ru")
def test_admin_pages_in_russian_show_no_english_of_ours(superuser_client, admin_data,
                                                         messages):
    patterns = english_patterns(messages)
    found: dict[str, list[str]] = {}
    with translation.override("ru"):
        for page in admin_pages(admin_data):
            url, only = page if isinstance(page, tuple) else (page, None)
            ours = patterns if only is None else english_patterns(
                [e for e in messages if only in e.locations])
            response = superuser_client.get(url, follow=True)
            assert response.status_code == 200, url
            html = response.content.decode()
            assert 'lang="ru"' in html, url
            if offenders := english_of_ours(html, ours):
                found[url] = offenders
    assert not found, "English strings of ours on Russian pages:\n" + "\n".join(
        f"{url}: {offender}" for url, offenders in found.items() for offender in offenders)


def test_the_english_detector_finds_english(superuser_client, admin_data, messages):
    """The check above can fail: in English the same pages show msgids of ours."""
    patterns = english_patterns(messages)
    with translation.override("en"):
        html = superuser_client.get(
            reverse("admin:django_celery_adv_lockdefinition_change",
                    args=[admin_data["lock"].pk])).content.decode()
    offenders = " ".join(english_of_ours(html, patterns))
    for msgid in ("Lease and retries", "current holders", "Task id", "lease TTL (s)"):
        assert repr(msgid) in offenders


# -- checks and commands speak Russian too ---------------------------------------------------

def test_check_messages_and_command_output_in_russian(db):
    from django.core.management import call_command

    from django_celery_adv import conf
    from django_celery_adv.checks import check_scalars

    config = {**conf.DEFAULTS, "INSPECT_TIMEOUT": 0}
    with translation.override("ru"):
        [message] = check_scalars(config)
        assert message.msg == ("CELERY_ADV['INSPECT_TIMEOUT'] равно 0; ожидается число "
                               "секунд > 0.")
        out = StringIO()
        call_command("prune_task_failures", "--dry-run", "--days", "3", stdout=out)
    assert "Было бы удалено (старше 3 дн.)" in out.getvalue()
