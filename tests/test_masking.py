"""``mask_text`` in linear time, and ``limit=`` never showing a secret the cut falls into.

Also the shapes a review found still showing a secret: auth scheme + credential,
escaped quotes, b/r/u string prefixes, ``KEY:value`` properties (MongoDB's
``authMechanismProperties``) in URLs and text.

The large inputs run in a child process with a 10 s timeout: 1 MB of each
input that made one of the old patterns quadratic (hours on that code, well
under a second now). No test asserts a speed; the timeout only stops a
quadratic implementation from hanging the suite, and the child's output is
checked for correct masking.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from django_celery_adv.masking import MASK, mask_text, mask_url, url_secrets

ROOT = Path(__file__).resolve().parent.parent
ELLIPSIS = "..."  # what ends a cut text (masking.ELLIPSIS)
MB = 1_000_000

# name -> (Python expression building about 1 MB of text, the secret it hides or None).
# Each is worst-case input for one pattern: a long run the old key pattern re-split at
# every character, "a.a.a" runs where every letter could start a URL scheme, a URL whose
# scheme is a 1 MB run, open quotes, keys without a separator.
LARGE_INPUTS = {
    "word-characters": ('"a" * N', None),
    "word-characters-then-pair": ('"a" * N + " password=s3cr3t-W0rd"', "s3cr3t-W0rd"),
    "scheme-letters": ('"a." * (N // 2) + "redis://u:s3cr3t-W0rd@h"', "s3cr3t-W0rd"),
    "scheme-run": ('"a" * N + "://u:s3cr3t-W0rd@h"', "s3cr3t-W0rd"),
    "userinfo-without-at": ('"a://b:" * (N // 6) + " x://u:s3cr3t-W0rd@h"', "s3cr3t-W0rd"),
    "one-long-key": ('"password" * (N // 8) + "=s3cr3t-W0rd"', "s3cr3t-W0rd"),
    "keys-without-separator": ('"token " * (N // 6) + "token=s3cr3t-W0rd"', "s3cr3t-W0rd"),
    "separator-spaces": ('("token" + " " * 50) * (N // 55) + "token = s3cr3t-W0rd"',
                         "s3cr3t-W0rd"),
    "unclosed-quote": ("\"token='\" + \"x \" * (N // 2) + ' api_key=\"s3cr3t-W0rd\"'",
                       "s3cr3t-W0rd"),
    "many-open-quotes": ("'token=\"' * (N // 7) + \" secret='s3cr3t-W0rd'\"", "s3cr3t-W0rd"),
    "many-pairs": ('"token=abc " * (N // 10) + "token=s3cr3t-W0rd"', "s3cr3t-W0rd"),
    # Shapes of the review findings: escaped quotes, string prefixes, auth schemes with
    # parameter lists, KEY:value properties behind an ordinary key.
    "escaped-quotes": ("'token=\"' + '\\\\\\\"' * (N // 2) + ' s3cr3t-W0rd\"'", "s3cr3t-W0rd"),
    "unclosed-escaped-quote": ("'token=\"' + 'x\\\\\" ' * (N // 4) + ' secret=s3cr3t-W0rd'",
                               "s3cr3t-W0rd"),
    "many-escaped-quotes": ("'token=\"\\\\\"' * (N // 9) + ' api_key=s3cr3t-W0rd'",
                            "s3cr3t-W0rd"),
    "string-prefixes": ('"token=rb" * (N // 8) + " token=b\'s3cr3t-W0rd\'"', "s3cr3t-W0rd"),
    "auth-schemes": ('"Authorization: Bearer abc " * (N // 26) + "auth: Basic s3cr3t-W0rd"',
                     "s3cr3t-W0rd"),
    "auth-scheme-without-credential": ('"auth: Bearer ( " * (N // 16) + "auth: Bearer s3cr3t-W0rd"',
                                       "s3cr3t-W0rd"),
    "auth-parameter-list": ("'Authorization: Digest ' + 'a=\"x\", ' * (N // 7)"
                            " + 'response=\"s3cr3t-W0rd\"'", "s3cr3t-W0rd"),
    "auth-comma-runs": ('"auth: a b, " + ("x" * 5000 + "_auth: a b, ") * (N // 5011)'
                        ' + "auth: Bearer s3cr3t-W0rd"', "s3cr3t-W0rd"),
    "properties-behind-ordinary-key": ('"authMechanismProperties=" + "SERVICE_NAME:x," * (N // 15)'
                                       ' + "AWS_SESSION_TOKEN:s3cr3t-W0rd"', "s3cr3t-W0rd"),
    "ordinary-keys-chained": ('"access=" * (N // 7) + "password=s3cr3t-W0rd"', "s3cr3t-W0rd"),
}

CHILD = """
import json, sys
from django_celery_adv.masking import mask_text
N = {size}
text = {expression}
masked = mask_text(text)
print(json.dumps({{"length": len(text), "masked_length": len(masked),
                   "head": masked[:40], "tail": masked[-40:],
                   "leaked": {secret!r} is not None and {secret!r} in masked,
                   "unchanged": masked == text}}))
"""


def mask_in_child(expression: str, secret: str | None, size: int = MB) -> dict:
    code = CHILD.format(size=size, expression=expression, secret=secret)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=10, check=True)
    return json.loads(done.stdout)


@pytest.mark.parametrize("name", sorted(LARGE_INPUTS))
def test_one_megabyte_of_pathological_input_is_masked_within_the_timeout(name):
    expression, secret = LARGE_INPUTS[name]
    result = mask_in_child(expression, secret)
    assert result["length"] >= 0.9 * MB
    if secret is None:
        assert result["unchanged"]
    else:
        assert not result["leaked"]
        assert MASK in result["tail"]


def test_200_kb_of_word_characters_around_secrets_in_process():
    text = "w" * 200_000 + " redis://user:pw-in-url@host token=abc123 " + "x" * 200_000
    masked = mask_text(text, ["x" * 5 + "not-there"])
    assert masked == ("w" * 200_000 + f" redis://user:{MASK}@host token={MASK} "
                      + "x" * 200_000)


@pytest.mark.parametrize(("text", "expected"), [
    ("redis://u:pw@h/0", f"redis://u:{MASK}@h/0"),
    ("sqla+postgresql://u:pw@h/db", f"sqla+postgresql://u:{MASK}@h/db"),
    ("redis://:pw@h", f"redis://:{MASK}@h"),
    ("see _redis://u:pw@h", f"see _redis://u:{MASK}@h"),  # the old pattern missed this one
    ("redis://h:6379/0 is down", "redis://h:6379/0 is down"),
    ("PaSsWoRd=x1 Api-Key: 'x2' \"token\": \"x3\"",
     f"PaSsWoRd={MASK} Api-Key: '{MASK}' \"token\": \"{MASK}\""),
    ("pa\u017f\u017fword=x1", f"pa\u017f\u017fword={MASK}"),  # re.I: long s is an s
    ("authSource=admin author=me x_auth=x1", f"authSource=admin author=me x_auth={MASK}"),
    ("a=1, password=x1; b=2", f"a=1, password={MASK}; b=2"),
    ("\u0130 password=x1", f"\u0130 password={MASK}"),  # lower-cases to two characters
])
def test_shapes_are_masked_as_before(text, expected):
    assert mask_text(text) == expected


# -- limit= : cut before masking, never showing a secret the cut falls into -----------

LIMIT = 4000


def test_short_text_with_limit_is_masked_whole():
    assert mask_text("token=abc x", limit=LIMIT) == f"token={MASK} x"


def test_limit_bounds_the_result_and_marks_the_cut():
    masked = mask_text("y" * 50_000, limit=LIMIT)
    assert len(masked) == LIMIT
    assert masked == "y" * (LIMIT - len(ELLIPSIS)) + ELLIPSIS


@pytest.mark.parametrize("tail", [
    pytest.param(" password=" + "S" * 20_000, id="bare-value-past-the-window"),
    pytest.param(" token='" + "S S " * 5_000 + "'", id="single-quoted-past-the-window"),
    pytest.param(' "secret": "' + "S S " * 5_000 + '"', id="double-quoted-past-the-window"),
    pytest.param(" redis://u:" + "S" * 20_000 + "@h", id="url-password-past-the-window"),
    pytest.param(" pwd='" + "\\'S " * 5_000 + "'", id="escaped-quotes-past-the-window"),
    pytest.param(" auth: Bearer " + "S" * 20_000, id="auth-credential-past-the-window"),
    pytest.param(' auth: Digest a="1", response="' + "S S " * 5_000 + '"',
                 id="auth-parameter-past-the-window"),
])
def test_secret_running_past_the_cut_is_not_shown(tail):
    text = "x" * (LIMIT - 20) + tail + " more" * 1000
    masked = mask_text(text, limit=LIMIT)
    assert len(masked) <= LIMIT
    assert "S" not in masked
    assert MASK in masked


def test_literal_secret_cut_at_the_window_end_is_not_shown():
    # The quoted value shrinks to MASK, so the window's end (2 * limit + 6) comes into
    # view: four of the literal's six characters are in the window.
    limit = 24
    text = "password='" + "p" * 38 + "' " + "QQQQQQ and more text after it"
    masked = mask_text(text, ["QQQQQQ"], limit=limit)
    assert "Q" not in masked
    assert masked.startswith(f"password='{MASK}'")
    assert len(masked) <= limit


def test_literal_secret_inside_the_shown_prefix_is_masked():
    text = "connect failed for hunter22 " + "z" * 50_000
    masked = mask_text(text, ["hunter22"], limit=100)
    assert masked.startswith(f"connect failed for {MASK} zzz")
    assert len(masked) == 100


# -- review findings: shapes that still showed a secret ---------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("Authorization: Bearer TOKEN", f"Authorization: {MASK}"),
    ("authorization=Basic dXNlcjpwYXNz rejected", f"authorization={MASK} rejected"),
    ("x_auth: Token abc123\nnext line", f"x_auth: {MASK}\nnext line"),
    ('Proxy-Authorization: Digest username="u", realm="r", nonce="n", response="6629fae4"',
     f"Proxy-Authorization: {MASK}"),
    ("(Authorization: AWS4-HMAC-SHA256 Credential=AKIA/20130524/s3/aws4_request, "
     "SignedHeaders=host;x-amz-date, Signature=fe5f80f7)", f"(Authorization: {MASK})"),
    ("Authorization: Bearer, retry", f"Authorization: {MASK}, retry"),
    ("{'Authorization': 'Bearer TOKEN'}", f"{{'Authorization': '{MASK}'}}"),
])
def test_authorization_scheme_and_credential_are_masked(text, expected):
    assert mask_text(text) == expected


# Quoted values: backslash escapes honoured, and a b/r/u string prefix (up to two, any case).
@pytest.mark.parametrize(("text", "expected"), [
    ('"password": "ab\\"cdSECRET"', f'"password": "{MASK}"'),
    ("'password': 'ab\\'cdSECRET', 'user': 'bob'", f"'password': '{MASK}', 'user': 'bob'"),
    ('"token": "ab\\\\", "user": "bob"', f'"token": "{MASK}", "user": "bob"'),
    ('"secret": "a\\\nb\\"c"', f'"secret": "{MASK}"'),
    ("{'password': b'SECRET'}", f"{{'password': b'{MASK}'}}"),
    ("password=rb'SE CRET' x", f"password=rb'{MASK}' x"),
    ('token: U"SE CRET"', f'token: U"{MASK}"'),
    ("api_key=Br'SE\\'CRET'", f"api_key=Br'{MASK}'"),
    ("password=bob", f"password={MASK}"),
])
def test_quoted_value_honours_escapes_and_string_prefixes(text, expected):
    assert mask_text(text) == expected


def test_escaped_quote_at_the_cut_end_is_not_shown():
    # The window (2 * limit) ends right after a backslash inside the quoted value.
    limit = 20
    text = 'password="' + "S" * 29 + "\\" + '"' + "S" * 100 + '" and more'
    assert text[2 * limit - 1] == "\\"
    masked = mask_text(text, limit=limit)
    assert "S" not in masked
    assert masked.startswith(f'password="{MASK}')


@pytest.mark.parametrize(("url", "expected", "secrets"), [
    ("mongodb://h/db?authMechanismProperties=AWS_SESSION_TOKEN:SECRET",
     f"mongodb://h/db?authMechanismProperties=AWS_SESSION_TOKEN:{MASK}", ["SECRET"]),
    ("mongodb://u:pw@h/db?authMechanism=MONGODB-AWS"
     "&authMechanismProperties=SERVICE_NAME:mongo,AWS_SESSION_TOKEN:SECRET",
     f"mongodb://u:{MASK}@h/db?authMechanism=MONGODB-AWS"
     f"&authMechanismProperties=SERVICE_NAME:mongo,AWS_SESSION_TOKEN:{MASK}", ["pw", "SECRET"]),
    ("mongodb://h/db?authmechanismproperties=AWS_SESSION_TOKEN%3ASE%2FCRET",
     f"mongodb://h/db?authmechanismproperties=AWS_SESSION_TOKEN:{MASK}", ["SE/CRET"]),
    ("mongodb://h/db?authMechanismProperties=SERVICE_NAME:mongo",
     "mongodb://h/db?authMechanismProperties=SERVICE_NAME:mongo", []),
])
def test_secret_auth_mechanism_properties_are_masked(url, expected, secrets):
    assert mask_url(url) == expected
    assert url_secrets(url) == secrets
    if "%" not in url:  # free text shows the URL as written: the pairs in it are masked
        assert mask_text(f"cannot connect to {url} (timeout)") == (
            f"cannot connect to {expected} (timeout)")


@pytest.mark.parametrize(("text", "expected"), [
    ("authMechanismProperties=AWS_SESSION_TOKEN:x1",
     f"authMechanismProperties=AWS_SESSION_TOKEN:{MASK}"),
    ("author=password=x1", f"author=password={MASK}"),
])
def test_secret_pair_inside_an_ordinary_keys_value(text, expected):
    assert mask_text(text) == expected


def test_a_percent_encoded_password_is_masked_as_written_and_decoded():
    """A client error may print the password decoded ("p@ss" for "p%40ss")."""
    url = "amqp://user:p%40ss%2Fw0rd@broker.example:5672//"
    secrets = url_secrets(url)
    assert "p%40ss%2Fw0rd" in secrets and "p@ss/w0rd" in secrets
    text = "auth failed for user:p@ss/w0rd at broker.example (url " + url + ")"
    masked = mask_text(text, secrets)
    assert "p@ss" not in masked and "p%40ss" not in masked
