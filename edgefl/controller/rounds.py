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
from typing import Any

import numpy as np

from edgefl.aggregation import ServerAggregator, WeightedSum
from edgefl.controller.config import SessionConfig
from edgefl.controller.inbox import CombinerInbox, Partial, Progress
from edgefl.controller.model_versions import ModelRepository
from edgefl.controller.presence import Presence
from edgefl.controller.records import RoundAttempt
from edgefl.protocol import CodecError, Topics, encode
from edgefl.protocol.chunking import release_array, trim_heap, tune_allocator
from edgefl.protocol.tensors import decode_tensors
from edgefl.protocol.types import Participant, Rejection, Spec, Weights, spec_of, spec_to_wire
from edgefl.store.base import Store
from edgefl.transport import MqttConnection

log = logging.getLogger(__name__)

Evaluator = Callable[[Weights], dict[str, float]]


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
        """Run one attempt; None (with a failed record) when the round cannot complete."""
        online = self.presence.wait_for(config.min_devices, config.wait_for_devices_s)
        if len(online) < config.min_devices:
            attempt.fail(self.store, f"only {len(online)} of {config.min_devices} devices online")
            return None
        selected = select_devices(online, config, attempt.round, attempt.attempt)
        by_region: dict[str, list[str]] = {}
        for dev in selected:
            by_region.setdefault(online[dev], []).append(dev)
        started = time.time()
        deadline = started + config.round_timeout_s
        attempt.start(self.store, selected, started)
        spec = spec_of(weights)
        self.inbox.drain()
        extra: dict[str, Any] = {}
        if package is not None:
            extra["package"] = package
        if fence is not None:
            extra["fence"] = fence
        self._dispatch(config, attempt, by_region, deadline, spec_to_wire(spec), extra)
        refusals: list[Rejection] = []
        partials = self._collect(attempt.task_id, by_region, config, deadline, refusals)

        merged = WeightedSum(spec)
        participants: list[Participant] = []
        rejected: list[Rejection] = list(refusals)
        refused = len(refusals)
        for region, partial in sorted(partials.items()):
            rejected.extend(partial.rejected)
            # checked again: a device may have been revoked while the partial waited
            wrong = self._unplanned(partial, by_region[region])
            if wrong:
                refused += 1
                self._refuse(attempt.task_id, partial, wrong, rejected)
                continue
            try:
                _merge_streaming(merged, decode_tensors(partial.sums), partial)
            except (CodecError, KeyError, ValueError) as exc:
                log.error("round %s: partial from %s unusable: %s", attempt.task_id, region, exc)
                continue
            participants.extend(partial.participants)
        for partial in partials.values():  # merged (or refused): their spill files are free
            if partial.release is not None:
                partial.release()
        partials.clear()
        trim_heap()
        if merged.count < config.min_devices or merged.weight <= 0:
            attempt.fail(
                self.store,
                f"quorum not met: {merged.count} accepted updates, "
                f"{config.min_devices} needed ({len(rejected)} rejected)",
                participants=participants,
                rejected=rejected,
                started=started,
            )
            return None

        new_weights = aggregator.step(weights, _mean_in_place(merged, spec))
        metrics = round_metrics(participants)
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
            meta={"metrics": metrics},
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
            merged.count,
            {k: round(v, 4) for k, v in metrics.items()},
        )
        trim_heap()
        blobs, version = self.models.blobs, record.version
        return RoundOutcome(
            attempt.task_id, new_weights, version, lambda: blobs.get(version), [_blob]
        )

    def _dispatch(
        self,
        config: SessionConfig,
        attempt: RoundAttempt,
        by_region: dict[str, list[str]],
        deadline: float,
        wire_spec: list[list[Any]],
        extra: dict[str, Any],
    ) -> None:
        model = self.store.get_model(attempt.model_in)
        if model is None:
            raise KeyError(f"model version {attempt.model_in!r} is not in the store")
        for region, devs in sorted(by_region.items()):
            plan = encode(
                "round",
                **extra,
                task_id=attempt.task_id,
                session=attempt.session_id,
                round=attempt.round,
                model_version=attempt.model_in,
                model_digest=bytes.fromhex(model.digest),
                devices=sorted(devs),
                deadline=deadline,
                train=config.train,
                chunk_size=config.chunk_size,
                spec=wire_spec,
            )
            self.conn.publish(self.topics.combiner(region, "round"), plan, qos=1)

    def _refuse(
        self, task_id: str, partial: Partial, wrong: list[Rejection], into: list[Rejection]
    ) -> None:
        """Log and record a refused partial (its offending entries join the rejections)."""
        self.refused_partials += 1
        log.error(
            "round %s: partial from %s refused: %s",
            task_id,
            partial.region,
            "; ".join(f"{r['device']}: {r['reason']}" for r in wrong),
        )
        into.extend(wrong)

    def _collect(
        self,
        task_id: str,
        by_region: dict[str, list[str]],
        config: SessionConfig,
        deadline: float,
        refusals: list[Rejection],
    ) -> dict[str, Partial]:
        """Wait for every region's partial; close the round at the deadline or a full buffer.

        A partial crediting a device not planned in its region is refused (into ``refusals``)
        and the region's genuine partial is still awaited: a forged or replayed one arriving
        first must not cost the region its round.
        """
        partials: dict[str, Partial] = {}
        accepted: dict[str, int] = {}
        closed_at: float | None = None
        while len(partials) < len(by_region):
            limit = deadline if closed_at is None else closed_at + config.close_grace_s
            ev = self.inbox.get(limit - time.time())
            if ev is None:
                if closed_at is not None:
                    missing = sorted(set(by_region) - set(partials))
                    log.warning("round %s: no partial from %s; going on without", task_id, missing)
                    break
                closed_at = self._close(task_id, by_region, partials, "deadline")
                continue
            if ev.task_id != task_id or ev.region not in by_region:
                continue
            if isinstance(ev, Partial):
                # revocations are checked at the merge: this region sends no other partial
                wrong = self._unplanned(ev, by_region[ev.region], revocations=False)
                if wrong:
                    self._refuse(task_id, ev, wrong, refusals)
                    continue
                partials[ev.region] = ev
            elif isinstance(ev, Progress):
                accepted[ev.region] = max(accepted.get(ev.region, 0), ev.accepted)
                if (
                    closed_at is None
                    and config.buffer_size is not None
                    and sum(accepted.values()) >= config.buffer_size
                ):
                    closed_at = self._close(task_id, by_region, partials, "buffer full")
        return partials

    def _close(
        self, task_id: str, by_region: dict[str, list[str]], partials: dict[str, Partial], why: str
    ) -> float:
        log.info("round %s: closing (%s)", task_id, why)
        msg = encode("close", task_id=task_id)
        for region in by_region:
            if region not in partials:
                self.conn.publish(self.topics.combiner(region, "round"), msg, qos=1)
        return time.time()
