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
        "edgefl-controller", "edgefl-api", "edgefl-combiner-region-0",
        "edgefl-combiner-region-1", "edgefl-broker", "edgefl-postgres", "edgefl-influxdb",
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
        objs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"},
                     "data": {"password": "aHVudGVyMg=="}})

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
        return {p["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                for p in rule.get("from", []) if "podSelector" in p}

    broker = _policy(objs, "edgefl-broker")["ingress"]
    by_port = {r["ports"][0]["port"]: r for r in broker}
    assert set(by_port) == {8883, 1883}  # no plain listener for devices
    assert "from" not in by_port[8883]  # devices: from anywhere, TLS only
    assert components(by_port[1883]) == {"controller", "combiner"}
    (api,) = _policy(objs, "edgefl-api")["ingress"]
    assert api["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "ingress-nginx"}}}]
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
    conf = next(o for o in objs if o["kind"] == "ConfigMap"
                and o["metadata"]["name"].startswith("edgefl-mosquitto"))["data"]["mosquitto.conf"]
    assert listeners(conf) == {"1883": [], "8883": [
        "cafile", "certfile", "keyfile", "tls_version", "use_username_as_clientid"]}
    ingress = find(objs, "Ingress", "edgefl-api")
    assert ingress["spec"]["tls"][0]["secretName"] == "edgefl-api-tls"


def test_lab_is_single_replica_without_tls(rendered) -> None:
    objs = rendered["lab"]
    for obj in objs:
        if obj["kind"] in WORKLOADS:
            assert obj["spec"]["replicas"] == 1, obj["metadata"]["name"]
    conf = next(o for o in objs if o["kind"] == "ConfigMap"
                and o["metadata"]["name"].startswith("edgefl-mosquitto"))["data"]["mosquitto.conf"]
    assert listeners(conf) == {"1883": [], "1884": ["use_username_as_clientid"]}


def test_combiners_are_one_per_region_and_never_two_at_once(rendered) -> None:
    for objs in rendered.values():
        combiners = [o for o in objs if o["kind"] == "Deployment"
                     and o["metadata"]["name"].startswith("edgefl-combiner-")]
        for c in combiners:
            region = c["metadata"]["name"].removeprefix("edgefl-combiner-")
            assert c["spec"]["replicas"] == 1 and c["spec"]["strategy"]["type"] == "Recreate"
            args = pod_spec(c)["containers"][0]["args"]
            assert args[args.index("--region") + 1] == region


# -- the broker configs stay the shipped ones ---------------------------------------------

# The lines a pod's config may differ in from broker_config/: listeners, the TLS block (paths
# of the pod) and file locations. Everything else must be the shipped directive, same value.
POD_SPECIFIC = {"listener", "cafile", "certfile", "keyfile", "tls_version",
                "use_username_as_clientid", "password_file", "acl_file", "persistence_location"}


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


@pytest.mark.parametrize(("ours", "shipped"), [
    ("base/mosquitto.conf", "mosquitto.conf"),
    ("overlays/lab/mosquitto.conf", "mosquitto.conf"),
    ("overlays/production/mosquitto.conf", "mosquitto-tls.conf"),
])
def test_broker_config_matches_the_shipped_one(ours, shipped) -> None:
    mine = [d for d in directives((K8S / ours).read_text()) if d[0] not in POD_SPECIFIC]
    theirs = [d for d in directives((ROOT / "broker_config" / shipped).read_text())
              if d[0] not in POD_SPECIFIC]
    assert mine == theirs
    paths = dict(directives((K8S / ours).read_text()))
    assert paths["password_file"] == "/mosquitto/auth/passwd"
    assert paths["persistence_location"] == "/mosquitto/data/"
