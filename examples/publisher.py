"""Manage a job, wait for it and print its result: JOB_TYPE=... python -m examples.publisher"""

import asyncio
import os

from jlm.client import JobsClient


async def main() -> None:
    async with JobsClient.connect(os.environ["JLM_AMQP_URL"]) as jobs:
        d = await jobs.manage(os.environ["JOB_TYPE"], {"user": 42}, prefix="tenant-a", priority=7)
        print(d.state, await jobs.job(d.new_job_id).result(timeout=30))


asyncio.run(main())
