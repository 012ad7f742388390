"""The frame guard: what it hands aiormq always decodes, and what decoded already is unchanged."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pamqp.frame
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from jlm.amqp.transport import UNDECODABLE, FrameGuardReader

pytestmark = pytest.mark.unit

FLAGS = Basic.Properties.flags


async def guarded(data: bytes) -> list[tuple[int, Any]]:
    """Every frame aiormq would read from `data` through the guard, decoded by pamqp."""
    inner = asyncio.StreamReader()
    inner.feed_data(data)
    inner.feed_eof()
    reader = FrameGuardReader(inner)
    frames = []
    while not reader.at_eof():
        head = await reader.readexactly(7)
        size = struct.unpack(">I", head[3:7])[0]
        raw = head + await reader.readexactly(size + 1)
        _, channel, frame = pamqp.frame.unmarshal(raw)
        frames.append((channel, frame))
    return frames


def header_frame(channel: int, body_size: int, flags: int, props: bytes) -> bytes:
    payload = struct.pack(">HHQH", 60, 0, body_size, flags) + props
    return struct.pack(">BHI", 2, channel, len(payload)) + payload + b"\xce"


def deliver(channel: int, routing_key: bytes) -> bytes:
    """A Basic.Deliver whose 6-byte routing key is given as raw bytes."""
    assert len(routing_key) == 6
    method = Basic.Deliver("ctag", 7, False, "jlm.requests", "manage")
    return pamqp.frame.marshal(method, channel).replace(b"manage", routing_key)


properties = st.builds(
    Basic.Properties,
    content_type=st.none() | st.text(max_size=20),
    headers=st.none()
    | st.dictionaries(st.text(min_size=1, max_size=8), st.integers(0, 2**31) | st.text()),
    delivery_mode=st.none() | st.sampled_from([1, 2]),
    priority=st.none() | st.integers(0, 9),
    correlation_id=st.none() | st.text(max_size=20),
    message_id=st.none() | st.text(max_size=20),
    reply_to=st.none() | st.text(max_size=20),
)


@settings(max_examples=200, deadline=None)
@given(properties, st.integers(0, 2**40), st.integers(1, 100))
def test_decodable_frames_pass_unchanged(props: Basic.Properties, size: int, ch: int) -> None:
    frame = pamqp.frame.marshal(ContentHeader(0, size, props), ch)
    [(channel, header)] = asyncio.run(guarded(frame))
    assert channel == ch
    assert header.body_size == size
    assert pamqp.frame.marshal(header, ch) == frame


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(0, 0xFFFE).map(lambda f: f & ~1), st.integers(0, 99))
def test_any_content_header_comes_out_decodable_and_marked(
    junk: bytes, flags: int, size: int
) -> None:
    frame = header_frame(3, size, flags, junk)
    [(channel, header)] = asyncio.run(guarded(frame))
    assert channel == 3
    assert header.body_size == size
    try:
        pamqp.frame.unmarshal(frame)
    except Exception:
        assert UNDECODABLE in header.properties.headers


def test_a_header_timestamp_of_2_63_keeps_the_other_properties() -> None:
    table = b"\x04sent" + b"T" + struct.pack(">Q", 2**63)
    flags = FLAGS["content_type"] | FLAGS["headers"] | FLAGS["reply_to"] | FLAGS["message_id"]
    props = b"\x10application/json" + struct.pack(">I", len(table)) + table
    props += b"\x09amq.gen-x" + b"\x02m1"
    [(_, header)] = asyncio.run(guarded(header_frame(1, 5, flags, props)))
    p = header.properties
    assert (p.content_type, p.reply_to, p.message_id) == ("application/json", "amq.gen-x", "m1")
    assert p.headers[UNDECODABLE].startswith("UnmarshalingException")


def test_a_routing_key_that_is_not_utf8_is_replaced_and_marks_its_header() -> None:
    body_header = pamqp.frame.marshal(ContentHeader(0, 2, Basic.Properties(message_id="m")), 1)
    frames = asyncio.run(guarded(deliver(1, b"\xffanage") + body_header))
    (_, method), (_, header) = frames
    assert method.routing_key == "\ufffdanage"
    assert method.delivery_tag == 7
    assert header.properties.message_id == "m"
    assert UNDECODABLE in header.properties.headers
