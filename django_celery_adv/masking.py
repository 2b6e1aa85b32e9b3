"""Hide secrets before anything is shown: URLs, error texts, task arguments.

Used wherever the library displays data it did not write itself (broker URLs,
error messages of client libraries, the arguments of running or failed tasks).

Guarantees:

* :func:`mask_url` never returns the password of a URL it was given, nor the
  value of a query parameter with a secret-looking name (``?password=...``);
  the rest of the URL (scheme, user, host, port, path) stays readable. Several
  URLs separated by ``;`` (kombu's failover syntax) or given as a list are each
  masked.
* :func:`mask_text` masks, anywhere inside free text, the password part of
  every ``scheme://user:password@`` URL, the value of every
  ``secret-name = value`` / ``"secret-name": "value"`` pair, and every literal
  string the caller names as a secret.
* :func:`mask_secrets` returns a masked copy of a nested structure (dicts,
  lists, tuples, sets): values under secret-looking keys become :data:`MASK`
  whatever their type, and every string inside goes through :func:`mask_text`.
  The input is never modified.

Masking errs on the side of hiding: a key like ``author_token`` is masked too.
Secrets with no recognisable shape (a password passed as a bare positional
argument) cannot be detected; tasks should set Celery's ``argsrepr`` /
``kwargsrepr`` for those, which is what the monitoring pages display.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

#: What a hidden value is replaced with.
MASK = "****"

#: Key names whose values are secrets, searched for anywhere in a key
#: (case-insensitive); ``auth`` / ``authorization`` only as a whole word
#: part, so ``authSource`` or ``author`` stay visible.
SECRET_NAME = (
    r"pass(?:word|wd|phrase)|^pass$|pwd|secret|token|api[_-]?key|credential"
    r"|private[_-]?key|access[_-]?key|session[_-]?id|cookie|signature"
    r"|(?:^|[_.-])auth(?:orization)?$"
)
_SECRET_KEY_RE = re.compile(SECRET_NAME, re.I)

# scheme://user:password@  (the user part may be empty: redis://:pw@host)
_URL_USERINFO_RE = re.compile(
    r"(?P<head>\b[a-z][a-z0-9+.-]*://[^\s:/@]*):(?P<password>[^\s@/]*)@", re.I)

# key=value, "key": "value", 'key': 'value', key: value -- for keys that look
# like secrets; is_secret_key has the last word, so both places agree. Only
# such keys are matched: a match consumes its value, which must not swallow a
# secret pair behind an ordinary one.
_KEY_HINT = (r"pass|pwd|secret|token|api[_-]?key|credential|private[_-]?key"
             r"|access[_-]?key|session[_-]?id|cookie|signature|auth")
_KEY_VALUE_RE = re.compile(
    rf"""(?P<key>[\w.-]*(?:{_KEY_HINT})[\w.-]*)(?P<sep>['"]?\s*[:=]\s*)"""
    r"""(?:'(?P<single>[^']*)'|"(?P<double>[^"]*)"|(?P<bare>[^\s,;&'"()\[\]{}<>]+))""",
    re.I)

#: Literal secrets shorter than this are not searched for in text: replacing
#: every "ab" in a message would destroy it without protecting anything.
MIN_LITERAL_SECRET = 3


def is_secret_key(key: object) -> bool:
    """True if a mapping key names a secret (``password``, ``API_KEY`` ...)."""
    return isinstance(key, str) and bool(_SECRET_KEY_RE.search(key))


def _mask_one_url(url: str) -> str:
    url = url.strip()
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL after all (e.g. an unbalanced "[")
        return mask_text(url)
    netloc = parts.netloc
    if "@" not in netloc and not any(
            is_secret_key(key) for key, _ in parse_qsl(parts.query, keep_blank_values=True)):
        return url  # nothing to hide: keep it as written ("filesystem://" stays whole)
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user, has_password, _password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hostinfo}" if has_password else f"{user}@{hostinfo}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(is_secret_key(key) for key, _ in pairs):
            query = "&".join(
                f"{quote(key, safe='')}={MASK if is_secret_key(key) else quote(value, safe='')}"
                for key, value in pairs)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def mask_url(url: str | Iterable[str] | None) -> str:
    """The URL (or URLs) with passwords and secret query values replaced by ``****``.

    ``None`` gives ``""``; a list, or a string of ``;``-separated URLs (kombu
    failover), gives the masked URLs joined with ``;``.
    """
    if url is None:
        return ""
    urls = url.split(";") if isinstance(url, str) else [str(item) for item in url]
    return ";".join(_mask_one_url(item) for item in urls if item.strip())


def url_secrets(url: str | Iterable[str] | None) -> list[str]:
    """The passwords inside one or several URLs (to hand to :func:`mask_text`)."""
    if url is None:
        return []
    urls = url.split(";") if isinstance(url, str) else [str(item) for item in url]
    found = []
    for item in urls:
        try:
            parts = urlsplit(item.strip())
        except ValueError:
            continue
        if parts.password:
            found.append(parts.password)
        found.extend(value for key, value in parse_qsl(parts.query) if is_secret_key(key))
    return found


def _mask_pair(match: re.Match[str]) -> str:
    if not is_secret_key(match.group("key")):
        return match.group(0)
    if match.group("single") is not None:
        value = f"'{MASK}'"
    elif match.group("double") is not None:
        value = f'"{MASK}"'
    else:
        value = MASK
    return f"{match.group('key')}{match.group('sep')}{value}"


def mask_text(text: str, secrets: Iterable[str | None] = ()) -> str:
    """Free text (an error message, a repr) with every secret in it masked.

    ``secrets`` are literal strings to hide as well, e.g. the broker password
    a client library might print without the URL around it.
    """
    text = _URL_USERINFO_RE.sub(lambda m: f"{m.group('head')}:{MASK}@", text)
    text = _KEY_VALUE_RE.sub(_mask_pair, text)
    for secret in sorted({s for s in secrets if s and len(s) >= MIN_LITERAL_SECRET},
                         key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


def mask_secrets(obj: Any, secrets: Iterable[str | None] = (), *, _depth: int = 0) -> Any:
    """A copy of ``obj`` with secret-keyed values and secrets inside strings masked.

    Dicts, lists, tuples and sets are copied recursively (nesting deeper than
    32 levels is replaced by ``MASK`` rather than followed); strings go
    through :func:`mask_text`; other values are returned as they are.
    """
    secrets = tuple(secrets)
    if _depth > 32:
        return MASK
    if isinstance(obj, str):
        return mask_text(obj, secrets)
    if isinstance(obj, Mapping):
        return {key: MASK if is_secret_key(key) else
                mask_secrets(value, secrets, _depth=_depth + 1)
                for key, value in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = [mask_secrets(item, secrets, _depth=_depth + 1) for item in obj]
        if isinstance(obj, list):
            return items
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a namedtuple
            return type(obj)(*items)
        try:
            return type(obj)(items)
        except TypeError:  # a subclass with its own constructor
            return items
    return obj
