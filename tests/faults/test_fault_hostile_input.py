"""Scenario 6: poison and hostile input.

Fast path: thousands of hypothesis cases through the daemon's own parse and validate functions
(what `_on_message` runs before anything touches Redis): each is accepted or rejected with a code
of the contract, never anything else. Broker path: the corpus and a few hundred generated cases
(bodies, operations, headers including forged `x-death`, odd message ids, bodies at and above the
size limit) published to a running daemon with a restrictive configuration (two job types, auth
on). Each is answered as the in-process oracle says; each rejected one is dead-lettered with its
code and its body intact; nothing is written to Redis and no queue is declared for a rejected one;
the daemon stays ready and has no internal error.
"""

from __future__ import annotations

import functools
import re
import subprocess
import tomllib
from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, Phase, given, settings
from tests.faults.conftest import DaemonFactory
from tests.faults.hostile import (
    JOB_TYPES,
    Case,
    cases,
    corpus,
    raw_fields,
)
from tests.faults.load import Publisher
from tests.support.daemon import metric
from tests.support.ledger import Accounting, drain, job_hashes, queue_count, request_records

from jlm.config import FileConfig, Settings, load_settings
from jlm.errors import Disposition, JlmError
from jlm.keys import Keys, scope_tag
from jlm.lifecycle import Context, Lifecycle
from jlm.metrics import Metrics
from jlm.protocol import CancelRequest, ManageRequest, ScopeRequest, StatusRequest, parse_request
from jlm.store import Store, connect

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

CODES = {
    "invalid_request",
    "unknown_job_type",
    "payload_too_large",
    "not_found",
    "forbidden",
    "unsupported_operation",
}
LIMIT = 64 * 1024  # max_request_bytes of the fuzzed daemon: near-limit bodies stay cheap
CONFIG = f"""
max_request_bytes = {LIMIT}
allow_any_job_type = false

[job_types."fz.a"]
[job_types."fz.b"]
policy = "skip"

[auth]
enabled = true
[auth.users.guest]
prefixes = ["fz-*", "job"]
job_types = ["fz.*"]
operations = ["manage", "cancel", "status", "invalidate", "result"]
"""
BROKER_CASES = 300


def fuzz_settings() -> Settings:
    """The fuzzed daemon's settings, built as load_settings builds them from JLM_CONFIG."""
    return load_settings({}).model_copy(
        update={"file": FileConfig.model_validate(tomllib.loads(CONFIG))}
    )


class Oracle:
    """The daemon's own checks, in process: the code a case must get (None: accepted)."""

    def __init__(self, settings: Settings) -> None:
        metrics = Metrics()
        # No I/O: validate() needs the settings only; the client never connects.
        store = Store(connect("redis://127.0.0.1:1/0"), Keys("oracle"), metrics)
        self.lifecycle = Lifecycle(store, settings, metrics)
        self.limit = settings.file.max_request_bytes

    def judge(self, case: Case) -> tuple[str | None, object]:
        if case.poison:
            return "invalid_request", None
        mid = case.message_id
        ctx = Context(
            request_id=mid or "generated",
            idempotent=bool(mid) and len(mid or "") <= 256,
            actor=case.user_id,
        )
        try:
            request = parse_request(case.op, case.body, self.limit)
            self.lifecycle.validate(case.op, request, ctx)
        except JlmError as exc:
            assert exc.code in CODES, exc
            assert exc.disposition is Disposition.DEAD_LETTER
            assert exc.message
            return exc.code, None
        if isinstance(request, CancelRequest | StatusRequest):
            return "not_found", request  # no generated job id exists
        return None, request


@settings(
    max_examples=3000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(cases())
def test_parse_and_validate_answer_every_case_with_a_code(case: Case) -> None:
    code, request = oracle().judge(case)
    if code is None:
        assert isinstance(request, ManageRequest | ScopeRequest)
        assert request.job_type in JOB_TYPES
        assert re.fullmatch(r"fz-.*|job", request.cache_prefix)
        assert case.user_id == "guest"


@functools.cache
def oracle() -> Oracle:
    return Oracle(fuzz_settings())


def generated(n: int) -> list[Case]:
    """n cases drawn by hypothesis (generation only: the broker path does not shrink)."""
    out: list[Case] = []

    @settings(
        max_examples=n,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(cases())
    def collect(case: Case) -> None:
        out.append(case)

    collect()
    return out


def unique_id(mid: str | None, n: int) -> str | None:
    if mid is None:
        return None
    suffix = f"#{n}".encode()
    return (mid.encode()[: 255 - len(suffix)] + suffix).decode(errors="ignore")


def vhost_queues(vhost: str) -> set[str]:
    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "-p", vhost, "--quiet", "--no-table-headers", "name"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


async def test_hostile_requests_through_the_broker(
    spawn: DaemonFactory,
    *,
    amqp_url: str,
    vhost: str,
    shared_redis: aioredis.Redis,
    namespace: str,
    tmp_path: Path,
) -> None:
    config = tmp_path / "fuzz.toml"
    config.write_text(CONFIG)
    daemon = spawn("d", amqp_url, JLM_CONFIG=str(config)).start()
    await daemon.wait_ready()
    all_cases = corpus(LIMIT) + generated(BROKER_CASES)
    for n, case in enumerate(all_cases):
        case.message_id = unique_id(case.message_id, n)
    expected = {f"h{n}": oracle().judge(case) for n, case in enumerate(all_cases)}
    by_corr = {f"h{n}": case for n, case in enumerate(all_cases)}

    # A server-named reply queue: with authorisation on, replies go only to the queues a grant
    # allows, and a caller without a grant (no or a foreign user_id) gets the default grant's.
    async with Publisher(amqp_url, "hostile", server_named_replies=True) as pub:
        with raw_fields():
            for corr, case in by_corr.items():
                await pub.publish_raw(
                    case.op,
                    case.body,
                    correlation_id=corr,
                    message_id=case.message_id,
                    headers=case.headers or None,
                    user_id=case.user_id,
                    content_type=case.content_type,
                )
        missing = await pub.wait_replies(set(by_corr), 120)
        replies = dict(pub.replies)
        # Still serving: a valid request after all that.
        await pub.publish_raw(
            "manage",
            b'{"job_type": "fz.a", "cache_prefix": "fz-after", "payload": {}}',
            correlation_id="after",
            message_id="after",
            user_id="guest",
        )
        assert not await pub.wait_replies({"after"}, 30)
        assert pub.replies["after"][0]["success"] is True
    assert not missing, sorted(missing)[:5]
    assert await daemon.ready()
    text = await daemon.metrics()
    logs = daemon.log_text()

    wrong = {}
    accepted: dict[str, object] = {}
    for corr, (code, request) in expected.items():
        reply = replies[corr][0]
        got = None if reply["success"] else reply["error"]["code"]
        if got != code:
            wrong[corr] = (by_corr[corr].op, by_corr[corr].body[:120], code, reply)
        if code is None:
            accepted[corr] = request
    assert not wrong, list(wrong.items())[:5]
    # What a rejection answers is bounded, whatever it echoes (a huge key, a long operation).
    messages = [r[0]["error"]["message"] for r in replies.values() if not r[0]["success"]]
    longest_message = max(len(m.encode()) for m in messages)
    assert longest_message <= 1024
    poison = sum(1 for case in all_cases if case.poison)
    assert metric(text, "jlm_poison_messages_total") == poison
    assert "connection lost" not in logs  # the poison ended no session

    dead = {m.correlation_id: m for m in await drain(amqp_url, "jlm.dead")}
    undead = []
    for corr, (code, _) in expected.items():
        case = by_corr[corr]
        if code in (None, "not_found"):
            assert corr not in dead, corr
            continue
        msg = dead.get(corr)
        if msg is None or msg.headers.get("x-jlm-error") != code or msg.body != case.body:
            undead.append(corr)
    assert not undead, undead[:5]
    # A header pamqp cannot write back (a 64-bit double) is kept as text in the dead letter.
    double = next(c for c, case in by_corr.items() if case.name == "header-double-bad-body")
    assert "1e+300" in str(dead[double].headers["x-jlm-original-headers"])

    # Redis holds only what accepted requests wrote (the requests' scopes and request records, and
    # the binding of each recorded request's idempotency key, under a tag of its own).
    allowed_tags = {
        scope_tag(r.cache_prefix, r.job_type)
        for r in [
            *accepted.values(),
            ManageRequest(job_type="fz.a", cache_prefix="fz-after", payload={}),
        ]
        if isinstance(r, ManageRequest | ScopeRequest)
    }
    keys = [k.decode(errors="replace") async for k in shared_redis.scan_iter(f"{namespace}:*")]
    bindings = [k for k in keys if ":bind:" in k]
    strays = [
        k
        for k in keys
        if k.split("{", 1)[1].split("}", 1)[0] not in allowed_tags and k not in bindings
    ]
    assert not strays, strays[:5]
    # One request record at most per accepted request (aiormq gives a message without a
    # message_id a random one, so those are recorded under an id this test never chose).
    records = await request_records(shared_redis, namespace)
    assert len(records) <= len(accepted) + 1
    # Only decisions are recorded: `status` and `result` are reads and leave no record.
    chosen = {
        by_corr[c].message_id
        for c in accepted
        if by_corr[c].message_id and by_corr[c].op in ("manage", "cancel", "invalidate")
    } | {"after"}
    assert chosen <= set(records)
    assert len(bindings) == len(records)

    queues = vhost_queues(vhost)
    allowed_queues = {"jlm.requests", "jlm.dead", "jlm.provenance"} | {
        f"jlm.jobs.{t}" for t in JOB_TYPES
    }
    reply_queues = ("fault-replies-", "amq.gen-")
    assert {q for q in queues if not q.startswith(reply_queues)} <= allowed_queues, queues

    assert metric(text, "jlm_requests_total", outcome="error") == 0
    assert "internal error" not in logs
    assert "Traceback" not in logs

    assert await daemon.terminate() == 0
    left = await queue_count(amqp_url, "jlm.requests")
    jobs = await job_hashes(shared_redis, namespace)
    published = set()
    for t in JOB_TYPES:
        published |= {m.message_id for m in await drain(amqp_url, f"jlm.jobs.{t}")}
    rejected = sum(1 for code, _ in expected.values() if code is not None)
    acc = Accounting(
        "6 hostile input via broker (corpus + generated)",
        sent=len(all_cases),
        acked=len(all_cases) - left,
        replied=sum(1 for c in by_corr if replies.get(c)),
        decisions=len(records),
        jobs_published=len(published),
        lost=len(missing) + len(undead),
        duplicated_decisions=sum(
            n - 1 for n in Counter(f.get("request_id", "") for f in jobs.values()).values() if n > 1
        ),
        extra={
            "accepted": len(accepted),
            "rejected": rejected,  # dead-lettered, plus not_found answers (acked, kept)
            "dead_lettered": len(dead),
            "poison": poison,
            "redis_keys_of_rejected": len(strays),
            "max_error_message_bytes": longest_message,
            "ready_after": True,
            "fast_path_cases": 3000,
        },
    )
    acc.report()
