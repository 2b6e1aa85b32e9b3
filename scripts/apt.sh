# Sourced by the scripts that install what is missing from Debian's packages: the one
# way they call apt-get (waits for an apt already running, sudo when not root, and on
# failure the end of apt's output and where the rest is). Run from the repository root.
#   apt_installed PACKAGE              true if dpkg has it installed
#   apt_install [APT-OPTION...] PACKAGE...
#   apt_ensure_packages PACKAGE...     installs those not installed, in one apt run
#   apt_ensure_commands COMMAND:PACKAGE...
#                                      installs the packages whose command is not found
APT_LOG=${APT_LOG:-$PWD/build/apt.log}

apt_installed() { [[ $(dpkg-query -W -f='${Status}' "$1" 2>/dev/null) == *"ok installed"* ]]; }

apt_install() {
  local sudo= lock=(-o DPkg::Lock::Timeout=600)
  [ "$(id -u)" = 0 ] || sudo=sudo
  mkdir -p "$(dirname "$APT_LOG")"
  echo "installing with apt: $*"
  if ! { $sudo apt-get "${lock[@]}" update &&
         $sudo env DEBIAN_FRONTEND=noninteractive apt-get "${lock[@]}" install -y "$@"
       } >"$APT_LOG" 2>&1; then
    tail -n 20 "$APT_LOG" >&2
    echo "apt-get install $* failed (log: $APT_LOG)" >&2
    return 1
  fi
}

apt_ensure_packages() {
  local missing=() package
  for package in "$@"; do apt_installed "$package" || missing+=("$package"); done
  ((${#missing[@]} == 0)) || apt_install "${missing[@]}"
}

apt_ensure_commands() {
  local missing=() pair
  for pair in "$@"; do command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}"); done
  ((${#missing[@]} == 0)) || apt_install "${missing[@]}"
}
