"""Hide secrets before anything is shown: URLs, error texts, task arguments.

Used wherever the library displays data it did not write itself (broker URLs,
error messages of client libraries, the arguments of running or failed tasks).

Guarantees:

* :func:`mask_url` never returns the password of a URL it was given, nor the
  value of a query parameter with a secret-looking name (``?password=...``),
  nor a secret-looking property of a query value made of ``KEY:value`` pairs
  separated by commas (MongoDB's
  ``authMechanismProperties=AWS_SESSION_TOKEN:...``); the rest of the URL
  (scheme, user, host, port, path) stays readable. Several URLs separated by
  ``;`` (kombu's failover syntax) or given as a list are each masked.
  :func:`url_secrets` returns the same secrets, decoded, as literals for
  :func:`mask_text`.
* :func:`mask_text` masks, anywhere inside free text, the password part of
  every ``scheme://user:password@`` URL, the value of every
  ``secret-name = value`` / ``"secret-name": "value"`` pair, and every literal
  string the caller names as a secret. A quoted value ends only at an
  unescaped quote (``"a\\"b"`` is one value) and may carry a string prefix
  (``b'...'``, ``rb"..."``: up to two of b, r, u in any case). After an
  ``auth`` / ``authorization`` key, a scheme word and the credential behind
  it are masked together (``Authorization: Bearer xyz``, also ``Digest``'s
  ``name="value", ...`` parameter list).
* :func:`mask_secrets` returns a masked copy of a nested structure (dicts,
  lists, tuples, sets): values under secret-looking keys become :data:`MASK`
  whatever their type, and every string inside goes through :func:`mask_text`.
  The input is never modified.
* Time linear in the length of the text (the worker masks inside its
  ``task_failure`` handler): no pattern is tried at every character of a run
  or re-split on failure. With ``limit=`` (the caller shows a prefix), the
  cost is bounded by the limit: the text is cut before masking, and a secret
  the cut falls into is masked all the same.

Masking errs on the side of hiding: a key like ``author_token`` is masked too.
Secrets with no recognisable shape (a password passed as a bare positional
argument) cannot be detected; tasks should set Celery's ``argsrepr`` /
``kwargsrepr`` for those, which is what the monitoring pages display.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit

#: What a hidden value is replaced with.
MASK = "****"

# ``auth`` / ``authorization`` only as the whole last word part of a key, so
# ``authSource`` or ``author`` stay visible. Its value may be an HTTP
# "scheme credential" pair, masked whole (see _pair_pattern).
_AUTH_NAME = r"(?:^|[_.-])auth(?:orization)?$"
_AUTH_KEY_RE = re.compile(_AUTH_NAME, re.I)

#: Key names whose values are secrets, searched for anywhere in a key
#: (case-insensitive); ``auth`` / ``authorization`` only as a whole word part.
SECRET_NAME = (
    r"pass(?:word|wd|phrase)|^pass$|pwd|secret|token|api[_-]?key|credential"
    r"|private[_-]?key|access[_-]?key|session[_-]?id|cookie|signature"
    rf"|{_AUTH_NAME}"
)
_SECRET_KEY_RE = re.compile(SECRET_NAME, re.I)

# ://user:password@ (the user part may be empty: redis://:pw@host). Anchored
# at the "://" behind a scheme character, not at the scheme's first letter:
# scanning for a scheme from every letter of a long run ("a.a.a...") is what
# made the pattern quadratic. Starting with the literal lets the regex engine
# jump from one "://" to the next; possessive quantifiers read each run once
# and never re-split it on failure, so the time is linear in the text.
_URL_USERINFO = r"(?P<head>://(?<=[a-z0-9+.-]://)[^\s:/@]*+):(?P<password>[^\s@/]*+)"
_URL_USERINFO_RE = re.compile(_URL_USERINFO + "@", re.I)

# key=value, "key": "value", 'key': 'value', key: value -- for keys that look
# like secrets; is_secret_key has the last word, so both places agree. Only
# such keys are matched (_mask_pairs checks the key before the pattern runs):
# a match consumes its value, which must not swallow a secret pair behind an
# ordinary one (authMechanismProperties=AWS_SESSION_TOKEN:...). A key is a
# whole run of [\w.-] holding a hint word. Trying a pattern at every character
# of a long run and re-splitting the run on failure made the old pattern
# quadratic: now _mask_pairs finds the hint words with str.find and matches
# the pattern once per run holding one, from the run's start. Every repeat is
# possessive, so no run is ever re-split on failure.
_HINT_WORDS = ("pass", "pwd", "secret", "token", "api", "credential", "private", "access",
               "session", "cookie", "signature", "auth")
# The non-ASCII letters re.IGNORECASE equates with an ASCII one (Python's re
# documentation names these four), folded so a lower-cased copy finds them too.
_ASCII_FOLD = str.maketrans({"\u0130": "i", "\u0131": "i", "\u017f": "s", "\u212a": "k"})
_RUN_RE = re.compile(r"[\w.-]*+")
_KEY = r"""(?<![\w.-])(?P<key>[\w.-]++)"""
_SEP = r"""(?P<sep>['"]?\s*+[:=]\s*+)"""
_BARE = r"""[^\s,;&'"()\[\]{}<>]++"""
# b'...', rb"...", U'...': a string prefix stays, the quoted value is masked.
_PREFIX = r"(?P<prefix>[bru]{0,2}+)"
# A credential after an auth scheme may hold ; & = : / (AWS4's
# SignedHeaders=host;x-amz-date) and quoted strings (Digest's response="...").
_CREDENTIAL_CHARS = r"""[^\s,'"()\[\]{}<>]++"""


def _quoted(quote: str, end: str, name: str = "") -> str:
    """A string in ``quote``s, its body in group ``name``; ``end`` may also close it.

    A backslash escapes the next character (``"a\\"b"`` is one string). The
    body is runs of plain characters between escapes, each run possessive:
    read once, never re-split. A backslash may be the last character of a
    cut text, so the escaped character is optional.
    """
    body = rf"[^{quote}\\]*+(?:\\[\s\S]?[^{quote}\\]*+)*+"
    if name:
        body = f"(?P<{name}>{body})"
    return f"{quote}{body}(?:{quote}{end})"


def _pair_pattern(end: str, *, auth: bool) -> re.Pattern[str]:
    """``key sep value`` for secret keys; ``end`` (``|\\Z``) also closes a quote.

    After an auth key a bare value may be "scheme credential": one word,
    blanks, a credential, and ``, name=value`` parameters belonging to it.
    """
    bare = _BARE
    if auth:
        quoted = _quoted('"', end)
        credential = rf"(?:{_CREDENTIAL_CHARS}|{quoted})++"
        bare = (rf"[a-z][\w.+-]*+[ \t]++{credential}"
                rf"(?:,[ \t]*+(?=[\w.-]++=){credential})*+|{bare}")
    return re.compile(rf"""{_KEY}{_SEP}(?:{_PREFIX}(?:{_quoted("'", end, "single")}"""
                      rf"""|{_quoted('"', end, "double")})|(?P<bare>{bare}))""", re.I)


# [ordinary key, auth key] -> pattern. The cut ones, and the URL pattern's, are
# for a text cut short (see mask_text's ``limit``): the end of the text may
# fall inside a password or a quoted value, so the end counts as the closing
# "@" or quote and the piece before it is masked.
_KEY_VALUE_RES = (_pair_pattern("", auth=False), _pair_pattern("", auth=True))
_KEY_VALUE_CUT_RES = (_pair_pattern(r"|\Z", auth=False), _pair_pattern(r"|\Z", auth=True))
_URL_USERINFO_CUT_RE = re.compile(_URL_USERINFO + r"(?:@|\Z)", re.I)

#: What ends a text that ``mask_text(..., limit=...)`` had to cut.
ELLIPSIS = "..."

#: Literal secrets shorter than this are not searched for in text: replacing
#: every "ab" in a message would destroy it without protecting anything.
MIN_LITERAL_SECRET = 3


def is_secret_key(key: object) -> bool:
    """True if a mapping key names a secret (``password``, ``API_KEY`` ...)."""
    return isinstance(key, str) and bool(_SECRET_KEY_RE.search(key))


def _secret_properties(value: str) -> list[str]:
    """The secret values in a ``KEY:value,KEY:value`` query value.

    MongoDB's ``authMechanismProperties`` has this shape (``AWS_SESSION_TOKEN``
    in it); split as pymongo splits it: at commas, then at the first colon.
    """
    found = []
    for item in value.split(","):
        key, colon, prop = item.partition(":")
        if colon and is_secret_key(key):
            found.append(prop)
    return found


def _mask_properties(value: str) -> str:
    masked = []
    for item in value.split(","):
        key, colon, _ = item.partition(":")
        masked.append(f"{quote(key, safe='')}:{MASK}" if colon and is_secret_key(key)
                      else quote(item, safe=":"))
    return ",".join(masked)


def _query_secrets(query: str) -> list[str]:
    """The secret values in a URL's query, decoded: secret keys' and properties'."""
    found = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        found.extend([value] if is_secret_key(key) else _secret_properties(value))
    return found


def _masked_query_value(key: str, value: str) -> str:
    if is_secret_key(key):
        return MASK
    if _secret_properties(value):
        return _mask_properties(value)
    return quote(value, safe="")


def _mask_one_url(url: str) -> str:
    url = url.strip()
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL after all (e.g. an unbalanced "[")
        return mask_text(url)
    netloc = parts.netloc
    query_secrets = _query_secrets(parts.query)
    if "@" not in netloc and not query_secrets:
        return url  # nothing to hide: keep it as written ("filesystem://" stays whole)
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user, has_password, _password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hostinfo}" if has_password else f"{user}@{hostinfo}"
    query = parts.query
    if query_secrets:
        query = "&".join(f"{quote(key, safe='')}={_masked_query_value(key, value)}"
                         for key, value in parse_qsl(query, keep_blank_values=True))
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
    """The secrets inside one or several URLs (to hand to :func:`mask_text`).

    Passwords as written and, when the URL percent-encodes them, as a client
    would print them decoded (``p%40ss`` and ``p@ss``); then the secret query
    values (decoded), in order.
    """
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
            if unquote(parts.password) != parts.password:
                found.append(unquote(parts.password))
        found.extend(_query_secrets(parts.query))
    return found


def _mask_pair(match: re.Match[str]) -> str:
    prefix = match.group("prefix") or ""
    if match.group("single") is not None:
        value = f"{prefix}'{MASK}'"
    elif match.group("double") is not None:
        value = f'{prefix}"{MASK}"'
    else:
        value = MASK
    return f"{match.group('key')}{match.group('sep')}{value}"


def _mask_userinfo(match: re.Match[str]) -> str:
    at = "@" if match.group(0).endswith("@") else ""  # no "@" where a cut text ended
    return f"{match.group('head')}:{MASK}{at}"


def _literals(secrets: Iterable[str | None]) -> list[str]:
    # Longest first: a secret containing another is replaced whole.
    if not secrets:
        return []
    return sorted({s for s in secrets if s and len(s) >= MIN_LITERAL_SECRET},
                  key=len, reverse=True)


def _hint_positions(text: str) -> list[int]:
    """Where a hint word starts in ``text``, ignoring case as ``re.I`` does."""
    folded = text.lower() if text.isascii() else text.translate(_ASCII_FOLD).lower()
    if len(folded) != len(text):  # a letter lower-cased to two: keep one per position
        folded = "".join(char.lower()[:1] for char in text)
    found = set()
    for word in _HINT_WORDS:
        at = folded.find(word)
        while at != -1:
            found.add(at)
            at = folded.find(word, at + 1)
    return sorted(found)


def _mask_pairs(text: str, pair_res: tuple[re.Pattern[str], re.Pattern[str]]) -> str:
    """Every secret-looking ``key=value`` pair in ``text`` masked (``_mask_pair``).

    Left to right as ``re.sub`` goes, but a pattern (``pair_res``: for other
    keys, for auth keys) is matched only at the start of each run of [\\w.-]
    that holds a hint word, found with ``str.find``, and only if the run is a
    secret key; the regex engine is not started at every character.
    """
    reversed_text = ""
    parts: list[str] = []
    done = 0  # text[:done] is in parts
    for hint in _hint_positions(text):
        if hint < done:
            continue  # inside a run already tried or a value already masked
        if not reversed_text:
            reversed_text = text[::-1]  # to find a run's start with one forward match
        back = len(text) - hint
        start = hint - (_RUN_RE.match(reversed_text, back).end() - back)
        end = _RUN_RE.match(text, hint).end()
        key = text[start:end]
        match = (pair_res[bool(_AUTH_KEY_RE.search(key))].match(text, start)
                 if is_secret_key(key) else None)
        if match is None:
            # No secret pair starts at this run; its other hints would try the same
            # start. An ordinary key's value is left to be searched: it may hold one.
            parts.append(text[done:end])
        else:
            end = match.end()
            parts += [text[done:start], _mask_pair(match)]
        done = end
    parts.append(text[done:])
    return "".join(parts)


def _mask(text: str, literals: list[str], *, cut: bool = False) -> str:
    url_re, pair_res = ((_URL_USERINFO_CUT_RE, _KEY_VALUE_CUT_RES) if cut
                        else (_URL_USERINFO_RE, _KEY_VALUE_RES))
    text = url_re.sub(_mask_userinfo, text)
    text = _mask_pairs(text, pair_res)
    for secret in literals:
        text = text.replace(secret, MASK)
    return text


def mask_text(text: str, secrets: Iterable[str | None] = (), *,
              limit: int | None = None) -> str:
    """Free text (an error message, a repr) with every secret in it masked.

    ``secrets`` are literal strings to hide as well, e.g. the broker password
    a client library might print without the URL around it. The time is linear
    in the length of the text.

    ``limit``: the caller shows at most this many characters. The result is
    then at most ``limit`` long and ends in :data:`ELLIPSIS` when shortened.
    A longer text is cut *before* masking, to a window of ``2 * limit`` plus
    the longest literal secret, so the cost is bounded by ``limit`` whatever
    the input. A secret the cut falls into is still masked: the cut end counts
    as the end of a password or quoted value, and the characters where a
    literal secret may have been cut off are dropped. Only a prefix is shown
    this way; a caller showing a suffix masks the whole text (a quoted secret
    may open anywhere before a cut at the front).
    """
    literals = _literals(secrets)
    if limit is None:
        return _mask(text, literals)
    longest = len(literals[0]) if literals else 0
    window = 2 * limit + longest
    cut = len(text) > window
    if cut:
        masked = _mask(text[:window], literals, cut=True)
        masked = masked[:len(masked) - max(longest - 1, 0)]
    else:
        masked = _mask(text, literals)
    if cut or len(masked) > limit:
        masked = (masked[:max(limit - len(ELLIPSIS), 0)] + ELLIPSIS)[:limit]
    return masked


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
