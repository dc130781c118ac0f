"""deploy/agent: the systemd unit passes ``systemd-analyze verify``, install.sh passes
shellcheck, and install.sh really installs, upgrades and uninstalls the agent in a temporary
root (``--root``, ``--no-systemctl``) from a wheel built here: a system user in that root's
/etc/passwd, a virtualenv whose ``edgefl-agent`` runs, the bundle at mode 0600 owned by the
user, the unit with its paths.

systemd need not be PID 1: ``verify`` only loads unit files. It checks that ExecStart exists,
so the unit is verified once with the real venv of the test install in its path.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
AGENT = ROOT / "deploy" / "agent"
UNIT = AGENT / "edgefl-agent.service"
INSTALL = AGENT / "install.sh"

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="install.sh runs as root")
needs_verify = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                  reason="systemd-analyze missing (Debian systemd)")


def verify(unit: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, timeout=60)


def unit_settings(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def test_the_unit_is_sandboxed_and_restarts() -> None:
    s = unit_settings(UNIT.read_text())
    assert s["User"] == ["edgefl"] and s["Group"] == ["edgefl"]
    assert s["ExecStart"] == ["/opt/edgefl/venv/bin/edgefl-agent --config /etc/edgefl/agent.json"]
    for key, value in {"ProtectSystem": "strict", "ProtectHome": "yes",
                       "NoNewPrivileges": "yes", "PrivateTmp": "yes",
                       "Restart": "on-failure", "CapabilityBoundingSet": ""}.items():
        assert s[key] == [value], key
    assert s["ReadWritePaths"] == ["/var/lib/edgefl /var/cache/edgefl"]
    assert int(s["RestartSec"][0]) >= 5 and s["StartLimitIntervalSec"] == ["0"]


@needs_verify
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # ExecStart must exist: point it at a real executable of the same kind of path
    exe = tmp_path / "opt" / "edgefl" / "venv" / "bin" / "edgefl-agent"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    unit = tmp_path / "edgefl-agent.service"
    unit.write_text(UNIT.read_text().replace("/opt/edgefl/venv", str(exe.parent.parent)))
    out = verify(unit)
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stderr
    # and it does fail: a misspelt key, and a missing binary
    unit.write_text(UNIT.read_text().replace("/opt/edgefl/venv", str(exe.parent.parent))
                    .replace("ProtectHome=yes", "ProtectHomes=yes"))
    out = verify(unit)
    assert "Unknown key" in out.stderr and "ProtectHomes" in out.stderr
    unit.write_text(UNIT.read_text().replace("/opt/edgefl/venv", str(tmp_path / "nowhere")))
    out = verify(unit)
    assert out.returncode != 0 and "is not executable" in out.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck missing (Debian)")
def test_shellcheck(tmp_path: Path) -> None:
    out = subprocess.run(["shellcheck", "--severity=style", str(INSTALL)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout
    bad = tmp_path / "bad.sh"  # the same check flags an unquoted expansion
    bad.write_text(INSTALL.read_text().replace('rm -f "$ROOT$UNIT_PATH"', "rm -f $ROOT$UNIT_PATH"))
    out = subprocess.run(["shellcheck", str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "SC2086" in out.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "--wheel-dir", str(out), str(ROOT)],
                   check=True, timeout=300, cwd=out)
    (found,) = out.glob("edgefl-*.whl")
    return found


def run_install(*args: str) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["bash", str(INSTALL), *args], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def new_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    for name in ("passwd", "group", "shadow", "gshadow"):
        (root / "etc" / name).write_text("root:x:0:0:root:/root:/bin/bash\n" if name == "passwd"
                                         else "root:x:0:\n" if name == "group" else "")
    return root


def bundle(tmp_path: Path, password: str) -> Path:
    b = tmp_path / f"bundle-{password}"
    b.mkdir()
    cfg = {"broker_url": "mqtts://broker.example:8883", "project": "p", "region": "region-0",
           "device_id": "pi-17", "password": password, "ca_file": "ca.crt"}
    (b / "agent.json").write_text(json.dumps(cfg))
    (b / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\n(test)\n")
    return b


@needs_root
@pytest.mark.slow
def test_install_upgrade_uninstall_in_a_temporary_root(tmp_path: Path, wheel: Path) -> None:
    root = new_root(tmp_path)
    common = ["--root", str(root), "--no-systemctl", "--python", sys.executable]
    run_install("--bundle", str(bundle(tmp_path, "s3cret")), "--wheel", str(wheel), *common)

    # the user, in the root's own /etc/passwd
    users = {line.split(":")[0]: line.split(":") for line in
             (root / "etc" / "passwd").read_text().splitlines()}
    uid, gid = int(users["edgefl"][2]), int(users["edgefl"][3])
    assert users["edgefl"][6] == "/usr/sbin/nologin" and uid < 1000
    # the venv runs the agent, and has the base package only
    venv = root / "opt" / "edgefl" / "venv"
    out = subprocess.run([str(venv / "bin" / "edgefl-agent"), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "edgefl device agent" in out.stdout
    pkgs = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"],
                          capture_output=True, text=True, check=True).stdout
    names = {p["name"].lower() for p in json.loads(pkgs)}
    assert {"edgefl", "paho-mqtt", "cbor2", "numpy"} <= names
    assert not names & {"fastapi", "sqlalchemy", "onnxruntime", "torch"}
    # the bundle: 0600, owned by the service user, in a 0700 folder; it loads as configured
    etc = root / "etc" / "edgefl"
    for f in ("agent.json", "ca.crt"):
        st = (etc / f).stat()
        assert stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (uid, gid), f
    assert stat.S_IMODE(etc.stat().st_mode) == 0o700
    loaded = subprocess.run(
        [str(venv / "bin" / "python"), "-c",
         "import sys; from device_agent.config import load_config; "
         "c = load_config(sys.argv[1]); print(c.ca_file, c.username)", str(etc / "agent.json")],
        capture_output=True, text=True, check=True).stdout.split()
    assert loaded == [str(etc / "ca.crt"), "pi-17"]
    for d in ("var/lib/edgefl", "var/cache/edgefl"):
        assert (root / d).stat().st_uid == uid
    # the unit names the final paths, and verifies against this venv
    unit_text = (root / "etc/systemd/system/edgefl-agent.service").read_text()
    execstart = "ExecStart=/opt/edgefl/venv/bin/edgefl-agent --config /etc/edgefl/agent.json"
    assert execstart in unit_text
    if shutil.which("systemd-analyze"):
        probe = tmp_path / "edgefl-agent.service"
        probe.write_text(unit_text.replace("/opt/edgefl/venv", str(venv)))
        res = verify(probe)
        assert res.returncode == 0 and res.stderr == "", res.stderr

    # a second install refuses; an upgrade reinstalls from the wheel and keeps the bundle
    refused = subprocess.run(["bash", str(INSTALL), "--bundle", str(bundle(tmp_path, "x")),
                              "--wheel", str(wheel), *common], capture_output=True, text=True)
    assert refused.returncode != 0 and "use --upgrade" in refused.stderr
    (venv / "bin" / "edgefl-agent").unlink()  # a damaged install that the upgrade repairs
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y",
                    "edgefl"], check=True)
    out = run_install("--upgrade", "--wheel", str(wheel), *common)
    assert "the bundle in /etc/edgefl was kept" in out.stdout
    assert json.loads((etc / "agent.json").read_text())["password"] == "s3cret"
    assert subprocess.run([str(venv / "bin" / "edgefl-agent"), "--help"],
                          capture_output=True).returncode == 0

    # uninstall keeps the bundle; --purge removes it and the user
    run_install("--uninstall", *common)
    assert not venv.exists() and not (root / "etc/systemd/system/edgefl-agent.service").exists()
    assert (etc / "agent.json").is_file()
    run_install("--uninstall", "--purge", *common)
    assert not etc.exists() and not (root / "var/lib/edgefl").exists()
    assert "edgefl:" not in (root / "etc" / "passwd").read_text()


@needs_root
def test_install_refuses_bad_input(tmp_path: Path) -> None:
    root = new_root(tmp_path)
    common = ["--root", str(root), "--no-systemctl"]
    for args, message in [
        ([], "install needs --bundle"),
        (["--bundle", str(tmp_path)], "no agent.json"),
        (["--bundle", str(tmp_path), "--extras", "server"], "--extras"),
        (["--purge"], "--purge goes with --uninstall"),
        (["--upgrade"], "install first"),
        (["--frobnicate"], "unknown option"),
    ]:
        out = subprocess.run(["bash", str(INSTALL), *args, *common], capture_output=True,
                             text=True, timeout=60)
        assert out.returncode != 0 and message in out.stderr, (args, out.stderr)
    assert not (root / "opt").exists()
