"""Model distribution: global model versions as retained, chunked messages on the broker.

Retained chunks let a device that connects late (or reconnects mid-round) fetch the current
model without asking anyone. Only the current and the previous version stay retained, so the
broker's memory does not grow with the number of rounds.
"""

from __future__ import annotations

from edgefl.protocol import Topics
from edgefl.protocol.chunking import split_payload
from edgefl.store.base import Store
from edgefl.transport import MqttConnection

RETAINED_VERSIONS = 2  # the current model and the one before it (devices still finishing)


class ModelDistributor:
    """Publishes model blobs as retained chunks and clears old versions.

    Not thread-safe: the controller's session loop is its only caller. ``publish`` blocks
    until the broker has acknowledged every chunk.
    """

    def __init__(self, conn: MqttConnection, topics: Topics) -> None:
        self.conn = conn
        self.topics = topics
        self._published: list[tuple[str, int]] = []  # (version, chunk count) on the broker

    def publish(self, version: str, blob: bytes, chunk_size: int) -> None:
        """Publish a model as retained chunks, and clear versions older than the previous one."""
        if self._published and self._published[-1][0] == version:
            return
        count = self._publish_retained(version, blob, chunk_size, {"version": version})
        self._published.append((version, count))
        while len(self._published) > RETAINED_VERSIONS:
            old, n = self._published.pop(0)
            self._clear(old, n)

    def publish_package(self, package_id: str, blob: bytes, chunk_size: int) -> None:
        """Publish a model package as retained chunks under its id (``pkg-...``).

        Packages stay retained for the session: a device that joins late needs the package
        as much as the model. They are not part of the version rotation.
        """
        self._publish_retained(package_id, blob, chunk_size, {"package": package_id})

    def _publish_retained(
        self, transfer: str, blob: bytes, chunk_size: int, meta: dict[str, str]
    ) -> int:
        """Publish ``blob`` as retained chunks on the model tree; wait for every PUBACK."""
        chunks = split_payload(blob, chunk_size, transfer=transfer, meta=meta)
        infos = [
            self.conn.publish(
                self.topics.model_chunk(transfer, c.index), c.to_bytes(), qos=1, retain=True
            )
            for c in chunks
        ]
        for info in infos:
            info.wait_for_publish(timeout=30)
        return len(chunks)

    def forget_stale(self, store: Store, session_id: str, current: str, chunk_size: int) -> None:
        """Clear what a predecessor controller may have left retained for this session.

        A resumed controller does not know what was published before it started, so it
        clears the session's recent versions other than the current one.
        """
        recent = [m for m in store.list_models(session_id) if m.version != current][-3:]
        for m in recent:
            self._clear(m.version, max(1, -(-m.size // chunk_size)))

    def _clear(self, version: str, n_chunks: int) -> None:
        for i in range(n_chunks):
            self.conn.publish(self.topics.model_chunk(version, i), b"", qos=1, retain=True)
