# Sourced by test.sh, demo.sh, bench.sh and screenshots.sh: make sure .venv exists with
# the project installed (and, through scripts/apt.sh, offer apt_install & co).
# Usage: ensure_venv EXTRAS   (e.g. "all,test")
source scripts/apt.sh
ensure_venv() {
  local extras=$1 stamp
  if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    apt_install python3-venv python3-pip
  fi
  [ -x .venv/bin/python ] || python3 -m venv .venv
  # Reinstall only when pyproject.toml or the extras changed.
  stamp=".venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)-${extras//,/-}"
  if [ ! -f "$stamp" ]; then
    echo "installing django-celery-adv[$extras] into .venv ..."
    .venv/bin/python -m pip install -q --upgrade pip >/dev/null
    .venv/bin/python -m pip install -q -e ".[$extras]"
    touch "$stamp"
  fi
}
