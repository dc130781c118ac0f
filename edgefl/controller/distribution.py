"""Model distribution: global model versions as retained, chunked messages on the broker.

Retained chunks let a device that connects late (or reconnects mid-round) fetch the current
model without asking anyone. Only the current and the previous version stay retained, so the
broker's memory does not grow with the number of rounds.

The broker is not a store: a crash can lose retained messages it had not yet persisted. So
the distributor keeps what it published and publishes it again whenever the controller
reconnects, and when a device reports a model it cannot find (a ``fetch`` request).
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import IO

from edgefl.protocol import Topics
from edgefl.protocol.chunking import ChunkWriter, Payload, release_pages, trim_heap
from edgefl.store.base import Store
from edgefl.transport import MqttConnection
from edgefl.transport.mqtt import stream_window

log = logging.getLogger(__name__)

RETAINED_VERSIONS = 2  # the current model and the one before it (devices still finishing)
PUBLISH_TIMEOUT_S = 300.0  # how long a publication waits for an unreachable broker
STALL_S = 30.0  # a publication with no PUBACK for this long is given up and resent
FETCH_COOLDOWN_S = 5.0  # one republication per version per this long, however many ask


class BrokerUnavailable(ConnectionError):
    """The broker stayed unreachable for longer than a publication may wait."""


@dataclass(frozen=True)
class _Retained:
    """What is retained on the broker, kept for republication in a temporary file: in
    memory it would cost the controller two model copies for the whole session."""

    transfer: str
    file: IO[bytes]
    size: int
    digest: bytes
    chunk_size: int
    meta_key: str  # "version" for models, "package" for packages

    @classmethod
    def keep(
        cls,
        transfer: str,
        blob: bytes,
        chunk_size: int,
        meta_key: str,
        reuse: IO[bytes] | None = None,
        digest: bytes | None = None,
    ) -> _Retained:
        """Write ``blob`` to a temporary file: ``reuse`` (a dropped version's, whose pages
        are still cached, so rewriting them is a plain copy) or a new one."""
        f = reuse or tempfile.TemporaryFile(prefix="edgefl-retained-")  # noqa: SIM115 - closed in close()
        os.ftruncate(f.fileno(), len(blob))
        view = memoryview(blob)
        at = 0
        while at < len(view):
            at += os.pwrite(f.fileno(), view[at:], at)
        if digest is None:
            digest = hashlib.sha256(blob).digest()
        return cls(transfer, f, len(blob), digest, chunk_size, meta_key)

    @property
    def chunk_count(self) -> int:
        return max(1, -(-self.size // self.chunk_size))

    def view(self) -> memoryview:
        """The blob, mapped from its file (pages come and go with use)."""
        if self.size == 0:
            return memoryview(b"")
        return memoryview(mmap.mmap(self.file.fileno(), self.size, access=mmap.ACCESS_READ))

    def close(self) -> None:
        self.file.close()


class ModelDistributor:
    """Publishes model blobs and packages as retained chunks; republishes them on demand.

    ``publish`` and ``publish_package`` block until the broker has acknowledged every chunk,
    waiting through disconnects (up to ``PUBLISH_TIMEOUT_S``, then ``BrokerUnavailable``).
    ``republish`` may be called from any thread, including the network thread: it only wakes
    the distributor's own worker, which ``stop`` ends. Publications never interleave.
    """

    def __init__(self, conn: MqttConnection, topics: Topics) -> None:
        self.conn = conn
        self.topics = topics
        self._published: list[_Retained] = []  # model versions on the broker, oldest first
        self._package: _Retained | None = None
        self._spare: IO[bytes] | None = None  # a dropped version's file, for the next one
        self._store: Store | None = None
        self._lock = threading.Lock()  # one publication at a time
        self._wanted: set[str] = set()  # transfers to republish ("*": everything retained)
        self._wake = threading.Condition()
        self._last_fetch: dict[str, float] = {}
        self._closing = False
        self._worker = threading.Thread(target=self._run, name="model-republisher", daemon=True)
        self._worker.start()
        self.republished = 0

    # publishing -------------------------------------------------------------------------
    def publish(self, version: str, blob: bytes, chunk_size: int) -> None:
        """Publish a model as retained chunks, and clear versions older than the previous one."""
        if self._published and self._published[-1].transfer == version:
            return
        with self._lock:
            spare, self._spare = self._spare, None
            item = _Retained.keep(
                version, blob, chunk_size, "version", reuse=spare, digest=self._digest(version)
            )
            self._send(item, blob)
            self._published.append(item)
            while len(self._published) > RETAINED_VERSIONS:
                old = self._published.pop(0)
                self._clear(old.transfer, old.chunk_count)
                if self._spare is None:
                    self._spare = old.file  # the next version's file
                else:
                    old.close()

    def _digest(self, version: str) -> bytes | None:
        """The SHA-256 the model store recorded for ``version`` (saves hashing it again: a
        blob that no longer matches it fails at every receiver's digest check anyway)."""
        if self._store is None:
            return None
        record = self._store.get_model(version)
        if record is None or len(record.digest) != 64:
            return None
        return bytes.fromhex(record.digest)

    def publish_package(self, package_id: str, blob: bytes, chunk_size: int) -> None:
        """Publish a model package as retained chunks under its id (``pkg-...``).

        Packages stay retained for the session: a device that joins late needs the package
        as much as the model. They are not part of the version rotation.
        """
        item = _Retained.keep(package_id, blob, chunk_size, "package")
        with self._lock:
            self._send(item, blob)
            if self._package is not None:
                self._package.close()
            self._package = item

    def forget_stale(self, store: Store, session_id: str, current: str, chunk_size: int) -> None:
        """Clear what a predecessor controller may have left retained for this session.

        A resumed controller does not know what was published before it started, so it
        clears the session's recent versions other than the current one.
        """
        self._store = store  # its records know the digests of the versions to publish
        recent = [m for m in store.list_models(session_id) if m.version != current][-3:]
        for m in recent:
            self._clear(m.version, max(1, -(-m.size // chunk_size)))

    # republishing ------------------------------------------------------------------------
    def republish(self, transfer: str | None = None) -> None:
        """Publish again what is retained (one transfer, or all with None), in the background.

        Requests for a transfer the distributor does not hold are ignored, and a transfer is
        republished at most once per ``FETCH_COOLDOWN_S`` on request: a device cannot make
        the controller flood the broker.
        """
        now = time.monotonic()
        if transfer is not None:
            if transfer not in {r.transfer for r in self._holding()}:
                return
            if now - self._last_fetch.get(transfer, float("-inf")) < FETCH_COOLDOWN_S:
                return
            self._last_fetch[transfer] = now
        with self._wake:
            self._wanted.add(transfer or "*")
            self._wake.notify()

    def stop(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._worker.join(timeout=5)

    def _holding(self) -> list[_Retained]:
        held = list(self._published)
        if self._package is not None:
            held.append(self._package)
        return held

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._closing or bool(self._wanted))
                if self._closing:
                    return
                wanted, self._wanted = self._wanted, set()
            with self._lock:
                for item in self._holding():
                    if "*" in wanted or item.transfer in wanted:
                        try:
                            self._send(item)
                            self.republished += 1
                            log.info("republished %s (%d bytes)", item.transfer, item.size)
                        except BrokerUnavailable as exc:
                            log.error("could not republish %s: %s", item.transfer, exc)

    # the wire -----------------------------------------------------------------------------
    def _send(self, item: _Retained, blob: bytes | None = None) -> None:
        """Publish every chunk and wait for its PUBACK, resending what a disconnect cut off.

        Chunks are cut from ``blob`` (or the kept file) as the broker acknowledges earlier
        ones, a window at a time: the controller never holds the chunk messages of a model.
        """
        view = memoryview(blob) if blob is not None else item.view()
        writer = ChunkWriter(
            Payload([view]),
            item.chunk_size,
            transfer=item.transfer,
            meta={item.meta_key: item.transfer},
            digest=item.digest,
        )

        def message(index: int) -> tuple[str, bytes]:
            return self.topics.model_chunk(item.transfer, index), writer.message(index)

        pending: list[int] = list(range(writer.count))
        window = stream_window(item.chunk_size, self.conn.max_inflight)
        give_up = time.monotonic() + PUBLISH_TIMEOUT_S
        try:
            while pending:
                if not self.conn.connected.wait(timeout=max(0.0, give_up - time.monotonic())):
                    raise BrokerUnavailable(
                        f"broker unreachable for {PUBLISH_TIMEOUT_S:.0f}s while publishing "
                        f"{item.transfer}"
                    )
                stream = self.conn.publish_stream(pending, message, retain=True, window=window)
                if stream.wait(STALL_S):
                    return
                self.conn.cancel_stream(stream)
                failed = stream.unacked()
                log.warning(
                    "%d of %d chunks of %s unacknowledged (broker disconnect?); resending",
                    len(failed),
                    len(pending),
                    item.transfer,
                )
                pending = failed
        finally:
            if blob is None:
                release_pages(view)
            trim_heap()  # the chunk messages are freed: give their memory back

    def _clear(self, transfer: str, n_chunks: int) -> None:
        for i in range(n_chunks):
            self.conn.publish(self.topics.model_chunk(transfer, i), b"", qos=1, retain=True)
