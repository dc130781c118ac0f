"""Combiner pools: several combiners serve one region, and the merge stays exact.

The controller deals each region's devices out over the pool's online members, every member
receives only its own devices' updates, and each member's partial is checked against its
share. The digits task is bit-reproducible, so a pool must give the single-process reference
accuracies, also when a member dies in the middle of a round (the round is retried on the
survivors: nothing lost, nothing counted twice).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from edgefl.auth.tokens import Role
from edgefl.combiner import Combiner, CombinerConfig
from edgefl.tasks import digits
from tests.harness import Deployment, completed_accuracies


def _participation(rounds: list[Any]) -> None:
    """Every completed round took all 10 devices exactly once."""
    for rec in rounds:
        if rec.status != "completed":
            continue
        devices = [p["device"] for p in rec.participants]
        assert len(devices) == 10 and len(set(devices)) == 10, devices


def test_pool_of_two_reproduces_the_reference(deployment) -> None:
    members = deployment.start_combiners(["region-0"], pool=2)
    deployment.start_fleet(10)
    ctl = deployment.controller()
    _, rounds = deployment.run_session(ctl, rounds=20, min_devices=10, round_timeout_s=30)
    accs = completed_accuracies(rounds)
    assert len(accs) == 20
    assert accs == pytest.approx(digits.reference_run(10, 20), abs=1e-9)
    assert abs(accs[-1] - 0.938889) <= 0.003
    _participation(rounds)
    # the work was shared: each member took half of every round's updates
    assert [m.stats["accepted"] for m in members] == [100, 100]
    assert sum(m.stats["partials"] for m in members) == 40
    assert all(m.stats["rejected"] == 0 for m in members)
    # the fleet state lists each member with its own counts
    ctl.fleet.flush()
    rows = ctl.store.list_combiners(deployment.project)
    assert [(c.combiner, c.state, c.accepted) for c in rows] == [
        ("combiner-region-0-0", "online", 100),
        ("combiner-region-0-1", "online", 100),
    ]


class CrashingCombiner(Combiner):
    """A pool member that dies, as a killed process would, after accepting its first update
    of round ``crash_round``: the socket is cut without DISCONNECT (the broker publishes its
    will) and nothing more leaves it, so the updates it folded are lost with it."""

    crash_round = 3

    def __init__(self, config: CombinerConfig) -> None:
        super().__init__(config)
        self.crashed_with = -1

    def _accept(self, device: str, payload: Any, meta: dict[str, Any], digest: bytes) -> None:
        super()._accept(device, payload, meta, digest)
        rnd = self._round
        if self.crashed_with < 0 and rnd is not None and rnd.plan["round"] == self.crash_round:
            self.crashed_with = rnd.acc.count
            self.conn.client.loop_stop()
            self.conn.drop()
            self._stopping.set()  # the worker drops whatever else is queued


def test_a_member_killed_mid_round_costs_a_retry_not_the_result(broker_url, tmp_path) -> None:
    dep = Deployment(broker_url, tmp_path)
    try:
        region = "region-0"
        login = dep.credentials.login(f"combiner-{region}", Role.combiner, region)
        victim = CrashingCombiner(
            CombinerConfig(
                dep.region_url(region),
                project=dep.project,
                region=region,
                combiner_id=f"combiner-{region}-0",
                pool=True,
                **login,
            )
        ).start()
        dep.regions.append(region)
        survivor = dep.start_combiners([region], pool=1, members=[f"combiner-{region}-1"])[0]
        dep.regions.remove(region)  # start_combiners added it again
        dep.start_fleet(10)
        ctl = dep.controller()
        t0 = time.time()
        _, rounds = dep.run_session(ctl, rounds=6, min_devices=10, round_timeout_s=30)
        took = time.time() - t0
        victim.stop()
    finally:
        dep.close()
    assert victim.crashed_with >= 1, "the victim never crashed mid-round"
    accs = completed_accuracies(rounds)
    assert accs == pytest.approx(digits.reference_run(10, 20)[:6], abs=1e-9)
    _participation(rounds)
    # round 3 failed its first attempt (half the updates died with the victim) and was
    # retried on the survivor alone, which took every device from then on
    third = [r for r in rounds if r.round == 3]
    assert [r.status for r in third] == ["failed", "completed"]
    assert "quorum not met" in third[0].reason
    assert survivor.stats["accepted"] == 5 * 2 + 5 + 10 * 4  # rounds 1-2, 3a, 3b-6
    assert took < 60, "the controller waited out the deadline for the dead member"
