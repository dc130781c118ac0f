"""Topic permissions, derived from the topic tree and a client's claims.

device      publish:   edgefl/v1/{p}/{its region}/dev/{itself}/{update|status|telemetry}
            subscribe: edgefl/v1/{p}/{its region}/dev/{itself}/task
                       edgefl/v1/{p}/model/{version}/+ (or one chunk); never a wildcard version
combiner    publish/subscribe under edgefl/v1/{p}/{its region}/#  (every region if it has none)
            subscribe: edgefl/v1/{p}/model/#
controller, admin:  anything under edgefl/v1/{p}/#
operator, viewer:   subscribe only, under edgefl/v1/{p}/#

Everything else is denied: other projects, ``$SYS``, wildcards in a published topic, and
``$share/<group>/<filter>`` for devices (for the others the inner filter is checked).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from edgefl.auth.tokens import Claims, Role
from edgefl.protocol.topics import ROOT, TopicError, check_segment

DEVICE_PUBLISH = ("update", "status", "telemetry", "request")
# first levels under a project that are not regions (see protocol/topics.py)
NON_REGION = ("model", "ctl")
_CHUNK_INDEX = re.compile(r"^[0-9]+$")
SHARE_ROLES = (Role.combiner, Role.controller, Role.admin)


def _is_segment(value: object) -> bool:
    try:
        check_segment("name", value)
    except TopicError:
        return False
    return True


def _covered(pattern: list[str], topic: list[str]) -> bool:
    """Is every topic the filter ``topic`` can match also matched by ``pattern``?"""
    for i, p in enumerate(pattern):
        if p == "#":
            return True
        if i >= len(topic):
            return False
        t = topic[i]
        if t == "#":
            return False
        if p != "+" and (t == "+" or p != t):
            return False
    return len(topic) == len(pattern)


def _claims_usable(claims: Claims) -> bool:
    """Claims become topic levels: a '+' or '#' in them would widen every rule."""
    names = [claims.project] + ([claims.region] if claims.region is not None else [])
    if claims.role is Role.device:
        names.append(claims.subject)
        if claims.region is None:
            return False
    return all(_is_segment(n) for n in names)


def allowed(claims: Claims, topic: str, action: str) -> bool:
    """May the holder of ``claims`` publish to / subscribe to ``topic``?

    ``action`` is ``"publish"`` or ``"subscribe"`` (delivery is checked as subscribe). Fails
    closed: anything not matched by a rule, including claims whose names are not valid topic
    segments, is denied. Pure and thread-safe; it never raises for untrusted input.
    """
    if action not in ("publish", "subscribe") or not topic or not _claims_usable(claims):
        return False
    if topic.startswith("$share/"):
        parts = topic.split("/", 2)
        if (
            action != "subscribe"
            or len(parts) < 3
            or not _is_segment(parts[1])
            or claims.role not in SHARE_ROLES
        ):
            return False
        topic = parts[2]
    if topic.startswith("$"):
        return False
    if action == "publish" and ("+" in topic or "#" in topic):
        return False
    levels = topic.split("/")
    base = f"{ROOT}/{claims.project}".split("/")
    if levels[: len(base)] != base or len(levels) <= len(base):
        return False
    rest = levels[len(base) :]
    role = claims.role
    if role in (Role.controller, Role.admin):
        return True
    if role in (Role.operator, Role.viewer):
        return action == "subscribe"
    if role is Role.combiner:
        return _combiner(claims, rest, action)
    if role is Role.device:
        return _device(claims, rest, action)
    return False


def _combiner(claims: Claims, rest: list[str], action: str) -> bool:
    if action == "subscribe":
        if _covered(["model", "#"], rest):
            return True
        if claims.region is None:
            # every region: reading the rest of the project (model, controller status) is
            # harmless, and a filter like '+/dev/+/update' must be allowed
            return True
        return _covered([claims.region, "#"], rest)
    # publish: a concrete topic in a region subtree, never the model or controller subtrees
    if rest[0] in NON_REGION or len(rest) < 2:
        return False
    return claims.region is None or rest[0] == claims.region


def _device(claims: Claims, rest: list[str], action: str) -> bool:
    own = [claims.region, "dev", claims.subject]
    if action == "publish":
        return len(rest) == 4 and rest[:3] == own and rest[3] in DEVICE_PUBLISH
    if rest == [*own, "task"]:
        return True
    # one model version's chunks; never a wildcard version (no browsing other models)
    return (
        len(rest) == 3
        and rest[0] == "model"
        and _is_segment(rest[1])
        and (rest[2] == "+" or bool(_CHUNK_INDEX.match(rest[2])))
    )


def client_id_allowed(claims: Claims, client_id: str | None) -> bool:
    """May the holder of ``claims`` connect with this MQTT client id?

    The client id names the persistent session, so it is bound to the identity, as
    Mosquitto's ``use_username_as_clientid`` does on the device listener:

    - a device: its subject, or ``edgefl-{project}-{subject}`` (the id protocol v1 gives
      the agent), nothing else;
    - a service or a person: the same two, or ``edgefl-{project}-{subject}-{suffix}``
      (several controllers share the ``controller`` account, each with an instance suffix).

    The broker also refuses a client id that a session of another identity holds, so even
    a name that fits two identities (a device called ``controller-x``) cannot be taken over.
    """
    if not client_id:
        return False
    prefix = f"edgefl-{claims.project}-{claims.subject}"
    if client_id in (claims.subject, prefix):
        return True
    if claims.role is Role.device:
        return False
    return client_id.startswith(prefix + "-") and len(client_id) > len(prefix) + 1


def mosquitto_acl_lines(project: str) -> str:
    """The lab template for a Mosquitto ``acl_file``: server accounts only, no device lines.

    Mosquitto ``pattern`` lines know only ``%u`` and ``%c``, not the region claim, so a
    pattern for devices would let a device publish as itself under *any* region. Devices
    therefore get no lines here: ``edgefl fleet provision`` writes one block per device,
    region included (``mosquitto_fleet_acl``). Raises ``TopicError`` for a project name that
    is not a valid topic segment.
    """
    check_segment("project", project)
    base = f"{ROOT}/{project}"
    lines = [
        f"# edgefl protocol v1 ACL for project '{project}' (generated by edgefl.auth.acl)",
        "# LAB TEMPLATE: server accounts only. Devices get no lines here: a Mosquitto pattern",
        "# cannot bind a device to its region. Provision devices with 'edgefl fleet provision',",
        "# which writes this file with one 'user' block per device (see README.md).",
        "",
        *_mosquitto_server_blocks(project, ["region-0"]),
        "# operators and viewers read only, e.g.:",
        "# user alice",
        f"# topic read {base}/#",
        "",
    ]
    return "\n".join(lines)


def _mosquitto_server_blocks(project: str, regions: Iterable[str]) -> list[str]:
    """The controller's and each regional combiner's ``user`` blocks (usernames as in deploy)."""
    base = f"{ROOT}/{project}"
    lines = ["user controller", f"topic readwrite {base}/#", ""]
    for region in sorted(set(regions)):
        check_segment("region", region)
        lines += [
            f"user combiner-{region}",
            f"topic readwrite {base}/{region}/#",
            f"topic read {base}/model/#",
            "",
        ]
    return lines


def mosquitto_device_block(project: str, region: str, device: str) -> str:
    """One device's Mosquitto ``user`` block: ``allowed()``'s device rules, region included.

    Every topic is concrete except the model chunks (``model/+/+``, read only): Mosquitto
    checks reads at delivery, so that grants exactly the chunks ``allowed()`` lets a device
    subscribe to. No ``pattern`` line may sit in the same file, or it would apply to every
    user on top of these blocks. Raises ``TopicError`` for a name that is not a topic segment.
    """
    check_segment("project", project)
    check_segment("region", region)
    check_segment("device id", device)
    own = f"{ROOT}/{project}/{region}/dev/{device}"
    return "\n".join(
        [
            f"user {device}",
            *(f"topic write {own}/{ch}" for ch in DEVICE_PUBLISH),
            f"topic read {own}/task",
            f"topic read {ROOT}/{project}/model/+/+",
            "",
        ]
    )


def mosquitto_fleet_acl(project: str, devices: Iterable[tuple[str, str]]) -> str:
    """A whole Mosquitto ``acl_file`` for a provisioned fleet: servers, then one block per device.

    ``devices`` yields ``(region, device_id)``; every region seen gets a ``combiner-{region}``
    block. There are no ``pattern`` lines, so a device can publish only under its own region
    and id. Raises ``TopicError`` for an invalid name and ``ValueError`` for a device id used
    twice or one that collides with a server account.
    """
    check_segment("project", project)
    pairs = list(devices)
    regions = {region for region, _ in pairs}
    servers = {"controller", *(f"combiner-{r}" for r in regions)}
    seen: set[str] = set()
    blocks: list[str] = []
    for region, device in pairs:
        if device in seen:
            raise ValueError(f"device id {device!r} appears twice in the fleet ACL")
        if device in servers:
            raise ValueError(f"device id {device!r} collides with a server account name")
        seen.add(device)
        blocks.append(mosquitto_device_block(project, region, device))
    head = [
        f"# edgefl fleet ACL for project '{project}' (generated by edgefl fleet provision;",
        "# do not edit: re-run provisioning). No 'pattern' lines: each device has its block.",
        "",
        *_mosquitto_server_blocks(project, regions),
        f"# devices ({len(blocks)})",
    ]
    return "\n".join(head) + "\n" + "\n".join(blocks)
