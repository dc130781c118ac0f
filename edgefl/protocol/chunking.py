"""Chunked transfer of large payloads over MQTT.

A payload (a model or an update, already CBOR-encoded) is cut into chunks. Each chunk is a
CBOR map carrying the transfer id, its index, the total count, the payload size, the nominal
chunk size and the SHA-256 of the whole payload, so that a receiver can:

* place chunks that arrive out of order (offset = index * chunk_size),
* ignore duplicates,
* resume after a reconnect (partial state is kept until it expires),
* reject a payload whose digest does not match,
* expire incomplete transfers so memory never grows without bound.

Reassembly buffers live in memory up to a byte budget and spill to temporary files past it,
so a combiner facing a burst of uploads keeps its RSS near O(model size).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import IO, Any, Protocol, TypeVar

import cbor2

log = logging.getLogger(__name__)

CHUNK_FORMAT = 1
DEFAULT_CHUNK_SIZE = 256 * 1024
MIN_CHUNK_SIZE = 1024
MAX_CHUNK_SIZE = 8 * 1024 * 1024
DIGEST_ALG = "sha256"

Meta = dict[Any, object]
"""A chunk's free-form ``meta`` map as decoded from CBOR. The protocol leaves its keys open
(edgefl itself only writes strings), so keys are not checked; values are plain CBOR values."""

_T = TypeVar("_T")


class ChunkError(ValueError):
    """A chunk or a reassembled payload that must be rejected."""


class TransferRefused(ChunkError):
    """A well-formed transfer that can never be accepted (too large): no resend will help.

    ``meta`` is the transfer's metadata, so the receiver can tell which round it was for.
    """

    def __init__(self, message: str, meta: Meta) -> None:
        super().__init__(message)
        self.meta = meta


class ReceiverFull(ChunkError):
    """A new transfer refused because the receiver has no room left for it right now.

    Raised when every transfer slot, or both the memory budget and every spill file, are in
    use. The rest of that transfer's chunks are ignored (until the TTL), but unlike
    ``TransferRefused`` the sender did nothing wrong: the same payload under a new transfer id
    may be accepted once room frees up. ``meta`` is the transfer's metadata.
    """

    def __init__(self, message: str, meta: Meta) -> None:
        super().__init__(message)
        self.meta = meta


@dataclass(frozen=True)
class Chunk:
    """One slice of a payload plus everything a receiver needs to place and verify it.

    Every chunk repeats the whole-transfer header (count, size, chunk size, digest, meta), so
    a receiver can start from whichever chunk arrives first. Instances from ``parse_chunk``
    are structurally valid; the digest is only checked once the whole payload is in.
    """

    transfer: str
    index: int
    count: int
    size: int
    chunk_size: int
    digest: bytes
    data: bytes
    meta: Meta = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """The chunk message as sent on the wire (a CBOR map, see docs/protocol.md)."""
        return cbor2.dumps(
            {
                "v": CHUNK_FORMAT,
                "xfer": self.transfer,
                "i": self.index,
                "n": self.count,
                "size": self.size,
                "csz": self.chunk_size,
                "alg": DIGEST_ALG,
                "digest": self.digest,
                "meta": self.meta,
                "data": self.data,
            }
        )


def _req(msg: Mapping[object, object], key: str, kind: type[_T]) -> _T:
    value = msg.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ChunkError(f"chunk field {key!r} missing or of the wrong type")
    return value


def parse_chunk(payload: bytes, max_chunk_size: int = MAX_CHUNK_SIZE) -> Chunk:
    """Decode one chunk message and check it is self-consistent; raise only ``ChunkError``.

    Size limits are checked before decoding, so a hostile message cannot make the receiver
    allocate more than ``max_chunk_size`` plus a small envelope.
    """
    if len(payload) > max_chunk_size + 4096:
        raise ChunkError(f"chunk message of {len(payload)} bytes exceeds the limit")
    try:
        msg = cbor2.loads(payload)
    except Exception as exc:
        raise ChunkError(f"malformed CBOR in chunk: {exc}") from exc
    if not isinstance(msg, dict):
        raise ChunkError("chunk must be a CBOR map")
    if msg.get("v") != CHUNK_FORMAT:
        raise ChunkError(f"unsupported chunk format {msg.get('v')!r}")
    if msg.get("alg") != DIGEST_ALG:
        raise ChunkError(f"unsupported digest algorithm {msg.get('alg')!r}")
    transfer = _req(msg, "xfer", str)
    index = _req(msg, "i", int)
    count = _req(msg, "n", int)
    size = _req(msg, "size", int)
    csz = _req(msg, "csz", int)
    digest = _req(msg, "digest", bytes)
    data = _req(msg, "data", bytes)
    meta = msg.get("meta") or {}
    if not isinstance(meta, dict):
        raise ChunkError("chunk field 'meta' must be a map")
    if not 0 < len(transfer) <= 128:
        raise ChunkError("transfer id must be 1-128 characters")
    if csz < 1 or (
        not MIN_CHUNK_SIZE <= csz <= max_chunk_size and not (count == 1 and csz >= size)
    ):
        raise ChunkError(f"chunk size {csz} outside [{MIN_CHUNK_SIZE}, {max_chunk_size}]")
    if size < 0 or count != max(1, -(-size // csz)):
        raise ChunkError(f"count {count} does not match size {size} / chunk size {csz}")
    if not 0 <= index < count:
        raise ChunkError(f"chunk index {index} outside 0..{count - 1}")
    expected = min(csz, size - index * csz) if size else 0
    if len(data) != expected:
        raise ChunkError(f"chunk {index} carries {len(data)} bytes, expected {expected}")
    if len(digest) != 32:
        raise ChunkError("digest must be 32 bytes of SHA-256")
    return Chunk(transfer, index, count, size, csz, digest, data, meta)


def split_payload(
    payload: bytes,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    transfer: str | None = None,
    meta: Mapping[str, object] | None = None,
) -> list[Chunk]:
    """Cut a payload into chunks; ``meta`` travels in every chunk (e.g. the round id).

    ``transfer`` defaults to a fresh random id; reuse an id only to resend the same payload,
    because receivers drop chunks of an id they have already delivered (until it expires).
    Raises ``ValueError`` for a chunk size outside the protocol's limits.
    """
    if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be in [{MIN_CHUNK_SIZE}, {MAX_CHUNK_SIZE}]")
    transfer = transfer or uuid.uuid4().hex
    digest = hashlib.sha256(payload).digest()
    size = len(payload)
    count = max(1, -(-size // chunk_size))
    view = memoryview(payload)
    return [
        Chunk(
            transfer,
            i,
            count,
            size,
            chunk_size,
            digest,
            bytes(view[i * chunk_size : (i + 1) * chunk_size]),
            dict(meta or {}),
        )
        for i in range(count)
    ]


class _Buffer:
    """Where one transfer's bytes are placed: memory, or a temporary file past the budget."""

    def __init__(self, size: int, spill: bool, recycled: bytearray | None = None) -> None:
        self.size = size
        self.spilled = spill
        self._file: IO[bytes] | None = None
        self._mem: bytearray | None = None
        if spill:
            self._file = tempfile.TemporaryFile(prefix="edgefl-xfer-")  # noqa: SIM115 - closed in close()
            self._file.truncate(size)
        else:
            # every byte is overwritten by chunks, so a recycled buffer needs no clearing
            self._mem = recycled if recycled is not None else bytearray(size)

    def _spill_file(self) -> IO[bytes]:
        if self._file is None:
            raise ValueError("transfer buffer used after close")
        return self._file

    def write(self, offset: int, data: bytes) -> None:
        if self._mem is not None:
            self._mem[offset : offset + len(data)] = data
        else:
            f = self._spill_file()
            f.seek(offset)
            f.write(data)

    def read(self, offset: int, length: int) -> bytes | memoryview:
        if self._mem is not None:
            return memoryview(self._mem)[offset : offset + length]
        f = self._spill_file()
        f.seek(offset)
        return f.read(length)

    def take_all(self) -> bytes:
        """The whole payload as ``bytes``: cbor2 decodes ``bytes`` about 8x faster than a
        ``bytearray`` (measured: 0.38 ms vs 3.2 ms for 4 MB), which outweighs the copy."""
        if self._mem is not None:
            return bytes(self._mem)
        f = self._spill_file()
        f.seek(0)
        return f.read()

    def close(self) -> bytearray | None:
        """Release the buffer; returns the memory so the caller may recycle it."""
        if self._file is not None:
            self._file.close()
        mem, self._mem = self._mem, None
        return mem


class _Hash(Protocol):
    """The part of a ``hashlib`` hash object that incremental verification uses."""

    def update(self, data: bytes | memoryview, /) -> None: ...

    def digest(self) -> bytes: ...


@dataclass
class _Partial:
    first: Chunk
    buffer: _Buffer
    received: set[int]
    created: float
    touched: float
    # SHA-256 over the leading run of chunks received so far: in-order arrivals (the usual
    # case) are hashed while hot in cache, and completion needs no second pass.
    hasher: _Hash = field(default_factory=hashlib.sha256)
    hashed: int = 0


@dataclass
class Completed:
    """A payload whose every chunk arrived and whose SHA-256 matched; delivered once."""

    transfer: str
    payload: bytes
    meta: Meta
    source: str


class Reassembler:
    """Collects chunks from many senders; yields each payload once, complete and verified.

    Transfers are keyed by ``(source, transfer id)``: the same id from two devices never
    mixes, because the caller takes ``source`` from the topic, which the broker ACL ties to
    the sender's identity.

    State stays bounded whatever the senders do, and one sender cannot take another's room:

    * per source, at most ``max_transfers_per_source`` transfers in flight and
      ``max_bytes_per_source`` bytes of them; a new transfer from a source at its limit
      evicts that source's oldest incomplete transfer (the sender has moved on), so a sender
      that starts transfers and never finishes them only ever replaces its own;
    * in all, at most ``max_transfers`` transfers in flight (a last resort against many
      identities), ``memory_budget`` bytes of buffers in RAM, and ``max_spill_files``
      transfers spilled to temporary files past it; a transfer that fits nowhere is refused
      (``ReceiverFull``), never buffered;
    * idle transfers expire after ``ttl_s``; ids of delivered or refused transfers are kept
      (to ignore their late duplicates) for the TTL, at most ``REMEMBERED_PER_SOURCE`` per
      source and ``max_transfers`` sources.

    ``evictions`` and ``expirations`` count what was dropped, for the caller to report. Not
    thread-safe: callers serialise access (the combiner feeds it from one worker thread).
    Nothing blocks except file I/O of spilled transfers.
    """

    REMEMBERED_PER_SOURCE = 16

    def __init__(
        self,
        max_payload: int = 256 * 1024 * 1024,
        max_chunk_size: int = MAX_CHUNK_SIZE,
        memory_budget: int = 64 * 1024 * 1024,
        ttl_s: float = 600.0,
        max_transfers: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        max_transfers_per_source: int = 2,
        max_bytes_per_source: int | None = None,
        max_spill_files: int = 64,
    ) -> None:
        if max_transfers_per_source < 1:
            raise ValueError("max_transfers_per_source must be at least 1")
        self.max_payload = max_payload
        self.max_chunk_size = max_chunk_size
        self.memory_budget = memory_budget
        self.ttl_s = ttl_s
        self.max_transfers = max_transfers
        self.max_transfers_per_source = max_transfers_per_source
        self.max_bytes_per_source = (
            max_payload if max_bytes_per_source is None else max_bytes_per_source
        )
        self.max_spill_files = max_spill_files
        self.evictions = 0
        self.expirations = 0
        self._clock = clock
        self._partials: dict[tuple[str, str], _Partial] = {}
        # per source: its transfers in flight, oldest first, and their declared bytes
        self._by_source: dict[str, dict[str, None]] = {}
        self._source_bytes: dict[str, int] = {}
        # per source (least recently used first): delivered or refused ids -> when
        self._finished: dict[str, dict[str, float]] = {}
        self._pool: dict[int, list[bytearray]] = {}
        self._last_sweep = float("-inf")
        self._mem_bytes = 0
        self._spilled = 0

    @property
    def pending(self) -> int:
        """Transfers started but not yet complete."""
        return len(self._partials)

    def pending_from(self, source: str) -> int:
        """Transfers from ``source`` started but not yet complete."""
        return len(self._by_source.get(source, ()))

    @property
    def memory_bytes(self) -> int:
        """Bytes of in-memory reassembly buffers in use (spilled transfers not counted)."""
        return self._mem_bytes

    @property
    def spill_files(self) -> int:
        """Temporary files open for spilled transfers (at most ``max_spill_files``)."""
        return self._spilled

    def feed(self, source: str, payload: bytes) -> Completed | None:
        """Add one raw chunk message; return the payload when this chunk completes it.

        Raises ChunkError for chunks that must be rejected; a completed payload whose digest
        does not match raises too, and its state is dropped so a clean resend can succeed.
        ``TransferRefused`` and ``ReceiverFull`` refuse a whole transfer at its first chunk;
        its later chunks are then ignored quietly.
        """
        chunk = parse_chunk(payload, self.max_chunk_size)
        return self.feed_chunk(source, chunk)

    def feed_chunk(self, source: str, chunk: Chunk) -> Completed | None:
        """``feed`` for a chunk that is already parsed (same results, same errors)."""
        now = self._clock()
        # sweeping is O(transfers): do it at most every ttl/100, not on every chunk
        if now - self._last_sweep >= min(1.0, self.ttl_s / 100):
            self.expire(now)
        key = (source, chunk.transfer)
        finished = self._finished.get(source)
        if finished is not None and chunk.transfer in finished:
            return None  # a duplicate of a delivered transfer, or the rest of a refused one
        part = self._partials.get(key)
        if part is None:
            part = self._start(source, chunk, now)
        else:
            f = part.first
            if (f.count, f.size, f.chunk_size, f.digest) != (
                chunk.count,
                chunk.size,
                chunk.chunk_size,
                chunk.digest,
            ):
                raise ChunkError(
                    f"chunk {chunk.index} disagrees with earlier chunks of its transfer"
                )
        part.touched = now
        if chunk.index in part.received:
            return None
        part.buffer.write(chunk.index * chunk.chunk_size, chunk.data)
        part.received.add(chunk.index)
        if chunk.index == part.hashed:
            part.hasher.update(chunk.data)
            part.hashed += 1
            csz = chunk.chunk_size
            while part.hashed in part.received:  # chunks that had arrived early
                i = part.hashed
                part.hasher.update(part.buffer.read(i * csz, min(csz, chunk.size - i * csz)))
                part.hashed += 1
        if len(part.received) < chunk.count:
            return None
        digest = part.hasher.digest()
        data = part.buffer.take_all()
        self._drop(key)
        if digest != chunk.digest:
            raise ChunkError(f"transfer {chunk.transfer} from {source}: digest mismatch, rejected")
        self._remember(source, chunk.transfer, now)
        return Completed(chunk.transfer, data, dict(part.first.meta), source)

    def _start(self, source: str, chunk: Chunk, now: float) -> _Partial:
        """Admit a new transfer, or raise why not; evicts the source's oldest if it must."""
        size = chunk.size
        if size > self.max_payload:
            self._remember(source, chunk.transfer, now)
            raise TransferRefused(
                f"payload of {size} bytes exceeds the limit of {self.max_payload}",
                dict(chunk.meta),
            )
        if size > self.max_bytes_per_source:
            self._remember(source, chunk.transfer, now)
            raise TransferRefused(
                f"payload of {size} bytes exceeds the per-sender limit of "
                f"{self.max_bytes_per_source}",
                dict(chunk.meta),
            )
        # the source has moved on: its oldest transfers make room, never another source's
        mine = self._by_source.get(source)
        while mine and (
            len(mine) >= self.max_transfers_per_source
            or self._source_bytes.get(source, 0) + size > self.max_bytes_per_source
        ):
            oldest = next(iter(mine))
            log.debug(
                "transfer %s from %s evicted by its transfer %s", oldest, source, chunk.transfer
            )
            self._drop((source, oldest))
            self.evictions += 1
            mine = self._by_source.get(source)
        if len(self._partials) >= self.max_transfers:
            self._remember(source, chunk.transfer, now)
            raise ReceiverFull(
                f"too many transfers in flight ({self.max_transfers}); try again later",
                dict(chunk.meta),
            )
        spill = self._mem_bytes + size > self.memory_budget
        if spill and self._spilled >= self.max_spill_files:
            self._remember(source, chunk.transfer, now)
            raise ReceiverFull(
                f"no room for a payload of {size} bytes: {self._mem_bytes} of the "
                f"{self.memory_budget}-byte memory budget and all {self.max_spill_files} "
                "spill files in use; try again later",
                dict(chunk.meta),
            )
        pooled = self._pool.get(size)
        buf = _Buffer(size, spill, pooled.pop() if pooled and not spill else None)
        if spill:
            self._spilled += 1
        else:
            self._mem_bytes += size
        part = _Partial(chunk, buf, set(), now, now)
        self._partials[(source, chunk.transfer)] = part
        self._by_source.setdefault(source, {})[chunk.transfer] = None
        self._source_bytes[source] = self._source_bytes.get(source, 0) + size
        return part

    def _remember(self, source: str, transfer: str, now: float) -> None:
        """Note a delivered or refused transfer, so its late chunks are ignored (bounded)."""
        seen = self._finished.pop(source, None)
        if seen is None:
            seen = {}
            while len(self._finished) >= self.max_transfers:
                self._finished.pop(next(iter(self._finished)))  # least recently used source
        self._finished[source] = seen  # now the most recently used
        seen.pop(transfer, None)
        seen[transfer] = now
        while len(seen) > self.REMEMBERED_PER_SOURCE:
            seen.pop(next(iter(seen)))

    def missing(self, source: str, transfer: str) -> list[int] | None:
        """Indices still missing from a transfer in progress, or None if none is known."""
        part = self._partials.get((source, transfer))
        if part is None:
            return None
        return [i for i in range(part.first.count) if i not in part.received]

    def discard(self, predicate: Callable[[Meta], bool]) -> int:
        """Drop partial transfers whose meta matches (e.g. all of a finished round).

        Returns how many were dropped; their later chunks start a new partial transfer.
        """
        keys = [k for k, p in self._partials.items() if predicate(p.first.meta)]
        for k in keys:
            self._drop(k)
        return len(keys)

    def expire(self, now: float | None = None) -> int:
        """Drop transfers idle for longer than ``ttl_s`` and forget old delivered/refused ids.

        ``feed`` calls this itself every so often, but only when chunks arrive: a receiver
        that must free idle state on a quiet link calls it on a timer. Returns the number of
        transfers dropped, and logs one line for them all.
        """
        now = self._clock() if now is None else now
        self._last_sweep = now
        stale = [k for k, p in self._partials.items() if now - p.touched > self.ttl_s]
        for k in stale:
            self._drop(k)
        if stale:
            self.expirations += len(stale)
            sources = sorted({src for src, _ in stale})
            log.warning(
                "%d incomplete transfer(s) expired after %.0f s idle, from %s%s",
                len(stale),
                self.ttl_s,
                ", ".join(sources[:5]),
                f" and {len(sources) - 5} more senders" if len(sources) > 5 else "",
            )
        for source in list(self._finished):
            seen = self._finished[source]
            for transfer in [t for t, when in seen.items() if now - when > self.ttl_s]:
                del seen[transfer]
            if not seen:
                del self._finished[source]
        return len(stale)

    def _drop(self, key: tuple[str, str]) -> None:
        part = self._partials.pop(key, None)
        if part is None:
            return
        source, transfer = key
        mine = self._by_source[source]
        del mine[transfer]
        if mine:
            self._source_bytes[source] -= part.buffer.size
        else:
            del self._by_source[source], self._source_bytes[source]
        if part.buffer.spilled:
            self._spilled -= 1
        else:
            self._mem_bytes -= part.buffer.size
        mem = part.buffer.close()
        # Keep a few buffers of the sizes in use: a fleet sends same-sized updates, and a
        # fresh multi-MB bytearray costs page faults on every transfer.
        if mem is not None:
            pooled = self._pool.setdefault(len(mem), [])
            if len(pooled) < 2 and len(mem) * (len(pooled) + 1) <= self.memory_budget // 4:
                pooled.append(mem)
            if len(self._pool) > 4:
                self._pool.pop(next(iter(self._pool)))


def iter_chunk_messages(chunks: list[Chunk]) -> Iterator[bytes]:
    """The wire bytes of each chunk, encoded lazily so a sender holds one message at a time."""
    for c in chunks:
        yield c.to_bytes()


def new_transfer_id() -> str:
    """A random transfer id (36 hex characters), unique enough to never collide per sender."""
    return uuid.uuid4().hex + os.urandom(2).hex()
