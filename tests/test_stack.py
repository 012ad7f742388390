"""The deployed stack's order of start: a worker under the deploy's least-privilege broker user,
started on an empty vhost before the daemon, waits for its queue and becomes ready."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import aio_pika
import pytest
from aiormq.exceptions import ChannelAccessRefused
from tests.security_helpers import add_shared_users, delete_shared_users, deploy_user
from tests.support.services import start_daemon
from tests.test_worker import WorkerProcess, until

from jlm.client import Client
from jlm.config import Settings

JOB_TYPE = "stack"


@pytest.mark.timeout(90)
async def test_a_least_privilege_worker_started_first_becomes_ready_with_the_daemon(
    make_settings: Callable[..., Settings], settings: Settings, vhost: str, tmp_path: Path
) -> None:
    daemon_user, worker_user = deploy_user("jlm-daemon"), deploy_user("worker")
    assert worker_user.configure == "^$", "the deploy's worker user may not declare anything"
    add_shared_users([daemon_user, worker_user], vhost)
    host = settings.amqp_url.rpartition("@")[2].partition("/")[0]
    config = tmp_path / "jlm.toml"
    config.write_text(f'[job_types."{JOB_TYPE}"]\nmax_attempts = 1\n')
    worker_url = worker_user.url(host, vhost)
    worker = WorkerProcess(
        settings,
        "examples.echo:handle",
        tmp_path / "worker.log",
        job_type=JOB_TYPE,
        JLM_AMQP_URL=worker_url,
        JLM_CONFIG=str(config),
    )
    try:
        # Nothing is declared yet: the worker waits, says so, and is not ready.
        await until(lambda: "waiting" in worker.tail(), 20, "the worker to wait for its queue")
        status, body = await asyncio.to_thread(worker._get, "/readyz")
        assert status == 503
        assert "queue down" in body
        assert worker.proc.poll() is None

        daemon = await start_daemon(
            make_settings(JLM_AMQP_URL=daemon_user.url(host, vhost), JLM_CONFIG=str(config))
        )
        try:
            # The daemon declared the configured job type's queue at start: the same worker
            # process becomes ready, without a restart, and runs a job.
            await worker.ready(timeout=30)
            assert worker.proc.poll() is None
            async with Client(settings) as client:
                reply = await client.call(
                    "manage", {"job_type": JOB_TYPE, "cache_prefix": "s", "payload": {"n": 1}}
                )
                assert reply["success"] is True, reply

                async def succeeded() -> bool:
                    status = await client.call("status", {"job_id": reply["new_job_id"]})
                    return status["state"] == "succeeded"

                await until(succeeded, 20, "the job to succeed")
        finally:
            await daemon.stop()

        # The worker user publishes worker events only, and never a request.
        conn = await aio_pika.connect(worker_url)
        async with conn:
            ch = await conn.channel(publisher_confirms=True)
            events = await ch.get_exchange("jlm.events", ensure=False)
            await events.publish(aio_pika.Message(b"{}"), routing_key="job.claimed")
            with pytest.raises(ChannelAccessRefused, match=r"job\.enqueued"):
                await events.publish(aio_pika.Message(b"{}"), routing_key="job.enqueued")
        for exchange, key in (("jlm.requests", "manage"), ("jlm.requests", "cancel")):
            conn = await aio_pika.connect(worker_url)
            async with conn:
                ch = await conn.channel(publisher_confirms=True)
                x = await ch.get_exchange(exchange, ensure=False)
                with pytest.raises(ChannelAccessRefused, match=r"jlm\.requests"):
                    await x.publish(aio_pika.Message(b"{}"), routing_key=key)
    finally:
        worker.close()
        delete_shared_users([daemon_user, worker_user])
