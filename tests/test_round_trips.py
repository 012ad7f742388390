"""One decision, one round trip: the EVALSHA calls a daemon makes per manage request, counted by
a private Redis (INFO commandstats), so no other test's traffic is counted."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import redis.asyncio as aioredis
from prometheus_client import generate_latest
from tests.support.redis_server import RedisServer
from tests.support.services import start_daemon

from jlm.client import Client
from jlm.config import Settings
from jlm.due import DueSets
from jlm.keys import DUE_SLOTS, Keys, due_slot
from jlm.metrics import Metrics
from jlm.store import Store, connect

REQUESTS = 1000


async def _commandstats(client: aioredis.Redis) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def _script_calls(text: str, script: str) -> int:
    for line in text.splitlines():
        if line.startswith(f'jlm_redis_script_duration_seconds_count{{script="{script}"}}'):
            return int(float(line.rsplit(" ", 1)[1]))
    return 0


async def test_a_manage_request_is_one_evalsha(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        settings = make_settings(JLM_REDIS_URL=server.url)
        daemon = await start_daemon(settings)
        redis = aioredis.Redis.from_url(server.url)
        try:
            async with Client(settings) as client:
                await client.call("manage", {"job_type": "demo", "payload": {}})  # loads scripts
                await daemon.service.store.flush_marks()
                before = await _commandstats(redis)
                text = generate_latest(daemon.service.metrics.registry).decode()
                manage_before = _script_calls(text, "manage")
                sweeps_before = _script_calls(text, "take_due")
                replies = await asyncio.gather(
                    *(
                        client.call(
                            "manage",
                            {
                                "job_type": "demo",
                                "cache_prefix": f"p{i % 100}",
                                "payload": {"i": i},
                            },
                        )
                        for i in range(REQUESTS)
                    )
                )
                after = await _commandstats(redis)
                text = generate_latest(daemon.service.metrics.registry).decode()
                manage_after = _script_calls(text, "manage")
                sweeps = _script_calls(text, "take_due") - sweeps_before
        finally:
            await daemon.stop()
            await redis.aclose()
    finally:
        server.stop()
    assert all(r["success"] for r in replies)
    delta = {name: after.get(name, 0) - before.get(name, 0) for name in after}
    manage_calls = manage_after - manage_before
    print(
        f"\nEVALSHA delta over {REQUESTS} manage requests: {delta.get('evalsha', 0)}; "
        f"manage script calls: {manage_calls}; scheduler sweeps' calls: {sweeps}; other deltas: "
        f"{ {k: v for k, v in sorted(delta.items()) if v and k != 'evalsha'} }"
    )
    assert manage_calls == REQUESTS
    # The other EVALSHA: the monitor's probe (one `result` script call a second) and the
    # scheduler's sweeps of the due sets (one `take_due` call a sweep; nothing is due).
    assert REQUESTS + sweeps <= delta.get("evalsha", 0) <= REQUESTS + sweeps + 60
    assert delta.get("eval", 0) == 0  # never the script's text again


async def test_a_sweep_of_every_due_set_is_one_evalsha_on_one_redis(
    tmp_path: Path, namespace: str
) -> None:
    """The scheduler's pass over the 16 due sets: one call, idle or not, each set's due entries
    (and only those) taken by slot."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    store = Store(connect(server.url), Keys(namespace), Metrics(process=False))
    redis = aioredis.Redis.from_url(server.url)
    try:
        due = DueSets(store, 3600)
        assert due.one_call
        await due.take_all(50, 10_000)  # the script loaded
        ids = [f"{i:010d}-{i:032x}" for i in range(40)]
        slots = {due_slot(i) for i in ids}
        assert len(slots) > 1
        for job_id in ids[:30]:
            await due.add(job_id, 1)  # long due
        for job_id in ids[30:]:
            await due.add(job_id, 2**50)  # not due for ages
        before = await _commandstats(redis)
        taken = await due.take_all(50, 10_000)
        idle = await due.take_all(50, 10_000)
        after = await _commandstats(redis)
    finally:
        await store.close()
        await redis.aclose()
        server.stop()
    assert after["evalsha"] - before["evalsha"] == 2
    assert len(taken) == len(idle) == DUE_SLOTS
    assert sorted(i for ids in taken for i in ids) == sorted(ids[:30])
    for slot, got in enumerate(taken):
        assert all(due_slot(i) == slot for i in got)
    assert idle == [[]] * DUE_SLOTS  # taken entries are leased, the others not due
