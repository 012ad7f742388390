"""The lean publish and ack path (`jlm.amqp.lean`): its frames are pamqp's, byte for byte; on a
real RabbitMQ its confirms, returns, nacks and batched acks mean what aiormq's would; and it
fails loudly (an ERROR, aiormq's own path kept) when the AMQP library under it changes."""

from __future__ import annotations

import asyncio
import collections
import logging
import tomllib
from collections.abc import AsyncIterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aio_pika
import pamqp.frame
import pytest
from aio_pika.abc import AbstractIncomingMessage
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from packaging.requirements import Requirement
from pamqp.body import ContentBody
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from jlm.amqp import lean
from jlm.amqp.session import Outgoing
from jlm.broker import Broker
from jlm.config import Settings
from jlm.errors import Unavailable
from jlm.metrics import Metrics

shortstr = st.text(max_size=40).filter(lambda s: len(s.encode()) <= 255)
header_values = st.one_of(st.text(max_size=30), st.integers(-(2**31), 2**31 - 1), st.booleans())
headers = st.dictionaries(st.text(min_size=1, max_size=20), header_values, max_size=4)


@pytest.mark.unit
@given(
    content_type=shortstr,
    headers=headers,
    delivery_mode=st.sampled_from([1, 2]),
    priority=st.integers(0, 10),
    correlation_id=st.none() | shortstr,
    message_id=st.none() | shortstr,
    message_type=st.none() | shortstr,
)
def test_properties_are_pamqps_byte_for_byte(**values: object) -> None:
    expected = Basic.Properties(**values).marshal()
    assert lean.properties(**values) == expected


@pytest.mark.unit
@hsettings(max_examples=60)
@given(
    body=st.binary(max_size=200),
    max_body=st.integers(1, 64),
    routing_key=shortstr,
    mandatory=st.booleans(),
    channel=st.integers(1, 2047),
)
def test_publish_frames_decode_as_sent(
    body: bytes, max_body: int, routing_key: str, mandatory: bool, channel: int
) -> None:
    props = Basic.Properties(content_type="application/json", headers={"a": 1}, message_id="m")
    data = lean.publish_frames(
        channel, "jlm.jobs", routing_key, body,
        props=lean.encoded(props), mandatory=mandatory, max_body=max_body,
    )  # fmt: skip
    frames = []
    while data:
        consumed, number, frame = pamqp.frame.unmarshal(data)
        assert number == channel
        frames.append(frame)
        data = data[consumed:]
    method, header, *bodies = frames
    assert isinstance(method, Basic.Publish)
    assert (method.exchange, method.routing_key, method.mandatory, method.immediate) == (
        "jlm.jobs", routing_key, mandatory, False,
    )  # fmt: skip
    assert isinstance(header, ContentHeader)
    assert header.body_size == len(body)
    assert header.properties == props
    assert all(isinstance(b, ContentBody) and 0 < len(b.value) <= max_body for b in bodies)
    assert b"".join(b.value for b in bodies) == body


@pytest.mark.unit
def test_ack_frames_decode_as_sent() -> None:
    for tag, multiple in ((1, False), (2**40, True)):
        _, number, frame = pamqp.frame.unmarshal(lean.ack_frame(7, tag, multiple))
        assert number == 7
        assert isinstance(frame, Basic.Ack)
        assert (frame.delivery_tag, frame.multiple) == (tag, multiple)


@pytest.mark.unit
def test_outgoing_properties_read_back() -> None:
    props = Basic.Properties(content_type="x", headers={"h": "v"}, priority=3, message_id="i")
    out = Outgoing.of("e", "k", b"{}", props, True)
    assert out.properties() == props
    assert out.message_id == "i"


def _acks_written(turns: list[list[int]]) -> list[list[tuple[int, bool]]]:
    """Each turn's acks through `lean.Acks`, and the frames it wrote for them."""

    async def run() -> list[list[tuple[int, bool]]]:
        written: list[bytes] = []
        acks = lean.Acks(1, written.append, lambda: False)
        out = []
        for turn in turns:
            for tag in turn:
                acks.ack(tag)
            await asyncio.sleep(0)
            data, frames = b"".join(written), []
            written.clear()
            while data:
                consumed, _, frame = pamqp.frame.unmarshal(data)
                frames.append((frame.delivery_tag, frame.multiple))
                data = data[consumed:]
            out.append(frames)
        return out

    return asyncio.run(run())


@pytest.mark.unit
def test_acks_of_a_turn_go_as_one_multiple_ack_and_never_ack_a_tag_twice() -> None:
    assert _acks_written([[1, 2, 3], [5], [4], [7, 6], [9, 10]]) == [
        [(3, True)],  # one frame for the run 1..3
        [(5, False)],  # 4 is still being handled: 5 alone
        [(4, True)],  # the run reaches 5, but 5 is acked already: the multiple stops at 4
        [(7, True)],
        [(9, False), (10, False)],  # 8 still in hand
    ]


@pytest.mark.unit
def test_acks_above_a_gap_that_never_closes_go_one_by_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(lean.Acks, "MAX_ABOVE", 3)
    turns = [[2], [3], [4], [5], [1], [6, 7]]
    assert _acks_written(turns) == [
        [(2, False)], [(3, False)], [(4, False)], [(5, False)], [(1, False)],
        [(6, False), (7, False)],
    ]  # fmt: skip
    assert "acks go one by one" in caplog.text


class _Channel:
    """What LeanChannel uses of an aiormq channel, for the timer logic alone (no I/O)."""

    def __init__(self) -> None:
        self.number, self.delivery_tag, self.max_content_size = 1, 0, 1000
        self.publisher_confirms, self.is_closed = True, False
        self.confirmations: dict[int, object] = collections.OrderedDict()
        self.message_id_delivery_tag: dict[str, int] = {}

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()


@pytest.mark.unit
def test_a_confirm_not_in_within_the_timeout_fails_and_the_rest_settle() -> None:
    async def run() -> None:
        written: list[bytes] = []
        ch = _Channel()
        channel = lean.LeanChannel(ch, written.append, lambda: False, confirm_timeout=0.2)
        futures = [channel.publish("x", "k", b"{}", b"\x00\x00") for _ in range(3)]
        assert len(written) == 3
        await ch._on_confirm_frame(Basic.Ack(delivery_tag=1))
        assert futures[0] is not None
        assert isinstance(futures[0].result(), Basic.Ack)
        await asyncio.sleep(0.4)
        for f in futures[1:]:
            assert f is not None
            assert isinstance(f.exception(), TimeoutError)
        # All confirmed in time: nothing fails, and the timer stops.
        more = [channel.publish("x", "k", b"{}", b"\x00\x00") for _ in range(2)]
        await ch._on_confirm_frame(Basic.Ack(delivery_tag=5, multiple=True))
        await asyncio.sleep(0.3)
        assert all(f is not None and isinstance(f.result(), Basic.Ack) for f in more)
        assert channel._watch is None

    asyncio.run(run())


# -- against RabbitMQ ------------------------------------------------------------------------


@pytest.fixture
async def broker(settings: Settings) -> AsyncIterator[Broker]:
    b = Broker(settings, Metrics())
    await b.open()
    try:
        yield b
    finally:
        await b.close()


async def _queue(
    settings: Settings, **arguments: object
) -> tuple[aio_pika.abc.AbstractRobustConnection, aio_pika.abc.AbstractQueue]:
    conn = await aio_pika.connect_robust(settings.amqp_url)
    channel = await conn.channel()
    queue = await channel.declare_queue("lean-test", arguments=arguments or None)
    await queue.bind("jlm.jobs", routing_key="lean-test")
    return conn, queue


def _no_leftovers(broker: Broker) -> None:
    assert broker._lean_publish is not None
    raw = broker._lean_publish._ch
    assert not raw.confirmations
    assert not raw.message_id_delivery_tag
    assert not broker._lean_publish._ids


async def test_confirmed_publishes_arrive_whole_and_in_order(
    broker: Broker, settings: Settings
) -> None:
    assert broker._lean_publish is not None
    assert broker._acks is not None
    conn, queue = await _queue(settings)
    try:
        bodies = [b"%d" % i for i in range(2000)] + [b"x" * 300_000]  # the last one split
        out = [
            Outgoing.of("jlm.jobs", "lean-test", body,
                        Basic.Properties(message_id=f"m{i}", priority=i % 10, headers={"i": i},
                                         content_type="application/json", delivery_mode=2),
                        True)
            for i, body in enumerate(bodies)
        ]  # fmt: skip
        done: set[str] = set()
        await broker.publish_confirmed(out, done)
        assert len(done) == len(out)
        _no_leftovers(broker)
        got = []
        while (m := await queue.get(no_ack=True, fail=False)) is not None:
            got.append(m)
        assert sorted(m.body for m in got) == sorted(bodies)  # a priority queue may reorder
        by_id = {m.message_id: m for m in got}
        m7 = by_id["m7"]
        assert (m7.headers, m7.priority, m7.content_type, m7.delivery_mode) == (
            {"i": 7}, 7, "application/json", 2,
        )  # fmt: skip
    finally:
        await conn.close()


async def test_a_returned_and_a_refused_message_fail_only_their_own_publish(
    broker: Broker, settings: Settings
) -> None:
    conn, queue = await _queue(settings, **{"x-max-length": 0, "x-overflow": "reject-publish"})
    try:

        def msg(rk: str, mid: str) -> Outgoing:
            return Outgoing.of("jlm.jobs", rk, b"{}", Basic.Properties(message_id=mid), True)

        with pytest.raises(Unavailable, match="unroutable"):
            await broker.publish_confirmed([msg("nobody-binds-this", "r1")], set())
        with pytest.raises(Unavailable, match="Nack"):
            await broker.publish_confirmed([msg("lean-test", "n1")], set())
        await queue.unbind("jlm.jobs", routing_key="lean-test")
        await queue.delete(if_empty=False)
        await (await conn.channel()).declare_queue("lean-ok")
        ok = Outgoing.of("", "lean-ok", b"{}", Basic.Properties(message_id="ok"), True)
        done: set[str] = set()
        mixed = [ok, msg("nobody-binds-this", "r2")]
        with pytest.raises(Unavailable, match="unroutable"):
            await broker.publish_confirmed(mixed, done)
        assert done == {"ok"}
        _no_leftovers(broker)
        assert not broker.closed.is_set()
    finally:
        await conn.close()


async def test_batched_acks_settle_every_delivery_once_with_one_held_back(
    settings: Settings,
) -> None:
    """300 requests consumed by the daemon's session, one of them held while the rest are
    acked: the channel stays open (the broker refuses an ack of an unknown or acked tag by
    closing it) and, after the session ends, nothing comes back."""
    producer = await aio_pika.connect_robust(settings.amqp_url)
    pch = await producer.channel()
    broker = Broker(settings, Metrics())
    await broker.open()
    for i in range(300):
        await pch.default_exchange.publish(aio_pika.Message(b"%d" % i), routing_key="jlm.requests")
    held: list[AbstractIncomingMessage] = []
    seen = 0
    all_seen = asyncio.Event()

    async def on_message(message: AbstractIncomingMessage) -> None:
        nonlocal seen
        seen += 1
        if message.body == b"10":
            held.append(message)
        else:
            await asyncio.sleep(0.001 * (seen % 3))  # finish out of order
            await broker.ack(message)
        if seen == 300:
            all_seen.set()

    try:
        await broker.consume(on_message)
        await asyncio.wait_for(all_seen.wait(), 30)
        await asyncio.sleep(0.2)
        await broker.ack(held[0])
        await asyncio.sleep(0.2)
        assert not broker.closed.is_set(), "the broker closed the channel over an ack"
    finally:
        await broker.close()
    queue = await pch.declare_queue("jlm.requests", passive=True)
    assert queue.declaration_result.message_count == 0
    await producer.close()


async def test_a_changed_aiormq_is_reported_and_its_own_path_kept(
    settings: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lean, "_NEEDED", (*lean._NEEDED, "an_attribute_aiormq_dropped"))
    caplog.set_level(logging.ERROR)
    b = Broker(settings, Metrics())
    await b.open()
    try:
        assert b._lean_publish is None
        assert b._acks is None
        assert "lean AMQP path is not in use" in caplog.text
        assert "an_attribute_aiormq_dropped" in caplog.text
        assert f"aiormq {version('aiormq')}" in caplog.text
        conn = await aio_pika.connect_robust(settings.amqp_url)
        queue = await (await conn.channel()).declare_queue("lean-off")
        props = Basic.Properties(message_id="f", headers={"k": "v"}, priority=4)
        await b.publish_confirmed([Outgoing.of("", "lean-off", b"{}", props, True)], set())
        m = await queue.get(no_ack=True)
        assert (m.message_id, m.headers, m.priority) == ("f", {"k": "v"}, 4)
        await conn.close()
    finally:
        await b.close()


@pytest.mark.unit
@pytest.mark.parametrize("package", ["aio-pika", "aiormq"])
def test_the_installed_release_is_within_the_pinned_minor_release(package: str) -> None:
    """The lean path reaches into aiormq's channel: another minor release is tested first, then
    pinned (pyproject.toml)."""
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    pins = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    (pin,) = [r for r in pins if r.name == package]
    upper = [s for s in pin.specifier if s.operator == "<"]
    assert [s.version.count(".") for s in upper] == [1], f"{pin}: no minor-release cap"
    assert pin.specifier.contains(version(package)), f"{package} {version(package)} is not {pin}"


async def test_a_delivery_reads_as_aio_pikas_incoming_message(settings: Settings) -> None:
    """The same message read by the daemon's lean consumer and by aio-pika: every field the
    daemon reads is equal."""
    fields = ("body", "headers", "content_type", "content_encoding", "message_id",
              "correlation_id", "reply_to", "user_id", "type", "redelivered")  # fmt: skip
    conn = await aio_pika.connect_robust(settings.amqp_url)
    broker = Broker(settings, Metrics())
    await broker.open()
    try:
        channel = await conn.channel()
        plain = await channel.declare_queue("lean-plain")
        message = aio_pika.Message(
            b'{"a": 1}', headers={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01",
                                  "n": 7, "list": [1, "x"]},
            content_type="application/json", content_encoding="utf-8", message_id="mid",
            correlation_id="cid", reply_to="rq", type="t", user_id="guest",
        )  # fmt: skip
        await channel.default_exchange.publish(message, routing_key="lean-plain")
        await channel.default_exchange.publish(message, routing_key="jlm.requests")
        got: asyncio.Future[lean.Incoming] = asyncio.get_running_loop().create_future()

        async def on_message(m: lean.Incoming) -> None:
            got.set_result(m)
            await broker.ack(m)

        await broker.consume(on_message)
        lean_one = await asyncio.wait_for(got, 10)
        assert isinstance(lean_one, lean.Delivery)
        aio_one = await plain.get(no_ack=True)
        for name in fields:
            assert getattr(lean_one, name) == getattr(aio_one, name), name
        assert (lean_one.routing_key, aio_one.routing_key) == ("jlm.requests", "lean-plain")
        assert lean_one.headers["n"] == 7
    finally:
        await broker.close()
        await conn.close()
