"""Property tests of chunked transfer (docs/protocol.md, "Chunked transfer").

The receiver rules under test: chunks may arrive in any order and more than once, a transfer
completes exactly once with the original bytes, an incomplete transfer survives until it
expires (so a sender can resume), a digest mismatch is rejected without poisoning a clean
resend, senders never mix, and memory stays within its budget by spilling to disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os

import cbor2
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edgefl.protocol.chunking import (
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    Chunk,
    ChunkError,
    DigestMismatch,
    Reassembler,
    ReceiverFull,
    TransferRefused,
    parse_chunk,
    split_payload,
)

SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CHUNK_SIZES = st.integers(min_value=1024, max_value=65536)


def make_payload(size: int, seed: int) -> bytes:
    return np.random.default_rng(seed).bytes(size)


@st.composite
def transfers(draw: st.DrawFn, min_chunks: int = 1) -> tuple[bytes, list[Chunk]]:
    csz = draw(CHUNK_SIZES)
    # hypothesis favours small integers on wide ranges; compose sizes so that the bulk is
    # spread evenly up to ~300 KB, and chunk boundaries (k * csz + {-1, 0, 1}) get their share
    mode = draw(st.sampled_from(["tiny", "bulk", "boundary"]))
    if mode == "tiny":
        size = draw(st.integers(0, 2100))
    elif mode == "bulk":
        size = draw(st.integers(0, 300)) * 1000 + draw(st.integers(0, 999))
    else:
        size = draw(st.integers(1, 300_000 // csz)) * csz + draw(st.integers(-1, 1))
    assume(max(1, -(-size // csz)) >= min_chunks)
    payload = make_payload(size, draw(st.integers(0, 2**32 - 1)))
    return payload, split_payload(payload, csz, meta={"task_id": "s:1:0"})


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def feed_all(r: Reassembler, source: str, chunks: list[Chunk]) -> list:
    return [c for c in (r.feed(source, ch.to_bytes()) for ch in chunks) if c is not None]


# splitting ---------------------------------------------------------------------------------


@SETTINGS
@given(transfers())
def test_split_headers_follow_the_rules(item: tuple[bytes, list[Chunk]]) -> None:
    payload, chunks = item
    csz = chunks[0].chunk_size
    n = max(1, -(-len(payload) // csz))  # count = ceil(size / csz), at least one chunk
    assert len(chunks) == n
    digest = hashlib.sha256(payload).digest()
    for i, ch in enumerate(chunks):
        assert (ch.index, ch.count, ch.size, ch.chunk_size) == (i, n, len(payload), csz)
        assert ch.digest == digest
        assert ch.data == payload[i * csz : (i + 1) * csz]  # offset = i * csz
        assert parse_chunk(ch.to_bytes()) == ch
    last = len(payload) - (n - 1) * csz
    assert len(chunks[-1].data) == last  # the last chunk carries the remainder
    assert b"".join(c.data for c in chunks) == payload


@pytest.mark.parametrize("csz", [0, MIN_CHUNK_SIZE - 1, MAX_CHUNK_SIZE + 1])
def test_split_refuses_chunk_sizes_outside_the_limits(csz: int) -> None:
    with pytest.raises(ValueError):
        split_payload(b"x" * 10, csz)


# reassembly --------------------------------------------------------------------------------


@SETTINGS
@given(transfers(), st.data())
def test_any_order_with_duplicates_completes_exactly_once(
    item: tuple[bytes, list[Chunk]], data: st.DataObject
) -> None:
    payload, chunks = item
    order = data.draw(st.permutations(range(len(chunks))))
    dups = data.draw(st.lists(st.integers(0, len(chunks) - 1), max_size=20))
    sequence = list(order)
    for d in dups:  # insert each duplicate at a random position
        sequence.insert(data.draw(st.integers(0, len(sequence))), d)
    r = Reassembler()
    done = feed_all(r, "dev-1", [chunks[i] for i in sequence])
    assert len(done) == 1
    assert done[0].payload == payload
    assert done[0].meta == {"task_id": "s:1:0"}
    assert done[0].source == "dev-1"
    assert done[0].transfer == chunks[0].transfer
    assert r.pending == 0 and r.memory_bytes == 0
    # a late duplicate of a delivered transfer (QoS 1 redelivery) is ignored
    assert r.feed("dev-1", chunks[0].to_bytes()) is None
    assert r.pending == 0


@SETTINGS
@given(transfers(min_chunks=2), st.data())
def test_missing_chunks_reported_then_resume_completes(
    item: tuple[bytes, list[Chunk]], data: st.DataObject
) -> None:
    payload, chunks = item
    n = len(chunks)
    dropped = data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n - 1), label="dropped")
    kept = [i for i in data.draw(st.permutations(range(n))) if i not in dropped]
    r = Reassembler()
    assert r.missing("dev-1", chunks[0].transfer) is None  # nothing known yet
    assert feed_all(r, "dev-1", [chunks[i] for i in kept]) == []
    assert r.missing("dev-1", chunks[0].transfer) == sorted(dropped)
    assert r.pending == 1
    # "resume": after a reconnect the sender republishes everything unacknowledged; resent
    # copies of chunks already held are ignored
    resend = sorted(dropped) + data.draw(st.lists(st.sampled_from(kept), max_size=5))
    resend = data.draw(st.permutations(resend))
    done = feed_all(r, "dev-1", [chunks[i] for i in resend])
    assert [d.payload for d in done] == [payload]
    assert r.missing("dev-1", chunks[0].transfer) is None


@SETTINGS
@given(transfers(), st.data())
def test_corrupted_chunk_fails_digest_and_clean_resend_succeeds(
    item: tuple[bytes, list[Chunk]], data: st.DataObject
) -> None:
    payload, chunks = item
    assume(len(payload) > 0)
    victim = data.draw(st.integers(0, len(chunks) - 1))
    ch = chunks[victim]
    pos = data.draw(st.integers(0, len(ch.data) - 1))
    flip = data.draw(st.integers(1, 255))
    bad_data = ch.data[:pos] + bytes([ch.data[pos] ^ flip]) + ch.data[pos + 1 :]
    bad = list(chunks)
    bad[victim] = dataclasses.replace(ch, data=bad_data)
    r = Reassembler()
    with pytest.raises(ChunkError, match="digest"):
        feed_all(r, "dev-1", bad)
    assert r.pending == 0 and r.memory_bytes == 0  # the bad transfer left nothing behind
    done = feed_all(r, "dev-1", chunks)  # the same transfer id, sent cleanly
    assert [d.payload for d in done] == [payload]


@SETTINGS
@given(transfers(), transfers(), st.data())
def test_same_transfer_id_from_two_sources_never_mixes(
    a: tuple[bytes, list[Chunk]], b: tuple[bytes, list[Chunk]], data: st.DataObject
) -> None:
    pa, ca = a
    pb, cb = b
    cb = [dataclasses.replace(c, transfer=ca[0].transfer) for c in cb]  # a colliding id
    tagged = [("dev-a", c) for c in ca] + [("dev-b", c) for c in cb]
    order = data.draw(st.permutations(tagged))
    r = Reassembler()
    got = {}
    for source, ch in order:
        done = r.feed(source, ch.to_bytes())
        if done is not None:
            assert done.source not in got
            got[done.source] = done.payload
    assert got == {"dev-a": pa, "dev-b": pb}


@SETTINGS
@given(transfers(min_chunks=2), transfers(), st.data())
def test_chunk_disagreeing_with_its_transfer_is_rejected(
    a: tuple[bytes, list[Chunk]], b: tuple[bytes, list[Chunk]], data: st.DataObject
) -> None:
    pa, ca = a
    _, cb = b
    other = data.draw(st.sampled_from(cb))
    assume(
        (other.count, other.size, other.chunk_size, other.digest)
        != (ca[0].count, ca[0].size, ca[0].chunk_size, ca[0].digest)
    )
    other = dataclasses.replace(other, transfer=ca[0].transfer)
    r = Reassembler()
    assert r.feed("dev-1", ca[0].to_bytes()) is None
    with pytest.raises(ChunkError, match="disagrees"):
        r.feed("dev-1", other.to_bytes())
    # the genuine transfer is unharmed
    done = feed_all(r, "dev-1", ca[1:])
    assert [d.payload for d in done] == [pa]


def test_chunk_with_other_meta_is_rejected_and_a_mismatch_names_the_transfer() -> None:
    """The first chunk fixes ``meta`` too (rule 6.3.2): a chunk claiming another round for
    the same transfer is refused. A transfer that completes with the wrong digest raises
    ``DigestMismatch`` carrying its meta, so the combiner knows whose answer was junk."""
    payload = bytes(range(256)) * 20
    chunks = split_payload(payload, 1024, transfer="x", meta={"task_id": "s:1:0"})
    r = Reassembler()
    assert r.feed("dev-1", chunks[0].to_bytes()) is None
    moved = dataclasses.replace(chunks[1], meta={"task_id": "s:2:0"})
    with pytest.raises(ChunkError, match="disagrees"):
        r.feed("dev-1", moved.to_bytes())
    assert [d.payload for d in feed_all(r, "dev-1", chunks[1:])] == [payload]
    bad = [*chunks[:-1], dataclasses.replace(chunks[-1], data=bytes(len(chunks[-1].data)))]
    r2 = Reassembler()
    with pytest.raises(DigestMismatch) as caught:
        feed_all(r2, "dev-1", bad)
    assert caught.value.meta == {"task_id": "s:1:0"}


# header validation -------------------------------------------------------------------------


def _valid_map(size: int = 3000, csz: int = 1024, index: int = 0) -> dict:
    payload = make_payload(size, 7)
    ch = split_payload(payload, csz, transfer="t-1")[index]
    return cbor2.loads(ch.to_bytes())


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"v": 2}, "format"),
        ({"v": None}, "format"),
        ({"alg": "md5"}, "algorithm"),
        ({"n": 2}, "count"),  # ceil(3000 / 1024) is 3
        ({"n": 4}, "count"),
        ({"i": 3}, "index"),
        ({"i": -1}, "index"),
        ({"size": 3050, "i": 2, "data": b"\x00" * 1000}, "carries"),  # last chunk: 1002
        ({"size": -1}, "count"),
        ({"csz": 512, "n": 6}, "chunk size"),  # below MIN_CHUNK_SIZE with several chunks
        ({"csz": 1500}, "count"),
        ({"data": b"\x00" * 1023}, "carries"),
        ({"data": b"\x00" * 1025}, "carries"),
        ({"digest": b"\x00" * 31}, "digest"),
        ({"digest": "00" * 32}, "digest"),
        ({"xfer": ""}, "transfer"),
        ({"xfer": "x" * 129}, "transfer"),
        ({"xfer": 5}, "xfer"),
        ({"i": True}, "'i'"),  # a CBOR bool is not an integer
        ({"n": 3.0}, "'n'"),
        ({"data": "text"}, "'data'"),
        ({"meta": [1, 2]}, "meta"),
    ],
)
def test_inconsistent_headers_rejected(change: dict, why: str) -> None:
    msg = _valid_map()
    msg.update(change)
    with pytest.raises(ChunkError, match=why):
        parse_chunk(cbor2.dumps(msg))


@pytest.mark.parametrize("key", ["v", "xfer", "i", "n", "size", "csz", "alg", "digest", "data"])
def test_missing_field_rejected(key: str) -> None:
    msg = _valid_map()
    del msg[key]
    with pytest.raises(ChunkError):
        parse_chunk(cbor2.dumps(msg))


def test_single_chunk_may_declare_its_own_size_as_chunk_size() -> None:
    """A one-chunk transfer may use csz = size even below the 1024-byte minimum."""
    payload = b"tiny"
    msg = {
        "v": 1,
        "xfer": "t",
        "i": 0,
        "n": 1,
        "size": 4,
        "csz": 4,
        "alg": "sha256",
        "digest": hashlib.sha256(payload).digest(),
        "meta": {},
        "data": payload,
    }
    done = Reassembler().feed("d", cbor2.dumps(msg))
    assert done is not None and done.payload == payload
    # ... and meta may be left out entirely
    del msg["meta"]
    assert parse_chunk(cbor2.dumps(msg)).meta == {}


def test_empty_payload_is_one_empty_chunk() -> None:
    (ch,) = split_payload(b"", 1024)
    assert (ch.count, ch.size, ch.data) == (1, 0, b"")
    done = Reassembler().feed("d", ch.to_bytes())
    assert done is not None and done.payload == b""


def test_worked_chunk_example_from_the_docs() -> None:
    """The hex example in docs/protocol.md, byte for byte."""
    from edgefl.protocol.tensors import dumps_tensors

    blob = dumps_tensors({"b": np.array([1.5, -2.0], dtype=np.float32)})
    (ch,) = split_payload(blob, 1024, transfer="x1", meta={"task_id": "s1:1:0"})
    assert ch.to_bytes().hex(" ") == " ".join(
        [
            "aa",  # map of 10 pairs
            "61 76 01",  # "v": 1
            "64 78 66 65 72 62 78 31",  # "xfer": "x1"
            "61 69 00",  # "i": 0
            "61 6e 01",  # "n": 1
            "64 73 69 7a 65 13",  # "size": 19
            "63 63 73 7a 19 04 00",  # "csz": 1024
            "63 61 6c 67 66 73 68 61 32 35 36",  # "alg": "sha256"
            "66 64 69 67 65 73 74 58 20",  # "digest": 32-byte string ...
            "11 4f b1 70 05 60 e8 af b7 67 94 4b 39 cf af ed",
            "ef b8 e0 0a 5b 4a a9 97 7a 80 70 af 28 a1 9b cc",
            "64 6d 65 74 61 a1 67 74 61 73 6b 5f 69 64 66 73 31 3a 31 3a 30",  # "meta"
            "64 64 61 74 61 53",  # "data": 19-byte string ...
            "a1 61 62 d8 28 82 81 02 d8 55 48 00 00 c0 3f 00 00 00 c0",
        ]
    )


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_parse_chunk_on_arbitrary_bytes_raises_only_chunk_error(blob: bytes) -> None:
    with contextlib.suppress(ChunkError):
        parse_chunk(blob)


CBOR_VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=70_000),
    st.booleans(),
    st.none(),
    st.floats(),
    st.text(max_size=140),
    st.binary(max_size=40),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([(0, 1024), (5, 1024), (3000, 1024), (3000, 2000)]),
    st.dictionaries(
        st.sampled_from(["v", "xfer", "i", "n", "size", "csz", "alg", "digest", "meta", "data"]),
        CBOR_VALUES,
        min_size=1,
        max_size=3,
    ),
)
def test_parse_chunk_on_mutated_headers_raises_only_chunk_error(
    shape: tuple[int, int], changes: dict
) -> None:
    msg = _valid_map(*shape)
    msg.update(changes)
    with contextlib.suppress(ChunkError):
        parse_chunk(cbor2.dumps(msg))


# expiry, budgets, limits -------------------------------------------------------------------


@SETTINGS
@given(st.lists(transfers(min_chunks=2), min_size=1, max_size=4), st.data())
def test_expiry_drops_incomplete_transfers_and_frees_memory(
    items: list[tuple[bytes, list[Chunk]]], data: st.DataObject
) -> None:
    clock = FakeClock()
    r = Reassembler(ttl_s=60.0, clock=clock)
    for k, (_, chunks) in enumerate(items):
        feed_all(r, f"dev-{k}", chunks[:-1])  # every transfer stays one chunk short
    assert r.pending == len(items)
    assert r.memory_bytes == sum(len(p) for p, _ in items)
    clock.now += 60.0  # exactly the TTL: still kept
    assert r.expire() == 0
    clock.now += data.draw(st.floats(min_value=0.001, max_value=1e6))
    assert r.expire() == len(items)
    assert r.pending == 0 and r.memory_bytes == 0
    # the expired state is gone: the missing last chunk alone no longer completes anything
    payload0, chunks0 = items[0]
    assert r.feed("dev-0", chunks0[-1].to_bytes()) is None
    assert r.missing("dev-0", chunks0[0].transfer) == list(range(len(chunks0) - 1))
    # a full resend after expiry completes from scratch
    done = feed_all(r, "dev-0", chunks0[:-1])
    assert [d.payload for d in done] == [payload0]


def test_activity_keeps_a_transfer_alive_and_feeding_expires_others() -> None:
    clock = FakeClock()
    r = Reassembler(ttl_s=10.0, clock=clock)
    payload = make_payload(5000, 1)
    slow = split_payload(payload, 1024)
    stale = split_payload(make_payload(5000, 2), 1024)
    r.feed("stale", stale[0].to_bytes())
    for ch in slow[:-1]:
        r.feed("slow", ch.to_bytes())
        clock.now += 4.0  # each chunk touches the transfer within the TTL
    assert r.pending == 1  # feeding expired "stale" (16 s idle) on the way
    assert r.missing("stale", stale[0].transfer) is None
    done = r.feed("slow", slow[-1].to_bytes())
    assert done is not None and done.payload == payload


@SETTINGS
@given(
    st.lists(
        st.tuples(st.integers(2000, 60_000), st.integers(0, 2**32 - 1)), min_size=2, max_size=6
    ),
    st.integers(1024, 8192),
    st.integers(2000, 100_000),
    st.data(),
)
def test_memory_budget_spills_to_disk_and_still_reassembles(
    specs: list[tuple[int, int]], csz: int, budget: int, data: st.DataObject
) -> None:
    payloads = {f"dev-{k}": make_payload(size, seed) for k, (size, seed) in enumerate(specs)}
    split = {src: split_payload(p, csz) for src, p in payloads.items()}
    stream = [(src, ch) for src, chunks in split.items() for ch in chunks]
    stream = data.draw(st.permutations(stream))  # all uploads interleaved
    r = Reassembler(memory_budget=budget)
    got: dict[str, bytes] = {}
    for src, ch in stream:
        done = r.feed(src, ch.to_bytes())
        assert r.memory_bytes <= budget
        if done is not None:
            got[src] = done.payload
    assert got == payloads
    assert r.memory_bytes == 0 and r.pending == 0


def test_transfers_past_the_budget_really_spill() -> None:
    r = Reassembler(memory_budget=10_000)
    a = split_payload(make_payload(8000, 1), 1024)
    b = split_payload(make_payload(8000, 2), 1024)
    r.feed("a", a[0].to_bytes())
    r.feed("b", b[0].to_bytes())
    assert r.pending == 2
    assert r.memory_bytes == 8000  # b went to a temporary file
    assert feed_all(r, "b", b[1:])[0].payload == make_payload(8000, 2)
    assert feed_all(r, "a", a[1:])[0].payload == make_payload(8000, 1)
    assert r.memory_bytes == 0


@SETTINGS
@given(transfers(min_chunks=2), st.data())
def test_payload_over_max_payload_rejected_then_ignored(
    item: tuple[bytes, list[Chunk]], data: st.DataObject
) -> None:
    payload, chunks = item
    limit = data.draw(st.integers(0, len(payload) - 1))
    r = Reassembler(max_payload=limit)
    order = data.draw(st.permutations(chunks))
    with pytest.raises(ChunkError, match="exceeds"):
        r.feed("dev-1", order[0].to_bytes())
    # the rest of the refused transfer is dropped quietly, and nothing is buffered
    assert feed_all(r, "dev-1", order[1:]) == []
    assert r.pending == 0 and r.memory_bytes == 0
    # a payload at the limit is fine
    ok = split_payload(payload[:limit], 1024)
    assert [d.payload for d in feed_all(r, "dev-2", ok)] == [payload[:limit]]


def test_oversized_chunk_message_rejected() -> None:
    r = Reassembler(max_chunk_size=4096)
    (ch,) = split_payload(make_payload(20_000, 3), 65536)
    with pytest.raises(ChunkError, match=r"exceeds|chunk size"):
        r.feed("d", ch.to_bytes())


def test_too_many_transfers_in_flight_rejected() -> None:
    r = Reassembler(max_transfers=2)
    for k in range(2):
        r.feed(f"d{k}", split_payload(make_payload(3000, k), 1024)[0].to_bytes())
    with pytest.raises(ChunkError, match="too many"):
        r.feed("d9", split_payload(make_payload(3000, 9), 1024)[0].to_bytes())


def test_discard_drops_transfers_by_meta() -> None:
    r = Reassembler()
    old = split_payload(make_payload(3000, 1), 1024, meta={"task_id": "s:1:0"})
    new = split_payload(make_payload(3000, 2), 1024, meta={"task_id": "s:2:0"})
    r.feed("d", old[0].to_bytes())
    r.feed("d", new[0].to_bytes())
    assert r.discard(lambda meta: meta.get("task_id") == "s:1:0") == 1
    assert r.pending == 1 and r.memory_bytes == 3000


# fairness between senders, bounded state ---------------------------------------------------


def starts(size: int, seed: int, meta: dict | None = None) -> list[Chunk]:
    """A 1 KiB-chunked transfer; feeding only its first chunk leaves it incomplete."""
    return split_payload(make_payload(size, seed), 1024, meta=meta)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_source_at_its_limit_evicts_its_own_oldest_transfer_only() -> None:
    r = Reassembler(max_transfers_per_source=2)
    a1, a2, a3, a4 = (starts(3000, k) for k in range(4))
    b1 = starts(3000, 10)
    r.feed("a", a1[0].to_bytes())
    r.feed("b", b1[0].to_bytes())
    r.feed("a", a2[0].to_bytes())
    r.feed("a", a1[1].to_bytes())  # activity does not make a1 younger: it was started first
    assert (r.pending_from("a"), r.pending_from("b"), r.evictions) == (2, 1, 0)
    r.feed("a", a3[0].to_bytes())
    assert r.evictions == 1
    assert r.missing("a", a1[0].transfer) is None  # the oldest went
    assert r.missing("a", a2[0].transfer) == [1, 2]
    r.feed("a", a4[0].to_bytes())
    assert r.missing("a", a2[0].transfer) is None
    assert (r.evictions, r.pending_from("a"), r.memory_bytes) == (2, 2, 3 * 3000)
    # the other source never noticed, and the survivors complete
    assert [d.payload for d in feed_all(r, "b", b1[1:])] == [make_payload(3000, 10)]
    assert [d.payload for d in feed_all(r, "a", a4[1:])] == [make_payload(3000, 3)]
    # an evicted transfer is not remembered: a full resend of it starts afresh
    assert [d.payload for d in feed_all(r, "a", a1)] == [make_payload(3000, 0)]


@SETTINGS
@given(st.integers(1, 4), st.integers(50, 400), st.integers(1, 3), st.data())
def test_a_flooding_source_cannot_grow_state_or_starve_others(
    limit: int, flood: int, honest: int, data: st.DataObject
) -> None:
    r = Reassembler(max_transfers_per_source=limit, max_transfers=limit + honest)
    uploads = {f"dev-{k}": starts(2500, k) for k in range(honest)}
    stream = [(src, ch) for src, chunks in uploads.items() for ch in chunks]
    # the flooder starts `flood` transfers (2 chunks each, one sent) among the honest chunks
    junk = [("flood", starts(2000, 1000 + k)[0]) for k in range(flood)]
    for item in junk:
        stream.insert(data.draw(st.integers(0, len(stream))), item)
    got = {}
    for src, ch in stream:
        done = r.feed(src, ch.to_bytes())
        assert r.pending_from("flood") <= limit
        assert r.pending <= limit + honest
        if done is not None:
            got[src] = done.payload
    assert got == {src: make_payload(2500, k) for k, src in enumerate(uploads)}
    assert r.evictions == flood - limit
    assert (r.pending, r.memory_bytes) == (limit, limit * 2000)


def test_bytes_per_source_evict_then_refuse() -> None:
    r = Reassembler(max_bytes_per_source=10_000, max_transfers_per_source=8)
    first, second = starts(6000, 1), starts(6000, 2)
    r.feed("a", first[0].to_bytes())
    r.feed("a", second[0].to_bytes())  # 12,000 bytes would not fit: the first makes room
    assert (r.evictions, r.pending_from("a"), r.memory_bytes) == (1, 1, 6000)
    big = starts(12_000, 3, meta={"task_id": "s:1:0"})
    with pytest.raises(TransferRefused, match="per-sender limit") as err:
        r.feed("a", big[0].to_bytes())
    assert err.value.meta == {"task_id": "s:1:0"}
    assert feed_all(r, "a", big[1:]) == []  # the rest of it is ignored quietly
    assert r.pending_from("a") == 1  # refusing evicted nothing more
    assert [d.payload for d in feed_all(r, "a", second[1:])] == [make_payload(6000, 2)]


def test_spill_files_are_capped_and_a_transfer_that_fits_nowhere_is_refused() -> None:
    fds = open_fds()
    r = Reassembler(memory_budget=10_000, max_spill_files=2)
    uploads = {src: starts(8000, k) for k, src in enumerate("abcd")}
    for src in "abc":
        r.feed(src, uploads[src][0].to_bytes())
    assert (r.memory_bytes, r.spill_files, open_fds() - fds) == (8000, 2, 2)
    with pytest.raises(ReceiverFull, match="all 2 spill files in use"):
        r.feed("d", uploads["d"][0].to_bytes())
    assert feed_all(r, "d", uploads["d"][1:]) == []  # refused, not buffered
    assert (r.pending, r.memory_bytes, r.spill_files, open_fds() - fds) == (3, 8000, 2, 2)
    # a small transfer still fits in memory while the spill files are busy
    assert [d.payload for d in feed_all(r, "e", starts(1500, 9))] == [make_payload(1500, 9)]
    # room frees up as transfers complete; the refused one succeeds under a new id
    assert [d.payload for d in feed_all(r, "b", uploads["b"][1:])] == [make_payload(8000, 1)]
    retry = split_payload(make_payload(8000, 3), 1024)
    assert [d.payload for d in feed_all(r, "d", retry)] == [make_payload(8000, 3)]
    for src in "ac":
        feed_all(r, src, uploads[src][1:])
    assert (r.pending, r.memory_bytes, r.spill_files, open_fds()) == (0, 0, 0, fds)


@SETTINGS
@given(
    st.lists(st.integers(1000, 30_000), min_size=2, max_size=12),
    st.integers(5000, 40_000),
    st.integers(0, 3),
    st.data(),
)
def test_memory_budget_and_spill_cap_hold_for_any_interleaving(
    sizes: list[int], budget: int, max_spill: int, data: st.DataObject
) -> None:
    uploads = {f"dev-{k}": starts(size, k) for k, size in enumerate(sizes)}
    stream = data.draw(st.permutations([(s, c) for s, cs in uploads.items() for c in cs]))
    r = Reassembler(memory_budget=budget, max_spill_files=max_spill)
    got, refused = {}, set()
    for src, ch in stream:
        try:
            done = r.feed(src, ch.to_bytes())
        except ReceiverFull:
            assert src not in refused
            assert r.missing(src, ch.transfer) is None
            refused.add(src)
            continue
        assert r.memory_bytes <= budget
        assert r.spill_files <= max_spill
        if done is not None:
            got[src] = done.payload
    # every upload either completed intact or was refused whole at its first chunk
    assert sorted([*got, *refused]) == sorted(uploads)
    assert all(got[src] == make_payload(sizes[int(src[4:])], int(src[4:])) for src in got)
    assert (r.pending, r.memory_bytes, r.spill_files) == (0, 0, 0)


def test_remembered_ids_are_bounded_per_source() -> None:
    """A sender refused again and again leaves only its latest ids behind."""
    r = Reassembler(max_payload=1000)
    n = 5 * Reassembler.REMEMBERED_PER_SOURCE
    big = [starts(3000, k) for k in range(n)]
    for chunks in big:
        with pytest.raises(TransferRefused):
            r.feed("a", chunks[0].to_bytes())
    # the latest ids are still remembered: their later chunks are ignored quietly ...
    for chunks in big[-Reassembler.REMEMBERED_PER_SOURCE :]:
        assert r.feed("a", chunks[1].to_bytes()) is None
    # ... the oldest were forgotten, so their chunks are judged (and refused) again
    with pytest.raises(TransferRefused):
        r.feed("a", big[0][1].to_bytes())


def test_expiry_logs_one_line_for_many_transfers(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    r = Reassembler(ttl_s=10.0, clock=clock, max_transfers_per_source=1)
    for k in range(200):
        r.feed(f"dev-{k}", starts(2000, k)[0].to_bytes())
    clock.now += 11.0
    with caplog.at_level("WARNING", logger="edgefl.protocol.chunking"):
        assert r.expire() == 200
    assert (r.expirations, r.pending, len(caplog.records)) == (200, 0, 1)
    assert "200 incomplete transfer(s) expired" in caplog.text
    assert "and 195 more senders" in caplog.text


# regressions (bugs these tests found) ------------------------------------------------------


def test_zero_chunk_size_is_a_chunk_error() -> None:
    msg = _valid_map(0, 1024)
    msg["csz"] = 0
    with pytest.raises(ChunkError):
        parse_chunk(cbor2.dumps(msg))
