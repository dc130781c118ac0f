"""Topic permissions per role (edgefl.auth.acl) and the Mosquitto rendering of them."""

from __future__ import annotations

import pytest

from edgefl.auth.acl import allowed, client_id_allowed, mosquitto_acl_lines
from edgefl.auth.tokens import Claims, Role

B = "edgefl/v1/p"


def claims(role: Role, sub: str = "d1", region: str | None = "r1", project: str = "p") -> Claims:
    return Claims(sub, role, project, region, 0.0)


@pytest.mark.parametrize(
    ("topic", "action", "ok"),
    [
        (f"{B}/r1/dev/d1/update", "publish", True),
        (f"{B}/r1/dev/d1/status", "publish", True),
        (f"{B}/r1/dev/d1/telemetry", "publish", True),
        (f"{B}/r1/dev/d1/task", "publish", False),
        (f"{B}/r1/dev/d2/update", "publish", False),
        (f"{B}/r2/dev/d1/update", "publish", False),
        (f"{B}/r1/dev/+/update", "publish", False),
        (f"{B}/r1/dev/d1/task", "subscribe", True),
        (f"{B}/r1/dev/+/task", "subscribe", False),
        (f"{B}/r1/dev/d1/update", "subscribe", False),
        (f"{B}/model/v7/+", "subscribe", True),
        (f"{B}/model/v7/3", "subscribe", True),
        (f"{B}/model/+/+", "subscribe", False),
        (f"{B}/model/#", "subscribe", False),
        (f"{B}/r1/comb/round", "subscribe", False),
        ("edgefl/v1/other/r1/dev/d1/update", "publish", False),
        ("$SYS/broker/uptime", "subscribe", False),
        (f"$share/g/{B}/r1/dev/d1/task", "subscribe", False),
        (f"{B}/model/v7/#", "subscribe", False),
        (f"{B}/model/v7/²", "subscribe", False),
        (f"{B}/model/v7/3", "publish", False),
        (f"{B}/ctl/status", "subscribe", False),
        ("#", "subscribe", False),
        ("edgefl/v1/+/r1/dev/d1/task", "subscribe", False),
        (f"{B}/r1/dev/d1/update", "delete", False),
        ("", "publish", False),
    ],
)
def test_device_rules(topic: str, action: str, ok: bool) -> None:
    assert allowed(claims(Role.device), topic, action) is ok


def test_combiner_rules() -> None:
    c = claims(Role.combiner, "combiner-r1")
    assert allowed(c, f"{B}/r1/dev/+/update", "subscribe")
    assert allowed(c, f"{B}/r1/dev/d9/task", "publish")
    assert allowed(c, f"{B}/r1/comb/partial", "publish")
    assert allowed(c, f"$share/combiners/{B}/r1/dev/+/update", "subscribe")
    assert allowed(c, f"{B}/model/#", "subscribe")
    assert not allowed(c, f"{B}/r2/dev/+/update", "subscribe")
    assert not allowed(c, f"{B}/#", "subscribe")
    assert not allowed(c, f"{B}/model/v1/0", "publish")
    assert not allowed(c, f"{B}/+/dev/+/update", "subscribe")
    assert not allowed(c, f"{B}/ctl/status", "publish")
    assert not allowed(c, f"{B}/r1/comb/+", "publish")  # never a wildcard in a publish
    assert not allowed(c, f"$share/g/{B}/r1/comb/round", "publish")
    assert not allowed(c, f"$share//{B}/r1/dev/+/update", "subscribe")
    assert not allowed(c, "edgefl/v1/q/r1/dev/+/update", "subscribe")
    anywhere = claims(Role.combiner, "combiner-all", region=None)
    assert allowed(anywhere, f"{B}/r7/dev/+/update", "subscribe")
    assert allowed(anywhere, f"{B}/+/dev/+/update", "subscribe")
    assert allowed(anywhere, f"{B}/r7/dev/d1/task", "publish")
    assert allowed(anywhere, f"{B}/r7/comb/partial", "publish")
    # "every region" does not include the model and controller subtrees
    assert not allowed(anywhere, f"{B}/model/v1/0", "publish")
    assert not allowed(anywhere, f"{B}/ctl/status", "publish")


def test_wildcards_in_claims_never_widen_rules() -> None:
    """Claims become topic levels; a '+' or '#' in them must deny, not match everything."""
    assert not allowed(claims(Role.device, sub="+"), f"{B}/r1/dev/+/task", "subscribe")
    assert not allowed(claims(Role.device, region="#"), f"{B}/#", "subscribe")
    assert not allowed(claims(Role.device, region=None), f"{B}/r1/dev/d1/update", "publish")
    assert not allowed(claims(Role.combiner, region="#"), f"{B}/r1/dev/+/update", "subscribe")
    assert not allowed(claims(Role.controller, project="+"), "edgefl/v1/+/#", "subscribe")
    assert not allowed(claims(Role.controller, project="#"), "edgefl/v1/#", "subscribe")


def test_server_and_operator_roles() -> None:
    for role in (Role.controller, Role.admin):
        assert allowed(claims(role), f"{B}/model/v1/0", "publish")
        assert allowed(claims(role), f"{B}/#", "subscribe")
        assert not allowed(claims(role), "edgefl/v1/q/#", "subscribe")
        assert not allowed(claims(role), f"{B}/+/comb/round", "publish")
        assert not allowed(claims(role), "$SYS/#", "subscribe")
        assert allowed(claims(role), f"$share/ctl/{B}/+/comb/partial", "subscribe")
    for role in (Role.operator, Role.viewer):
        assert allowed(claims(role), f"{B}/#", "subscribe")
        assert not allowed(claims(role), f"{B}/r1/comb/round", "publish")
        assert not allowed(claims(role), f"{B}/r1/dev/d1/task", "publish")
        assert not allowed(claims(role), f"$share/g/{B}/#", "subscribe")
        assert not allowed(claims(role), "edgefl/v1/q/#", "subscribe")
    assert not allowed(claims(Role.controller), f"{B}/x", "delete")


def test_lab_template_has_no_device_lines() -> None:
    """A Mosquitto pattern cannot bind a device to its region, so the template has none."""
    text = mosquitto_acl_lines("p")
    assert not [line for line in text.splitlines() if line.startswith("pattern")]
    assert "%u" not in text and "/+/dev/" not in text
    assert f"user controller\ntopic readwrite {B}/#" in text
    assert f"user combiner-region-0\ntopic readwrite {B}/region-0/#" in text
    assert "edgefl fleet provision" in text
    with pytest.raises(ValueError):
        mosquitto_acl_lines("a/#")


def test_client_id_binding() -> None:
    dev = claims(Role.device)
    assert client_id_allowed(dev, "d1") and client_id_allowed(dev, "edgefl-p-d1")
    for bad in ("", None, "d2", "edgefl-p-d1-x", "edgefl-q-d1", "edgefl-p-d", "d1-x"):
        assert not client_id_allowed(dev, bad), bad
    ctl = Claims("controller", Role.controller, "p", None, 0.0)
    assert client_id_allowed(ctl, "edgefl-p-controller-1a2b3c4d")
    assert client_id_allowed(ctl, "controller")
    for bad in (
        "edgefl-p-controller-",
        "edgefl-p-d1",
        "ctl",
        "controller-x",
        "edgefl-q-controller",
    ):
        assert not client_id_allowed(ctl, bad), bad
