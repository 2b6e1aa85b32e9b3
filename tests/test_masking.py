"""``mask_text`` in linear time, and ``limit=`` never showing a secret the cut falls into.

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

from django_celery_adv.masking import MASK, mask_text

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
