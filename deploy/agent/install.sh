#!/usr/bin/env bash
# Install the edgefl device agent as a systemd service on Raspberry Pi OS or JetPack (any
# Debian-based system with Python 3.9+ and its venv module: apt-get install python3-venv).
#
#   sudo ./install.sh --bundle fleet/devices/pi-17 [--wheel edgefl-0.1.0-py3-none-any.whl]
#                     [--extras onnx]
#   sudo ./install.sh --upgrade --wheel edgefl-0.2.0-py3-none-any.whl   # keeps the bundle
#   sudo ./install.sh --uninstall [--purge]                             # --purge: bundle too
#
# --bundle DIR   a provisioning bundle (edgefl fleet provision's DIR/devices/<id>/: agent.json,
#                and ca.crt and any other files it names); installed to /etc/edgefl, mode 0600,
#                owned by the service user
# --wheel FILE   install this wheel; without it, edgefl from PyPI (--version V pins it)
# --extras LIST  optional extras: onnx, tflite (comma-separated)
# --user NAME    the service user (default edgefl), created as a system user when missing
# --python PY    the interpreter for the virtualenv (default python3)
# --prefix DIR   where the virtualenv goes (default /opt/edgefl; the venv is DIR/venv)
# --root DIR     install into DIR as the filesystem root (DESTDIR-style: files name their
#                final paths); for images and tests
# --no-systemctl do not call systemctl (images, tests, or a system not yet booted)
set -euo pipefail

ROOT=/
PREFIX=/opt/edgefl
SERVICE_USER=edgefl
PYTHON=python3
BUNDLE=""
WHEEL=""
VERSION=""
EXTRAS=""
MODE=install
PURGE=0
SYSTEMCTL=1
UNIT=edgefl-agent.service
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --bundle) BUNDLE=${2:?--bundle needs a folder}; shift 2 ;;
        --wheel) WHEEL=${2:?--wheel needs a file}; shift 2 ;;
        --version) VERSION=${2:?--version needs a version}; shift 2 ;;
        --extras) EXTRAS=${2:?--extras needs a list}; shift 2 ;;
        --user) SERVICE_USER=${2:?--user needs a name}; shift 2 ;;
        --python) PYTHON=${2:?--python needs an interpreter}; shift 2 ;;
        --prefix) PREFIX=${2:?--prefix needs a folder}; shift 2 ;;
        --root) ROOT=${2:?--root needs a folder}; shift 2 ;;
        --upgrade) MODE=upgrade; shift ;;
        --uninstall) MODE=uninstall; shift ;;
        --purge) PURGE=1; shift ;;
        --no-systemctl) SYSTEMCTL=0; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

case "$EXTRAS" in
    ""|onnx|tflite|onnx,tflite|tflite,onnx) ;;
    *) die "--extras: onnx, tflite or onnx,tflite, not '$EXTRAS'" ;;
esac
[ "$PURGE" = 0 ] || [ "$MODE" = uninstall ] || die "--purge goes with --uninstall"
[ -z "$WHEEL" ] || [ -z "$VERSION" ] || die "give --wheel or --version, not both"
[ "$(id -u)" = 0 ] || die "run as root (sudo): it creates a user and installs a service"

ROOT=${ROOT%/}
VENV=$PREFIX/venv
ETC=/etc/edgefl
UNIT_PATH=/etc/systemd/system/$UNIT
STATE_DIRS=(/var/lib/edgefl /var/cache/edgefl)

systemctl_() { if [ "$SYSTEMCTL" = 1 ]; then systemctl "$@"; fi; }

# uid and gid of the service user, from the target root's own /etc/passwd
user_ids() {
    awk -F: -v u="$SERVICE_USER" '$1 == u { print $3 ":" $4; found = 1 } END { exit !found }' \
        "$ROOT/etc/passwd"
}

ensure_user() {
    if user_ids >/dev/null 2>&1; then
        return
    fi
    local prefix=()
    [ -z "$ROOT" ] || prefix=(--prefix "$ROOT")
    useradd "${prefix[@]}" --system --user-group --home-dir /var/lib/edgefl --no-create-home \
        --shell /usr/sbin/nologin --comment "edgefl device agent" "$SERVICE_USER"
    say "created system user $SERVICE_USER"
}

install_package() {
    local spec
    if [ -n "$WHEEL" ]; then
        [ -f "$WHEEL" ] || die "--wheel $WHEEL: no such file"
        spec="$(cd "$(dirname "$WHEEL")" && pwd)/$(basename "$WHEEL")"
    else
        spec=edgefl
    fi
    [ -z "$EXTRAS" ] || spec="${spec}[$EXTRAS]"
    [ -z "$VERSION" ] || spec="$spec==$VERSION"
    "$ROOT$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
        --upgrade "$spec"
    "$ROOT$VENV/bin/edgefl-agent" --help >/dev/null
    say "installed $("$ROOT$VENV/bin/python" -m pip show edgefl | awk '/^Version:/ { print $2 }') into $VENV"
}

install_bundle() {
    [ -f "$BUNDLE/agent.json" ] || die "--bundle $BUNDLE: no agent.json (edgefl fleet provision writes DIR/devices/<id>/)"
    local ids
    ids=$(user_ids)
    install -d -m 0700 -o "${ids%:*}" -g "${ids#*:}" "$ROOT$ETC"
    local f
    for f in "$BUNDLE"/*; do
        [ -f "$f" ] || continue
        install -m 0600 -o "${ids%:*}" -g "${ids#*:}" "$f" "$ROOT$ETC/$(basename "$f")"
    done
    say "installed the bundle $BUNDLE to $ETC (mode 0600, owner $SERVICE_USER)"
}

install_unit() {
    local ids
    ids=$(user_ids)
    local d
    for d in "${STATE_DIRS[@]}"; do
        install -d -m 0750 -o "${ids%:*}" -g "${ids#*:}" "$ROOT$d"
    done
    install -d "$ROOT/etc/systemd/system"
    sed -e "s#/opt/edgefl/venv#$VENV#g" -e "s#^User=edgefl\$#User=$SERVICE_USER#" \
        -e "s#^Group=edgefl\$#Group=$SERVICE_USER#" "$HERE/$UNIT" > "$ROOT$UNIT_PATH.tmp"
    chmod 0644 "$ROOT$UNIT_PATH.tmp"
    mv "$ROOT$UNIT_PATH.tmp" "$ROOT$UNIT_PATH"
    # An exponential restart backoff where systemd has it (254+; bookworm has 252).
    local version
    version=$(systemctl --version 2>/dev/null | awk 'NR == 1 { print $2 }')
    if [ "${version:-0}" -ge 254 ] 2>/dev/null; then
        install -d "$ROOT$UNIT_PATH.d"
        printf '[Service]\nRestartSteps=8\nRestartMaxDelaySec=5min\n' > "$ROOT$UNIT_PATH.d/backoff.conf"
    fi
    say "installed $UNIT_PATH"
}

case "$MODE" in
    install)
        [ -n "$BUNDLE" ] || die "install needs --bundle DIR (a provisioning bundle)"
        [ -f "$BUNDLE/agent.json" ] || die "--bundle $BUNDLE: no agent.json (edgefl fleet provision writes DIR/devices/<id>/)"
        [ ! -e "$ROOT$VENV" ] || die "$VENV exists: use --upgrade, or --uninstall first"
        "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 9))' \
            || die "$PYTHON is older than 3.9"
        ensure_user
        install -d -m 0755 "$ROOT$PREFIX"
        "$PYTHON" -m venv "$ROOT$VENV" || die "no venv module: apt-get install python3-venv"
        install_package
        install_bundle
        install_unit
        systemctl_ daemon-reload
        systemctl_ enable --now "$UNIT"
        say "done: systemctl status edgefl-agent; journalctl -u edgefl-agent -f"
        ;;
    upgrade)
        [ -x "$ROOT$VENV/bin/python" ] || die "$VENV missing: install first"
        [ -f "$ROOT$ETC/agent.json" ] || die "$ETC/agent.json missing: install with --bundle"
        [ -z "$BUNDLE" ] || [ -f "$BUNDLE/agent.json" ] || die "--bundle $BUNDLE: no agent.json"
        install_package
        [ -z "$BUNDLE" ] || install_bundle   # a new bundle only when given; else kept as is
        install_unit
        systemctl_ daemon-reload
        systemctl_ restart "$UNIT"
        say "upgraded; the bundle in $ETC was kept"
        ;;
    uninstall)
        systemctl_ disable --now "$UNIT" || true
        rm -f "$ROOT$UNIT_PATH"
        rm -rf "$ROOT$UNIT_PATH.d" "$ROOT$VENV"
        rmdir "$ROOT$PREFIX" 2>/dev/null || true
        systemctl_ daemon-reload
        if [ "$PURGE" = 1 ]; then
            rm -rf "$ROOT$ETC" "${STATE_DIRS[@]/#/$ROOT}"
            if user_ids >/dev/null 2>&1; then
                local_prefix=()
                [ -z "$ROOT" ] || local_prefix=(--prefix "$ROOT")
                userdel "${local_prefix[@]}" "$SERVICE_USER"
            fi
            say "removed the agent, its bundle, state and user"
        else
            say "removed the agent; kept $ETC (the bundle) and its state (--purge removes them)"
        fi
        ;;
esac
