# Sourced by scripts/demo and scripts/test: makes .venv with pinned versions, from nothing.
# Usage: source scripts/bootstrap.sh EXTRAS   (EXTRAS: "devset", "test", ...)
# Works on a fresh Debian 12 as root (installs python3-venv and the few Debian tools it needs).

set -euo pipefail
VPMON_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$VPMON_ROOT/.venv"
extras="${1:-devset}"

log() { printf '\033[1m[vpmon]\033[0m %s\n' "$*" >&2; }

apt_install() {  # apt_install PACKAGE... : install Debian packages that are missing
  local missing=()
  for package in "$@"; do dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    log "please install: ${missing[*]} (needs root and apt-get)"; return 1
  fi
  log "installing Debian packages: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

python_ok() { "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; }

PYTHON="${VPMON_PYTHON:-python3}"
if ! command -v "$PYTHON" >/dev/null || ! python_ok "$PYTHON"; then
  apt_install python3 python3-venv python3-dev ca-certificates
  PYTHON=python3
fi
python_ok "$PYTHON" || { log "vpmon needs Python >= 3.11 with venv; found $("$PYTHON" --version 2>&1)"; exit 1; }

# Reinstall only when the pins, the project metadata or the extras change.
stamp="$VENV/.vpmon-installed"
want="$(cat "$VPMON_ROOT/constraints.txt" "$VPMON_ROOT/pyproject.toml" | sha256sum | cut -c1-16) $extras"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "creating $VENV (extras: $extras)"
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -c "$VPMON_ROOT/constraints.txt" -e "$VPMON_ROOT[$extras]"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
