"""Every Redis key and channel name in one place.

All keys of one dedup scope share one hash tag, `{<tag>}`, where the tag is a short digest of the
scope. Job ids start with their scope's tag, so a job id alone names the slot of its keys: one Lua
script can touch the scope, its result, the old and new jobs and the request record atomically,
and stays in one slot on a Redis Cluster.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass

TAG_LEN = 10
JOB_ID_RE = re.compile(r"^([0-9a-f]{10})-[0-9a-f]{32}$")


def scope_tag(cache_prefix: str, job_type: str) -> str:
    digest = hashlib.blake2b(f"{cache_prefix}\x00{job_type}".encode(), digest_size=8).hexdigest()
    return digest[:TAG_LEN]


def new_job_id(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex}"


def tag_of_job(job_id: str) -> str | None:
    """The scope tag inside a job id, or None if the id is not one of ours."""
    m = JOB_ID_RE.match(job_id)
    return m.group(1) if m else None


@dataclass(frozen=True, slots=True)
class Keys:
    """Key names under one namespace (default `jlm`)."""

    namespace: str = "jlm"

    def base(self, tag: str) -> str:
        return f"{self.namespace}:{{{tag}}}"

    def scope(self, tag: str, cache_prefix: str, job_type: str) -> str:
        """Hash: `job` (current job id), `at` (its requested_at, µs)."""
        return f"{self.base(tag)}:scope:{cache_prefix}:{job_type}"

    def result(self, tag: str, cache_prefix: str, job_type: str) -> str:
        """Hash: `job`, `value` (JSON), `at`; expires after the job type's result TTL."""
        return f"{self.base(tag)}:result:{cache_prefix}:{job_type}"

    def job_prefix(self, tag: str) -> str:
        """`<prefix><job_id>` is the job hash; `<prefix><job_id>:h` its history list."""
        return f"{self.base(tag)}:job:"

    def job(self, job_id: str) -> str:
        tag = tag_of_job(job_id)
        assert tag is not None
        return f"{self.job_prefix(tag)}{job_id}"

    def history(self, job_id: str) -> str:
        return f"{self.job(job_id)}:h"

    def request(self, tag: str, request_id: str) -> str:
        """String: the stored facts of a decision, for idempotent replays (expires)."""
        return f"{self.base(tag)}:req:{request_id}"

    def no_request(self, tag: str) -> str:
        """A slot-mate placeholder passed when a request carries no message_id (never written)."""
        return f"{self.base(tag)}:req:-"

    @property
    def job_types(self) -> str:
        """Set: the unconfigured job types admitted to a queue (at most max_job_types)."""
        return f"{self.namespace}:job-types"

    @property
    def cancel_channel(self) -> str:
        """Pub/sub channel on which running-job cancellations are pushed to workers."""
        return f"{self.namespace}:cancel"
