"""FedBuff (asynchronous sessions): the staleness weighting, the window, and a digits session
where 30% of the devices answer rounds late (docs/algorithms.md, FedBuff)."""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import numpy as np
import pytest

from device_agent.trainers.base import CallableTrainer, TrainTask
from device_agent.trainers.numpy_trainer import NumpyTrainer
from edgefl.aggregation.compressed import add_global, fold_delta
from edgefl.aggregation.fedbuff import AsyncSettings, staleness_weight
from edgefl.aggregation.weighted_sum import WeightedSum
from edgefl.combiner.fedbuff import Base, Window
from edgefl.controller import SessionConfig
from edgefl.fleet.simulate import device_name
from edgefl.protocol.compression import decode_delta, encode_delta
from edgefl.protocol.types import spec_of
from edgefl.tasks import digits
from tests.harness import Deployment


def _plan(session: str, r: int, devices: list[str], s: int = 2, a: float = 0.5) -> dict[str, Any]:
    return {
        "task_id": f"{session}:{r}:0",
        "session": session,
        "round": r,
        "model_version": f"v{r}",
        "async": {"max_staleness": s, "exponent": a},
        "devices": devices,
    }


def test_staleness_weighting_matches_the_numpy_formula() -> None:
    """Updates of rounds 2..5 folded into round 5 (S = 2): the fresh and 1-2 versions old
    ones weigh s(tau) = (1 + tau)^-a; the numpy formula of the paper agrees to float64."""
    rng = np.random.default_rng(3)
    g = {"W": rng.normal(size=(4, 3)), "b": rng.normal(size=3)}
    spec = spec_of(g)
    window = Window()
    for r in range(1, 6):
        window.add(_plan("s", r, ["d"]), {"d"})
    acc = WeightedSum(spec)
    taus, ns, deltas = [], [], []
    for r in (5, 4, 3):  # tau 0, 1, 2
        base = window.resolve(f"s:{r}:0")
        assert isinstance(base, Base)
        delta = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in g.items()}
        n = int(rng.integers(10, 200))
        enc = decode_delta(encode_delta(delta, "float32"), "float32", spec)
        fold_delta(acc, enc, float(n), {"compression": {"encoding": "float32"}}, base.scale)
        taus.append(base.tau)
        ns.append(n)
        deltas.append(delta)
    assert taus == [0, 1, 2]
    # round 2 is 3 versions old: refused with the reason, and so is a round no plan named
    for stale in ("s:2:0", "s:1:0"):
        why = window.resolve(stale)
        assert isinstance(why, str) and why.startswith("stale:") and "max_staleness 2" in why
    assert window.resolve("other:5:0") is None  # another session's task: not this window
    add_global(acc, g, acc.weight)
    got = acc.mean()
    a = 0.5
    s = np.array([(1.0 + t) ** -a for t in taus])
    n = np.array(ns, dtype=np.float64)
    for k in g:
        stacked = np.stack([d[k].astype(np.float64) for d in deltas])
        want = g[k] + np.tensordot(s * n, stacked, axes=1) / n.sum()
        np.testing.assert_allclose(got[k], want, rtol=1e-12, atol=1e-12)
    assert staleness_weight(0, 0.5) == 1.0
    assert staleness_weight(3, 0.5) == pytest.approx(0.5)
    assert staleness_weight(3, 0.0) == 1.0


@pytest.mark.parametrize(
    ("fields", "why"),
    [
        ({"aggregator": "fedmedian"}, "holds whole updates"),
        ({"dp": {"clip_norm": 1.0, "noise_multiplier": 1.0}}, "dp is not available"),
        ({"buffer_size": 3}, "unset buffer_size"),
        ({"max_devices": 4}, "unset max_devices"),
        ({"min_devices": 6}, "must be at least min_devices"),
        ({"asynchronous": {"buffer": 5, "concurrency": 3}}, "concurrency (3) must be at least"),
        ({"asynchronous": {"buffer": 5, "max_staleness": -1}}, "max_staleness"),
    ],
)
def test_nonsense_async_sessions_are_refused_with_the_reason(
    fields: dict[str, Any], why: str
) -> None:
    cfg: dict[str, Any] = {"mode": "async", "asynchronous": {"buffer": 5}, **fields}
    with pytest.raises(ValueError, match=re.escape(why)):
        SessionConfig(**cfg)


def test_async_settings_only_in_async_mode_and_deltas_forced() -> None:
    with pytest.raises(ValueError, match="need mode 'async'"):
        SessionConfig(asynchronous={"buffer": 2})
    plan = SessionConfig(mode="async").plan_fields()
    assert plan["compression"] == {"encoding": "float32"}
    assert plan["async"] == {"max_staleness": 4, "exponent": 0.5}
    assert "async" not in SessionConfig().plan_fields()  # sync sessions are unchanged
    assert SessionConfig(mode="async", compression="int8").plan_fields()["compression"] == {
        "encoding": "int8"
    }


class Rounds:
    """The session's completed round, for trainers that answer late (a shared clock)."""

    def __init__(self) -> None:
        self.done = 0
        self.over = False
        self._cv = threading.Condition()

    def completed(self, r: int) -> None:
        with self._cv:
            self.done = r
            self._cv.notify_all()

    def finish(self) -> None:
        with self._cv:
            self.over = True
            self._cv.notify_all()

    def wait_for(self, r: int) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self.over or self.done >= r, timeout=120)


def _delayed(clock: Rounds, delays: dict[int, int]):
    """Device k trains round b's task only once round b + delays[k] - 1 is complete, so its
    update reaches the combiners ``delays[k]`` or more versions late. The others answer
    within their round, device k after 50·k ms: the buffer fills before the last of them,
    whose updates then count in the next version (staleness 1)."""

    def factory(k: int, X: np.ndarray, y: np.ndarray) -> CallableTrainer:
        inner = NumpyTrainer(X, y)

        def train(weights: dict[str, np.ndarray], task: TrainTask) -> Any:
            if k in delays:
                clock.wait_for(task.round + delays[k] - 1)
            else:
                time.sleep(0.05 * k)
            return inner.train(weights, task)

        return CallableTrainer(train)

    return factory


S = 3
LATE, TOO_LATE = (7, 8), 9  # 30% of the 10 devices: two 2 versions late, one S + 2 late


def test_fedbuff_converges_with_late_devices_and_refuses_stale_updates(
    broker_url: str, tmp_path
) -> None:
    clock = Rounds()
    dep = Deployment(broker_url, tmp_path)
    try:
        dep.start_combiners(2)
        delays = {LATE[0]: 2, LATE[1]: 2, TOO_LATE: S + 2}
        dep.start_fleet(10, trainer_factory=_delayed(clock, delays))
        ctl = dep.controller()
        config = SessionConfig(
            session_id="fedbuff",
            rounds=30,
            min_devices=1,
            round_timeout_s=30,
            mode="async",
            asynchronous=AsyncSettings(buffer=5, max_staleness=S, staleness_exponent=0.5),
            train={"lr": 0.1, "batch_size": 32},
        )
        ctl.create_session(config, digits.initial_weights())
        ctl.run(config.session_id, on_round=lambda rec, sess: clock.completed(sess.current_round))
        rounds = ctl.store.list_rounds(config.session_id)
        models = {r.model_out: ctl.store.get_model(r.model_out) for r in rounds if r.model_out}
        stale_refused = sum(c.stats["rejected_stale"] for c in dep.combiners)
    finally:
        clock.finish()
        dep.close()
    done = [r for r in rounds if r.status == "completed"]
    assert len(done) == 30
    acc = [r.metrics["accuracy"] for r in done]
    loss = [r.metrics["loss"] for r in done]
    assert acc[-1] >= 0.85, acc
    assert np.mean(loss[-3:]) < 0.6 * loss[0], loss  # learning, not noise
    late, too_late = {device_name(k) for k in LATE}, device_name(TOO_LATE)
    model_in = {r.round: r.model_in for r in done}
    applied_late, carried = [], 0
    for r in done:
        assert len(r.participants) >= 5  # a version is made of at least K updates
        meta = models[r.model_out].meta["async"]
        assert meta["buffer"] == 5 and len(meta["updates"]) == len(r.participants)
        for p, u in zip(r.participants, meta["updates"]):
            tau = p["metrics"]["staleness"]
            assert 0 <= tau <= S, (r.round, p)  # nothing older than the bound is applied
            assert p["metrics"]["base_round"] == r.round - tau
            assert u["device"] == p["device"] and u["staleness"] == tau
            assert u["base_version"] == model_in[r.round - tau]  # the version it trained on
            assert p["device"] != too_late
            if p["device"] in late:
                applied_late.append(tau)
            elif tau:
                carried += 1
        assert r.metrics["staleness_max"] <= S
    # updates that missed their round's buffer were applied in the next one
    assert carried >= 3, carried
    # the late devices' updates were applied, 2 or more versions late
    assert len(applied_late) >= 3 and min(applied_late) >= 2, applied_late
    # the too-late device's answers were refused with the reason, recorded, never applied
    refused = [j for r in done for j in r.rejected if j["device"] == too_late]
    assert refused and all(j["reason"].startswith("stale:") for j in refused), refused
    assert all(f"max_staleness {S}" in j["reason"] for j in refused)
    assert stale_refused >= len(refused)
    # model versions chain: each round's input is the previous round's output
    for prev, cur in zip(done, done[1:]):
        assert cur.model_in == prev.model_out
        assert models[cur.model_out].parent == cur.model_in


def test_a_combiner_that_ignores_async_is_refused_loudly(
    broker_url: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A combiner that predates FedBuff ignores the plan's ``async`` field and folds a
    synchronous round: its partial (no ``async`` echo) is refused whole, with the reason,
    and no model version is made from it."""
    from edgefl.combiner.combiner import Combiner
    from edgefl.controller.errors import SessionFailed

    start_round = Combiner._start_round

    def unaware(self: Combiner, plan: dict[str, Any]) -> None:
        start_round(self, {k: v for k, v in plan.items() if k != "async"})

    monkeypatch.setattr(Combiner, "_start_round", unaware)
    dep = Deployment(broker_url, tmp_path)
    try:
        dep.start_combiners(1)
        dep.start_fleet(4)
        ctl = dep.controller()
        config = SessionConfig(
            session_id="unaware",
            rounds=1,
            max_attempts=1,
            round_timeout_s=10,
            mode="async",
            asynchronous=AsyncSettings(buffer=2),
            train={"lr": 0.1, "batch_size": 32},
        )
        ctl.create_session(config, digits.initial_weights())
        with pytest.raises(SessionFailed):
            ctl.run(config.session_id)
        (rec,) = ctl.store.list_rounds(config.session_id)
    finally:
        dep.close()
    assert rec.status == "failed" and rec.model_out is None
    assert "quorum not met: 0 accepted updates" in rec.reason
    assert any("does not confirm async aggregation" in j["reason"] for j in rec.rejected)


def test_a_restarted_controller_rebuilds_busy_devices_from_the_round_records() -> None:
    from edgefl.controller.async_rounds import AsyncTracker
    from edgefl.controller.records import RoundAttempt
    from edgefl.store.base import RoundRecord

    def rec(r: int, devices: list[str], answered: dict[str, int]) -> RoundRecord:
        return RoundRecord(
            task_id=f"s:{r}:0",
            session_id="s",
            round=r,
            attempt=0,
            status="completed",
            model_in=f"v{r - 1}",
            model_out=f"v{r}",
            devices=devices,
            participants=[
                {"device": d, "region": "r0", "n": 1, "metrics": {"base_round": float(b)}}
                for d, b in answered.items()
            ],
        )

    tracker = AsyncTracker("s", AsyncSettings(buffer=1, max_staleness=2))
    # round 1 selects a, b, c; a answers at once, b one version late; c never; round 2: a again
    tracker.restore([rec(1, ["a", "b", "c"], {"a": 1}), rec(2, ["a"], {"b": 1, "a": 2})])
    assert tracker.busy == {"c": 1}
    online = {"a": "r0", "b": "r0", "c": "r0", "d": "r1"}
    assert tracker.select(online, RoundAttempt("s", 3, 0, "v2")) == ["a", "b", "d"]
    assert tracker.busy_regions() == {"r0"}
    slots: dict[Any, list[str]] = {("r0", None): ["a"]}
    tracker.widen(slots)
    assert slots[("r0", None)] == ["a", "c"]  # c's late answer may still be credited
    # round 4 (S = 2): c's task of round 1 is written off, so c is idle again
    assert "c" in tracker.select(online, RoundAttempt("s", 4, 0, "v3"))


def test_a_decline_for_an_older_round_is_noted_once() -> None:
    window = Window()
    for r in (1, 2):
        window.add(_plan("s", r, ["a", "b"]), {"a", "b"})
    assert window.answered("s:1:0", "a")  # recorded in the open round: a is idle again
    assert not window.answered("s:1:0", "a")  # once
    assert not window.answered("s:1:0", "z")  # not selected for that task
    assert not window.answered("s:9:0", "a")  # no task of the window
    base = window.resolve("s:1:0")
    assert isinstance(base, Base) and "a" in base.reported  # an update after it is a duplicate


def test_the_rest_api_creates_async_sessions_and_refuses_nonsense_with_422() -> None:
    from edgefl.api.auth import ApiError
    from edgefl.api.routes.session_control import _config
    from edgefl.api.schemas import SessionCreate

    body = {"session_id": "a1", "mode": "async", "asynchronous": {"buffer": 3}}
    config, _weights = _config(SessionCreate(**body), "softmax")
    assert config.mode == "async" and config.asynchronous == AsyncSettings(buffer=3)
    assert config.plan_fields()["async"] == {"max_staleness": 4, "exponent": 0.5}
    with pytest.raises(ApiError) as err:
        _config(SessionCreate(**{**body, "aggregator": "krum"}), "softmax")
    assert err.value.status_code == 422 and "holds whole updates" in str(err.value.detail)
