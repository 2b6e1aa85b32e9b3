#!/usr/bin/env bash
# Packaging smoke test: what a user gets from `pip install django-celery-adv` works.
#
#  1. sdist and wheel built by `python -m build` (the wheel from the sdist, so the
#     sdist is proven complete), then `twine check --strict`;
#  2. the WHEEL (not an editable install) installed into a clean venv;
#  3. from a temporary directory outside the source tree, the tiny project of
#     tests/wheel_smoke/: `check`, `migrate`, the admin pages render with a
#     superuser (our templates, admin static files found), the Russian catalogue
#     found and used (the compiled .mo is in the wheel), and `celery_status`
#     against an app on the embedded filesystem broker with no worker: exit 1 and
#     a readable message, no traceback.
#
# Needs python3 with venv and network access to PyPI (or the configured index).
# Everything goes under build/wheel-smoke/ (made afresh each run), the tools' venv
# under build/wheel-smoke-tools/ (kept: build and twine are not under test) and one
# mktemp directory (removed).
# Last line on success: "wheel smoke test: ok".
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/apt.sh
ROOT=$PWD
OUT=$ROOT/build/wheel-smoke
START=$SECONDS

step() { printf '[wheel-smoke %3ss] %s\n' "$((SECONDS - START))" "$*"; }
die() { echo "wheel smoke test: FAILED: $*" >&2; exit 1; }

if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  step "installing python3-venv (Debian, needs root)"
  apt_install python3-venv
fi

TOOLS=$ROOT/build/wheel-smoke-tools
rm -rf "$OUT"
mkdir -p "$OUT"
# One venv for the tools; the smoke venv is made without pip and filled by the
# tools' pip (`pip --python`), which saves a second ensurepip.
if [ ! -x "$TOOLS/bin/twine" ] || ! "$TOOLS/bin/python" -c 'import build' 2>/dev/null; then
  step "tools venv (build, twine) in $TOOLS"
  rm -rf "$TOOLS"
  python3 -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q build twine >"$OUT/tools.log" 2>&1 \
    || { cat "$OUT/tools.log"; die "cannot install build and twine"; }
fi

step "python -m build (sdist, then the wheel from the sdist)"
"$TOOLS/bin/python" -m build --outdir "$OUT/dist" . >"$OUT/build.log" 2>&1 \
  || { tail -30 "$OUT/build.log"; die "python -m build failed (log: $OUT/build.log)"; }
SDIST=$(ls "$OUT"/dist/*.tar.gz)
WHEEL=$(ls "$OUT"/dist/*.whl)
step "built $(basename "$SDIST") and $(basename "$WHEEL")"

step "twine check --strict"
"$TOOLS/bin/twine" check --strict "$SDIST" "$WHEEL"

# What the pages and the broker need must be inside the wheel.
"$TOOLS/bin/python" - "$WHEEL" <<'PY' || die "the wheel lacks files (see above)"
import sys
import zipfile

names = set(zipfile.ZipFile(sys.argv[1]).namelist())
required = [
    "django_celery_adv/py.typed",
    "django_celery_adv/migrations/0001_initial.py",
    "django_celery_adv/transports/filesystem.py",
    "django_celery_adv/templates/admin/django_celery_adv/monitoring/workers.html",
    "django_celery_adv/templates/admin/django_celery_adv/lockdefinition/holders.html",
    "django_celery_adv/management/commands/celery_status.py",
    "django_celery_adv/locale/ru/LC_MESSAGES/django.po",
    "django_celery_adv/locale/ru/LC_MESSAGES/django.mo",
]
missing = [name for name in required if name not in names]
for name in missing:
    print(f"missing from the wheel: {name}")
templates = sum(1 for n in names if n.startswith("django_celery_adv/templates/"))
migrations = sum(1 for n in names if n.startswith("django_celery_adv/migrations/0"))
print(f"wheel holds {len(names)} files: {templates} templates, {migrations} migrations")
sys.exit(1 if missing else 0)
PY

step "clean venv with the wheel installed (no extras)"
python3 -m venv --without-pip "$OUT/venv"
"$TOOLS/bin/python" -m pip --python "$OUT/venv/bin/python" install -q "$WHEEL" \
  >"$OUT/install.log" 2>&1 || { tail -30 "$OUT/install.log"; die "cannot install the wheel"; }
PY="$OUT/venv/bin/python"

WORK=$(mktemp -d /tmp/wheel-smoke.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
cp "$ROOT"/tests/wheel_smoke/*.py "$WORK/"
cd "$WORK"
export SMOKE_VAR_DIR="$WORK/var" PYTHONDONTWRITEBYTECODE=1
unset DJANGO_SETTINGS_MODULE PYTHONPATH

step "manage.py check (in $WORK)"
"$PY" manage.py check
step "manage.py migrate"
"$PY" manage.py migrate -v 0
step "admin pages as a superuser"
"$PY" manage.py shell -c "$(cat pages.py)"

step "Russian catalogue from the installed wheel"
"$PY" manage.py shell -c "
from django.utils import translation
with translation.override('ru'):
    got = str(translation.gettext('Lease and retries'))
    print('  | ru: Lease and retries ->', got)
    assert got == 'Аренда и повторы', got
" || die "the Russian catalogue is not used from the wheel"

step "celery_status with no worker on the filesystem broker (expect exit 1)"
set +e
"$PY" manage.py celery_status --timeout 1 >"$WORK/status.out" 2>&1
code=$?
set -e
sed 's/^/  | /' "$WORK/status.out"
[ "$code" = 1 ] || die "celery_status exited $code, expected 1"
if grep -q "Traceback" "$WORK/status.out"; then die "celery_status printed a traceback"; fi
grep -q "unhealthy: default" "$WORK/status.out" || die "celery_status did not name the app"

step "done in $((SECONDS - START)) s"
echo "wheel smoke test: ok"
