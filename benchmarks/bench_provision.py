"""Fleet provisioning speed: ``edgefl fleet provision`` for 10,000 devices, and Mosquitto on it.

1. provision N devices (default 10,000, 4 regions) from a CSV into a fresh folder: bundles,
   registry, passwd (PBKDF2-SHA512 computed in-process) and the per-device ACL;
   then the same into a second folder with EdDSA-signed tokens as passwords (the secure path);
2. re-run with the same CSV (idempotent: every device kept) and with 100 new devices added;
3. start a private Mosquitto on the generated passwd and acl.conf, time until it accepts
   connections, connect the last device with its bundle, then revoke a connected device and
   time from SIGHUP until Mosquitto has disconnected it (it is then refused at CONNECT).

Prints one JSON line: devices, seconds (the first provisioning), devices_per_s and the others.
Usage: ``python benchmarks/bench_provision.py [--devices N]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import tempfile
import time
from pathlib import Path

from _common import emit, log

from edgefl.auth.keys import KeyDir
from edgefl.auth.tokens import AuthConfig
from edgefl.broker.mosquitto import MosquittoProcess
from edgefl.fleet.provision import provision, revoke
from edgefl.transport import MqttConnection


def write_csv(path: Path, n: int, start: int = 0) -> Path:
    lines = ["device_id,region,site"]
    lines += [f"dev-{i:06d},region-{i % 4},site-{i % 97}" for i in range(start, start + n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def connect(url: str, out: Path, dev: str, timeout: float = 5.0) -> MqttConnection:
    b = json.loads((out / "devices" / dev / "agent.json").read_text())
    c = MqttConnection(url, dev, username=b["username"], password=b["password"], clean_session=True)
    return c.start(timeout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=10_000)
    args = ap.parse_args()
    n = args.devices
    tmp = Path(tempfile.mkdtemp(prefix="edgefl-bench-prov-"))
    try:
        out = tmp / "fleet"
        csv1 = write_csv(tmp / "devices.csv", n)
        log(f"provisioning {n} devices into {out}")
        first = provision(csv1, "bench", out)
        assert len(first.added) == n
        again = provision(csv1, "bench", out)
        assert len(again.kept) == n
        assert not again.added
        csv2 = write_csv(tmp / "more.csv", n + 100)
        more = provision(csv2, "bench", out)
        assert len(more.added) == 100
        log(f"first {first.seconds:.2f} s, re-run {again.seconds:.2f} s, +100 {more.seconds:.2f} s")
        # the secure path: every password is an EdDSA-signed token (its expiry recorded too)
        keys = KeyDir(tmp / "keys")
        keys.init("EdDSA")
        signed = provision(csv1, "bench", tmp / "fleet-eddsa", auth=AuthConfig(keys=str(keys.path)))
        assert len(signed.added) == n
        log(f"with EdDSA tokens: {signed.seconds:.2f} s")

        extra = (
            f"password_file {out / 'broker' / 'passwd'}\nacl_file {out / 'broker' / 'acl.conf'}\n"
        )
        t0 = time.perf_counter()
        with MosquittoProcess(config_extra=extra, allow_anonymous=False) as mq:
            start_s = time.perf_counter() - t0
            last = f"dev-{n + 99:06d}"
            connect(mq.url, out, last).stop()
            victim = f"dev-{0:06d}"
            login = json.loads((out / "devices" / victim / "agent.json").read_text())
            live = connect(mq.url, out, victim)
            assert mq.proc is not None
            t1 = time.perf_counter()
            revoke(out, victim)
            revoke_s = time.perf_counter() - t1
            mq.proc.send_signal(signal.SIGHUP)
            t2 = time.perf_counter()
            while live.connected.is_set() and time.perf_counter() - t2 < 30:
                time.sleep(0.005)
            reload_s = time.perf_counter() - t2
            assert not live.connected.is_set(), "the revoked device was not disconnected in 30 s"
            live.stop()
            probe = MqttConnection(
                mq.url, "probe", username=victim, password=login["password"], clean_session=True
            )
            try:
                probe.start(2).stop()
            except ConnectionError:
                pass
            else:
                raise AssertionError("the revoked device could connect after the reload")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    emit(
        {
            "benchmark": "provision",
            "devices": n,
            "seconds": round(first.seconds, 3),
            "devices_per_s": round(n / first.seconds),
            "seconds_eddsa_tokens": round(signed.seconds, 3),
            "rerun_same_csv_s": round(again.seconds, 3),
            "add_100_s": round(more.seconds, 3),
            "revoke_s": round(revoke_s, 3),
            "mosquitto_start_s": round(start_s, 3),
            "reload_until_revoked_disconnected_s": round(reload_s, 3),
        }
    )


if __name__ == "__main__":
    main()
