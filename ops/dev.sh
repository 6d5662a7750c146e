#!/usr/bin/env bash
# One entry point for a fresh clone: sets up .venv (Python + pip only needed) and then
#   ops/dev.sh up     -> starts the local stack (NATS, Redis, services, emulated workers, the gateway) with the demo
#   ops/dev.sh test   -> runs the whole test suite (lint, types, import layers, unit, integration)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV=".venv"
stamp="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$stamp" ]; then
  echo "installing Gantry and its dependencies into $VENV (the first time takes a few minutes) ..." >&2
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  # not quiet: pip names each package as it downloads and installs it (minutes of silence looked like a hang)
  "$VENV/bin/python" -m pip install --progress-bar on -e ".[dev]"
  rm -f "$VENV"/.installed-* && touch "$stamp"
fi
export PATH="$PWD/$VENV/bin:$PATH"
cmd="${1:-up}"; shift || true
case "$cmd" in
  up)
    exec gantry up --demo --workers 4 "$@" ;;
  test)
    # The web view's browser test drives Debian's Chromium. Install it where we can (root with apt, as CI
    # runs); elsewhere that one test skips and says how to install it.
    if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "installing Chromium for the web view's browser test (apt-get, once) ..." >&2
      { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
        || echo "could not install Chromium: the browser test will be skipped" >&2
    fi
    ruff check .
    mypy
    lint-imports  # the layer contracts in pyproject.toml
    set +e
    python -m pytest -q "$@"
    rc=$?
    set -e
    # pytest exits 5 when it collected nothing: that must never count as a pass.
    if [ "$rc" -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi
    exit "$rc" ;;
  *)
    exec gantry "$cmd" "$@" ;;
esac
