"""jlm's AMQP transport on a real connection: the check that fails if aio-pika or aiormq stop
passing the transport factory on (pyproject.toml pins the minor releases it was tested with)."""

from __future__ import annotations

import logging

import aio_pika
import pytest

from jlm.amqp.connect import connect_first
from jlm.amqp.transport import in_place
from jlm.config import Settings


async def test_connections_read_and_write_through_jlms_transport(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="jlm.amqp.connect")
    conn = await connect_first(settings, "transport-check")
    try:
        assert in_place(conn), "aio-pika/aiormq no longer pass jlm's transport factory on"
        channel = await conn.channel(publisher_confirms=True)
        queue = await channel.declare_queue(exclusive=True)
        sent = [b"m%d" % i for i in range(50)]
        for body in sent:  # confirmed one by one: each publish's frames leave together
            await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue.name)
        got = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            got.append(message.body)
        assert got == sent
    finally:
        await conn.close()
    assert "did not use jlm's AMQP transport" not in caplog.text


async def test_the_check_tells_a_plain_connection_apart(settings: Settings) -> None:
    plain = await aio_pika.connect(settings.amqp_url)
    try:
        assert not in_place(plain)
    finally:
        await plain.close()
