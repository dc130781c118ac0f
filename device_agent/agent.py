"""The device agent: dial out, announce presence, take tasks, train, upload in chunks.

The agent never opens a port. Tasks arrive on its own task topic with QoS 1 and a persistent
session, so a device that was offline gets its task when it returns. Updates are published
as QoS 1 chunks; paho keeps unacknowledged chunks across a reconnect and the combiner ignores
duplicates, so an upload cut by a network drop resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np

from device_agent.compressed_update import compressed_update
from device_agent.config import AgentConfig
from device_agent.system_metrics import SystemMetrics, telemetry_name_ok
from device_agent.trainers.base import Trainer, TrainResult, TrainTask
from device_agent.trainers.data import NoLocalData
from edgefl.observability.hooks import task_scope, transfer_scope
from edgefl.observability.tracing import span, trace_field
from edgefl.protocol import ChunkError, MessageError, Topics, decode, encode
from edgefl.protocol.chunking import (
    MIN_CHUNK_SIZE,
    ChunkWriter,
    Payload,
    Reassembler,
    parse_chunk,
    split_payload,
)
from edgefl.protocol.compression import ErrorFeedback
from edgefl.protocol.messages import clean_metrics, encode_payload
from edgefl.protocol.tensors import loads_tensors
from edgefl.transport import MqttConnection
from edgefl.transport.compat import announce_on_hello, fetch_retained
from edgefl.transport.mqtt import PublishStream, stream_window

if TYPE_CHECKING:
    from edgefl.transport.multiplex import SharedLoop

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"


class TaskExecutor(Protocol):
    """Where a simulated fleet runs its agents' tasks (a shared thread pool)."""

    def submit(self, fn: Callable[[], None], /) -> Any: ...


class DeviceAgent:
    """One device: announces itself, takes round tasks, trains, uploads, and declines what it
    cannot do.

    Owns its MQTT connection and one worker thread that runs tasks one at a time (training
    never blocks the network thread). ``start`` returns once connected (or at once with
    ``timeout=None``; it then keeps dialling); ``stop`` publishes an offline status, closes the
    connection and joins the worker. A failed task never stops the agent: it is logged and
    declined, so the round does not wait for this device. So is a task for a device that has
    no local data (its trainer's ``local_examples`` is 0): it declines with "no local data"
    before fetching anything.

    A simulated fleet passes ``loop`` (a ``SharedLoop``: no network thread per device) and
    ``executor`` (a shared pool: no worker thread per device; this agent's tasks still run one
    at a time, in order) and may share one ``system_metrics`` between its agents.
    """

    def __init__(
        self,
        config: AgentConfig,
        trainer: Trainer,
        *,
        loop: SharedLoop | None = None,
        executor: TaskExecutor | None = None,
        system_metrics: SystemMetrics | None = None,
    ) -> None:
        self.config = config
        self.trainer = trainer
        self._executor = executor
        self._draining = False
        self._drain_lock = threading.Lock()
        self._stopped = False
        self.topics = Topics(config.project)
        self._tasks: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._latest: dict[str, tuple[int, int, int]] = {}  # session -> newest (fence, r, a)
        self.stale_tasks = 0
        self._model_cache: tuple[str, dict[str, np.ndarray]] | None = None
        self._download_done: threading.Event | None = None  # the download being awaited
        self._download_result_ready = False
        self._worker: threading.Thread | None = None
        self.completed = 0
        self._feedback = ErrorFeedback()  # top-k residual of the current session
        self.last_error: str | None = None
        # telemetry: system readings from /proc and /sys, and bytes moved over MQTT
        self.system_metrics = system_metrics or SystemMetrics()
        self.bytes_received = 0
        c = config
        self.status_topic = self.topics.device(c.region, c.device_id, "status")
        offline = encode("status", state="offline", ts=time.time(), device=c.device_id)
        self.conn = MqttConnection(
            c.broker_url,
            client_id=f"edgefl-{c.project}-{c.device_id}",
            username=c.username,
            password=c.password,
            clean_session=False,
            will=(self.status_topic, offline, 1, True),
            keepalive=c.keepalive,
            min_backoff_s=c.min_backoff_s,
            max_backoff_s=c.max_backoff_s,
            on_connect=self._announce,
            ca_file=c.ca_file,
            cert_file=c.cert_file,
            key_file=c.key_file,
            tls_insecure=c.tls_insecure,
            loop=loop,
        )

    # lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float | None = 10.0) -> DeviceAgent:
        c = self.config
        self.conn.subscribe(self.topics.device(c.region, c.device_id, "task"), self._on_task)
        # brokers without retained delivery to wildcards: announce again on a controller's hello
        announce_on_hello(self.conn, self.topics.controller_status(), self._announce)
        if self._executor is None:
            self._worker = threading.Thread(
                target=self._work, name=f"agent-{c.device_id}", daemon=True
            )
            self._worker.start()
        self.conn.start(timeout)
        return self

    def stop(self) -> None:
        self._stopped = True
        self._tasks.put(None)
        offline = encode("status", state="offline", ts=time.time(), device=self.config.device_id)
        self.conn.stop(publish_first=(self.status_topic, offline, 1, True))
        if self._worker:
            self._worker.join(timeout=5)

    def run_forever(self) -> None:
        try:
            while self._worker and self._worker.is_alive():
                self._worker.join(timeout=1.0)
        except KeyboardInterrupt:
            log.info("stopping agent %s", self.config.device_id)
        finally:
            self.stop()

    def _announce(self) -> None:
        c = self.config
        msg = encode(
            "status",
            state="online",
            ts=time.time(),
            device=c.device_id,
            region=c.region,
            agent=AGENT_VERSION,
        )
        self.conn.publish(self.status_topic, msg, qos=1, retain=True)

    # tasks -----------------------------------------------------------------------------
    def _on_task(self, _topic: str, payload: bytes) -> None:
        try:
            task = decode(payload, "task")
        except MessageError as exc:
            log.error("%s: ignoring bad task: %s", self.config.device_id, exc)
            return
        if task["task_id"] in self._seen:
            return  # QoS 1 redelivery after a reconnect
        key = _task_key(task)
        latest = self._latest.get(task["session"])
        if key is None or (latest is not None and key <= latest):
            # a replay of an older round, or a plan from a controller that lost the session
            self.stale_tasks += 1
            log.warning("%s: dropping stale task %s", self.config.device_id, task["task_id"])
            return
        self._latest[task["session"]] = key
        while len(self._latest) > 64:
            self._latest.pop(next(iter(self._latest)))
        self._seen[task["task_id"]] = None
        while len(self._seen) > 256:
            self._seen.popitem(last=False)
        self._tasks.put(task)
        waiting = self._download_done
        if waiting is not None:
            waiting.set()  # a download in progress gives up: the round moved on
        if self._executor is not None:
            with self._drain_lock:
                if self._draining:
                    return  # the running drain takes it next
                self._draining = True
            self._executor.submit(self._drain)

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            self._handle(task)

    def _drain(self) -> None:
        """The shared-pool counterpart of ``_work``: run queued tasks, then give the thread back."""
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                with self._drain_lock:
                    if self._tasks.empty():
                        self._draining = False
                        return
                continue
            if task is None or self._stopped:
                return
            self._handle(task)

    def _handle(self, task: dict[str, Any]) -> None:
        c = self.config
        with task_scope(task, c.project, c.region, c.device_id):
            self._handle_task(task)

    def _handle_task(self, task: dict[str, Any]) -> None:
        try:
            self._run_task(task)
        except NoLocalData as exc:  # not a failure: nothing to train on
            log.info("%s: declining task %s: %s", self.config.device_id, task.get("task_id"), exc)
            self._decline(task, str(exc))
        except Exception as exc:  # one failed task must not kill the agent
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("%s: task %s failed: %s", self.config.device_id, task.get("task_id"), exc)
            log.debug("task failure", exc_info=True)
            self._decline(task, self.last_error)

    def _run_task(self, task: dict[str, Any]) -> None:
        c = self.config
        if time.time() > task["deadline"]:
            log.warning(
                "%s: task %s arrived after its deadline; skipped", c.device_id, task["task_id"]
            )
            return
        if getattr(self.trainer, "local_examples", None) == 0:
            # nothing to train on: say so at once instead of fetching a model to ignore
            raise NoLocalData()
        received0 = self.bytes_received
        if "package" in task:
            with transfer_scope("download", task["package"]["id"], kind="package"):
                self._ensure_package(task["package"], task["deadline"])
        weights = self._fetch_model(task["model_version"], task["model_digest"], task["deadline"])
        t0 = time.perf_counter()
        with span("edgefl.device.train") as train_span:
            result = self.trainer.train(
                weights,
                TrainTask(
                    round=task["round"],
                    config=task["train"],
                    seed=int(c.seed or 0),
                    task_id=task["task_id"],
                ),
            )
            train_span.set_attribute("edgefl.examples", int(result.num_examples))
        train_s = time.perf_counter() - t0
        with transfer_scope("upload", task["task_id"]) as upload:
            stream, update = self._upload(task, weights, result)
            upload.set_attributes({"edgefl.bytes": update.size, "edgefl.sent": stream.sent_bytes})
        self.completed += 1
        log.debug(
            "%s: task %s done: %d examples, %.3f s training, %d bytes sent",
            c.device_id,
            task["task_id"],
            int(result.num_examples),
            train_s,
            stream.sent_bytes,
        )
        self._publish_telemetry(
            {
                "train_s": train_s,
                "examples": float(result.num_examples),
                "update_bytes": float(update.size),
                "bytes_sent": float(stream.sent_bytes),
                "bytes_received": float(self.bytes_received - received0),
                **clean_metrics(result.metrics),
            }
        )

    def _upload(
        self, task: dict[str, Any], weights: dict[str, np.ndarray], result: TrainResult
    ) -> tuple[PublishStream, Payload]:
        """Publish the update in chunks and wait for the broker to acknowledge them all."""
        c = self.config
        fields = {
            "task_id": task["task_id"],
            "device": c.device_id,
            "model_version": task["model_version"],
            "num_examples": int(result.num_examples),
            "metrics": clean_metrics(result.metrics),
            **trace_field(),  # the upload span's context: the combiner's handling links to it
        }
        if "compression" in task:  # the delta to the round's model, encoded
            update = compressed_update(task, weights, result.weights, self._feedback, **fields)
        else:
            # streamed: the update is cut into chunks straight from the trained tensors, and
            # at most a window of chunk messages exists at once (no whole-update copies)
            update = encode_payload("update", "tensors", result.weights, **fields)
        chunk_size = max(MIN_CHUNK_SIZE, min(int(task["chunk_size"]), c.max_chunk_size))
        topic = self.topics.device(c.region, c.device_id, "update")
        writer = ChunkWriter(update, chunk_size, meta={"task_id": task["task_id"]})
        stream = self.conn.publish_stream(
            range(writer.count),
            lambda i: (topic, writer.message(i)),
            window=stream_window(chunk_size, self.conn.max_inflight),
        )
        if not stream.wait(max(1.0, task["deadline"] + 30 - time.time())):
            self.conn.cancel_stream(stream)
            raise TimeoutError(f"upload of {task['task_id']} not acknowledged in time")
        return stream, update

    def _publish_telemetry(self, training: dict[str, float]) -> None:
        """One telemetry message: training figures plus system readings (QoS 0, best effort).

        Names the controller would refuse (docs/protocol.md 4.4) are left out here, so one odd
        trainer metric does not get the whole message dropped.
        """
        metrics = {**self.system_metrics.sample(), **training}
        metrics = {k: v for k, v in metrics.items() if telemetry_name_ok(k)}
        tele = encode("telemetry", ts=time.time(), metrics=metrics)
        c = self.config
        self.conn.publish(self.topics.device(c.region, c.device_id, "telemetry"), tele, qos=0)

    def _decline(self, task: dict[str, Any], reason: str) -> None:
        """Tell the combiner this device cannot take part, so the round need not wait for it."""
        if time.time() > float(task.get("deadline", 0)):
            return  # the round is over anyway
        msg = encode("decline", task_id=task["task_id"], reason=reason[:512])
        topic = self.topics.device(self.config.region, self.config.device_id, "update")
        for ch in split_payload(msg, MIN_CHUNK_SIZE, meta={"task_id": task["task_id"]}):
            self.conn.publish(topic, ch.to_bytes(), qos=1)

    # model packages --------------------------------------------------------------------
    def _ensure_package(self, ref: dict[str, Any], deadline: float) -> None:
        """Make the trainer train the session's package: fetch, verify, cache, load.

        A trainer that does not take packages (the numpy reference) trains the weights it is
        given, so a mixed fleet works when the architectures agree. Raises PackageError or
        ValueError naming why a package is refused; the task is then declined.
        """
        load = getattr(self.trainer, "load_package", None)
        if load is None:
            return
        digest = ref["digest"].hex()
        if getattr(self.trainer, "package_digest", None) == digest:
            return
        from edgefl.packages.format import ModelPackage

        data = self._cached_package(digest)
        if data is None:
            data = self._download(ref["id"], ref["digest"], deadline, max_payload=ref["size"])
        package = ModelPackage.loads(
            data,
            trusted_keys=self._trusted_keys(),
            require_signature=self.config.require_signature,
        )
        load(package)
        self._cache_package(digest, data)
        log.info(
            "%s: training package %s (%s, %s...)",
            self.config.device_id,
            package.manifest.get("name"),
            package.manifest.get("framework"),
            digest[:12],
        )

    def _trusted_keys(self) -> list[Any] | None:
        if not self.config.trusted_key:
            return None
        from edgefl.packages.signing import load_public_key

        return [load_public_key(self.config.trusted_key)]

    def _cached_package(self, digest: str) -> bytes | None:
        if not self.config.package_cache:
            return None
        path = Path(self.config.package_cache) / f"pkg-{digest}"
        if not path.is_file():
            return None
        data = path.read_bytes()
        return data if hashlib.sha256(data).hexdigest() == digest else None

    def _cache_package(self, digest: str, data: bytes) -> None:
        """Keep a verified package by digest; best effort: a failure is logged, not raised."""
        if not self.config.package_cache:
            return
        folder = Path(self.config.package_cache)
        # a unique temp name: several agents (a gateway, a simulation) may share one cache
        tmp = folder / f".pkg-{digest}.{os.getpid()}-{threading.get_ident()}.tmp"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            tmp.replace(folder / f"pkg-{digest}")
        except OSError as exc:
            log.warning("%s: package not cached: %s", self.config.device_id, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    # model download --------------------------------------------------------------------
    def _fetch_model(self, version: str, digest: bytes, deadline: float) -> dict[str, np.ndarray]:
        if self._model_cache and self._model_cache[0] == version:
            return self._model_cache[1]
        self._model_cache = None  # the old model's memory goes before the new one arrives
        # the tensors are read-only views of the reassembly buffer: no copy of the model
        with transfer_scope("download", version, kind="model"):
            weights = loads_tensors(self._download(version, digest, deadline, zero_copy=True))
        self._model_cache = (version, weights)
        return weights

    def _await_download(self, version: str, done: threading.Event, deadline: float) -> None:
        """Wait for a download; ask the controller for it when it stalls; give up when a newer
        task is waiting (the round moved on) or time runs out.

        Retained chunks normally arrive at once. When none has arrived for
        ``fetch_after_s``, the broker may have lost them (a crash before it saved them), so
        the agent publishes a ``fetch`` request, and repeats it while the wait goes on.
        """
        c = self.config
        start = time.time()
        give_up = start + max(0.1, min(c.download_timeout_s, deadline - start))
        next_fetch = start + c.fetch_after_s
        request = encode("fetch", version=version)
        self._download_done = done  # a newer task sets it (_on_task): no polling
        while True:
            if self._download_result_ready:
                return
            if not self._tasks.empty():
                raise TimeoutError(f"gave up on {version}: a newer task is waiting")
            # woken by the last chunk or a newer task, or at the next fetch or the timeout
            done.wait(max(0.0, min(give_up, next_fetch) - time.time()))
            if self._download_result_ready:
                return
            now = time.time()
            if now >= give_up:
                raise TimeoutError(f"model {version} did not arrive within {now - start:.1f}s")
            if now >= next_fetch:
                log.info("%s: %s has not arrived; asking for it", c.device_id, version)
                self.conn.publish(
                    self.topics.device(c.region, c.device_id, "request"), request, qos=1
                )
                next_fetch = now + c.fetch_after_s

    def _download(
        self,
        version: str,
        digest: bytes,
        deadline: float,
        max_payload: int | None = None,
        zero_copy: bool = False,
    ) -> Any:
        """Fetch a retained, chunked transfer from the model tree and check its digest.

        Returns ``bytes``, or with ``zero_copy`` a ``memoryview`` of the reassembly buffer.
        Chunks whose digest is not the task's are dropped at once: the reassembler checks
        the payload against that digest, so the payload is never hashed twice.
        Where the broker hands out retained messages only to exact-topic subscriptions
        (``retained_wildcards=false``), chunk 0 is also subscribed to by its exact topic and,
        once it tells the count, every other chunk (``edgefl.transport.compat``).
        """
        reasm = Reassembler(
            # a package announces its size: accept no more
            max_payload=256 * 1024 * 1024 if max_payload is None else max_payload,
            ttl_s=self.config.download_timeout_s,
            zero_copy=zero_copy,
        )
        done = threading.Event()
        result: dict[str, Any] = {}

        exact: list[str] = []  # exact chunk topics subscribed to, to unsubscribe at the end
        asked = [self.conn.quirks.retained_wildcards]  # elsewhere nothing to ask for

        def on_chunk(topic: str, payload: bytes) -> None:
            if done.is_set():
                return
            try:
                chunk = parse_chunk(payload, reasm.max_chunk_size)
                if chunk.digest != digest:  # another model under this version: give up now
                    result["error"] = ValueError(f"{version} does not match the digest in the task")
                    self._download_result_ready = True
                    done.set()
                    return
                if not asked[0]:
                    asked[0] = True
                    rest = [self.topics.model_chunk(version, i) for i in range(1, chunk.count)]
                    exact.extend(fetch_retained(self.conn, rest))
                got = reasm.feed_chunk("controller", chunk)
            except ChunkError as exc:
                log.warning("%s: bad model chunk on %s: %s", self.config.device_id, topic, exc)
                return
            if got is not None:
                self._download_result_ready = True
                result["payload"] = got.payload
                self.bytes_received += len(got.payload)
                done.set()

        self._download_result_ready = False
        flt = self.topics.model_filter(version)
        self.conn.subscribe(flt, on_chunk)
        exact.extend(fetch_retained(self.conn, [self.topics.model_chunk(version, 0)]))
        try:
            self._await_download(version, done, deadline)
        finally:
            self._download_done = None
            asked[0] = True
            self.conn.unsubscribe(flt)
            for exact_topic in list(exact):
                self.conn.unsubscribe(exact_topic)
        if "error" in result:
            raise result["error"]
        return result["payload"]


def _task_key(task: dict[str, Any]) -> tuple[int, int, int] | None:
    """(fence, round, attempt): tasks of one session only ever move forward in this order."""
    parts = task["task_id"].rsplit(":", 2)
    fence = task.get("fence", 0)
    if len(parts) != 3 or not parts[2].isdigit() or not isinstance(fence, int):
        return None
    return (fence, int(task["round"]), int(parts[2]))
