"""A request the AMQP client library cannot decode (a header timestamp of 2^63), published ahead
of 20 ordinary requests, on the default (classic) request queue and on a quorum one.

Contract: the poison delays the requests behind it by at most 30 s in total, counted from its
first delivery; it is then dead-lettered (or dropped with an error log) and counted in
`jlm_poison_messages_total`; every other request is answered exactly once.
"""

from __future__ import annotations

import time

import pytest
from tests.faults.conftest import DaemonFactory
from tests.faults.hostile import TIMESTAMP_2_63, raw_fields
from tests.faults.load import Publisher
from tests.support.daemon import metric
from tests.support.ledger import Accounting, drain, queue_count

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

BOUND = 30.0  # seconds of delay one poison may cost, in total


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
async def test_a_poison_request_delays_the_queue_behind_it_by_at_most_30s(
    spawn: DaemonFactory, amqp_url: str, queue_type: str
) -> None:
    # The product defaults (the fault suite lowers the retry delay to 0.5 s): backoff included.
    daemon = spawn(
        "p", amqp_url, JLM_REQUESTS_QUEUE_TYPE=queue_type, JLM_RETRY_MAX_DELAY="5"
    ).start()
    await daemon.wait_ready()
    body = b'{"job_type": "fz.a", "cache_prefix": "fz-%d", "payload": {}}'
    bystanders = [f"fine{i}" for i in range(20)]
    async with Publisher(amqp_url, "poison", declare=False) as pub:
        with raw_fields():
            await pub.publish_raw(
                "manage",
                body % 99,
                correlation_id="poison",
                message_id="poison",
                headers={"x-sent-at": TIMESTAMP_2_63},
            )
        sent_at = time.time()  # the daemon is consuming: the poison's first delivery is now
        for i, mid in enumerate(bystanders):
            await pub.publish_raw("manage", body % i, correlation_id=mid, message_id=mid)
        missing = await pub.wait_replies(set(bystanders), 150)
        replies = dict(pub.replies)
        arrived = dict(pub.arrived)
    answered = [m for m in bystanders if m in replies]
    last = max((arrived[m] for m in answered), default=sent_at)
    delay = round(last - sent_at, 1)
    text = await daemon.metrics() if daemon.running else ""
    lost_sessions = sum(
        1 for r in daemon.logs() if "connection lost; reconnecting" in str(r.get("msg", ""))
    )
    dead = await drain(amqp_url, "jlm.dead")
    left = await queue_count(amqp_url, "jlm.requests")
    Accounting(
        f"poison + 20 requests ({queue_type})",
        sent=len(bystanders) + 1,
        acked=len(bystanders) + 1 - left,
        replied=len(answered),
        decisions=sum(1 for m in answered if replies[m][0].get("success")),
        jobs_published=sum(1 for m in answered if replies[m][0].get("success")),
        lost=len(missing),
        extra={
            "seconds_to_last_answer": delay,
            "poison_counted": metric(text, "jlm_poison_messages_total"),
            "dead_letters": len(dead),
            "sessions_lost": lost_sessions,
        },
    ).report()
    assert not missing, f"{sorted(missing)} unanswered after {delay}s: {daemon.tail()}"
    assert all(len(replies[m]) == 1 and replies[m][0]["success"] for m in bystanders)
    assert delay <= BOUND
    assert metric(text, "jlm_poison_messages_total") == 1
    assert [m.message_id for m in dead] == ["poison"]
    assert dead[0].headers["x-jlm-error"] == "invalid_request"
    assert left == 0
    assert await daemon.ready()
    assert await daemon.terminate() == 0
