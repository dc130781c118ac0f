"""Regional brokers: a central Mosquitto and two regional ones, bridged over mutual TLS.

Three real Mosquitto processes run the configs ``edgefl.broker.bridge`` renders (the same
function behind ``edgefl bridge-config`` and the shipped copies in ``broker_config/bridge/``).
The controller is on the central broker; each region's combiner and devices are on the
region's broker, the devices over TLS with accounts from ``edgefl fleet provision`` run per
region. A whole digits session must give the single-process reference's accuracies (so no
update, partial, plan or model chunk was lost or duplicated across a bridge), and the bridges
must carry only what the topic table says: nothing of one region reaches the other, and
tasks and update chunks never reach the central broker.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from edgefl import deploy
from edgefl.auth.ca import device_files, init_ca, issue_server_cert
from edgefl.auth.tokens import Role
from edgefl.broker.bridge import (
    EXAMPLE,
    PLACEHOLDER_PASSWORD,
    BridgeFiles,
    BridgeOptions,
    render_central_acl,
    render_central_conf,
    render_regional_conf,
    write_bridge_configs,
)
from edgefl.broker.mosquitto import MosquittoProcess
from edgefl.controller import SessionConfig
from edgefl.fleet.provision import provision
from edgefl.protocol import Topics, encode
from edgefl.tasks import digits
from edgefl.transport import MqttConnection
from tests.brokers import Probe, free_port, settle
from tests.harness import completed_accuracies

ROOT = Path(__file__).resolve().parents[1]
REGIONS = ("region-0", "region-1")
N_DEVICES = 10


def test_shipped_bridge_configs_match_the_renderer() -> None:
    shipped = ROOT / "broker_config" / "bridge"
    assert (shipped / "central.conf").read_text() == render_central_conf(EXAMPLE)
    assert (shipped / "acl-central.conf").read_text() == render_central_acl(EXAMPLE)
    regional = render_regional_conf(EXAMPLE, "region-0", PLACEHOLDER_PASSWORD)
    assert (shipped / "region-0.conf").read_text() == regional


def test_bridge_acl_covers_only_its_region() -> None:
    acl = render_central_acl(BridgeOptions(project="p", regions=REGIONS))
    block = acl.split("user bridge-region-0\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert block == [
        "topic read edgefl/v1/p/region-0/comb/round",
        "topic read edgefl/v1/p/model/#",
        "topic write edgefl/v1/p/region-0/comb/partial",
        "topic write edgefl/v1/p/region-0/comb/progress",
        "topic write edgefl/v1/p/region-0/comb/status",
        "topic write edgefl/v1/p/region-0/comb/pool/+/status",
        "topic write edgefl/v1/p/region-0/dev/+/status",
        "topic write edgefl/v1/p/region-0/dev/+/telemetry",
        "topic write edgefl/v1/p/region-0/dev/+/request",
    ]
    with pytest.raises(ValueError, match="region"):
        BridgeOptions(project="p", regions=("region-0", "bad/region"))


class RenderedBroker(MosquittoProcess):
    """A Mosquitto process running a rendered config as it is, plus a log file for the test."""

    def __init__(self, conf: Path, port: int) -> None:
        super().__init__(port, workdir=conf.parent / "run", allow_anonymous=False)
        self.rendered = conf.read_text()

    def config_text(self, log_path: Path) -> str:
        # Started as root, Mosquitto drops to 'mosquitto', which cannot read the 0600 keys
        return f"{self.rendered}\nuser root\nlog_dest file {log_path}\n"

    def log_text(self) -> str:
        assert self.log_path is not None
        return self.log_path.read_text(errors="replace")


class ProvisionedLogins:
    """The logins provisioning wrote (a password per account), in place of fresh JWTs.

    Mosquitto compares passwords, so every component must present exactly the one whose hash
    is in its broker's password file; ``Deployment`` asks its credentials for them.
    """

    def __init__(self, passwords: dict[str, str]) -> None:
        self.passwords = passwords

    def token(self, subject: str, role: Role | str, region: str | None = None) -> str:
        return self.passwords[subject]

    def login(self, subject: str, role: Role | str, region: str | None = None) -> dict[str, str]:
        return {"username": subject, "password": self.passwords[subject]}


@dataclass
class Bridged:
    project: str
    files: BridgeFiles
    central: RenderedBroker
    regional: dict[str, RenderedBroker]
    device_urls: dict[str, str]
    central_bridge_url: str
    ca: Path
    passwords: dict[str, str]  # every device's and server's login on the broker it uses
    regional_controller: dict[str, str]  # region -> password of its broker's read-all account


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(scope="module")
def bridged(tmp_path_factory) -> Iterator[Bridged]:
    base = tmp_path_factory.mktemp("bridged")
    project = deploy.random_project()
    ca = base / "ca"
    init_ca(ca)
    for name in ("central", *REGIONS):  # all three brokers listen on 127.0.0.1 here
        issue_server_cert(ca, ips=["127.0.0.1"], name=name)

    passwords: dict[str, str] = {}
    fleets: dict[str, Path] = {}
    regional_controller: dict[str, str] = {}
    for i, region in enumerate(REGIONS):  # each region's fleet provisioned on its own
        devices = [f"dev-{k:04d}" for k in range(N_DEVICES) if k % len(REGIONS) == i]
        csv = base / f"{region}.csv"
        csv.write_text("device_id,region\n" + "".join(f"{d},{region}\n" for d in devices))
        fleets[region] = base / f"fleet-{region}"
        provision(csv, project, fleets[region])
        for dev in devices:
            bundle = json.loads((fleets[region] / "devices" / dev / "agent.json").read_text())
            passwords[dev] = bundle["password"]
        servers = fleets[region] / "servers"
        passwords[f"combiner-{region}"] = json.loads(
            (servers / f"combiner-{region}.json").read_text()
        )["password"]
        regional_controller[region] = json.loads((servers / "controller.json").read_text())[
            "password"
        ]

    ports = {name: (free_port(), free_port()) for name in ("central", *REGIONS)}
    opts = BridgeOptions(
        project=project,
        regions=REGIONS,
        central_host="127.0.0.1",
        central_bridge_port=ports["central"][1],
        central_server_port=ports["central"][0],
        # each regional broker gets its own ports below; the renderer takes one pair, so the
        # test renders once per region with that region's ports
        install_dir=None,
        device_bind="127.0.0.1",
    )
    files = write_bridge_configs(base / "brokers", opts, ca_dir=ca, region_fleets=fleets)
    for region in REGIONS:  # re-render each region with its own ports, same bridge password
        ropts = replace(
            opts, regional_server_port=ports[region][0], regional_device_port=ports[region][1]
        )
        text = render_regional_conf(
            ropts, region, files.passwords[f"bridge-{region}"], base / "brokers"
        )
        files.regional_confs[region].write_text(text)
    passwords["controller"] = files.passwords["controller"]

    central = RenderedBroker(files.central_conf, ports["central"][0]).start()
    regional: dict[str, RenderedBroker] = {}
    try:
        for region in REGIONS:
            regional[region] = RenderedBroker(files.regional_confs[region], ports[region][0])
            regional[region].start()
        for region in REGIONS:  # the bridge logged in over mutual TLS
            _wait_for(
                lambda r=region: f"as bridge-{r}" in central.log_text(),
                15,
                f"the bridge of {region} on the central broker",
            )
        yield Bridged(
            project=project,
            files=files,
            central=central,
            regional=regional,
            device_urls={r: f"mqtts://127.0.0.1:{ports[r][1]}" for r in REGIONS},
            central_bridge_url=f"mqtts://127.0.0.1:{ports['central'][1]}",
            ca=ca,
            passwords=passwords,
            regional_controller=regional_controller,
        )
    finally:
        for broker in regional.values():
            broker.stop()
        central.stop()


def _recorder(url: str, password: str, *filters: str) -> Probe:
    probe = Probe(url, username="controller", password=password)
    assert probe.connect() == 0
    probe.subscribe(*filters)
    return probe


def test_session_over_bridged_regional_brokers(bridged: Bridged, tmp_path) -> None:
    b = bridged
    t = Topics(b.project)
    everything = f"{t.base}/#"
    # live traffic seen on region-0's broker, and on the central broker's bulk topics
    region0 = _recorder(b.regional["region-0"].url, b.regional_controller["region-0"], everything)
    central_bulk = _recorder(
        b.central.url,
        b.passwords["controller"],
        t.device_wildcard(None, "update"),
        t.device_wildcard(None, "task"),
    )
    dep = deploy.Deployment(
        tmp_path,
        project=b.project,
        broker_url=b.central.url,
        region_urls={r: broker.url for r, broker in b.regional.items()},
    )
    dep.credentials = ProvisionedLogins(b.passwords)
    try:
        dep.start_combiners(list(REGIONS))
        fleet = dep.start_fleet(
            N_DEVICES,
            device_urls=b.device_urls,
            agent_options={"ca_file": str(b.ca / "ca.crt")},
        )
        assert all(a.conn.address.url.startswith("mqtts://") for a in fleet.agents)
        ctl = dep.start_controller(evaluator=digits.evaluator)
        # the controller sees every device through the bridges (retained presence)
        assert len(ctl.presence.wait_for(N_DEVICES, 20)) == N_DEVICES
        config = SessionConfig(
            rounds=20,
            min_devices=N_DEVICES,
            round_timeout_s=30,
            train={"lr": 0.1, "batch_size": 32},
        )
        ctl.create_session(config, digits.initial_weights("softmax"))
        ctl.run(config.session_id)
        rounds = ctl.store.list_rounds(config.session_id)
        final_version = ctl.store.get_session(config.session_id).model_version
    finally:
        dep.close()

    accs = completed_accuracies(rounds)
    assert len(accs) == 20
    assert abs(accs[-1] - 0.938889) <= 0.003
    assert accs == pytest.approx(digits.reference_run(N_DEVICES, 20), abs=1e-9)
    for rec in rounds:
        assert {p["region"] for p in rec.participants} == set(REGIONS)
        assert len(rec.participants) == N_DEVICES

    settle(0.5)
    region0.close()
    central_bulk.close()
    seen = set(region0.topics())
    prefix0 = f"{t.base}/region-0/"
    # region-0's broker carried its own traffic and the bridged-in plans and models ...
    assert t.combiner("region-0", "round") in seen
    assert any(s.startswith(prefix0) and s.endswith("/update") for s in seen)
    assert any(s.startswith(f"{t.base}/model/") for s in seen)
    # ... and nothing of region-1: the bridges are scoped to their region
    assert not [s for s in seen if "/region-1/" in s], sorted(seen)
    # tasks and update chunks stay in their region: none reached the central broker
    assert central_bulk.topics() == []

    # retained state: region-0's broker holds the model chunks (retained as published, so
    # try_private works) and only region-0's presence
    late = _recorder(b.regional["region-0"].url, b.regional_controller["region-0"], everything)
    settle(0.5)
    late.close()
    retained = {m.topic for m in late.messages if m.retain and m.payload}
    assert t.model_chunk(final_version, 0) in retained
    assert t.device("region-0", "dev-0000", "status") in retained
    assert not [s for s in retained if "/region-1/" in s]
    # the central broker holds both regions' retained presence (forwarded with the flag)
    central_late = _recorder(b.central.url, b.passwords["controller"], everything)
    settle(0.5)
    central_late.close()
    central_retained = {m.topic for m in central_late.messages if m.retain}
    for region, dev in (("region-0", "dev-0000"), ("region-1", "dev-0001")):
        assert t.device(region, dev, "status") in central_retained
        assert t.combiner(region, "status") in central_retained


def test_bridge_account_is_confined_to_its_region(bridged: Bridged) -> None:
    """The central ACL: region-0's bridge login cannot write region-1's (or model) topics.

    Runs after the session: logging in as the bridge takes over the bridge's client id.
    """
    b = bridged
    t = Topics(b.project)
    watcher = _recorder(b.central.url, b.passwords["controller"], f"{t.base}/#")
    files = device_files(b.ca, "bridge-region-0")
    ca = str(b.ca / "ca.crt")
    password = b.files.passwords["bridge-region-0"]
    # without a client certificate the bridge listener refuses even the right password
    with pytest.raises(ConnectionError, match="certificate required"):
        MqttConnection(
            b.central_bridge_url,
            "x",
            username="bridge-region-0",
            password=password,
            ca_file=ca,
            clean_session=True,
            max_backoff_s=0.5,
        ).start(3)
    conn = MqttConnection(
        b.central_bridge_url,
        "x",
        username="bridge-region-0",
        password=password,
        ca_file=ca,
        cert_file=str(files.cert),
        key_file=str(files.key),
        clean_session=True,
    ).start(5)
    try:
        status = encode("status", state="online", ts=time.time())
        for topic in (
            t.device("region-1", "dev-0001", "telemetry"),  # another region
            t.device("region-0", "dev-0000", "update"),  # bulk topics stay regional
            t.model_chunk("forged", 0),  # the model tree is read-only for a bridge
            t.device("region-0", "dev-0000", "telemetry"),  # allowed: the positive control
        ):
            conn.publish(topic, status).wait_for_publish(3)
    finally:
        conn.stop()
    _wait_for(
        lambda: t.device("region-0", "dev-0000", "telemetry") in watcher.topics(),
        5,
        "the allowed publication",
    )
    settle(0.3)
    watcher.close()
    assert [m.topic for m in watcher.messages if not m.retain] == [
        t.device("region-0", "dev-0000", "telemetry")
    ]


def test_bridge_config_cli_writes_a_complete_rendering(tmp_path) -> None:
    from typer.testing import CliRunner

    from edgefl.cli.main import app

    ca = tmp_path / "ca"
    init_ca(ca)
    issue_server_cert(ca, dns_names=["central.example"], name="central")
    issue_server_cert(ca, dns_names=["r0.example"], name="region-0")
    out = tmp_path / "out"
    args = ["bridge-config", str(out), "--project", "p", "--region", "region-0"]
    args += ["--central-host", "central.example", "--ca", str(ca)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["regions"] == {"region-0": str(out / "region-0/mosquitto.conf")}
    central, region = out / "central", out / "region-0"
    users = [line.split(":")[0] for line in (central / "passwd").read_text().splitlines()]
    assert users == ["bridge-region-0", "controller"]
    conf = (region / "mosquitto.conf").read_text()
    password = next(x for x in conf.splitlines() if x.startswith("remote_password "))
    assert len(password.split()[1]) >= 32 and "address central.example:8884" in conf
    secret = [central / "passwd", central / "controller.json", region / "mosquitto.conf"]
    secret += [central / "certs/central.key", region / "certs/bridge-region-0.key"]
    assert [p.stat().st_mode & 0o777 for p in secret] == [0o600] * 5
    assert sorted(p.name for p in (region / "certs").iterdir()) == [
        "bridge-region-0.crt",
        "bridge-region-0.key",
        "ca.crt",
        "region-0.crt",
        "region-0.key",
    ]
    assert not (central / "certs" / "ca.key").exists()  # the CA's key never leaves its folder
    # a second run would rotate the bridge password: only with --force
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1 and "--force" in res.output
    assert (region / "mosquitto.conf").read_text() == conf


def test_combiner_pools_behind_regional_brokers(bridged: Bridged, tmp_path) -> None:
    """Each region served by a pool of 2 on its own broker: the members' presence crosses the
    bridge, so the controller deals every region's devices out over them, and the session
    still gives the reference's accuracies."""
    b = bridged
    t = Topics(b.project)
    dep = deploy.Deployment(
        tmp_path,
        project=b.project,
        broker_url=b.central.url,
        region_urls={r: broker.url for r, broker in b.regional.items()},
    )
    dep.credentials = ProvisionedLogins(b.passwords)
    rounds_n = 3
    try:
        members = dep.start_combiners(list(REGIONS), pool=2)
        dep.start_fleet(
            N_DEVICES, device_urls=b.device_urls, agent_options={"ca_file": str(b.ca / "ca.crt")}
        )
        ctl = dep.start_controller(evaluator=digits.evaluator)
        assert len(ctl.presence.wait_for(N_DEVICES, 20)) == N_DEVICES
        for region in REGIONS:  # both members, not only the first to cross the bridge
            expected = [f"combiner-{region}-0", f"combiner-{region}-1"]
            _wait_for(
                lambda r=region, e=expected: ctl.presence.pool_members(r) == e,
                15,
                f"both pool members of {region} on the central broker",
            )
        config = SessionConfig(
            rounds=rounds_n,
            min_devices=N_DEVICES,
            round_timeout_s=30,
            train={"lr": 0.1, "batch_size": 32},
        )
        ctl.create_session(config, digits.initial_weights("softmax"))
        ctl.run(config.session_id)
        rounds = ctl.store.list_rounds(config.session_id)
        accepted = [m.stats["accepted"] for m in members]
    finally:
        dep.close()

    accs = completed_accuracies(rounds)
    assert accs == pytest.approx(digits.reference_run(N_DEVICES, rounds_n), abs=1e-9)
    for rec in rounds:
        assert len(rec.participants) == N_DEVICES
    # every member served its share: 5 devices per region, dealt 3 and 2, each round
    assert sorted(accepted) == [2 * rounds_n] * 2 + [3 * rounds_n] * 2, accepted

    settle(0.5)
    central_late = _recorder(b.central.url, b.passwords["controller"], t.pool_status_wildcard())
    settle(0.5)
    central_late.close()
    retained = {m.topic for m in central_late.messages if m.retain and m.payload}
    assert retained == {
        t.pool_member_status(r, f"combiner-{r}-{i}") for r in REGIONS for i in range(2)
    }
