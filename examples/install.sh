#!/usr/bin/env bash
# Installs what the example business services need (nats-py, pinned) into the repo's venv
# (.tools/venv, created by scripts/install-tools.sh). Idempotent: does nothing when
# `import nats.aio.client` already works in that venv.
set -euo pipefail

cd "$(dirname "$0")/.."
NATS_PY_VERSION=2.16.0
PY=.tools/venv/bin/python

if [ ! -x "$PY" ]; then
  echo "examples: $PY missing; run scripts/install-tools.sh first" >&2
  exit 1
fi

if "$PY" -I -c 'import nats.aio.client' >/dev/null 2>&1; then
  exit 0
fi

echo "examples: installing nats-py $NATS_PY_VERSION into .tools/venv"
"$PY" -m pip install --quiet --disable-pip-version-check "nats-py==$NATS_PY_VERSION"
"$PY" -I -c 'import nats.aio.client'
