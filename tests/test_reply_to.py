"""Where replies may go, and what a refusal tells: `reply_to` grants and `forbidden` messages."""

from __future__ import annotations

import asyncio

import aio_pika
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.amqp_helpers import drain_queue, read_stream
from tests.support.requests import request_message
from tests.support.services import start_daemon
from tests.test_security import SHARED_HOST, AuthSetup, auth, client_as, manage

from jlm.config import UserGrant

__all__ = ["auth"]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("queue", "expected"),
    [
        ("amq.gen-JzTY20BRgKO-HjmUJj0wLg", True),
        ("amq.rabbitmq.reply-to", True),
        ("amq.rabbitmq.reply-to.g1h2AA5yZXBseUAxNjgxNjk5MQAAIkcAAAAAX6Np", True),
        ("jlm.jobs.demo", False),
        ("jlm.provenance", False),
        ("orders", False),
        ("xamq.gen-1", False),
        ("amq.generated", False),
    ],
)
def test_default_reply_to_grant(queue: str, expected: bool) -> None:
    assert UserGrant().allows_reply_to(queue) is expected


@pytest.mark.unit
@given(st.from_regex(r"[a-z][a-z0-9.-]{0,30}", fullmatch=True))
def test_a_reply_to_grant_names_whole_queue_names(name: str) -> None:
    grant = UserGrant(reply_to=("replies.tenant-a.*",))
    assert grant.allows_reply_to(f"replies.tenant-a.{name}")
    assert not grant.allows_reply_to(name)
    assert not grant.allows_reply_to(f"x.replies.tenant-a.{name}")


async def test_reply_to_outside_the_grant_is_forbidden_and_gets_no_reply(
    auth: AuthSetup,
) -> None:
    a = auth.users["a"]
    settings = auth.settings
    running = await start_daemon(settings)
    try:
        # A queue of the vhost that is not A's to fill: replies would amplify small requests.
        guest = await aio_pika.connect(settings.amqp_urls[0])
        async with guest:
            ch = await guest.channel()
            await ch.declare_queue("orders", durable=True)
        conn = await aio_pika.connect(a.url(SHARED_HOST, auth.vhost))
        async with conn:
            ch = await conn.channel(publisher_confirms=True)
            requests = await ch.get_exchange("jlm.requests", ensure=False)
            for i, (op, body) in enumerate(
                [
                    ("manage", orjson.dumps(manage("report.render", "tenant-a"))),
                    (
                        "result",
                        orjson.dumps({"job_type": "report.render", "cache_prefix": "tenant-a"}),
                    ),
                    # Refused for its body, and still no reply to a queue outside the grant.
                    ("manage", b"{not json"),
                ]
            ):
                await requests.publish(
                    request_message(
                        body,
                        message_id=f"aimed-{i}",
                        user_id=a.name,
                        reply_to="orders",
                        correlation_id="c",
                        persistent=False,
                    ),
                    routing_key=op,
                )
        dead = {}
        for _ in range(20):
            dead |= {m.message_id: m for m in await drain_queue(settings, "jlm.dead")}
            if len(dead) >= 3:
                break
        assert set(dead) == {"aimed-0", "aimed-1", "aimed-2"}
        assert dead["aimed-2"].headers["x-jlm-error"] == "invalid_request"
        for m in (dead["aimed-0"], dead["aimed-1"]):
            assert m.headers["x-jlm-error"] == "forbidden"
            assert m.reply_to == "orders"
            assert "orders" in str(m.headers["x-jlm-error-message"])
        events = {e["request_id"]: e for e in await read_stream(settings)}
        assert events["aimed-0"]["type"] == "request.rejected"
        assert events["aimed-0"]["actor"] == a.name
        # No job was enqueued: the refusal comes before any decision.
        assert "job.enqueued" not in {e["type"] for e in events.values()}
        # Acked (nothing left on the request queue), and not one reply in the aimed-at queue.
        await asyncio.sleep(0.3)
        assert await drain_queue(settings, "orders", timeout=0.5) == []
        assert await drain_queue(settings, "jlm.requests", timeout=0.5) == []
        # The same requests with a server-named reply queue are answered.
        async with client_as(auth.as_user(a)) as ca:
            reply = await ca.call("manage", manage("report.render", "tenant-a"), user_id=a.name)
            assert reply["success"] is True, reply
    finally:
        await running.stop()


async def test_forbidden_names_the_caller_and_its_request_never_another_scope(
    auth: AuthSetup,
) -> None:
    a, b = auth.users["a"], auth.users["b"]
    running = await start_daemon(auth.settings)
    try:
        async with client_as(auth.as_user(a)) as ca, client_as(auth.as_user(b)) as cb:
            job_b = await cb.call("manage", manage("report.render", "tenant-b"), user_id=b.name)
            jb = job_b["new_job_id"]
            for op, body in [
                ("status", {"job_id": jb}),
                ("cancel", {"job_id": jb}),
                ("cancel", {"job_id": jb, "running": True}),
            ]:
                reply = await ca.call(op, body, user_id=a.name)
                error = reply["error"]
                assert error["code"] == "forbidden"
                assert a.name in error["message"]
                assert jb in error["message"]
                assert op in error["message"]
                for secret in ("tenant-b", "report.render", "report"):
                    assert secret not in error["message"], error["message"]
            dead = await drain_queue(auth.settings, "jlm.dead")
            assert len(dead) == 3
            for m in dead:
                assert "tenant-b" not in str(m.headers["x-jlm-error-message"])
            rejected = [
                e for e in await read_stream(auth.settings) if e["type"] == "request.rejected"
            ]
            assert len(rejected) == 3
            assert all(b"tenant-b" not in orjson.dumps(e["metadata"]) for e in rejected)
    finally:
        await running.stop()
