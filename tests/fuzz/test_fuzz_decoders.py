"""Fuzzing every wire decoder and the chunk reassembler with hypothesis.

Everything a peer (or a config file) can hand to edgefl goes through one of these decoders,
and the handlers that call them catch only the documented error: ``MessageError``,
``CodecError``, ``ChunkError``, ``PackageError``, ``TopicError`` or ``ValueError``. Any other
exception escaping a decoder is a crash on the network thread, so every test here accepts a
result or the documented error and nothing else. Results are checked too: a decoder that
returns must return what its contract says (types, ranges, an alphabet).

The reassembler is driven with random sequences of chunks (several senders, interleaved,
duplicated, out of order, corrupted, truncated, oversized) under small limits, and its state
(transfers in flight, buffered bytes, every internal map, open files) must stay within them.

Inputs come from random bytes and text, from mutations of the seed corpus in
``tests/fuzz/corpus`` (bit flips, truncation, splicing, and structured replacement of decoded
fields), and from strategies that build near-valid inputs. ``EDGEFL_FUZZ_EXAMPLES`` sets the
total number of generated inputs (default 100,000); each test runs its share and asserts
that it really ran that many. Crashing inputs found so far are kept as ``crash-*`` files in
the corpus and replayed by ``test_corpus_replays_without_crashing``.

Regenerate the corpus (seeds and known crashes) from the repository root with
``.venv/bin/python -m tests.fuzz.test_fuzz_decoders``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import cbor2
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from device_agent.config import AgentConfig, load_config
from edgefl.packages.artifacts import TrainingArtifacts
from edgefl.packages.format import (
    SIGNATURE_CONTEXT,
    ModelPackage,
    PackageError,
    encode_manifest,
    sha256_hex,
)
from edgefl.protocol.chunking import (
    MAX_CHUNK_SIZE,
    Chunk,
    ChunkError,
    Completed,
    Reassembler,
    parse_chunk,
    split_payload,
)
from edgefl.protocol.messages import (
    MESSAGE_VERSION,
    OPTIONAL,
    SCHEMAS,
    MessageError,
    decode,
    package_ref,
)
from edgefl.protocol.tensors import (
    DTYPE_TO_TAG,
    TAG_TO_DTYPE,
    CodecError,
    decode_tensors,
    dumps_tensors,
    encode_tensors,
    loads_tensors,
)
from edgefl.protocol.topics import COMBINER_CHANNELS, DEVICE_CHANNELS, TopicError, Topics
from edgefl.protocol.types import participants_from_wire, rejections_from_wire, spec_from_wire

CORPUS = Path(__file__).resolve().parent / "corpus"

# --- budget ---------------------------------------------------------------------------------

TOTAL_EXAMPLES = int(os.environ.get("EDGEFL_FUZZ_EXAMPLES", "100000"))
# Relative shares of the budget: cheap decoders get more inputs than whole reassembly runs.
SHARES: dict[str, int] = {
    "messages_bytes": 9,
    "messages_mutated": 8,
    "messages_structured": 6,
    "tensors_bytes": 5,
    "tensors_mutated": 6,
    "tensors_structured": 8,
    "chunks_bytes": 5,
    "chunks_mutated": 8,
    "chunks_structured": 8,
    "reassembler": 5,
    "types": 10,
    "packages_mutated": 5,
    "packages_structured": 6,
    "topics": 9,
    "config": 2,
}


# The part of each test's inputs that hypothesis' own engine generates (boundary-biased, and
# shrunk to a minimal example on failure); the rest come through its fuzzing entry point.
ENGINE_SHARE = float(os.environ.get("EDGEFL_FUZZ_ENGINE_SHARE", "0.05"))
MAX_BUFFER = 4096  # bytes of choices a fuzzed input may consume
# Inputs are the same on every run; another salt explores different ones (a longer campaign).
SEED_SALT = os.environ.get("EDGEFL_FUZZ_SEED", "")


def quota(name: str) -> int:
    """The number of generated inputs test ``name`` must run (its share of the budget)."""
    return math.ceil(TOTAL_EXAMPLES * SHARES[name] / sum(SHARES.values()))


assert sum(quota(n) for n in SHARES) >= TOTAL_EXAMPLES

RUNS: Counter[str] = Counter()  # inputs actually run per test
CALLS: Counter[str] = Counter()  # decoder calls (a reassembler input feeds many chunks)


@pytest.fixture(scope="module", autouse=True)
def _report_budget(request: pytest.FixtureRequest) -> Iterator[None]:
    """Print how many inputs ran (and decoder calls they made) once the module is done."""
    yield
    plugins = request.config.pluginmanager
    reporter = plugins.get_plugin("terminalreporter")
    capture = plugins.get_plugin("capturemanager")
    if RUNS and reporter is not None and capture is not None:
        runs = ", ".join(f"{k} {v}" for k, v in sorted(RUNS.items()))
        calls = ", ".join(f"{k} {v}" for k, v in sorted(CALLS.items()))
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nfuzz: {sum(RUNS.values())} generated inputs ({runs})")
            reporter.write_line(f"fuzz: {sum(CALLS.values())} decoder calls ({calls})")


def fuzz(name: str, strategy: st.SearchStrategy[Any], check: Callable[[Any], None]) -> None:
    """Run ``check`` on ``quota(name)`` inputs drawn from ``strategy``; fail on any crash.

    Two passes over the same strategy: first hypothesis' engine generates ``ENGINE_SHARE`` of
    the inputs (derandomized: the same inputs on every run; a failure is shrunk to a minimal
    example), then ``fuzz_one_input`` (hypothesis' entry point for fuzzers such as atheris)
    turns seeded random buffers into the rest, at a fraction of the engine's cost per input.
    Both are reproducible. The count assertion catches a strategy that rejects its buffers,
    which would silently shrink the budget.
    """
    last: list[Any] = []

    @seed(zlib.crc32((name + SEED_SALT).encode()))
    @settings(
        max_examples=max(1, math.ceil(quota(name) * ENGINE_SHARE)),
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.large_base_example,
            HealthCheck.filter_too_much,
        ],
    )
    @given(strategy)
    def run(value: Any) -> None:
        RUNS[name] += 1
        last[:] = [value]
        check(value)

    RUNS[name] = 0
    run()
    rng = random.Random(zlib.crc32((name + SEED_SALT).encode()))
    for _ in range(4 * quota(name)):
        if RUNS[name] >= quota(name):
            break
        buffer = rng.randbytes(rng.randint(16, MAX_BUFFER))
        try:
            run.hypothesis.fuzz_one_input(buffer)  # type: ignore[attr-defined]
        except Exception as exc:
            raise AssertionError(f"{name}: {exc!r} on input {last[-1]!r}") from exc
    assert RUNS[name] >= quota(name), f"{name}: ran {RUNS[name]} inputs of {quota(name)}"


def expect(
    errors: type[Exception] | tuple[type[Exception], ...],
    fn: Callable[..., Any],
    *args: Any,
    **kwargs: Any,
) -> Any:
    """Call a decoder: its result, or None if it raised one of its documented ``errors``.

    Any other exception propagates, and hypothesis reports it with the input that caused it.
    """
    try:
        return fn(*args, **kwargs)
    except errors:
        return None


# --- generating inputs ----------------------------------------------------------------------
#
# Hypothesis draws the structure it is good at (bytes, text, schema-shaped messages) and a
# seed; the mutators below are plain Python on ``random.Random(seed)``, because a hypothesis
# draw costs ~0.1 ms and a mutated package needs hundreds of random choices.

SEEDS = st.integers(0, 2**64 - 1)

# fmt: off
INTERESTING_INTS = [
    -1, 0, 1, 2, 1023, 1024, 1025, 4095, 4096, 4097, 8192, 2**31, 2**32, 2**63 - 1, 2**63,
    2**64 - 1, 2**64, -(2**63), -(2**64), 2**1100, -(2**1100),
]
INTERESTING_TEXT = ["", "\n", "x\n", "a/b", "+", "#", "pkg-", "float32", "\x00", "é", "0" * 70]
SCALAR_POOL: list[Any] = [
    None, True, False, cbor2.undefined, math.nan, math.inf, -math.inf, 0.0, -0.0, 1.5, 1e308,
    5e-324, b"", b"\x00", bytes(32), *INTERESTING_INTS, *INTERESTING_TEXT,
]
# semantic tags cbor2 decodes (dates, bignums, decimals, regexes, sets, IPs, shared values),
# the tensor tags, and the rest
TAG_POOL = [
    0, 1, 2, 3, 4, 5, 24, 25, 28, 29, 30, 35, 36, 37, 40, 256, 258, 260, 261,
    *sorted(TAG_TO_DTYPE),
]
TEXT_ALPHABET = "abcxyz019_.-/+#: \n\t\x00é€😀"
# CBOR initial bytes that change a type or a length: 1-8 byte lengths, indefinite lengths,
# tags, simple values, half/single/double floats and the "break" code
MAGIC_BYTES = list(bytes.fromhex(
    "00 17 18 19 1a 1b 1f 3f 40 5f 7f 80 9f a0 bf c0 d8 d9 db f4 f6 f7 f9 fa fb ff"
))
# fmt: on

Values = Callable[[random.Random], Any]


def _cycle() -> list[Any]:
    """A list that contains itself: CBOR value sharing (tags 28/29) decodes to such cycles."""
    loop: list[Any] = []
    loop.append(loop)
    return loop


def _self_map() -> dict[str, Any]:
    loop: dict[str, Any] = {"k": 1}
    loop["self"] = loop
    return loop


def random_text(rng: random.Random, most: int = 12) -> str:
    return "".join(rng.choice(TEXT_ALPHABET) for _ in range(rng.randint(0, most)))


def random_scalar(rng: random.Random) -> Any:
    kind = rng.randrange(8)
    if kind == 0:
        return rng.randint(-(2**64), 2**64)
    if kind == 1:
        return rng.randint(-300, 300)
    if kind == 2:
        return rng.uniform(-1e9, 1e9)
    if kind == 3:
        return random_text(rng)
    if kind == 4:
        return rng.randbytes(rng.randint(0, 40))
    return rng.choice(SCALAR_POOL)


def random_value(rng: random.Random, depth: int = 0) -> Any:
    """Any value CBOR can carry: scalars, arrays, maps, tags, and cycles."""
    r = rng.random()
    if depth >= 3 or r < 0.55:
        return random_scalar(rng)
    if r < 0.7:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if r < 0.85:
        keys = [
            random_text(rng, 6) if rng.random() < 0.8 else rng.randint(-3, 3)
            for _ in range(rng.randint(0, 4))
        ]
        return {k: random_value(rng, depth + 1) for k in keys}
    if r < 0.96:
        tag = rng.choice(TAG_POOL) if rng.random() < 0.8 else rng.randint(0, 2**64 - 1)
        return cbor2.CBORTag(tag, random_value(rng, depth + 1))
    return _cycle() if rng.random() < 0.5 else _self_map()


def values_with(*extras: Any) -> Values:
    """A value source that favours ``extras`` (values that matter to one decoder)."""
    pool = list(extras)

    def draw(rng: random.Random) -> Any:
        return rng.choice(pool) if pool and rng.random() < 0.5 else random_value(rng)

    return draw


def dumps(value: Any, **kwargs: Any) -> bytes:
    """CBOR-encode a generated value; cyclic values need value sharing (tags 28/29)."""
    try:
        return cbor2.dumps(value, **kwargs)
    except cbor2.CBOREncodeError:
        return cbor2.dumps(value, value_sharing=True, **kwargs)


def roundtrip(value: Any) -> Any:
    """What a peer's CBOR decodes to: tags become datetimes, sets, ... as cbor2 decodes them."""
    try:
        return cbor2.loads(dumps(value))
    except cbor2.CBORDecodeError:
        return value


def mutate_bytes(rng: random.Random, data: bytes, seeds: list[bytes]) -> bytes:
    """1-4 byte-level mutations, as AFL-style fuzzers make them."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        at = rng.randint(0, len(out))
        if op == 0 and at < len(out):  # bit flip
            out[at] ^= 1 << rng.randrange(8)
        elif op == 1 and at < len(out):  # a CBOR header byte that changes types and lengths
            out[at] = rng.choice(MAGIC_BYTES)
        elif op == 2:  # truncation
            del out[at:]
        elif op == 3:  # insertion
            out[at:at] = rng.randbytes(rng.randint(1, 8))
        elif op == 4:  # deletion
            del out[at : at + rng.randint(1, 16)]
        elif op == 5:  # splice in the tail of another seed
            other = rng.choice(seeds)
            out[at:] = other[rng.randint(0, len(other)) :]
        else:  # duplicate a slice
            out[at:at] = out[at : at + rng.randint(1, 32)]
    return bytes(out)


def _paths(node: Any, prefix: tuple[Any, ...] = (), depth: int = 0) -> Iterator[tuple[Any, ...]]:
    """Every position in a decoded CBOR tree (maps, arrays, tag contents), root first."""
    yield prefix
    if depth >= 6:
        return
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k), depth + 1)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i), depth + 1)
    elif isinstance(node, cbor2.CBORTag):
        yield from _paths(node.value, (*prefix, None), depth + 1)


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        node = node.value if isinstance(node, cbor2.CBORTag) else node[step]
    return node


def _replace(node: Any, path: tuple[Any, ...], new: Any) -> Any:
    """A copy of ``node`` with ``new`` at ``path`` (None steps into a tag's content)."""
    if not path:
        return new
    step, rest = path[0], path[1:]
    if isinstance(node, cbor2.CBORTag):
        return cbor2.CBORTag(node.tag, _replace(node.value, rest, new))
    copy = dict(node) if isinstance(node, dict) else list(node)
    copy[step] = _replace(node[step], rest, new)
    return copy


def mutate_node(rng: random.Random, node: Any, values: Values) -> Any:
    """One structured mutation of a value, chosen to suit its type."""
    op = rng.randrange(10)
    if op < 4:
        return values(rng)
    if isinstance(node, dict) and node:
        key = rng.choice(list(node))
        if op < 6:
            return {k: v for k, v in node.items() if k != key}
        return {**node, (key if op < 8 else random_text(rng, 6)): values(rng)}
    if isinstance(node, list):
        if op < 6 and node:
            i = rng.randrange(len(node))
            return node[:i] + node[i + 1 :]
        return [*node, values(rng)]
    if isinstance(node, cbor2.CBORTag):
        return node.value if op < 6 else cbor2.CBORTag(rng.choice(TAG_POOL), node.value)
    if isinstance(node, bool):
        return not node
    if isinstance(node, int):
        return rng.choice([node + 1, node - 1, -node, node * 2**40, str(node)])
    if isinstance(node, float):
        finite = math.isfinite(node)
        return rng.choice([math.nan, math.inf, -math.inf, -node, int(node) if finite else 0])
    if isinstance(node, str):
        return rng.choice([node + "\n", node[:-1], node * 3, node.encode(), ""])
    if isinstance(node, bytes):
        return rng.choice([node[:-1], node + b"\x00", b"", node * 2, node.hex()])
    return cbor2.CBORTag(rng.choice(TAG_POOL), node)


def mutate_tree(rng: random.Random, tree: Any, values: Values, most: int = 3) -> Any:
    """A decoded CBOR tree with 1..most structured mutations at random positions."""
    for _ in range(rng.randint(1, most)):
        path = rng.choice(list(_paths(tree)))
        tree = _replace(tree, path, mutate_node(rng, _get(tree, path), values))
    return tree


def corpus_files(kind: str, prefix: str = "") -> list[Path]:
    """The corpus files of one decoder, sorted (``seed-*`` are valid, ``crash-*`` were bugs)."""
    return sorted(p for p in (CORPUS / kind).iterdir() if p.name.startswith(prefix))


def corpus_bytes(kind: str) -> list[bytes]:
    return [p.read_bytes() for p in corpus_files(kind)]


def mutated_corpus(kind: str, values: Values, structured: bool = True) -> st.SearchStrategy[bytes]:
    """Corpus files of one decoder, mutated byte by byte or (decoded) field by field."""
    seeds = corpus_bytes(kind)

    def mutate(index: int, seed_: int) -> bytes:
        rng = random.Random(seed_)
        data = seeds[index]
        if structured and rng.random() < 0.5:
            try:
                return dumps(mutate_tree(rng, cbor2.loads(data), values))
            except cbor2.CBORDecodeError:
                pass
        return mutate_bytes(rng, data, seeds)

    return st.builds(mutate, st.integers(0, len(seeds) - 1), SEEDS)


# --- control messages (edgefl.protocol.messages.decode) ------------------------------------

MESSAGE_TYPES = sorted(SCHEMAS)


def check_message(payload: bytes, expected: str | tuple[str, ...] | None = None) -> Any:
    """decode() returns a message that meets its schema, or raises MessageError."""
    CALLS["messages"] += 1
    msg = expect(MessageError, decode, payload, expected)
    if msg is None:
        return None
    assert isinstance(msg, dict)
    assert msg["v"] == MESSAGE_VERSION
    kind = msg["type"]
    assert kind in SCHEMAS
    if expected is not None:
        assert kind in ((expected,) if isinstance(expected, str) else expected)
    for key, typ in SCHEMAS[kind].items():
        assert isinstance(msg[key], typ), key
        assert not isinstance(msg[key], bool), key
    for key, typ in OPTIONAL.get(kind, {}).items():
        if key in msg:
            assert isinstance(msg[key], typ), key
            assert not isinstance(msg[key], bool), key
    if "package" in msg:
        ref = msg["package"]
        assert ref["id"].startswith("pkg-")
        assert len(ref["digest"]) == 32
        assert ref["size"] > 0
    return msg


_PLAIN = st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(max_size=8)
FIELD_VALUES: dict[Any, st.SearchStrategy[Any]] = {
    str: st.text(max_size=16) | st.sampled_from(["s:1:0", "v-1", "online", "pkg-x"]),
    int: st.integers(-(2**63), 2**64 - 1) | st.sampled_from([0, 1, 2**63]),
    bytes: st.binary(max_size=40),
    dict: st.dictionaries(st.text(max_size=8), _PLAIN, max_size=3),
    list: st.lists(_PLAIN, max_size=3),
}
NUMBERS = st.integers(-(2**63), 2**63) | st.floats(allow_nan=False)
PACKAGE_REFS = st.builds(
    lambda digest, size: package_ref(digest.hex(), size),
    st.binary(min_size=32, max_size=32),
    st.integers(1, 2**40),
)
OPTIONAL_VALUES = {"package": PACKAGE_REFS, "fence": st.integers(0, 2**63)}
# Well-typed messages of each type (before any mutation), optional fields included at random.
VALID_MESSAGES = st.one_of(
    [
        st.fixed_dictionaries(
            {
                "v": st.just(MESSAGE_VERSION),
                "type": st.just(kind),
                **{key: FIELD_VALUES.get(typ, NUMBERS) for key, typ in SCHEMAS[kind].items()},
            },
            optional={
                # a field without values of its own gets any value of its declared type
                key: OPTIONAL_VALUES.get(key, FIELD_VALUES.get(typ, NUMBERS))
                for key, typ in OPTIONAL.get(kind, {}).items()
            },
        )
        for kind in MESSAGE_TYPES
    ]
)
EXPECTED_TYPES = (
    st.none()
    | st.sampled_from(MESSAGE_TYPES)
    | st.lists(st.sampled_from(MESSAGE_TYPES), min_size=1, max_size=3).map(tuple)
)
MESSAGE_VALUES = values_with(
    {"id": "pkg-1", "digest": bytes(32), "size": 1},  # a valid package reference
    {"id": "pkg-1", "digest": bytes(31), "size": 1},
    {"id": "x", "digest": bytes(32), "size": 0},
    *MESSAGE_TYPES,
    MESSAGE_VERSION,
)


def test_messages_random_bytes() -> None:
    fuzz("messages_bytes", st.binary(max_size=300), check_message)


def test_messages_mutated_seeds() -> None:
    fuzz("messages_mutated", mutated_corpus("messages", MESSAGE_VALUES), check_message)


def test_messages_structured() -> None:
    def check(item: tuple[dict[str, Any], int, Any]) -> None:
        msg, seed_, expected = item
        rng = random.Random(seed_)
        mutated = rng.random() < 0.7
        got = check_message(
            dumps(mutate_tree(rng, msg, MESSAGE_VALUES) if mutated else msg), expected
        )
        if not mutated and (expected is None or msg["type"] in expected):
            assert got == msg  # every valid message decodes to exactly what was sent

    fuzz("messages_structured", st.tuples(VALID_MESSAGES, SEEDS, EXPECTED_TYPES), check)


# --- tensors (edgefl.protocol.tensors) ------------------------------------------------------


def check_tensors(payload: bytes) -> Any:
    """loads_tensors() returns arrays that match their declared dtype and byte size."""
    CALLS["tensors"] += 1
    out = expect(CodecError, loads_tensors, payload)
    if out is None:
        return None
    assert isinstance(out, dict)
    native = {dt.newbyteorder("=") for dt in TAG_TO_DTYPE.values()}
    for name, arr in out.items():
        assert isinstance(name, str)
        assert name
        assert isinstance(arr, np.ndarray)
        assert arr.dtype in native
        assert arr.ndim <= 8
        assert arr.nbytes == arr.size * arr.dtype.itemsize
    return out


def random_tensors(rng: random.Random) -> dict[str, np.ndarray]:
    """0-3 named arrays of any wire dtype and 0-4 dimensions (zero sizes included)."""
    out: dict[str, np.ndarray] = {}
    for _ in range(rng.randint(0, 3)):
        dtype = np.dtype(rng.choice(sorted(DTYPE_TO_TAG)))
        shape = tuple(rng.randint(0, 4) for _ in range(rng.randint(0, 4)))
        raw = rng.randbytes(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        out[random_text(rng, 6) or "w"] = np.frombuffer(raw, dtype).reshape(shape)
    return out


TENSOR_VALUES = values_with(
    *INTERESTING_INTS,
    [0, 2**64],
    [2**63, 2**63, 0],
    [1] * 9,
    *(cbor2.CBORTag(tag, b"\x00" * 8) for tag in sorted(TAG_TO_DTYPE)),
    cbor2.CBORTag(40, [[2], cbor2.CBORTag(85, bytes(8))]),
)


def test_tensors_random_bytes() -> None:
    fuzz("tensors_bytes", st.binary(max_size=300), check_tensors)


def test_tensors_mutated_seeds() -> None:
    fuzz("tensors_mutated", mutated_corpus("tensors", TENSOR_VALUES), check_tensors)


def test_tensors_structured() -> None:
    def check(seed_: int) -> None:
        rng = random.Random(seed_)
        arrays = random_tensors(rng)
        tree = encode_tensors(arrays)
        mutated = rng.random() < 0.7
        if mutated:
            tree = mutate_tree(rng, tree, TENSOR_VALUES)
        got = check_tensors(dumps(tree))
        CALLS["tensors"] += 1
        expect(CodecError, decode_tensors, tree)  # the in-message path, on undecoded values
        if not mutated:  # every valid tensor set survives the round trip bit for bit
            assert got is not None
            assert sorted(got) == sorted(arrays)
            for name, arr in arrays.items():
                assert got[name].dtype == arr.dtype
                assert got[name].shape == arr.shape
                assert got[name].tobytes() == arr.tobytes()

    fuzz("tensors_structured", SEEDS, check)


# --- chunks (edgefl.protocol.chunking.parse_chunk) ------------------------------------------

CHUNK_LIMITS = [1024, 4096, MAX_CHUNK_SIZE]


def check_chunk(payload: bytes, max_chunk_size: int = MAX_CHUNK_SIZE) -> Chunk | None:
    """parse_chunk() returns a self-consistent chunk (see its docstring), or ChunkError."""
    CALLS["chunks"] += 1
    chunk = expect(ChunkError, parse_chunk, payload, max_chunk_size)
    if chunk is None:
        return None
    assert isinstance(chunk, Chunk)
    assert 1 <= len(chunk.transfer) <= 128
    assert len(chunk.digest) == 32
    assert chunk.count == max(1, -(-chunk.size // chunk.chunk_size))
    assert 0 <= chunk.index < chunk.count
    assert chunk.size >= 0
    expected = min(chunk.chunk_size, chunk.size - chunk.index * chunk.chunk_size)
    assert len(chunk.data) == (expected if chunk.size else 0)
    assert isinstance(chunk.meta, dict)
    return chunk


CHUNK_VALUES = values_with(
    *INTERESTING_INTS, *range(-2, 12), bytes(31), bytes(33), "sha256", "sha1", "x" * 129, ""
)


def random_chunk(rng: random.Random) -> Chunk:
    """One chunk of a random payload, split as a sender would (first, middle or last)."""
    size = rng.choice([0, 1, 100, 1023, 1024, 1025, 3000, rng.randint(0, 5000)])
    csz = rng.choice([1024, 1025, 2048, 4096])
    meta = {random_text(rng, 6): random_text(rng, 6) for _ in range(rng.randint(0, 2))}
    transfer = random_text(rng, 8) or "t"
    return rng.choice(split_payload(rng.randbytes(size), csz, transfer=transfer, meta=meta))


def test_chunks_random_bytes() -> None:
    fuzz("chunks_bytes", st.binary(max_size=300), check_chunk)


def test_chunks_mutated_seeds() -> None:
    def check(item: tuple[bytes, int]) -> None:
        check_chunk(*item)

    cases = st.tuples(mutated_corpus("chunks", CHUNK_VALUES), st.sampled_from(CHUNK_LIMITS))
    fuzz("chunks_mutated", cases, check)


def test_chunks_structured() -> None:
    def check(seed_: int) -> None:
        rng = random.Random(seed_)
        chunk = random_chunk(rng)
        limit = rng.choice(CHUNK_LIMITS)
        if rng.random() < 0.7:
            check_chunk(dumps(mutate_tree(rng, cbor2.loads(chunk.to_bytes()), CHUNK_VALUES)), limit)
        elif chunk.chunk_size <= limit:
            assert check_chunk(chunk.to_bytes(), limit) == chunk

    fuzz("chunks_structured", SEEDS, check)


# --- the reassembler (edgefl.protocol.chunking.Reassembler) ---------------------------------

# Small limits, so that random sequences reach every one of them.
LIMITS: dict[str, Any] = {
    "max_payload": 8192,
    "max_chunk_size": 4096,
    "memory_budget": 6000,
    "ttl_s": 5.0,
    "max_transfers": 4,
    "max_transfers_per_source": 2,
    "max_bytes_per_source": 7000,
    "max_spill_files": 2,
}
# Ids of finished transfers are remembered per source (a source's own bounded map).
REMEMBERED = max(LIMITS["max_transfers"], getattr(Reassembler, "REMEMBERED_PER_SOURCE", 0))
SOURCES = ["dev-a", "dev-b", "dev-c"]


class FakeClock:
    """A clock the scenario advances by hand, so expiry is exercised without sleeping."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# Other threads of the test process (MQTT clients of earlier tests reconnecting, a broker
# winding down) may hold a few sockets at any moment: growth beyond this is the reassembler's.
FD_SLACK = 8


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _retained_bytes(container: Any, depth: int = 0) -> int:
    """Bytes held in plain containers (maps, lists) of the reassembler, e.g. pooled buffers."""
    total = 0
    for v in container.values() if isinstance(container, dict) else container:
        if isinstance(v, (bytes, bytearray)):
            total += len(v)
        elif depth < 3 and isinstance(v, (dict, list, set, tuple)):
            total += _retained_bytes(v, depth + 1)
    return total


def check_bounded(r: Reassembler, fds0: int) -> None:
    """The reassembler's state stays under its configured limits, whatever it was fed.

    Every internal map, set or list (whatever it is called: the API grows) holds at most
    ``max_transfers`` entries, and each map inside one at most ``REMEMBERED``; buffered
    bytes stay within the memory budget (in flight and in the recycling pool); spilled
    transfers hold one open file each, at most ``max_spill_files``.
    """
    assert 0 <= r.pending <= LIMITS["max_transfers"]
    assert 0 <= r.memory_bytes <= LIMITS["memory_budget"]
    for name, value in vars(r).items():
        if not isinstance(value, (dict, list, set)):
            continue
        assert len(value) <= LIMITS["max_transfers"], (
            f"Reassembler.{name} holds {len(value)} entries; limit {LIMITS['max_transfers']}"
        )
        for inner in value.values() if isinstance(value, dict) else value:
            if isinstance(inner, (dict, set)):
                assert len(inner) <= REMEMBERED, f"Reassembler.{name} holds {len(inner)}"
    for source in SOURCES:
        assert r.pending_from(source) <= LIMITS["max_transfers_per_source"]
    assert _retained_bytes(vars(r)) <= LIMITS["memory_budget"]
    assert 0 <= r.spill_files <= LIMITS["max_spill_files"]
    assert _open_fds() <= fds0 + r.spill_files + FD_SLACK


def run_scenario(ops: list[list[Any]]) -> list[Completed]:
    """Replay reassembler operations, checking the bounds after each; returns the deliveries.

    An op is ``["feed", source, chunk bytes]``, ``["tick", seconds]``, ``["expire"]``,
    ``["discard", task_id]`` or ``["missing", source, transfer]`` (the corpus stores these).
    """
    clock = FakeClock()
    r = Reassembler(**LIMITS, clock=clock)
    fds0 = _open_fds()
    delivered: list[Completed] = []
    for op in ops:
        if op[0] == "feed":
            CALLS["reassembler"] += 1
            done = expect(ChunkError, r.feed, op[1], op[2])
            if done is not None:
                last = parse_chunk(op[2], LIMITS["max_chunk_size"])
                assert isinstance(done, Completed)
                assert (done.source, done.transfer) == (op[1], last.transfer)
                assert hashlib.sha256(done.payload).digest() == last.digest  # verified, whole
                assert len(done.payload) == last.size
                delivered.append(done)
        elif op[0] == "tick":
            clock.now += op[1]
        elif op[0] == "expire":
            r.expire()
        elif op[0] == "discard":
            r.discard(lambda meta, task=op[1]: meta.get("task_id") == task)
        elif op[0] == "missing":
            missing = r.missing(op[1], op[2])
            assert missing is None or all(isinstance(i, int) and i >= 0 for i in missing)
        check_bounded(r, fds0)
    clock.now += LIMITS["ttl_s"] + 1
    r.expire()  # everything idle for longer than the TTL is gone: nothing leaks
    assert r.pending == 0
    assert r.memory_bytes == 0
    assert r.spill_files == 0
    assert _open_fds() <= fds0 + FD_SLACK
    return delivered


def _single_chunk(payload: bytes, csz: int, transfer: str, meta: dict[str, Any]) -> Chunk:
    """A one-chunk transfer with a chunk size under MIN_CHUNK_SIZE (allowed when csz >= size)."""
    digest = hashlib.sha256(payload).digest()
    return Chunk(transfer, 0, 1, len(payload), csz, digest, payload, meta)


def random_scenario(seed_: int, steps: int) -> list[list[Any]]:
    """Random traffic from three senders: whole transfers in any order with duplicates,
    single chunks, corrupted and truncated chunks, junk, oversized transfers, clock ticks,
    expiry and discards, all interleaved."""
    rng = random.Random(seed_)
    transfers: list[list[Chunk]] = []
    for _ in range(rng.randint(1, 4)):
        size = rng.choice([0, 1, 700, 1024, 1025, 3000, 5000, 6001, 7001, 8192, 8193, 9000])
        transfer = rng.choice(["t1", "t2", "t3", random_text(rng, 4) or "t4"])
        meta = {"task_id": rng.choice(["s:1:0", "s:1:1"])}
        payload = rng.randbytes(size)
        if size <= 1000 and rng.random() < 0.5:
            transfers.append([_single_chunk(payload, max(size, 1), transfer, meta)])
        else:
            transfers.append(split_payload(payload, rng.choice([1024, 2048, 4096]), transfer, meta))
    ops: list[list[Any]] = []
    for _ in range(steps):
        kind = rng.randrange(12)
        src = rng.choice(SOURCES)
        chunks = rng.choice(transfers)
        chunk = rng.choice(chunks)
        if kind <= 2:  # a whole transfer, shuffled, sometimes with a chunk twice
            order = [c.to_bytes() for c in chunks] + [chunk.to_bytes()] * (kind == 2)
            rng.shuffle(order)
            ops += [["feed", src, b] for b in order]
        elif kind <= 4:  # one chunk
            ops.append(["feed", src, chunk.to_bytes()])
        elif kind == 5:  # corrupted content: completes with a digest mismatch
            data = bytes(b ^ 0x55 for b in chunk.data)
            bad = Chunk(
                chunk.transfer,
                chunk.index,
                chunk.count,
                chunk.size,
                chunk.chunk_size,
                chunk.digest,
                data,
                chunk.meta,
            )
            ops.append(["feed", src, bad.to_bytes()])
        elif kind == 6:  # a header that disagrees with the rest of its transfer
            other = Chunk(chunk.transfer, 0, 1, 3, 3, bytes(32), b"abc", chunk.meta)
            ops.append(["feed", src, other.to_bytes()])
        elif kind == 7:  # truncated or junk
            raw = chunk.to_bytes()
            junk = raw[: rng.randrange(len(raw))] if rng.random() < 0.5 else rng.randbytes(40)
            ops.append(["feed", src, junk])
        elif kind == 8:
            ops.append(["tick", rng.choice([0.0, 0.5, 1.0, 4.9, 5.1, 8.0])])  # around the TTL
        elif kind == 9:
            ops.append(["expire"])
        elif kind == 10:
            ops.append(["discard", chunk.meta["task_id"]])
        else:
            ops.append(["missing", src, chunk.transfer])
    return ops


def test_reassembler_random_traffic_stays_bounded() -> None:
    # every expiry logs a warning: thousands of them would only slow the run down
    logger = logging.getLogger("edgefl.protocol.chunking")
    logger.disabled = True
    try:
        fuzz("reassembler", st.builds(random_scenario, SEEDS, st.integers(1, 16)), run_scenario)
    finally:
        logger.disabled = False


def test_reassembler_remembers_a_bounded_number_of_transfers() -> None:
    """A sender that completes (or is refused) many transfers within one TTL must not grow
    the reassembler's memory of delivered and refused ids without bound."""
    ops: list[list[Any]] = []
    for i in range(200):
        ops.append(["feed", "dev-a", _single_chunk(b"x", 1, f"done-{i}", {}).to_bytes()])
        big = split_payload(bytes(9000), 4096, f"big-{i}")[0]  # over max_payload: refused
        ops.append(["feed", "dev-a", big.to_bytes()])
    assert len(run_scenario(ops)) == 200


# --- wire types (edgefl.protocol.types) -----------------------------------------------------


def check_spec(value: Any) -> None:
    """spec_from_wire() returns a spec an aggregator can allocate (known dtype, sizes >= 0)."""
    CALLS["types"] += 1
    spec = expect(ValueError, spec_from_wire, value)
    if spec is None:
        return
    for name, (dtype, shape) in spec.items():
        assert isinstance(name, str)
        assert dtype in DTYPE_TO_TAG, (name, dtype)
        assert all(type(d) is int and d >= 0 for d in shape), (name, shape)


def check_participants(value: Any) -> None:
    """participants_from_wire() returns well-typed Participants, or ValueError."""
    CALLS["types"] += 1
    out = expect(ValueError, participants_from_wire, value)
    for p in out or []:
        assert isinstance(p["device"], str)
        assert isinstance(p["region"], str)
        assert type(p["n"]) is int
        assert isinstance(p["metrics"], dict)


def check_rejections(value: Any) -> None:
    """rejections_from_wire() returns well-typed Rejections, or ValueError."""
    CALLS["types"] += 1
    out = expect(ValueError, rejections_from_wire, value)
    for r in out or []:
        assert isinstance(r["device"], str)
        assert isinstance(r["reason"], str)


WIRE_VALUES = values_with(*INTERESTING_INTS, *DTYPE_TO_TAG, "O", "bool", "", [], [[]])


def random_wire_case(seed_: int) -> tuple[Callable[[Any], None], Any]:
    """A near-valid spec, participants or rejections list with a few mutations, or junk."""
    rng = random.Random(seed_)
    n = rng.randint(0, 3)
    kind = rng.randrange(3)
    if kind == 0:
        valid: Any = [
            [
                random_text(rng, 4),
                rng.choice(sorted(DTYPE_TO_TAG)),
                [rng.randint(0, 8) for _ in range(rng.randint(0, 3))],
            ]
            for _ in range(n)
        ]
        checker = check_spec
    elif kind == 1:
        valid = [
            {
                "device": random_text(rng, 4),
                "region": random_text(rng, 4),
                "n": rng.randint(-(2**64), 2**64),
                "metrics": {random_text(rng, 3): rng.random()},
            }
            for _ in range(n)
        ]
        checker = check_participants
    else:
        valid = [{"device": random_text(rng, 4), "reason": random_text(rng)} for _ in range(n)]
        checker = check_rejections
    r = rng.random()
    value = (
        valid if r < 0.2 else random_value(rng) if r < 0.3 else mutate_tree(rng, valid, WIRE_VALUES)
    )
    return checker, roundtrip(value)  # what decode() hands over: the value as CBOR decodes it


def test_wire_types() -> None:
    fuzz("types", st.builds(random_wire_case, SEEDS), lambda case: case[0](case[1]))


# --- model packages (edgefl.packages.format.ModelPackage.loads) -----------------------------

SIGNING_SEED = bytes(range(32))  # the corpus packages' test key (never a real key)
TRUSTED = (
    Ed25519PrivateKey.from_private_bytes(SIGNING_SEED)
    .public_key()
    .public_bytes(Encoding.Raw, PublicFormat.Raw)
)
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # docs/model-package.md


def check_package(
    data: bytes, trusted: bool = False, require: bool = False, max_size: int = 1 << 20
) -> ModelPackage | None:
    """ModelPackage.loads() returns a package whose every promise holds, or PackageError."""
    CALLS["packages"] += 1
    pkg = expect(
        PackageError,
        ModelPackage.loads,
        data,
        trusted_keys=[TRUSTED] if trusted else None,
        require_signature=require,
        max_size=max_size,
    )
    if pkg is None:
        return None
    assert isinstance(pkg, ModelPackage)
    assert all(_FILE_NAME.fullmatch(name) for name in pkg.files), sorted(pkg.files)
    if require or (trusted and pkg.signature is not None):
        assert pkg.verified_key_id is not None
    weights = pkg.initial_weights()  # a loaded package is usable, without further errors
    assert sorted(weights) == sorted(p["name"] for p in pkg.manifest["parameters"])
    return pkg


# fmt: off
MANIFEST_VALUES = values_with(
    *INTERESTING_INTS, *INTERESTING_TEXT, *DTYPE_TO_TAG, "N", 1e308, math.inf, math.nan,
    [0, 1, 8], [-1, "N"], [2**64], [2**1100], ["N", -2], {"name": "x"},
)
# fmt: on
FILE_NAMES = ["model.onnx", "model.onnx\n", ".hidden", "../x", "a" * 129, "b", "weights.cbor"]


def _sign(manifest_bytes: bytes) -> dict[str, Any]:
    key = Ed25519PrivateKey.from_private_bytes(SIGNING_SEED)
    kid = hashlib.sha256(TRUSTED).digest()[:16].hex()
    return {"alg": "ed25519", "key_id": kid, "sig": key.sign(SIGNATURE_CONTEXT + manifest_bytes)}


def random_package_case(seed_: int) -> tuple[bytes, bool, bool, int]:
    """A corpus package with structured mutations of its top level, manifest or files; digests
    and signature are recomputed at random, so that mutations also reach the later checks."""
    rng = random.Random(seed_)
    top = cbor2.loads(rng.choice(PACKAGE_SEEDS))
    manifest = cbor2.loads(top["manifest"])
    files = dict(top["files"])
    where = rng.randrange(4)
    if where == 0:
        manifest = mutate_tree(rng, manifest, MANIFEST_VALUES)
    elif where == 1:  # the weights: a tensor set of the wrong shape, dtype or encoding
        weights = cbor2.loads(files["weights.cbor"])
        files["weights.cbor"] = dumps(mutate_tree(rng, weights, TENSOR_VALUES))
    elif where == 2:  # file names and contents
        old, new = rng.choice(sorted(files)), rng.choice(FILE_NAMES)
        files[new] = files.pop(old) + rng.choice([b"", b"\x00"])
        if rng.random() < 0.5:
            manifest["files"][new] = manifest["files"].pop(old)
        if manifest["weights"] == old and rng.random() < 0.5:
            manifest["weights"] = new
    if rng.random() < 0.5 and isinstance(manifest, dict):  # make the digests agree again
        manifest["files"] = {n: {"sha256": sha256_hex(d), "size": len(d)} for n, d in files.items()}
    try:
        top["manifest"] = encode_manifest(manifest)
    except (PackageError, TypeError, ValueError, RecursionError, cbor2.CBOREncodeError):
        top["manifest"] = dumps(manifest)  # not plain data: encode it anyway, as an attacker would
    top["files"] = files
    if "signature" in top and rng.random() < 0.5:
        top["signature"] = _sign(top["manifest"])
    if where == 3:
        top = mutate_tree(rng, top, MANIFEST_VALUES)
    return dumps(top), rng.random() < 0.5, rng.random() < 0.2, rng.choice([1 << 20, 600])


PACKAGE_SEEDS = [p.read_bytes() for p in corpus_files("packages", "seed-")]


def test_packages_mutated_seeds() -> None:
    def check(item: tuple[bytes, bool]) -> None:
        check_package(item[0], trusted=item[1])

    cases = st.tuples(mutated_corpus("packages", MANIFEST_VALUES, structured=False), st.booleans())
    fuzz("packages_mutated", cases, check)


def test_packages_structured() -> None:
    fuzz(
        "packages_structured",
        st.builds(random_package_case, SEEDS),
        lambda case: check_package(*case),
    )


# --- topics (edgefl.protocol.topics.Topics.parse_*) -----------------------------------------

_SEGMENT = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # the documented alphabet of a topic level
PROJECTS = ["p", "fleet-1"]


def check_topic(project: str, topic: str) -> None:
    """Each parser returns levels in the documented alphabet that rebuild the same topic."""
    CALLS["topics"] += 3
    t = Topics(project)
    device = expect(TopicError, t.parse_device_topic, topic)
    if device is not None:
        region, dev, channel = device
        assert _SEGMENT.fullmatch(region), device
        assert _SEGMENT.fullmatch(dev), device
        assert channel in DEVICE_CHANNELS
        assert t.device(region, dev, channel) == topic
    comb = expect(TopicError, t.parse_combiner_topic, topic)
    if comb is not None:
        assert _SEGMENT.fullmatch(comb[0]), comb
        assert comb[1] in COMBINER_CHANNELS
        assert t.combiner(*comb) == topic
    model = expect(TopicError, t.parse_model_chunk, topic)
    if model is not None:
        version, index = model
        assert _SEGMENT.fullmatch(version), model
        assert type(index) is int
        assert index >= 0
        assert t.model_chunk(version, index) == topic


# fmt: off
SEGMENTS = [
    "r1", "dev-7", "v_1.2", "dev", "comb", "model", "+", "#", "", " ", "a\n", "x" * 65, "0", "00",
    "01", "٣", "¹", "1e3", "-1", *DEVICE_CHANNELS, *COMBINER_CHANNELS,
]
# fmt: on


def random_topic_case(seed_: int) -> tuple[str, str]:
    """A valid topic of each subtree with levels replaced, inserted or removed."""
    rng = random.Random(seed_)
    project = rng.choice(PROJECTS)
    t = Topics(project)
    levels = rng.choice(
        [
            t.device("r1", "dev-7", rng.choice(DEVICE_CHANNELS)),
            t.combiner("r1", rng.choice(COMBINER_CHANNELS)),
            t.model_chunk("v1", rng.choice([0, 1, 10, rng.randint(0, 2**40)])),
            t.controller_status(),
        ]
    ).split("/")
    for _ in range(rng.randint(0, 3)):
        at = rng.randrange(len(levels))
        op = rng.randrange(4)
        new = rng.choice(
            [
                rng.choice(SEGMENTS),
                random_text(rng, 8),
                str(rng.randint(0, 2**70)),
                "7" * rng.randint(4290, 4400),  # past int()'s 4300-digit limit
            ]
        )
        if op <= 1:
            levels[at] = new
        elif op == 2:
            levels.insert(at, new)
        elif len(levels) > 1:
            del levels[at]
    return project, "/".join(levels)


def test_topics() -> None:
    cases = st.one_of(
        st.builds(random_topic_case, SEEDS),
        st.tuples(st.sampled_from(PROJECTS), st.text(max_size=60)),
        st.tuples(st.sampled_from(PROJECTS), st.text(alphabet="edgflv1p/+#rmo\n0", max_size=40)),
    )
    fuzz("topics", cases, lambda item: check_topic(*item))


# --- device agent config files (device_agent.config.load_config) ----------------------------

CONFIG_FIELDS = {f.name: str(f.type) for f in fields(AgentConfig)}


def _type_ok(value: Any, annotation: str) -> bool:
    kinds = annotation.replace(" ", "").split("|")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return (
        ("None" in kinds and value is None)
        or ("str" in kinds and isinstance(value, str))
        or ("bool" in kinds and isinstance(value, bool))
        or ("int" in kinds and number and isinstance(value, int))
        or ("float" in kinds and number)
    )


def check_config(path: Path, env: dict[str, str]) -> None:
    """load_config() returns a config whose fields have their declared types, or ValueError.

    The agent's CLI turns ValueError (and OSError) into a one-line message; anything else
    is a traceback for a typo in a config file.
    """
    CALLS["config"] += 1
    cfg = expect(ValueError, load_config, path, env=env)
    if cfg is None:
        return
    for name, annotation in CONFIG_FIELDS.items():
        value = getattr(cfg, name)
        assert _type_ok(value, annotation), f"{name} = {value!r} is not {annotation}"


def random_json(rng: random.Random, depth: int = 0) -> Any:
    """A JSON value (no tags, no bytes), with the strings a config file typically holds."""
    r = rng.random()
    if depth >= 2 or r < 0.6:
        return rng.choice(
            [
                None,
                True,
                False,
                0,
                1,
                -5,
                2**70,
                0.5,
                1e400,
                -1e400,
                "dev-1",
                "numpy",
                "package",
                "true",
                "1",
                "",
                "x\n",
                random_text(rng),
            ]
        )
    if r < 0.8:
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {random_text(rng, 5): random_json(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def _toml_value(value: Any) -> str:
    """Render a JSON-like value as TOML (inf and nan included; None has no TOML form)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float, str)):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    if isinstance(value, dict):
        pairs = (
            f"{json.dumps(k, ensure_ascii=False)} = {_toml_value(v)}"
            for k, v in value.items()
            if v is not None
        )
        return "{" + ", ".join(pairs) + "}"
    return '""'


CONFIG_SEEDS = corpus_files("config", "seed-")
CONFIG_SEED_BYTES = [p.read_bytes() for p in CONFIG_SEEDS]
ENV_KEYS = ["EDGEFL_" + n.upper() for n in CONFIG_FIELDS]


def random_config_case(seed_: int) -> tuple[str, bytes, dict[str, str]]:
    """A config file (JSON or TOML) of known keys with values of any type, junk text,
    undecodable bytes, deep nesting or a mutated corpus config; plus EDGEFL_* variables."""
    rng = random.Random(seed_)
    doc = {
        rng.choice([*CONFIG_FIELDS, random_text(rng, 6)]): random_json(rng)
        for _ in range(rng.randint(0, 5))
    }
    if rng.random() < 0.5:
        doc.setdefault("device_id", "dev-1")
    kind = rng.randrange(6)
    if kind == 0:  # JSON: mostly an object of known keys, sometimes not an object
        suffix = ".json"
        text = json.dumps(doc if rng.random() < 0.8 else random_json(rng)).encode()
    elif kind == 1:
        suffix = ".toml"
        text = "\n".join(
            f"{json.dumps(k, ensure_ascii=False)} = {_toml_value(v)}"
            for k, v in doc.items()
            if v is not None
        ).encode()
    elif kind == 2:  # junk text, either suffix
        suffix = rng.choice([".json", ".toml", ".conf"])
        text = "".join(rng.choice('{}[]=:,"\n\\ #.0123abeflnrstu-') for _ in range(60)).encode()
    elif kind == 3:  # undecodable bytes
        suffix, text = rng.choice([".json", ".toml"]), rng.randbytes(rng.randint(0, 40))
    elif kind == 4:  # deep nesting: parsers recurse
        n = rng.randint(1, 3000)
        suffix = rng.choice([".json", ".toml"])
        inner = "[" * n + "]" * n
        text = (f"device_id = {inner}" if suffix == ".toml" else inner).encode()
    else:  # a mutated corpus config
        chosen = rng.choice(CONFIG_SEEDS)
        suffix, text = chosen.suffix, mutate_bytes(rng, chosen.read_bytes(), CONFIG_SEED_BYTES)
    values = ["1", "x", "true", "off", "", "1e999", "nan", "-5"]
    env = {rng.choice(ENV_KEYS): rng.choice(values) for _ in range(rng.randint(0, 2))}
    return suffix, text, env


def test_config_files() -> None:
    with tempfile.TemporaryDirectory(prefix="edgefl-fuzz-") as tmp:

        def check(item: tuple[str, bytes, dict[str, str]]) -> None:
            suffix, text, env = item
            path = Path(tmp) / f"agent{suffix}"
            path.write_bytes(text)
            check_config(path, env)

        fuzz("config", st.builds(random_config_case, SEEDS), check)


# --- the corpus -----------------------------------------------------------------------------


def _replay(kind: str, path: Path) -> bool:
    """Run one corpus file through its decoder's checks; True if the decoder accepted it."""
    data = path.read_bytes()
    if kind == "messages":
        return check_message(data) is not None
    if kind == "tensors":
        return check_tensors(data) is not None
    if kind == "chunks":
        return check_chunk(data) is not None
    if kind == "reassembler":
        return len(run_scenario(cbor2.loads(data))) > 0
    if kind == "types":
        checker = {
            "spec": check_spec,
            "participants": check_participants,
            "rejections": check_rejections,
        }[path.stem.split("-")[1]]
        checker(cbor2.loads(data))
        return True
    if kind == "packages":
        check_package(data, trusted=True)
        return check_package(data) is not None
    if kind == "topics":
        topic = data.decode()
        check_topic("p", topic)
        return any(
            expect(TopicError, parse, topic) is not None
            for parse in (
                Topics("p").parse_device_topic,
                Topics("p").parse_combiner_topic,
                Topics("p").parse_model_chunk,
            )
        )
    if kind == "config":
        check_config(path, {})
        return expect(ValueError, load_config, path, env={}) is not None
    raise AssertionError(f"unknown corpus folder {kind}")


CORPUS_KINDS = [
    "messages",
    "tensors",
    "chunks",
    "reassembler",
    "types",
    "packages",
    "topics",
    "config",
]


@pytest.mark.parametrize("kind", CORPUS_KINDS)
def test_corpus_replays_without_crashing(kind: str) -> None:
    """Seeds stay valid as the protocol evolves; every crash found stays fixed."""
    files = corpus_files(kind)
    assert any(p.name.startswith("seed-") for p in files), f"no seeds for {kind}"
    for path in files:
        accepted = _replay(kind, path)
        if path.name.startswith("seed-"):
            assert accepted, f"seed {path.name} is no longer accepted"


# --- corpus generation (python tests/fuzz/test_fuzz_decoders.py) ----------------------------


def _seed_messages() -> dict[str, bytes]:
    digest = hashlib.sha256(b"model v1").digest()
    ref = package_ref(hashlib.sha256(b"package").hexdigest(), 4096)
    common = {
        "task_id": "sess-1:3:region-0",
        "session": "sess-1",
        "round": 3,
        "model_version": "sess-1-v3",
        "model_digest": digest,
        "deadline": 1767225600.5,
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.1},
        "chunk_size": 262144,
    }
    spec = [["W", "float32", [64, 10]], ["b", "float32", [10]]]
    msgs: dict[str, dict[str, Any]] = {
        "task": dict(common),
        "task-package-fence": {**common, "package": ref, "fence": 7},
        "round": {**common, "devices": ["dev-1", "dev-2"], "spec": spec},
        "round-package-fence": {
            **common,
            "devices": ["dev-1"],
            "spec": spec,
            "package": ref,
            "fence": 2**40,
        },
        "update": {
            "task_id": "sess-1:3:region-0",
            "device": "dev-1",
            "model_version": "sess-1-v3",
            "num_examples": 120,
            "metrics": {"loss": 0.5, "accuracy": 0.9},
            "tensors": encode_tensors({"W": np.ones((2, 3), np.float32)}),
        },
        "status": {"state": "online", "ts": 1767225600},
        "telemetry": {"ts": 1767225600.25, "metrics": {"rss_mb": 41.5, "cpu": 0.3}},
        "close": {"task_id": "sess-1:3:region-0"},
        "progress": {
            "task_id": "sess-1:3:region-0",
            "region": "region-0",
            "accepted": 4,
            "rejected": 1,
        },
        "partial": {
            "task_id": "sess-1:3:region-0",
            "region": "region-0",
            "combiner": "comb-0",
            "count": 2,
            "weight": 240.0,
            "devices": [
                {"device": "dev-1", "region": "region-0", "n": 120, "metrics": {"loss": 0.5}}
            ],
            "rejected": [{"device": "dev-9", "reason": "late"}],
            "sums": encode_tensors({"W": np.full((2, 3), 240.0)}),
        },
        "decline": {"task_id": "sess-1:3:region-0", "reason": "package refused: unsigned"},
        "fetch": {"version": "pkg-0123456789abcdef0123456789abcdef"},
    }
    return {
        name: cbor2.dumps({"v": MESSAGE_VERSION, "type": name.split("-")[0], **body})
        for name, body in msgs.items()
    }


def _seed_package(signed: bool) -> bytes:
    weights = {"W": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}
    manifest = {
        "parameters": [
            {"name": "W", "dtype": "float32", "shape": [2, 3]},
            {"name": "b", "dtype": "float32", "shape": [3]},
        ],
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["N", 2]}],
        "labels": {"name": "y", "dtype": "int64", "shape": [-1], "num_classes": 3},
        "loss": "cross_entropy",
        "optimizer": {"name": "sgd", "lr": 0.1},
        "training": {"data": "x", "labels": "y"},
    }
    framework, model = ("tflite", "model.tflite") if signed else ("onnx", "model.onnx")
    artifacts = TrainingArtifacts(framework, {model: b"fuzz-model" * 8}, manifest, weights)
    pkg = ModelPackage.from_artifacts(
        artifacts,
        name="fuzz-seed",
        created="2026-01-01T00:00:00Z",
        preprocessing={"scale": 0.0625, "mean": [0.5, 0.5], "std": 2.0},
    )
    return pkg.dumps(SIGNING_SEED if signed else None)


def _package_with(mutate: Callable[[dict[str, Any]], None]) -> bytes:
    """The unsigned seed package with its manifest changed and its digests kept valid."""
    top = cbor2.loads(_seed_package(signed=False))
    manifest = cbor2.loads(top["manifest"])
    mutate(manifest)
    top["manifest"] = dumps(manifest)
    return cbor2.dumps(top)


def _renamed_package(new: str) -> bytes:
    top = cbor2.loads(_seed_package(signed=False))
    manifest = cbor2.loads(top["manifest"])
    manifest["files"][new] = manifest["files"].pop("model.onnx")
    top["files"][new] = top["files"].pop("model.onnx")
    top["manifest"] = encode_manifest(manifest)
    return cbor2.dumps(top)


def _seed_scenarios() -> dict[str, list[list[Any]]]:
    a = split_payload(bytes(range(256)) * 12, 1024, "t1", {"task_id": "s:1:0"})  # 3 chunks
    b = split_payload(b"update from b" * 100, 1024, "t1", {"task_id": "s:1:0"})  # same id
    interleaved = [
        ["feed", "dev-a", a[2].to_bytes()],
        ["feed", "dev-b", b[1].to_bytes()],
        ["feed", "dev-a", a[0].to_bytes()],
        ["tick", 1.0],
        ["feed", "dev-a", a[2].to_bytes()],
        ["feed", "dev-b", b[0].to_bytes()],
        ["missing", "dev-a", "t1"],
        ["feed", "dev-a", a[1].to_bytes()],
        ["feed", "dev-a", a[1].to_bytes()],
        ["expire"],
    ]
    done_flood: list[list[Any]] = []
    for i in range(20):  # completes 20 transfers and is refused 20 within one TTL
        done_flood.append(["feed", "dev-a", _single_chunk(b"x", 1, f"d{i}", {}).to_bytes()])
        done_flood.append(
            ["feed", "dev-a", split_payload(bytes(9000), 4096, f"r{i}")[0].to_bytes()]
        )
    return {"seed-interleaved": interleaved, "seed-finished-ids-flood": done_flood}


def corpus_entries() -> dict[str, bytes]:
    """Every corpus file (path under corpus/ -> bytes): seeds, then the crashes found."""
    out: dict[str, bytes] = {}
    for name, data in _seed_messages().items():
        out[f"messages/seed-{name}.cbor"] = data
    tensor_sets_ = {
        "all-dtypes": {name: np.arange(6).astype(name).reshape(2, 3) for name in DTYPE_TO_TAG},
        "scalar-and-empty": {
            "s": np.float32(1.5) * np.ones((), np.float32),
            "e": np.zeros((0, 4), np.int64),
        },
        "eight-dims": {"w": np.ones((1, 2, 1, 2, 1, 2, 1, 2), np.float16)},
    }
    for name, arrays in tensor_sets_.items():
        out[f"tensors/seed-{name}.cbor"] = dumps_tensors(arrays)
    payload = bytes(range(256)) * 9  # 2304 bytes: chunks of 1024, 1024 and 256
    for c in split_payload(payload, 1024, "xfer-1", {"task_id": "s:1:0"}):
        out[f"chunks/seed-multi-{c.index}.cbor"] = c.to_bytes()
    out["chunks/seed-empty.cbor"] = split_payload(b"", 1024, "xfer-2")[0].to_bytes()
    out["chunks/seed-tiny-single.cbor"] = _single_chunk(b"hi", 2, "xfer-3", {}).to_bytes()
    for name, ops in _seed_scenarios().items():
        out[f"reassembler/{name}.cbor"] = cbor2.dumps(ops)
    out["types/seed-spec.cbor"] = cbor2.dumps([["W", "float32", [64, 10]], ["b", "int64", []]])
    out["types/seed-participants.cbor"] = cbor2.dumps(
        [{"device": "dev-1", "region": "r1", "n": 10, "metrics": {"loss": 1.0}}]
    )
    out["types/seed-rejections.cbor"] = cbor2.dumps([{"device": "dev-2", "reason": "late"}])
    out["types/crash-spec-null-dim.cbor"] = cbor2.dumps([["W", "float32", [None]]])  # TypeError
    out["types/crash-spec-infinite-dim.cbor"] = cbor2.dumps([["W", "float32", [math.inf]]])
    out["types/crash-spec-negative-dim.cbor"] = cbor2.dumps([["W", "float32", [-3]]])
    out["types/crash-spec-unknown-dtype.cbor"] = cbor2.dumps([["W", "foo", [2]]])
    out["packages/seed-unsigned.edgepkg"] = _seed_package(signed=False)
    out["packages/seed-signed.edgepkg"] = _seed_package(signed=True)
    out["packages/crash-scale-bignum.edgepkg"] = _package_with(
        lambda m: m["preprocessing"].update(scale=2**1100)
    )  # OverflowError in math.isfinite
    out["packages/crash-mean-bignum.edgepkg"] = _package_with(
        lambda m: m["preprocessing"].update(mean=[0.5, 10**400])
    )
    out["packages/crash-dtype-unhashable.edgepkg"] = _package_with(
        lambda m: m["parameters"][0].update(dtype=[])
    )  # TypeError: unhashable type
    out["packages/crash-manifest-cycle.edgepkg"] = _package_with(
        lambda m: m["training"].update(loop=_cycle())
    )  # RecursionError in _check_plain
    out["packages/crash-file-name-newline.edgepkg"] = _renamed_package("model.onnx\n")
    t = Topics("p")
    out["topics/seed-device.txt"] = t.device("r1", "dev-1", "update").encode()
    out["topics/seed-combiner.txt"] = t.combiner("r1", "partial").encode()
    out["topics/seed-model.txt"] = t.model_chunk("v1", 12).encode()
    out["topics/crash-newline-in-level.txt"] = b"edgefl/v1/p/r1\n/dev/dev-1\n/update"
    out["topics/crash-huge-chunk-index.txt"] = b"edgefl/v1/p/model/v1/" + b"7" * 4301
    out["config/seed-agent.json"] = json.dumps(
        {
            "device_id": "dev-1",
            "broker_url": "mqtts://broker:8883",
            "region": "r1",
            "keepalive": 20,
            "min_backoff_s": 1,
            "require_signature": False,
        },
        indent=1,
    ).encode()
    out["config/seed-agent.toml"] = (
        b'device_id = "dev-1"\nproject = "fleet"\ntrainer = "package"\n'
        b'package_cache = "/var/cache/edgefl"\nmax_chunk_size = 65536\nseed = 3\n'
    )
    out["config/crash-array.json"] = b'[["device_id", "dev-1"]]'  # TypeError
    out["config/crash-number.json"] = b"5"  # TypeError
    out["config/crash-device-id-number.json"] = b'{"device_id": 5}'  # AttributeError
    out["config/crash-device-id-number.toml"] = b"device_id = 5\n"  # AttributeError
    out["config/crash-deep-nesting.json"] = b"[" * 2000 + b"]" * 2000  # RecursionError
    out["config/crash-deep-nesting.toml"] = b"device_id = " + b"[" * 600 + b"]" * 600
    out["config/crash-wrong-types.json"] = b'{"device_id": "d", "seed": "x", "keepalive": []}'
    return out


def write_corpus(root: Path = CORPUS) -> None:
    """(Re)write every corpus file; files added by hand are left alone."""
    for rel, data in corpus_entries().items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


if __name__ == "__main__":
    write_corpus()
    print(f"wrote {len(corpus_entries())} corpus files under {CORPUS}")
