"""Property tests of the tensor codec (RFC 8746 typed arrays in CBOR, docs/protocol.md).

The codec is the byte-level contract every device implementation must match, so these tests
check three things: any supported array survives a round trip bit for bit; the bytes are the
RFC 8746 layout that a plain CBOR library sees; and hostile bytes only ever raise CodecError.
"""

from __future__ import annotations

import contextlib

import cbor2
import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes

from edgefl.protocol.tensors import (
    DTYPE_TO_TAG,
    MAX_NDIM,
    MULTIDIM_TAG,
    CodecError,
    dumps_tensors,
    loads_tensors,
)

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = sorted(DTYPE_TO_TAG)
NAMES = st.text(min_size=1, max_size=12)


def rfc8746_tag(dtype: np.dtype) -> int:
    """The little-endian typed-array tag from the RFC 8746 bit layout 0b010_f_s_e_ll.

    Computed independently of the codec's table: f = float, s = signed, e = little-endian
    (uint8/int8 have no byte order; e=1 on uint8 would mean "clamped"), ll = log2 of the size
    (floats: 0 = 16 bit, 1 = 32, 2 = 64; integers: 0 = 8 bit, 1 = 16, 2 = 32, 3 = 64).
    """
    f = 1 if dtype.kind == "f" else 0
    s = 1 if dtype.kind == "i" else 0
    e = 1 if dtype.itemsize > 1 else 0
    ll = {2: 0, 4: 1, 8: 2}[dtype.itemsize] if f else {1: 0, 2: 1, 4: 2, 8: 3}[dtype.itemsize]
    return 0b0100_0000 | f << 4 | s << 3 | e << 2 | ll


@st.composite
def arrays(draw: st.DrawFn) -> tuple[np.ndarray, bytes]:
    """An array with arbitrary bits and the little-endian C-order bytes it must encode to.

    The array may be big-endian, transposed, reversed or strided: the codec must normalise
    all of these to the same wire bytes.
    """
    name = draw(st.sampled_from(DTYPES))
    le = np.dtype(name).newbyteorder("<")
    shape = draw(array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    layout = draw(st.sampled_from(["plain", "transposed", "reversed", "strided"]))
    base_shape = shape
    if layout == "strided" and shape:
        base_shape = (shape[0] * 2, *shape[1:])
    count = int(np.prod(base_shape, dtype=np.int64))
    raw = draw(st.binary(min_size=count * le.itemsize, max_size=count * le.itemsize))
    arr = np.frombuffer(raw, dtype=le).reshape(base_shape)
    if layout == "transposed":
        arr = arr.T
    elif layout == "reversed" and arr.ndim:
        arr = arr[::-1]
    elif layout == "strided" and arr.ndim:
        arr = arr[::2]
    # Reference bytes: a same-dtype copy is a pure memcpy, so the bits are untouched.
    expected = np.ascontiguousarray(arr).tobytes()
    if le.itemsize > 1 and draw(st.booleans()):
        arr = arr.byteswap().view(arr.dtype.newbyteorder(">"))  # same values, big-endian
    return arr, expected


def le_bytes(arr: np.ndarray) -> bytes:
    return np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False)).tobytes()


def tensor_tag(shape: list, tag: int, data: bytes) -> cbor2.CBORTag:
    return cbor2.CBORTag(MULTIDIM_TAG, [shape, cbor2.CBORTag(tag, data)])


# round trips ---------------------------------------------------------------------------------


@SETTINGS
@given(st.dictionaries(NAMES, arrays(), min_size=0, max_size=4))
def test_round_trip_preserves_dtype_shape_and_bits(items: dict) -> None:
    tensors = {k: arr for k, (arr, _) in items.items()}
    out = loads_tensors(dumps_tensors(tensors))
    assert list(out) == list(tensors)
    for name, (arr, expected) in items.items():
        got = out[name]
        assert got.dtype.name == arr.dtype.name
        assert got.dtype.isnative
        assert got.shape == arr.shape
        assert le_bytes(got) == expected  # exact bits, NaN payloads included


@SETTINGS
@given(
    st.sampled_from(["float16", "float32", "float64"]),
    st.lists(st.integers(min_value=1), min_size=1, max_size=16),
    st.booleans(),
)
def test_nan_payloads_survive(name: str, payloads: list[int], big_endian: bool) -> None:
    """Quiet, signalling and negative NaNs with any payload keep their exact bit pattern."""
    dtype = np.dtype(name)
    bits = dtype.itemsize * 8
    mant = {16: 10, 32: 23, 64: 52}[bits]
    exp_mask = ((1 << (bits - 1 - mant)) - 1) << mant
    words = []
    for i, p in enumerate(payloads):
        payload = p % (1 << mant) or 1  # a zero mantissa would be infinity
        sign = (i % 2) << (bits - 1)
        words.append(sign | exp_mask | payload)
    uint = np.dtype(f"<u{dtype.itemsize}")
    arr = np.array(words, dtype=uint).view(dtype.newbyteorder("<"))
    expected = arr.tobytes()
    assert np.isnan(arr).all()
    if big_endian:
        arr = arr.byteswap().view(arr.dtype.newbyteorder(">"))
    out = loads_tensors(dumps_tensors({"nan": arr}))["nan"]
    assert le_bytes(out) == expected


def test_scalar_and_empty_tensors() -> None:
    tensors = {
        "scalar": np.float64(2.5),
        "empty": np.zeros((0,), np.float32),
        "empty2d": np.zeros((3, 0), np.int64),
    }
    out = loads_tensors(dumps_tensors(tensors))
    assert out["scalar"].shape == () and out["scalar"] == 2.5
    assert out["empty"].shape == (0,) and out["empty"].dtype == np.float32
    assert out["empty2d"].shape == (3, 0) and out["empty2d"].dtype == np.int64


# the wire layout -----------------------------------------------------------------------------


@SETTINGS
@given(arrays())
def test_encoding_is_rfc8746_as_seen_by_plain_cbor(item: tuple[np.ndarray, bytes]) -> None:
    arr, expected = item
    blob = dumps_tensors({"t": arr})
    top = cbor2.loads(blob)  # no edgefl code involved
    assert isinstance(top, dict) and list(top) == ["t"]
    tagged = top["t"]
    assert isinstance(tagged, cbor2.CBORTag) and tagged.tag == 40
    shape, typed = tagged.value
    assert list(shape) == list(arr.shape)  # cbor2 hands tag contents over as tuples
    assert isinstance(typed, cbor2.CBORTag)
    assert typed.tag == rfc8746_tag(arr.dtype) == DTYPE_TO_TAG[arr.dtype.name]
    assert typed.value == expected
    # tag 40 is encoded as the two-byte head d8 28, right after the 1-byte key "t"
    assert blob[:5] == b"\xa1\x61t\xd8\x28"


def test_worked_example_from_the_docs() -> None:
    """The hex example in docs/protocol.md, byte for byte."""
    blob = dumps_tensors({"b": np.array([1.5, -2.0], dtype=np.float32)})
    assert blob.hex(" ") == "a1 61 62 d8 28 82 81 02 d8 55 48 00 00 c0 3f 00 00 00 c0"
    blob = dumps_tensors({"w": np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int16)})
    assert blob.hex(" ") == (
        "a1 61 77 d8 28 82 82 02 03 d8 4d 4c 01 00 02 00 03 00 04 00 05 00 06 00"
    )


def test_tag_table_is_the_rfc8746_little_endian_column() -> None:
    for name, tag in DTYPE_TO_TAG.items():
        assert tag == rfc8746_tag(np.dtype(name)), name


# rejections ----------------------------------------------------------------------------------


@SETTINGS
@given(arrays(), st.integers(min_value=-64, max_value=64).filter(bool))
def test_wrong_byte_count_rejected(item: tuple[np.ndarray, bytes], delta: int) -> None:
    arr, expected = item
    assume(len(expected) + delta >= 0)
    data = (expected + b"\x00" * max(delta, 0))[: len(expected) + delta]
    tagged = tensor_tag(list(arr.shape), DTYPE_TO_TAG[arr.dtype.name], data)
    with pytest.raises(CodecError, match="bytes"):
        loads_tensors(cbor2.dumps({"t": tagged}))


@SETTINGS
@given(st.integers(min_value=0, max_value=2**32).filter(lambda t: t not in DTYPE_TO_TAG.values()))
def test_unknown_typed_array_tag_rejected(tag: int) -> None:
    # includes the big-endian variants (65-67, 73-75, 80-83), clamped uint8 (68) and float128
    blob = cbor2.dumps({"t": tensor_tag([2], tag, b"\x00" * 16)})
    with pytest.raises(CodecError):
        loads_tensors(blob)


@SETTINGS
@given(st.integers(min_value=0, max_value=2**32).filter(lambda t: t != MULTIDIM_TAG))
def test_outer_tag_other_than_40_rejected(tag: int) -> None:
    # e.g. 1040, the RFC 8746 column-major array, is not part of protocol v1
    inner = [[2], cbor2.CBORTag(85, b"\x00" * 8)]
    blob = cbor2.dumps({"t": cbor2.CBORTag(tag, inner)})
    with pytest.raises(CodecError):
        loads_tensors(blob)


@SETTINGS
@given(
    st.lists(st.integers(min_value=0, max_value=4), min_size=1, max_size=4),
    st.data(),
)
def test_negative_or_bool_shape_entries_rejected(shape: list, data: st.DataObject) -> None:
    pos = data.draw(st.integers(min_value=0, max_value=len(shape) - 1))
    bad = data.draw(
        st.one_of(
            st.integers(max_value=-1),
            st.booleans(),
            st.floats(allow_nan=False, min_value=0, max_value=4),
            st.text(max_size=2),
            st.none(),
        )
    )
    shape[pos] = bad
    blob = cbor2.dumps({"t": tensor_tag(shape, 85, b"")})
    with pytest.raises(CodecError):
        loads_tensors(blob)


@SETTINGS
@given(
    st.one_of(
        st.integers(),
        st.text(),
        st.binary(),
        st.none(),
        st.booleans(),
        st.floats(),
        st.lists(st.integers(), max_size=3),
        st.builds(lambda: tensor_tag([1], 85, b"\x00" * 4)),
    )
)
def test_non_map_top_level_rejected(value: object) -> None:
    with pytest.raises(CodecError, match="map"):
        loads_tensors(cbor2.dumps(value))


@SETTINGS
@given(st.integers(min_value=MAX_NDIM + 1, max_value=MAX_NDIM + 8))
def test_too_many_dims_rejected(ndim: int) -> None:
    blob = cbor2.dumps({"t": tensor_tag([1] * ndim, 64, b"\x07")})
    with pytest.raises(CodecError, match="shape"):
        loads_tensors(blob)
    with pytest.raises(CodecError):
        dumps_tensors({"t": np.zeros((1,) * ndim, np.uint8)})
    # MAX_NDIM itself is fine
    out = loads_tensors(cbor2.dumps({"t": tensor_tag([1] * MAX_NDIM, 64, b"\x07")}))
    assert out["t"].shape == (1,) * MAX_NDIM


@pytest.mark.parametrize(
    "value",
    [
        {"": tensor_tag([1], 64, b"\x00")},  # empty name
        {1: tensor_tag([1], 64, b"\x00")},  # non-string name
        {"t": cbor2.CBORTag(40, [[1]])},  # body is not [shape, typed]
        {"t": cbor2.CBORTag(40, [[1], cbor2.CBORTag(64, b"\x00"), 3])},
        {"t": cbor2.CBORTag(40, {"shape": [1]})},
        {"t": cbor2.CBORTag(40, [5, cbor2.CBORTag(64, b"\x00" * 5)])},  # shape not a list
        {"t": cbor2.CBORTag(40, [[1], b"\x00"])},  # untagged bytes
        {"t": cbor2.CBORTag(40, [[1], cbor2.CBORTag(64, "x")])},  # text, not bytes
        {"t": cbor2.CBORTag(40, [[1], cbor2.CBORTag(64, [0])])},  # array, not bytes
        {"t": b"\x00"},  # not tagged at all
    ],
)
def test_malformed_tensor_structures_rejected(value: object) -> None:
    with pytest.raises(CodecError):
        loads_tensors(cbor2.dumps(value))


@pytest.mark.parametrize(
    "arr", [np.zeros(2, bool), np.zeros(2, np.complex64), np.array(["a"]), np.zeros(2, "V4")]
)
def test_unsupported_dtypes_refused_on_encode(arr: np.ndarray) -> None:
    with pytest.raises(CodecError, match="dtype"):
        dumps_tensors({"t": arr})


def test_empty_or_non_string_names_refused_on_encode() -> None:
    with pytest.raises(CodecError):
        dumps_tensors({"": np.zeros(1)})
    with pytest.raises(CodecError):
        dumps_tensors({3: np.zeros(1)})  # type: ignore[dict-item]


# hostile bytes -------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_raise_only_codec_error(blob: bytes) -> None:
    try:
        out = loads_tensors(blob)
    except CodecError:
        return
    assert isinstance(out, dict)


@SETTINGS
@given(st.dictionaries(NAMES, arrays(), min_size=1, max_size=3), st.data())
def test_truncated_and_mutated_encodings_raise_only_codec_error(
    items: dict, data: st.DataObject
) -> None:
    blob = dumps_tensors({k: arr for k, (arr, _) in items.items()})
    cut = data.draw(st.integers(min_value=0, max_value=len(blob) - 1))
    with pytest.raises(CodecError):
        loads_tensors(blob[:cut])  # a strict prefix of a definite-length map never decodes
    pos = data.draw(st.integers(min_value=0, max_value=len(blob) - 1))
    byte = data.draw(st.integers(min_value=0, max_value=255))
    mutated = blob[:pos] + bytes([byte]) + blob[pos + 1 :]
    with contextlib.suppress(CodecError):
        loads_tensors(mutated)


# regressions (bugs these tests found) ------------------------------------------------------


@pytest.mark.parametrize("shape", [[0, 2**63], [0, 2**62, 2**62], [0, 10**30]])
def test_zero_size_shape_with_huge_dimension_is_a_codec_error(shape: list) -> None:
    blob = cbor2.dumps({"t": tensor_tag(shape, 85, b"")})
    try:
        loads_tensors(blob)
    except CodecError:
        return
    pytest.fail("accepted an unrepresentable shape")
