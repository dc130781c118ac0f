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


def mosquitto_acl_lines(project: str) -> str:
    """The same rules as a Mosquitto ``acl_file`` (``%u`` is the username = device id).

    Mosquitto cannot see the region claim, so device patterns use ``+`` for the region; a
    device still can publish only as itself. Mosquitto checks reads when it delivers a
    message, so ``model/+/+`` gives the same result as the "no wildcard version" rule.
    Raises ``TopicError`` for a project name that is not a valid topic segment.
    """
    check_segment("project", project)
    base = f"{ROOT}/{project}"
    lines = [
        f"# edgefl protocol v1 ACL for project '{project}' (generated by edgefl.auth.acl)",
        "# devices: username = device id",
        *(f"pattern write {base}/+/dev/%u/{ch}" for ch in DEVICE_PUBLISH),
        f"pattern read {base}/+/dev/%u/task",
        f"pattern read {base}/model/+/+",
        "",
        "# server components (add one 'user' block per combiner/controller account)",
        "user controller",
        f"topic readwrite {base}/#",
        "",
        "user combiner-region-0",
        f"topic readwrite {base}/region-0/#",
        f"topic read {base}/model/#",
        "",
        "# operators and viewers read only, e.g.:",
        "# user alice",
        f"# topic read {base}/#",
        "",
    ]
    return "\n".join(lines)
