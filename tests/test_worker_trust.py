"""What a worker believes: the job's record in Redis, never a header of the job message."""

from __future__ import annotations

import aio_pika
import orjson
from tests.test_worker import JOB_TYPE, Env, env, until

__all__ = ["env"]


async def test_a_forged_high_generation_does_not_make_the_real_job_be_skipped(env: Env) -> None:
    """A forged copy of a job message with a high x-jlm-gen, published ahead of the real one.

    Before, its claim recorded generation 99, so the real message (generation 0) was skipped as
    a stale duplicate and only the forged payload ever ran. Now the forged copy runs once (it
    fails here), and the real message claims the pending job and runs the real payload."""
    cfg = env.config(max_attempts=3, retry_backoff=0.05)
    job = await env.submit("forge", payload={"v": "real"})
    forged = {
        "job_id": job,
        "job_type": JOB_TYPE,
        "cache_prefix": "forge",
        "payload": {"forged": True},
        "priority": 5,
        "enqueued_at": "2026-01-01T00:00:00.000Z",
    }
    conn = await aio_pika.connect(env.settings.amqp_urls[0])
    async with conn:
        ch = await conn.channel()
        jobs = await ch.get_exchange("jlm.jobs", ensure=False)
        message = aio_pika.Message(
            orjson.dumps(forged), message_id=job, priority=10, headers={"x-jlm-gen": 99}
        )
        await jobs.publish(message, JOB_TYPE)
    async with env.workers("tests.trust_handlers:picky", JLM_CONFIG=cfg) as (w,):
        status = await until(
            lambda: env.status_is(job, "succeeded", "failed"), 20, "the job to finish"
        )
        assert status["state"] == "succeeded", status["history"]
        assert (await env.result("forge"))["result"] == {"v": "real", "attempt": 2}
        stale = w.metric("jlm_jobs_skipped_total", job_type=JOB_TYPE, reason="stale")
        assert stale == 0
        # The forged copy's retry finds the job finished and is skipped.
        skipped = {"job_type": JOB_TYPE, "reason": "succeeded"}
        await until(lambda: w.metric("jlm_jobs_skipped_total", **skipped), 10, "the skip")
