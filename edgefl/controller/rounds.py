"""One attempt at one round: select devices, dispatch plans, collect partials, merge, record.

The merge is exact: combiners send sums, so the weighted mean over any number of regions is
the mean a single process would compute. The new model is stored (blob, then record) before
the caller moves the session pointer, which is what makes a SIGKILLed controller resumable.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from edgefl.aggregation import ServerAggregator, WeightedSum
from edgefl.aggregation.base import task_settings
from edgefl.aggregation.compressed import add_global
from edgefl.aggregation.robust import RegionalEstimates, RobustAggregator, robust_rule
from edgefl.controller import round_options
from edgefl.controller.async_rounds import AsyncTracker
from edgefl.controller.config import SessionConfig
from edgefl.controller.inbox import CombinerInbox, Partial, Progress
from edgefl.controller.model_versions import ModelRepository
from edgefl.controller.presence import Presence
from edgefl.controller.records import RoundAttempt
from edgefl.observability.hooks import round_scope
from edgefl.observability.tracing import set_attributes, trace_field
from edgefl.protocol import CodecError, Topics, encode
from edgefl.protocol.chunking import release_array, trim_heap, tune_allocator
from edgefl.protocol.tensors import decode_tensors
from edgefl.protocol.types import Participant, Rejection, Spec, Weights, spec_of, spec_to_wire
from edgefl.store.base import Store
from edgefl.transport import MqttConnection

log = logging.getLogger(__name__)

Evaluator = Callable[[Weights], dict[str, float]]

Slot = tuple[str, Optional[str]]
"""Who owes the controller a partial: (region, pool member), or (region, None) where one
combiner serves the region."""


@dataclass(frozen=True)
class RoundOutcome:
    """A completed round: the new global model and its stored version.

    ``blob`` (the stored model's bytes) is handed over once, to be published: kept here, it
    would sit beside the weights through the whole next round. Later reads come from the
    model store.
    """

    task_id: str
    weights: Weights
    version: str
    load_blob: Callable[[], bytes]
    _held: list[bytes] = field(default_factory=list, repr=False, compare=False)

    @property
    def blob(self) -> bytes:
        return self._held.pop() if self._held else self.load_blob()


def _merge_streaming(merged: WeightedSum, sums: Weights, partial: Partial) -> None:
    """``merged.merge`` one tensor at a time, letting the partial's mapped pages go as each
    is added: an 80 MB partial read from its spill file never sits whole in memory."""
    missing = set(merged.sums) - set(sums)
    if missing:
        raise KeyError(f"partial lacks {sorted(missing)}")
    for name, acc in merged.sums.items():
        if sums[name].shape != acc.shape:
            raise ValueError(f"partial tensor {name!r} has shape {sums[name].shape}")
    for name, acc in merged.sums.items():
        acc += sums[name]
        release_array(sums[name])
    merged.weight += float(partial.weight)
    merged.count += int(partial.count)


def _mean_in_place(merged: WeightedSum, spec: Spec) -> Weights:
    """``merged.mean`` with the model's dtypes, dividing each sum in place and dropping it
    once converted: the same values, without a float64 copy of the model."""
    if merged.weight <= 0:
        raise ValueError("no updates were aggregated")
    out: Weights = {}
    for name in list(merged.sums):
        acc = merged.sums.pop(name)
        np.divide(acc, merged.weight, out=acc)
        out[name] = acc.astype(spec[name][0])
        del acc
    return out


def _slot_of(ev: Partial | Progress, slots: dict[Slot, list[str]]) -> Slot | None:
    """The slot a combiner's message belongs to (None: nobody this round asked)."""
    member = ev.combiner
    if member is not None and (ev.region, member) in slots:
        return (ev.region, member)
    if (ev.region, None) in slots:
        return (ev.region, None)
    return None


def _slot_name(slot: Slot) -> str:
    region, member = slot
    return region if member is None else f"{region}/{member}"


def _kind_mismatch(partial: Partial, robust: RobustAggregator | None) -> list[Rejection]:
    """A partial that holds something else than the round asked for (sums for a robust rule,
    or the reverse) is refused whole: merging it would silently compute another estimator."""
    want = robust.name if robust is not None else None
    if partial.aggregate == want or partial.count == 0:
        return []
    have = f"a {partial.aggregate} estimate" if partial.aggregate else "sums"
    return [
        Rejection(
            device="",
            reason=f"partial of {partial.region} holds {have}, the round asked for "
            f"{want or 'sums'}: refused",
        )
    ]


def select_devices(
    online: dict[str, str], config: SessionConfig, r: int, attempt: int
) -> list[str]:
    """All eligible devices, or a sample seeded by (session seed, round, attempt) for replay."""
    devices = sorted(online)
    if config.max_devices is not None and len(devices) > config.max_devices:
        rng = random.Random(f"{config.seed}:{r}:{attempt}")
        devices = sorted(rng.sample(devices, config.max_devices))
    return devices


def round_metrics(participants: list[Participant]) -> dict[str, float]:
    """Update count, examples, and the example-weighted mean of each device metric."""
    metrics: dict[str, float] = {"updates": float(len(participants))}
    total = sum(p["n"] for p in participants)
    if total:
        metrics["examples"] = float(total)
        keys: set[str] = set().union(*(p["metrics"].keys() for p in participants))
        for k in sorted(keys):
            vals = [(p["n"], p["metrics"][k]) for p in participants if k in p["metrics"]]
            n = sum(w for w, _ in vals)
            if n:
                metrics[f"devices_{k}"] = sum(w * v for w, v in vals) / n
    return metrics


class RoundRunner:
    """Runs round attempts for the controller's session loop (one at a time, blocking)."""

    def __init__(
        self,
        conn: MqttConnection,
        topics: Topics,
        store: Store,
        models: ModelRepository,
        presence: Presence,
        inbox: CombinerInbox,
        evaluator: Evaluator | None = None,
    ) -> None:
        tune_allocator()  # large blocks go back to the OS when freed (memory ~ model size)
        self.conn = conn
        self.topics = topics
        self.store = store
        self.models = models
        self.presence = presence
        self.inbox = inbox
        self.evaluator = evaluator
        self.refused_partials = 0  # partials naming a device not planned there, or revoked
        self._presence_seen = presence.counters()
        self.fedbuff: AsyncTracker | None = None  # the async session's busy devices

    def _unplanned(
        self, partial: Partial, planned: list[str], *, revocations: bool = True
    ) -> list[Rejection]:
        """Why a region's partial must not be merged: one rejection per offending update.

        Its sums cannot be split, so a partial that credits a device not planned in that
        region (a misrouted or forged update, or a faulty combiner), one revoked since the
        plan, or a device twice, is refused whole; the quorum then decides.
        """
        registry = self.presence.registry
        allowed = set(planned)
        seen: set[str] = set()
        out: list[Rejection] = []
        for p in partial.participants:
            dev = p["device"]
            why = None
            if dev not in allowed or p["region"] != partial.region:
                why = f"update credited in region {partial.region}, where it was not planned"
            elif dev in seen:
                why = "credited twice in one partial"
            elif revocations and registry is not None and registry.is_revoked(dev):
                why = "revoked during the round"
            seen.add(dev)
            if why is not None:
                out.append(
                    Rejection(device=dev, reason=f"{why}: partial of {partial.region} refused")
                )
        if not out and len(partial.participants) != partial.count:
            out.append(
                Rejection(
                    device="",
                    reason=f"partial of {partial.region} counts {partial.count} updates but "
                    f"lists {len(partial.participants)}: refused",
                )
            )
        return out

    def _presence_increase(self) -> dict[str, float]:
        """Presence counters that grew since the last completed round (only those)."""
        now = self.presence.counters()
        grown = {
            k: float(v - self._presence_seen.get(k, 0))
            for k, v in now.items()
            if v > self._presence_seen.get(k, 0)
        }
        self._presence_seen = now
        return grown

    def run(
        self,
        config: SessionConfig,
        attempt: RoundAttempt,
        weights: Weights,
        aggregator: ServerAggregator,
        package: dict[str, Any] | None = None,
        *,
        fence: int | None = None,
    ) -> RoundOutcome | None:
        """Run one attempt; None (with a failed record) when the round cannot complete.

        Its log lines carry the round's ids, and it is one span when tracing is on.
        """
        with round_scope(self.topics.project, attempt) as scope:
            outcome = self._run(config, attempt, weights, aggregator, package, fence=fence)
            scope.done(outcome is not None)
        return outcome

    def _run(
        self,
        config: SessionConfig,
        attempt: RoundAttempt,
        weights: Weights,
        aggregator: ServerAggregator,
        package: dict[str, Any] | None,
        *,
        fence: int | None,
    ) -> RoundOutcome | None:
        fedbuff = self._fedbuff_for(config, attempt)
        quorum = config.min_devices if fedbuff is None else fedbuff.settings.buffer
        online = self.presence.wait_for(quorum, config.wait_for_devices_s)
        if len(online) < config.min_devices:
            attempt.fail(self.store, f"only {len(online)} of {config.min_devices} devices online")
            return None
        why = fedbuff.refusal(online, self.presence) if fedbuff is not None else None
        if why is not None:
            attempt.fail(self.store, why)
            return None
        if fedbuff is None:
            selected = select_devices(online, config, attempt.round, attempt.attempt)
        else:  # idle devices only; regions with busy ones get the plan too (stale answers)
            selected = fedbuff.select(online, attempt)
        by_region: dict[str, list[str]] = {
            region: [] for region in (fedbuff.busy_regions() if fedbuff is not None else ())
        }
        for dev in selected:
            by_region.setdefault(online[dev], []).append(dev)
        started = time.time()
        deadline = started + config.round_timeout_s
        attempt.start(self.store, selected, started)
        set_attributes(**{"edgefl.devices": len(selected), "edgefl.regions": sorted(by_region)})
        spec = spec_of(weights)
        self.inbox.drain()
        extra: dict[str, Any] = config.plan_fields()  # compression, dp
        if package is not None:
            extra["package"] = package
        if fence is not None:
            extra["fence"] = fence
        extra.update(trace_field())  # combiners' region spans become this round's children
        robust = robust_rule(aggregator)  # None: combiners fold sums (splittable)
        if robust is not None:
            extra["aggregate"] = robust.plan()
        train = {**config.train, **task_settings(aggregator)}
        slots = self._dispatch(
            config, attempt, by_region, deadline, spec_to_wire(spec), extra, train
        )
        buffer = config.buffer_size
        if fedbuff is not None:
            fedbuff.dispatched(selected, attempt.round, attempt.model_in)
            fedbuff.widen(slots)
            buffer = fedbuff.settings.buffer
        refusals: list[Rejection] = []
        partials = self._collect(attempt.task_id, slots, config, deadline, refusals, buffer)

        merged = WeightedSum(spec)
        regional = RegionalEstimates(robust, spec) if robust is not None else None
        participants: list[Participant] = []
        rejected: list[Rejection] = list(refusals)
        refused = len(refusals)
        bytes_up = tensor_bytes_up = 0  # of the merged partials' updates
        for slot, partial in sorted(partials.items(), key=lambda kv: (kv[0][0], kv[0][1] or "")):
            rejected.extend(partial.rejected)
            # checked again: a device may have been revoked while the partial waited
            wrong = self._unplanned(partial, slots[slot]) or _kind_mismatch(partial, robust)
            if not wrong and fedbuff is not None:
                wrong = fedbuff.refuse_partial(partial, extra["async"])
            if wrong:
                refused += 1
                self._refuse(attempt.task_id, partial, wrong, rejected)
                continue
            try:
                if regional is None:
                    _merge_streaming(merged, decode_tensors(partial.sums), partial)
                    if partial.delta:  # sum(w * delta) + W * global = sum(w * x)
                        add_global(merged, weights, partial.weight)
                elif partial.count:
                    regional.add(decode_tensors(partial.sums), partial.count)
            except (CodecError, KeyError, ValueError) as exc:
                log.error(
                    "round %s: partial from %s unusable: %s", attempt.task_id, partial.combiner, exc
                )
                continue
            participants.extend(partial.participants)
            bytes_up += partial.update_bytes
            tensor_bytes_up += partial.tensor_bytes
        for partial in partials.values():  # merged (or refused): their spill files are free
            if partial.release is not None:
                partial.release()
        partials.clear()
        trim_heap()
        tally = merged if regional is None else regional
        if fedbuff is not None:  # who answered is idle again, whatever the round's fate
            fedbuff.seen(participants, rejected)
        if tally.count < config.min_devices or tally.weight <= 0:
            attempt.fail(
                self.store,
                f"quorum not met: {tally.count} accepted updates, "
                f"{config.min_devices} needed ({len(rejected)} rejected)",
                participants=participants,
                rejected=rejected,
                started=started,
            )
            return None

        privacy: dict[str, Any] | None = None
        if regional is None:
            count = merged.count  # the mean consumes the sums
            aggregate, privacy = round_options.noised(
                config, _mean_in_place(merged, spec), count, attempt
            )
        else:
            aggregate = regional.center()
        new_weights = aggregator.step(weights, aggregate)
        metrics = round_metrics(participants)
        metrics.update(
            round_options.traffic(self.store, attempt, bytes_up, tensor_bytes_up, len(selected))
        )
        metrics.update(round_options.metrics(privacy))
        meta: dict[str, Any] = {"metrics": metrics, **({"privacy": privacy} if privacy else {})}
        if fedbuff is not None:
            metrics.update(fedbuff.metrics(participants))
            meta["async"] = fedbuff.meta(participants)
        if self.evaluator is not None:
            metrics.update(self.evaluator(new_weights))
        metrics["rejected"] = float(len(rejected))
        if refused:
            metrics["partials_refused"] = float(refused)
        metrics.update(self._presence_increase())
        record, _blob = self.models.save(
            new_weights,
            parent=attempt.model_in,
            session_id=attempt.session_id,
            round_=attempt.round,
            optimizer_state=aggregator.state_dict(),
            meta=meta,
        )
        attempt.complete(
            self.store,
            model_out=record.version,
            participants=participants,
            rejected=rejected,
            metrics=metrics,
        )
        log.info(
            "round %s done: %d updates, metrics %s",
            attempt.task_id,
            tally.count,
            {k: round(v, 4) for k, v in metrics.items()},
        )
        trim_heap()
        blobs, version = self.models.blobs, record.version
        return RoundOutcome(
            attempt.task_id, new_weights, version, lambda: blobs.get(version), [_blob]
        )

    def _fedbuff_for(self, config: SessionConfig, attempt: RoundAttempt) -> AsyncTracker | None:
        """The async session's tracker (a new one for a new session); None in sync mode."""
        if config.asynchronous is None:
            self.fedbuff = None
        elif self.fedbuff is None or self.fedbuff.session_id != attempt.session_id:
            self.fedbuff = AsyncTracker(attempt.session_id, config.asynchronous)
            self.fedbuff.restore(self.store.list_rounds(attempt.session_id))
        return self.fedbuff

    def _dispatch(
        self,
        config: SessionConfig,
        attempt: RoundAttempt,
        by_region: dict[str, list[str]],
        deadline: float,
        wire_spec: list[list[Any]],
        extra: dict[str, Any],
        train: dict[str, Any],
    ) -> dict[Slot, list[str]]:
        """Send each region its plan; return who owes a partial for which devices.

        In a region served by a combiner pool, the devices are dealt out round-robin over
        the online members (sorted, so a retry with the same members deals the same way)
        and the plan says who serves whom (``assign``): each update reaches exactly one
        member, and every member's partial is checked against its own share.
        """
        model = self.store.get_model(attempt.model_in)
        if model is None:
            raise KeyError(f"model version {attempt.model_in!r} is not in the store")
        slots: dict[Slot, list[str]] = {}
        for region, devs in sorted(by_region.items()):
            members = self.presence.pool_members(region)
            assign: dict[str, list[str]] = {}
            if members:
                for i, dev in enumerate(sorted(devs)):
                    assign.setdefault(members[i % len(members)], []).append(dev)
                for member, share in assign.items():
                    slots[(region, member)] = share
            else:
                slots[(region, None)] = sorted(devs)
            plan = encode(
                "round",
                **extra,
                **({"assign": assign} if assign else {}),
                task_id=attempt.task_id,
                session=attempt.session_id,
                round=attempt.round,
                model_version=attempt.model_in,
                model_digest=bytes.fromhex(model.digest),
                devices=sorted(devs),
                deadline=deadline,
                train=train,
                chunk_size=config.chunk_size,
                spec=wire_spec,
            )
            self.conn.publish(self.topics.combiner(region, "round"), plan, qos=1)
        return slots

    def _refuse(
        self, task_id: str, partial: Partial, wrong: list[Rejection], into: list[Rejection]
    ) -> None:
        """Log and record a refused partial (its offending entries join the rejections)."""
        self.refused_partials += 1
        log.error(
            "round %s: partial from %s (%s) refused: %s",
            task_id,
            partial.region,
            partial.combiner,
            "; ".join(f"{r['device']}: {r['reason']}" for r in wrong),
        )
        into.extend(wrong)

    def _collect(
        self,
        task_id: str,
        slots: dict[Slot, list[str]],
        config: SessionConfig,
        deadline: float,
        refusals: list[Rejection],
        buffer: int | None,
    ) -> dict[Slot, Partial]:
        """Wait for every slot's partial; close the round at the deadline or a full buffer.

        A partial crediting a device not planned for its sender is refused (into
        ``refusals``) and the genuine partial is still awaited: a forged or replayed one
        arriving first must not cost the region its round. A pool member that goes offline
        before its partial owes nothing more: its devices' updates are lost with it (never
        counted twice), and the quorum decides whether the round stands.
        """
        partials: dict[Slot, Partial] = {}
        accepted: dict[Slot, int] = {}
        waiting = set(slots)
        closed_at: float | None = None
        while waiting:
            limit = deadline if closed_at is None else closed_at + config.close_grace_s
            pooled = any(member is not None for _, member in waiting)
            # with a pool, look at its members' presence at least twice a second
            ev = self.inbox.get(min(limit - time.time(), 0.5) if pooled else limit - time.time())
            if ev is None:
                if pooled and time.time() < limit:
                    self._forget_dead_members(task_id, waiting, slots)
                    continue
                if closed_at is not None:
                    missing = sorted(_slot_name(s) for s in waiting)
                    log.warning("round %s: no partial from %s; going on without", task_id, missing)
                    break
                closed_at = self._close(task_id, slots, waiting, "deadline")
                continue
            if pooled:
                self._forget_dead_members(task_id, waiting, slots)
            if ev.task_id != task_id:
                continue
            slot = _slot_of(ev, slots)
            if slot is None:
                continue
            if isinstance(ev, Partial):
                if slot not in waiting:
                    continue  # a second partial for a slot already merged, or written off
                # revocations are checked at the merge: this sender sends no other partial
                wrong = self._unplanned(ev, slots[slot], revocations=False)
                if wrong:
                    self._refuse(task_id, ev, wrong, refusals)
                    continue
                partials[slot] = ev
                waiting.discard(slot)
            elif isinstance(ev, Progress):
                accepted[slot] = max(accepted.get(slot, 0), ev.accepted)
                if closed_at is None and buffer is not None and sum(accepted.values()) >= buffer:
                    closed_at = self._close(task_id, slots, waiting, "buffer full")
        return partials

    def _forget_dead_members(
        self, task_id: str, waiting: set[Slot], slots: dict[Slot, list[str]]
    ) -> None:
        for region, member in sorted(waiting, key=lambda s: (s[0], s[1] or "")):
            if member is None or self.presence.member_online(region, member):
                continue
            waiting.discard((region, member))
            log.warning(
                "round %s: pool member %s of %s went offline before its partial; the updates "
                "of its %d devices are lost",
                task_id,
                member,
                region,
                len(slots[(region, member)]),
            )

    def _close(
        self, task_id: str, slots: dict[Slot, list[str]], waiting: set[Slot], why: str
    ) -> float:
        log.info("round %s: closing (%s)", task_id, why)
        msg = encode("close", task_id=task_id)
        for region in sorted({region for region, _ in waiting}):
            self.conn.publish(self.topics.combiner(region, "round"), msg, qos=1)
        return time.time()
