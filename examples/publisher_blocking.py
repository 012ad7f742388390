"""The same from plain Python: JOB_TYPE=... python -m examples.publisher_blocking"""

import os

from jlm.blocking import BlockingJobsClient

with BlockingJobsClient.connect(os.environ["JLM_AMQP_URL"]) as jobs:
    d = jobs.manage(os.environ["JOB_TYPE"], {"user": 42}, prefix="tenant-b", priority=7)
    print(d.state, jobs.job(d.new_job_id).result(timeout=30))
