"""The Kubernetes manifests in deploy/k8s: every overlay renders with ``kubectl kustomize``,
every object validates against the Kubernetes schemas of a fixed version
(``kubernetes-validate``, strict: unknown fields fail), and the production overlay keeps its
policies (limits, pod security, NetworkPolicies, no Secret data in the repository).

No cluster runs here; these are the checks CI can make without one. ``KUBECTL`` picks another
kubectl (e.g. Debian's 1.20, whose kustomize v2.0 the manifests are written for too).
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgefl.protocol.topics import TopicError, check_segment

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
K8S_VERSION = "1.30.0"  # the schemas every object is validated against
KUBECTL = os.environ.get("KUBECTL") or shutil.which("kubectl")
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"}

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl (kubernetes-client) missing")


def render(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run(
        [str(KUBECTL), "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec = obj["spec"]
    if obj["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]["spec"]


def containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(obj)
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (obj,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    return obj


def policy_violations(objs: list[dict[str, Any]]) -> list[str]:
    """What the production overlay must never do; empty when it complies."""
    bad: list[str] = []
    for obj in objs:
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] == "Secret" and (obj.get("data") or obj.get("stringData")):
            bad.append(f"{where}: a Secret with data in the manifests")
        if obj["kind"] not in WORKLOADS:
            continue
        spec = pod_spec(obj)
        pod_sc = spec.get("securityContext", {})
        if spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC"):
            bad.append(f"{where}: shares a host namespace")
        for c in containers(obj):
            at = f"{where}/{c['name']}"
            sc = c.get("securityContext", {})
            limits = c.get("resources", {}).get("limits", {})
            requests = c.get("resources", {}).get("requests", {})
            for res in ("cpu", "memory"):
                if res not in limits:
                    bad.append(f"{at}: no {res} limit")
                if res not in requests:
                    bad.append(f"{at}: no {res} request")
            if not sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")):
                bad.append(f"{at}: may run as root")
            if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
                bad.append(f"{at}: runAsUser 0")
            if sc.get("readOnlyRootFilesystem") is not True:
                bad.append(f"{at}: writable root filesystem")
            if sc.get("allowPrivilegeEscalation") is not False:
                bad.append(f"{at}: privilege escalation allowed")
            if sc.get("privileged"):
                bad.append(f"{at}: privileged")
            caps = sc.get("capabilities", {})
            if caps.get("drop") != ["ALL"] or caps.get("add"):
                bad.append(f"{at}: capabilities not dropped (ALL)")
            seccomp = sc.get("seccompProfile", pod_sc.get("seccompProfile", {}))
            if seccomp.get("type") != "RuntimeDefault":
                bad.append(f"{at}: seccomp profile is not RuntimeDefault")
            image = c["image"]
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                bad.append(f"{at}: image {image!r} has no fixed tag")
    return bad


# -- rendering and schemas ----------------------------------------------------------------


def test_overlays_exist() -> None:
    assert OVERLAYS == ["lab", "production"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_the_kubernetes_schemas(rendered, overlay) -> None:
    objs = rendered[overlay]
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap", "Namespace"} <= kinds
    for obj in objs:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    names = {o["metadata"]["name"] for o in objs if o["kind"] in WORKLOADS}
    assert names == {
        "edgefl-controller",
        "edgefl-api",
        "edgefl-combiner-region-0",
        "edgefl-combiner-region-1",
        "edgefl-broker",
        "edgefl-postgres",
        "edgefl-influxdb",
    }
    namespaces = {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"}
    assert namespaces == {"edgefl" if overlay == "production" else "edgefl-lab"}


def test_the_validator_refuses_a_broken_object(rendered) -> None:
    obj = copy.deepcopy(find(rendered["production"], "Deployment", "edgefl-api"))
    obj["spec"]["replica"] = 2  # a typo: strict validation refuses unknown fields
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    obj = copy.deepcopy(find(rendered["production"], "Deployment", "edgefl-api"))
    obj["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


# -- production policies ------------------------------------------------------------------


def test_production_meets_the_policies(rendered) -> None:
    assert policy_violations(rendered["production"]) == []
    ns = find(rendered["production"], "Namespace", "edgefl")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_the_policy_check_catches_each_violation(rendered) -> None:
    base = rendered["production"]

    def mutated(change) -> list[str]:
        objs = copy.deepcopy(base)
        change(find(objs, "Deployment", "edgefl-controller"), objs)
        return policy_violations(objs)

    def no_limit(o, _):
        del containers(o)[0]["resources"]["limits"]  # the init container's

    def root(o, _):
        pod_spec(o)["securityContext"]["runAsNonRoot"] = False

    def writable(o, _):
        del pod_spec(o)["containers"][0]["securityContext"]["readOnlyRootFilesystem"]

    def caps(o, _):
        pod_spec(o)["containers"][0]["securityContext"]["capabilities"] = {"add": ["NET_ADMIN"]}

    def seccomp(o, _):
        del pod_spec(o)["securityContext"]["seccompProfile"]

    def latest(o, _):
        pod_spec(o)["containers"][0]["image"] = "edgefl/server"

    def secret(_, objs):
        objs.append(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "x"},
                "data": {"password": "aHVudGVyMg=="},
            }
        )

    expected = {
        no_limit: "db-upgrade: no cpu limit",
        root: "may run as root",
        writable: "writable root filesystem",
        caps: "capabilities not dropped",
        seccomp: "seccomp profile is not RuntimeDefault",
        latest: "has no fixed tag",
        secret: "Secret with data",
    }
    for change, message in expected.items():
        found = mutated(change)
        assert any(message in v for v in found), (change.__name__, found)


def test_no_secret_material_in_the_repository() -> None:
    """No Secret object anywhere under deploy/, and no key or certificate files."""
    for path in (ROOT / "deploy").rglob("*"):
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        assert "PRIVATE KEY-----" not in text, path
        assert not path.name.endswith((".key", ".pem", ".crt")), path
        if path.suffix in (".yaml", ".yml"):
            for doc in yaml.safe_load_all(text):
                if isinstance(doc, dict):
                    assert doc.get("kind") != "Secret", path
    for name in ("base", *[f"overlays/{o}" for o in OVERLAYS]):
        kustomization = yaml.safe_load((K8S / name / "kustomization.yaml").read_text())
        assert "secretGenerator" not in kustomization, name


def test_every_referenced_secret_is_documented(rendered) -> None:
    """Each Secret the manifests name has its `kubectl create secret` line in docs/deploy.md."""
    doc = (ROOT / "docs" / "deploy.md").read_text()
    created = set(re.findall(r"kubectl (?:-n \S+ )?create secret \w+ (\S+)", doc))
    for overlay, objs in rendered.items():
        referenced: set[str] = set()
        for obj in objs:
            if obj["kind"] == "Ingress":
                referenced |= {t["secretName"] for t in obj["spec"].get("tls", [])}
            if obj["kind"] not in WORKLOADS:
                continue
            for vol in pod_spec(obj).get("volumes", []):
                if "secret" in vol:
                    referenced.add(vol["secret"]["secretName"])
            for c in containers(obj):
                for env in c.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        referenced.add(ref["name"])
        assert referenced, overlay
        assert referenced <= created, (overlay, referenced - created)


def _policy(objs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return find(objs, "NetworkPolicy", name)["spec"]


def test_production_network_policies(rendered) -> None:
    objs = rendered["production"]
    deny = _policy(objs, "edgefl-default-deny")
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"]
    assert "ingress" not in deny

    def components(rule: dict[str, Any]) -> set[str]:
        return {
            p["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
            for p in rule.get("from", [])
            if "podSelector" in p
        }

    broker = _policy(objs, "edgefl-broker")["ingress"]
    by_port = {r["ports"][0]["port"]: r for r in broker}
    assert set(by_port) == {8883, 1883}  # no plain listener for devices
    assert "from" not in by_port[8883]  # devices: from anywhere, TLS only
    assert components(by_port[1883]) == {"controller", "combiner"}
    (api,) = _policy(objs, "edgefl-api")["ingress"]
    assert api["from"] == [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    ]
    (pg,) = _policy(objs, "edgefl-postgres")["ingress"]
    assert components(pg) == {"controller", "api"} and pg["ports"][0]["port"] == 5432
    (influx,) = _policy(objs, "edgefl-influxdb")["ingress"]
    assert components(influx) == {"controller"}
    # every policy selects pods that exist
    labels = [pod_spec_labels(o) for o in objs if o["kind"] in WORKLOADS]
    for pol in (o for o in objs if o["kind"] == "NetworkPolicy"):
        sel = pol["spec"]["podSelector"].get("matchLabels", {})
        assert any(sel.items() <= lab.items() for lab in labels), pol["metadata"]["name"]


def pod_spec_labels(obj: dict[str, Any]) -> dict[str, str]:
    return obj["spec"]["template"]["metadata"]["labels"]


def test_production_exposes_devices_only_to_tls(rendered) -> None:
    objs = rendered["production"]
    svc = find(objs, "Service", "edgefl-broker-devices")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert [p["port"] for p in svc["spec"]["ports"]] == [8883]
    assert find(objs, "Service", "edgefl-broker")["spec"].get("type", "ClusterIP") == "ClusterIP"
    conf = next(
        o
        for o in objs
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("edgefl-mosquitto")
    )["data"]["mosquitto.conf"]
    assert listeners(conf) == {
        "1883": [],
        "8883": ["cafile", "certfile", "keyfile", "tls_version", "use_username_as_clientid"],
    }
    ingress = find(objs, "Ingress", "edgefl-api")
    assert ingress["spec"]["tls"][0]["secretName"] == "edgefl-api-tls"


def test_lab_is_single_replica_without_tls(rendered) -> None:
    """One of everything on the lab's node, except the combiner pools: they keep the base's
    members, so a lab shows a pool at work (and a member's death) as production has it."""
    objs = rendered["lab"]
    for obj in objs:
        if obj["kind"] in WORKLOADS and not is_combiner(obj):
            assert obj["spec"]["replicas"] == 1, obj["metadata"]["name"]
    assert pool_violations(objs) == []
    conf = next(
        o
        for o in objs
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("edgefl-mosquitto")
    )["data"]["mosquitto.conf"]
    assert listeners(conf) == {"1883": [], "1884": ["use_username_as_clientid"]}


# -- combiner pools -----------------------------------------------------------------------

REGIONS = {"region-0", "region-1"}


def is_combiner(obj: dict[str, Any]) -> bool:
    return (
        obj["kind"] in WORKLOADS
        and pod_spec_labels(obj).get("app.kubernetes.io/component") == "combiner"
    )


def arg(args: list[str], flag: str) -> str | None:
    return args[args.index(flag) + 1] if flag in args else None


def pool_violations(objs: list[dict[str, Any]]) -> list[str]:
    """How the combiners stray from one pool per region; empty when they do not.

    A pool member's name is its MQTT client id suffix and its persistent session: it must be
    unique in the region and survive restarts, hence a StatefulSet's pod name. A single
    combiner (no --pool-member) never serves a region next to a pool.
    """
    bad: list[str] = []
    services = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Service"}
    regions: list[str] = []
    for obj in (o for o in objs if is_combiner(o)):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        spec = obj["spec"]
        labels = pod_spec_labels(obj)
        region = labels.get("edgefl.io/region", "")
        regions.append(region)
        if obj["kind"] != "StatefulSet":
            bad.append(f"{where}: not a StatefulSet (member names would not be stable)")
            continue
        if obj["metadata"]["name"] != f"edgefl-combiner-{region}":
            bad.append(f"{where}: not named after its region {region!r}")
        if spec.get("replicas", 1) < 2:
            bad.append(f"{where}: fewer than 2 members")
        if spec.get("podManagementPolicy") != "Parallel":
            bad.append(f"{where}: members not managed in parallel")
        selector = spec["selector"]["matchLabels"]
        if selector.get("edgefl.io/region") != region or not selector.items() <= labels.items():
            bad.append(f"{where}: selector does not pick exactly its region's pods")
        svc = services.get(spec.get("serviceName", ""))
        if svc is None or svc["spec"].get("clusterIP") != "None":
            bad.append(f"{where}: serviceName is not a headless Service")
        elif not svc["spec"].get("selector", {}).items() <= labels.items():
            bad.append(f"{where}: its Service selects other pods")
        (c,) = pod_spec(obj)["containers"]
        args = c["args"]
        if args[0] != "combiner" or arg(args, "--region") != region:
            bad.append(f"{where}: --region is not {region!r}")
        env = {e["name"]: e for e in c.get("env", [])}
        member = arg(args, "--pool-member") or ""
        ref = re.fullmatch(r"\$\((\w+)\)", member)
        field = env.get(ref.group(1), {}) if ref else {}
        if field.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "metadata.name":
            bad.append(f"{where}: --pool-member {member!r} is not the pod name (downward API)")
        # pod names are NAME-0, NAME-1, ...: each must be a valid topic level, the member's
        # status topic is edgefl/v1/{project}/{region}/comb/pool/{member}/status
        try:
            check_segment("combiner", f"{obj['metadata']['name']}-{spec.get('replicas', 1) - 1}")
        except TopicError as exc:
            bad.append(f"{where}: {exc}")
        # the shared region login comes from the mounted Secret, never from the manifest
        if "--insecure" in args or "--token" in args or any("value" in e for e in env.values()):
            bad.append(f"{where}: credentials or insecure mode in the manifest")
        logins = arg(args, "--logins")
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        vols = {v["name"]: v for v in pod_spec(obj).get("volumes", [])}
        secret = vols.get(mounts.get(logins or "", ""), {}).get("secret", {}).get("secretName")
        if secret != "edgefl-logins":
            bad.append(f"{where}: --logins is not the edgefl-logins Secret")
    if sorted(regions) != sorted(REGIONS):
        bad.append(
            f"combiners for regions {sorted(regions)}, expected one for each of {sorted(REGIONS)}"
        )
    return bad


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_combiners_are_one_pool_per_region(rendered, overlay) -> None:
    objs = rendered[overlay]
    assert pool_violations(objs) == []
    pools = [o for o in objs if is_combiner(o)]
    assert {o["metadata"]["name"] for o in pools} == {f"edgefl-combiner-{r}" for r in REGIONS}
    assert all(o["spec"]["replicas"] == 2 for o in pools)


def test_the_pool_check_catches_each_violation(rendered) -> None:
    base = rendered["production"]

    def mutated(change) -> list[str]:
        objs = copy.deepcopy(base)
        change(find(objs, "StatefulSet", "edgefl-combiner-region-0"), objs)
        return pool_violations(objs)

    def deployment(o, _):
        o["kind"] = "Deployment"

    def one(o, _):
        o["spec"]["replicas"] = 1

    def ordered(o, _):
        del o["spec"]["podManagementPolicy"]

    def fixed_name(o, _):
        args = pod_spec(o)["containers"][0]["args"]
        args[args.index("--pool-member") + 1] = "member-a"

    def node_name(o, _):
        env = pod_spec(o)["containers"][0]["env"]
        env[0]["valueFrom"]["fieldRef"]["fieldPath"] = "spec.nodeName"

    def single(o, _):
        args = pod_spec(o)["containers"][0]["args"]
        del args[args.index("--pool-member") : args.index("--pool-member") + 2]

    def other_region(o, _):
        args = pod_spec(o)["containers"][0]["args"]
        args[args.index("--region") + 1] = "region-1"

    def wide_selector(o, _):
        del o["spec"]["selector"]["matchLabels"]["edgefl.io/region"]

    def no_service(o, objs):
        objs.remove(find(objs, "Service", o["spec"]["serviceName"]))

    def baked_token(o, _):
        pod_spec(o)["containers"][0]["env"].append({"name": "EDGEFL_TOKEN", "value": "eyJ..."})

    def long_region(o, _):
        o["metadata"]["name"] = "edgefl-combiner-" + "r" * 60
        pod_spec_labels(o)["edgefl.io/region"] = "r" * 60

    def extra(_, objs):
        objs.append(copy.deepcopy(find(objs, "StatefulSet", "edgefl-combiner-region-1")))

    expected = {
        deployment: "not a StatefulSet",
        one: "fewer than 2 members",
        ordered: "not managed in parallel",
        fixed_name: "is not the pod name",
        node_name: "is not the pod name",
        single: "is not the pod name",
        other_region: "--region is not 'region-0'",
        wide_selector: "selector does not pick exactly",
        no_service: "not a headless Service",
        baked_token: "credentials or insecure mode",
        long_region: "invalid combiner",
        extra: "expected one for each",
    }
    for change, message in expected.items():
        found = mutated(change)
        assert any(message in v for v in found), (change.__name__, found)


def test_production_evicts_one_member_of_a_pool_at_a_time(rendered) -> None:
    objs = rendered["production"]
    budgets = [o for o in objs if o["kind"] == "PodDisruptionBudget"]
    for pool in (o for o in objs if is_combiner(o)):
        labels = pod_spec_labels(pool)
        (pdb,) = [
            b for b in budgets if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert pdb["spec"]["maxUnavailable"] == 1 and "minAvailable" not in pdb["spec"]
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert sel["edgefl.io/region"] == labels["edgefl.io/region"]
        assert sel["app.kubernetes.io/component"] == "combiner"
    assert len(budgets) == len(REGIONS)


# -- the broker configs stay the shipped ones ---------------------------------------------

# The lines a pod's config may differ in from broker_config/: listeners, the TLS block (paths
# of the pod) and file locations. Everything else must be the shipped directive, same value.
POD_SPECIFIC = {
    "listener",
    "cafile",
    "certfile",
    "keyfile",
    "tls_version",
    "use_username_as_clientid",
    "password_file",
    "acl_file",
    "persistence_location",
}


def directives(conf: str) -> list[tuple[str, str]]:
    out = []
    for line in conf.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            key, _, value = line.partition(" ")
            out.append((key, " ".join(value.split())))
    return out


def listeners(conf: str) -> dict[str, list[str]]:
    """Each listener's port and the per-listener options that follow it."""
    found: dict[str, list[str]] = {}
    current = None
    for key, value in directives(conf):
        if key == "listener":
            current = value.split()[0]
            found[current] = []
        elif key in POD_SPECIFIC - {"password_file", "acl_file", "persistence_location"}:
            assert current is not None
            found[current].append(key)
    return found


@pytest.mark.parametrize(
    ("ours", "shipped"),
    [
        ("base/mosquitto.conf", "mosquitto.conf"),
        ("overlays/lab/mosquitto.conf", "mosquitto.conf"),
        ("overlays/production/mosquitto.conf", "mosquitto-tls.conf"),
    ],
)
def test_broker_config_matches_the_shipped_one(ours, shipped) -> None:
    mine = [d for d in directives((K8S / ours).read_text()) if d[0] not in POD_SPECIFIC]
    theirs = [
        d
        for d in directives((ROOT / "broker_config" / shipped).read_text())
        if d[0] not in POD_SPECIFIC
    ]
    assert mine == theirs
    paths = dict(directives((K8S / ours).read_text()))
    assert paths["password_file"] == "/mosquitto/auth/passwd"
    assert paths["persistence_location"] == "/mosquitto/data/"
