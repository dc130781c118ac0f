#!/usr/bin/env bash
# The agent's tests on the Pythons devices run (Raspberry Pi OS bullseye: 3.9, JetPack 6:
# 3.10, bookworm: 3.11, 3.12), each in a venv with the base install only (paho-mqtt, cbor2,
# numpy): no server extra, so an accidental server import fails here. Uses pyenv's Pythons.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSIONS=${DEVICE_PYTHONS:-"3.9 3.10 3.11 3.12"}
PYENV_ROOT=${PYENV_ROOT:-$HOME/.pyenv}
stamp_key=$(sha256sum pyproject.toml | cut -c1-16)
failed=""
for v in $VERSIONS; do
  py=$(ls -d "$PYENV_ROOT"/versions/"$v".*/bin/python 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -z "$py" ]; then
    echo "device-pythons: no Python $v under $PYENV_ROOT/versions (install it with pyenv)" >&2
    exit 1
  fi
  venv=".venv-device/py$v"
  if [ ! -f "$venv/.stamp-$stamp_key" ]; then
    rm -rf "$venv"
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip
    # the base package exactly as a device installs it, plus the test runner
    "$venv/bin/python" -m pip install -q . pytest pytest-timeout hypothesis
    touch "$venv/.stamp-$stamp_key"
  fi
  echo "== agent tests on $("$venv/bin/python" -V) (base install only)"
  if ! EDGEFL_TEST_BROKERS=mosquitto "$venv/bin/python" -m pytest -q -p no:cacheprovider \
      tests/agent tests/protocol; then
    failed="$failed $v"
  fi
done
if [ -n "$failed" ]; then
  echo "device-pythons: agent tests failed on:$failed" >&2
  exit 1
fi
