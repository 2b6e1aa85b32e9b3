#!/usr/bin/env bash
# The Django 6.0 leg: pytest on Django 6.0 with the newest Python >= 3.12 found
# (Django 6.0 needs 3.12+; the main leg is Django 5.2 LTS on the system Python 3.11).
#
# Looks for the interpreter in pyenv's versions ($PYENV_ROOT, default ~/.pyenv),
# then python3.N on PATH; makes (or reuses) .venv-django6 with the project
# installed (-e ".[all,test]") and Django>=6.0,<6.1, and runs `pytest "$@"` there
# on SQLite. The servers must be up (scripts/test.sh or scripts/services.sh start).
# Reinstalls only when pyproject.toml or the interpreter changed (a stamp file,
# as scripts/venv.sh does). Example: bash scripts/django6.sh -m "not workers"
set -euo pipefail
cd "$(dirname "$0")/.."

MIN_MINOR=12  # Django 6.0 supports Python 3.12 and later
VENV=.venv-django6
DJANGO_SPEC="Django>=6.0,<6.1"

# Every candidate interpreter, then the newest one that really runs.
candidates=()
for dir in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.*; do
  [ -x "$dir/bin/python3" ] && candidates+=("$dir/bin/python3")
done
for minor in $(seq 30 -1 "$MIN_MINOR"); do
  found=$(command -v "python3.$minor" 2>/dev/null) && candidates+=("$found")
done
python="" best=-1
for candidate in "${candidates[@]}"; do
  # major.minor as one sortable number; a free-threaded or broken build is skipped.
  version=$("$candidate" -c 'import sys, sysconfig
ok = sys.version_info[0] == 3 and not sysconfig.get_config_var("Py_GIL_DISABLED")
print(sys.version_info[1] if ok else -1)' 2>/dev/null) || continue
  if [ "$version" -ge "$MIN_MINOR" ] && [ "$version" -gt "$best" ]; then
    python=$candidate best=$version
  fi
done
if [ -z "$python" ]; then
  cat >&2 <<EOF
django6.sh: FAILED: no Python >= 3.$MIN_MINOR found (Django 6.0 needs one).
Looked in ${PYENV_ROOT:-$HOME/.pyenv}/versions/ and for python3.$MIN_MINOR+ on PATH.
Install one and re-run: with pyenv, \`pyenv install 3.13\` (Debian 12's own python3 is 3.11),
or put a python3.12 or newer (with its venv module) on PATH.
EOF
  exit 2
fi

stamp="$VENV/.installed-$({ cat pyproject.toml; echo "$python $DJANGO_SPEC"; "$python" -V; } \
  | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  echo "django6.sh: making $VENV with $python ($("$python" --version 2>&1)) ..."
  rm -rf "$VENV"
  "$python" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
  "$VENV/bin/python" -m pip install -q -e ".[all,test]" "$DJANGO_SPEC"
  touch "$stamp"
fi
echo "django6.sh: $("$VENV/bin/python" --version), Django $("$VENV/bin/python" -c \
  'import django; print(django.get_version())'), SQLite"

: "${TEST_BUILD_DIR:=$PWD/build/tests-django6}"
export TEST_BUILD_DIR
mkdir -p "$TEST_BUILD_DIR"
TEST_DB=sqlite exec "$VENV/bin/python" -m pytest -p no:cacheprovider "$@"
