"""Property tests of the control messages and the topic tree (docs/protocol.md).

Every message type must survive encode/decode unchanged, and decode must turn every kind of
bad input into MessageError (never another exception: handlers run on the network thread).
The topic builders and parsers must agree with each other and refuse anything that could
escape a subtree (wildcards, slashes, empty segments) or cross into another project.
"""

from __future__ import annotations

import contextlib

import cbor2
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from edgefl.protocol.messages import (
    MESSAGE_VERSION,
    SCHEMAS,
    MessageError,
    clean_metrics,
    decode,
    encode,
)
from edgefl.protocol.topics import (
    COMBINER_CHANNELS,
    DEVICE_CHANNELS,
    ROOT,
    TopicError,
    Topics,
    check_segment,
)

SETTINGS = settings(max_examples=100, deadline=None)
TYPES = sorted(SCHEMAS)

SCALARS = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.booleans(),
    st.none(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def value_of(kind: type | tuple[type, ...]) -> st.SearchStrategy:
    """Values of one schema type, as a conforming implementation would send them."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    options = []
    for k in kinds:
        if k is int:
            options.append(st.integers(min_value=-(2**63), max_value=2**64 - 1))
        elif k is float:
            options.append(st.floats(allow_nan=False))
        elif k is str:
            options.append(st.text(max_size=20))
        elif k is bytes:
            options.append(st.binary(max_size=40))
        elif k is dict:
            options.append(st.dictionaries(st.text(max_size=8), VALUES, max_size=4))
        elif k is list:
            options.append(st.lists(VALUES, max_size=4))
        else:  # pragma: no cover - a new schema type needs a strategy here
            raise AssertionError(f"no strategy for {k}")
    return st.one_of(options)


def wrong_value_of(kind: type | tuple[type, ...]) -> st.SearchStrategy:
    """Values that must not pass for ``kind`` (bools never count as numbers)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return VALUES.filter(lambda v: isinstance(v, bool) or v is None or not isinstance(v, kinds))


@st.composite
def messages(draw: st.DrawFn, msg_type: str | None = None) -> tuple[str, dict]:
    t = msg_type or draw(st.sampled_from(TYPES))
    fields = {k: draw(value_of(kind)) for k, kind in SCHEMAS[t].items()}
    # fields beyond the schema travel untouched (e.g. "spec" in round plans, "device" and
    # "region" in status); receivers ignore what they do not know
    extra = draw(
        st.dictionaries(
            st.text(max_size=8).filter(lambda k: k not in fields and k not in ("v", "type")),
            VALUES,
            max_size=3,
        )
    )
    return t, {**fields, **extra}


# messages: round trips ---------------------------------------------------------------------


@SETTINGS
@given(messages())
def test_every_message_type_round_trips(item: tuple[str, dict]) -> None:
    msg_type, fields = item
    out = decode(encode(msg_type, **fields))
    assert out == {"v": MESSAGE_VERSION, "type": msg_type, **fields}
    assert decode(encode(msg_type, **fields), msg_type) == out
    assert decode(encode(msg_type, **fields), (msg_type, "close")) == out


def test_messages_as_the_components_send_them() -> None:
    """The exact field sets the agent, combiner and controller put on the wire."""
    status = decode(
        encode("status", state="online", ts=1.5, device="d1", region="r0", agent="0.1.0"),
        "status",
    )
    assert status["device"] == "d1" and status["region"] == "r0"
    comb = decode(encode("status", state="offline", ts=2, combiner="combiner-r0"), "status")
    assert comb["combiner"] == "combiner-r0"
    plan = decode(
        encode(
            "round",
            task_id="s:1:0",
            session="s",
            round=1,
            model_version="s-r0000",
            model_digest=b"\x00" * 32,
            devices=["d1", "d2"],
            deadline=1e9,
            train={"lr": 0.1},
            chunk_size=262144,
            spec=[["W", "float64", [64, 10]], ["b", "float64", [10]]],
        ),
        "round",
    )
    assert plan["spec"] == [["W", "float64", [64, 10]], ["b", "float64", [10]]]


@pytest.mark.parametrize("msg_type", TYPES)
def test_encode_refuses_missing_fields(msg_type: str) -> None:
    for key in SCHEMAS[msg_type]:
        fields = {k: None for k in SCHEMAS[msg_type] if k != key}
        with pytest.raises(MessageError, match=key):
            encode(msg_type, **fields)


def test_encode_refuses_unknown_type() -> None:
    with pytest.raises(MessageError, match="unknown"):
        encode("hello", x=1)


# messages: rejections ----------------------------------------------------------------------


def raw(msg: dict) -> bytes:
    return cbor2.dumps(msg)


@SETTINGS
@given(messages(), VALUES)
def test_wrong_version_rejected(item: tuple[str, dict], version: object) -> None:
    # 1.0 and true compare equal to 1 in Python and are accepted (see docs/protocol.md);
    # a conforming sender always writes the unsigned integer 1
    assume(not (isinstance(version, (int, float)) and version == MESSAGE_VERSION))
    msg_type, fields = item
    with pytest.raises(MessageError, match="version"):
        decode(raw({**fields, "v": version, "type": msg_type}))
    with pytest.raises(MessageError, match="version"):
        decode(raw({**fields, "type": msg_type}))  # no "v" at all


@SETTINGS
@given(messages(), st.one_of(st.text(max_size=10), st.integers(), st.none(), st.binary()))
def test_unknown_type_rejected(item: tuple[str, dict], msg_type: object) -> None:
    assume(msg_type not in SCHEMAS)
    _, fields = item
    with pytest.raises(MessageError, match="type"):
        decode(raw({**fields, "v": 1, "type": msg_type}))


@SETTINGS
@given(messages(), st.data())
def test_unexpected_type_rejected(item: tuple[str, dict], data: st.DataObject) -> None:
    msg_type, fields = item
    other = data.draw(st.sampled_from([t for t in TYPES if t != msg_type]))
    with pytest.raises(MessageError, match="expected"):
        decode(encode(msg_type, **fields), other)


@SETTINGS
@given(messages(), st.data())
def test_missing_field_rejected(item: tuple[str, dict], data: st.DataObject) -> None:
    msg_type, fields = item
    key = data.draw(st.sampled_from(sorted(SCHEMAS[msg_type])))
    del fields[key]
    with pytest.raises(MessageError, match=key):
        decode(raw({"v": 1, "type": msg_type, **fields}))


@SETTINGS
@given(messages(), st.data())
def test_wrong_field_type_rejected(item: tuple[str, dict], data: st.DataObject) -> None:
    msg_type, fields = item
    key = data.draw(st.sampled_from(sorted(SCHEMAS[msg_type])))
    fields[key] = data.draw(wrong_value_of(SCHEMAS[msg_type][key]))
    with pytest.raises(MessageError, match=key):
        decode(raw({"v": 1, "type": msg_type, **fields}))


@pytest.mark.parametrize(
    ("msg_type", "key"),
    [
        (t, k)
        for t, schema in SCHEMAS.items()
        for k, kind in schema.items()
        if kind is int or (isinstance(kind, tuple) and int in kind)
    ],
)
@pytest.mark.parametrize("flag", [True, False])
def test_bools_never_pass_as_numbers(msg_type: str, key: str, flag: bool) -> None:
    fields = {
        k: {str: "x", int: 1, bytes: b"", dict: {}, list: []}.get(kind, 1.0)
        for k, kind in SCHEMAS[msg_type].items()
    }
    decode(raw({"v": 1, "type": msg_type, **fields}))  # the baseline is valid
    fields[key] = flag
    with pytest.raises(MessageError, match=key):
        decode(raw({"v": 1, "type": msg_type, **fields}))


@SETTINGS
@given(VALUES.filter(lambda v: not isinstance(v, dict)))
def test_non_map_rejected(value: object) -> None:
    with pytest.raises(MessageError, match="map"):
        decode(raw(value))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_bytes_raise_only_message_error(blob: bytes) -> None:
    with contextlib.suppress(MessageError):
        decode(blob)


@SETTINGS
@given(st.dictionaries(st.sampled_from(["v", "type", "task_id", "round", "x"]), VALUES))
def test_arbitrary_maps_raise_only_message_error(msg: dict) -> None:
    with contextlib.suppress(MessageError):
        decode(raw(msg))


def test_clean_metrics_keeps_only_finite_named_numbers() -> None:
    metrics = {"a": 1, "b": 2.5, "c": float("nan"), "d": float("inf"), "e": True, "f": "x", 3: 1.0}
    assert clean_metrics(metrics) == {"a": 1.0, "b": 2.5}


# topics ------------------------------------------------------------------------------------

SEGMENTS = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
BAD_SEGMENTS = st.one_of(
    st.just(""),
    st.text(min_size=65, max_size=80, alphabet="abc"),
    st.builds(
        lambda a, bad, b: a + bad + b,
        st.text(alphabet="ab", max_size=3),
        st.sampled_from(["/", "+", "#", " ", "$", "\x00", "é", "*", ":"]),
        st.text(alphabet="ab", max_size=3),
    ),
)


@SETTINGS
@given(SEGMENTS, SEGMENTS, SEGMENTS, st.sampled_from(DEVICE_CHANNELS))
def test_device_topics_round_trip(project: str, region: str, device: str, ch: str) -> None:
    t = Topics(project)
    topic = t.device(region, device, ch)
    assert topic == f"edgefl/v1/{project}/{region}/dev/{device}/{ch}"
    assert t.parse_device_topic(topic) == (region, device, ch)
    # the wildcard filters cover the topic
    for flt in (t.device_wildcard(region, ch), t.device_wildcard(None, ch)):
        assert mqtt_match(flt, topic)
    with pytest.raises(TopicError):
        t.parse_combiner_topic(topic)


@SETTINGS
@given(SEGMENTS, SEGMENTS, st.sampled_from(COMBINER_CHANNELS))
def test_combiner_topics_round_trip(project: str, region: str, ch: str) -> None:
    t = Topics(project)
    topic = t.combiner(region, ch)
    assert topic == f"edgefl/v1/{project}/{region}/comb/{ch}"
    assert t.parse_combiner_topic(topic) == (region, ch)
    assert mqtt_match(t.combiner_wildcard(ch), topic)
    with pytest.raises(TopicError):
        t.parse_device_topic(topic)


@SETTINGS
@given(SEGMENTS, SEGMENTS, st.integers(min_value=0, max_value=10**6))
def test_model_topics_round_trip(project: str, version: str, index: int) -> None:
    t = Topics(project)
    topic = t.model_chunk(version, index)
    assert topic == f"edgefl/v1/{project}/model/{version}/{index}"
    assert t.parse_model_chunk(topic) == (version, index)
    assert mqtt_match(t.model_filter(version), topic)
    assert t.controller_status() == f"edgefl/v1/{project}/ctl/status"


@SETTINGS
@given(SEGMENTS, BAD_SEGMENTS, st.sampled_from(DEVICE_CHANNELS), st.sampled_from(range(5)))
def test_builders_reject_bad_segments(ok: str, bad: str, ch: str, where: int) -> None:
    with pytest.raises(TopicError):
        check_segment("x", bad)
    builders = [
        lambda: Topics(bad),
        lambda: Topics(ok).device(bad, ok, ch),
        lambda: Topics(ok).device(ok, bad, ch),
        lambda: Topics(ok).combiner(bad, "round"),
        lambda: Topics(ok).model_chunk(bad, 0),
    ]
    with pytest.raises(TopicError):
        builders[where]()
    with pytest.raises(TopicError):
        Topics(ok).model_filter(bad)
    with pytest.raises(TopicError):
        Topics(ok).device_wildcard(bad, ch)


@pytest.mark.parametrize("bad", [None, 5, b"dev"])
def test_builders_reject_non_strings(bad: object) -> None:
    with pytest.raises(TopicError):
        Topics("p").device("r", bad, "task")  # type: ignore[arg-type]


@SETTINGS
@given(SEGMENTS, st.text(max_size=12))
def test_unknown_channels_rejected(seg: str, ch: str) -> None:
    t = Topics(seg)
    if ch not in DEVICE_CHANNELS:
        with pytest.raises(TopicError):
            t.device(seg, seg, ch)
        with pytest.raises(TopicError):
            t.device_wildcard(None, ch)
        with pytest.raises(TopicError):
            t.parse_device_topic(f"{t.base}/{seg}/dev/{seg}/{ch}")
    if ch not in COMBINER_CHANNELS:
        with pytest.raises(TopicError):
            t.combiner(seg, ch)
        with pytest.raises(TopicError):
            t.combiner_wildcard(ch)


@SETTINGS
@given(SEGMENTS, SEGMENTS, SEGMENTS, SEGMENTS, st.sampled_from(DEVICE_CHANNELS))
def test_parse_device_topic_rejects_foreign_projects(
    mine: str, theirs: str, region: str, device: str, ch: str
) -> None:
    assume(mine != theirs)
    foreign = Topics(theirs).device(region, device, ch)
    with pytest.raises(TopicError):
        Topics(mine).parse_device_topic(foreign)
    with pytest.raises(TopicError):
        Topics(mine).parse_combiner_topic(Topics(theirs).combiner(region, "partial"))
    # another protocol version's tree is foreign too
    with pytest.raises(TopicError):
        Topics(mine).parse_device_topic(foreign.replace(f"{ROOT}/{theirs}", f"edgefl/v2/{mine}", 1))


@SETTINGS
@given(SEGMENTS, st.text(max_size=60))
def test_parsers_raise_only_topic_error(project: str, topic: str) -> None:
    t = Topics(project)
    for parse in (t.parse_device_topic, t.parse_combiner_topic, t.parse_model_chunk):
        with contextlib.suppress(TopicError):
            parse(topic)


@pytest.mark.parametrize(
    "topic",
    [
        "edgefl/v1/p/r/dev/d",  # too short
        "edgefl/v1/p/r/dev/d/update/x",  # too long
        "edgefl/v1/p/r/comb/d/update",  # not the dev subtree
        "edgefl/v1/p/r/dev/d/round",  # not a device channel
        "edgefl/v1/q/r/dev/d/update",  # another project
        "edgefl/v0/p/r/dev/d/update",  # another version
    ],
)
def test_parse_device_topic_rejects_malformed(topic: str) -> None:
    with pytest.raises(TopicError):
        Topics("p").parse_device_topic(topic)


def test_parse_model_chunk_rejects_bad_index() -> None:
    with pytest.raises(TopicError, match="index"):
        Topics("p").parse_model_chunk("edgefl/v1/p/model/v1/x")


def test_topic_error_is_a_value_error() -> None:
    assert issubclass(TopicError, ValueError)  # callers catch ValueError around parsing


def mqtt_match(topic_filter: str, topic: str) -> bool:
    """MQTT 3.1.1 filter matching (section 4.7), for checking the wildcard builders."""
    f, t = topic_filter.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


# regressions (bugs these tests found) ------------------------------------------------------


@pytest.mark.parametrize("bad_type", [[1], {"a": 1}])
def test_unhashable_type_field_is_a_message_error(bad_type: object) -> None:
    with pytest.raises(MessageError):
        decode(raw({"v": 1, "type": bad_type}))


def test_parse_model_chunk_rejects_foreign_projects() -> None:
    with pytest.raises(TopicError):
        Topics("mine").parse_model_chunk(Topics("theirs").model_chunk("v1", 0))
