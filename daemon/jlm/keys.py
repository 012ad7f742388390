"""Every Redis key and channel name in one place.

All keys of one dedup scope share one hash tag, `{<tag>}`, where the tag is a short digest of the
scope. Job ids start with their scope's tag, so a job id alone names the slot of its keys: one Lua
script can touch the scope, its result, the old and new jobs and the request record atomically,
and stays in one slot on a Redis Cluster.

A request record is named by its idempotency key, (actor, message_id), not by the scope alone: two
scopes that share a tag (40 bits can be searched for) still never share a record. The binding of
that key to one request lives in a slot of its own, derived from the key itself, so that the same
key sent to another scope is seen.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass

TAG_LEN = 10
# Significant bits of a scope tag. Tests lower it to force scopes onto one tag; the key layout must
# keep them apart even then.
TAG_BITS = 40
JOB_ID_RE = re.compile(r"^([0-9a-f]{10})-[0-9a-f]{32}$")
# Due entries of scheduled jobs are spread over this many sorted sets, each under a hash tag of its
# own (`{d<k>}`), so that no Redis Cluster node holds all of them. Every daemon of a namespace
# scans them all: the number is fixed, never configured (a daemon with another number would leave
# entries unscanned).
DUE_SLOTS = 16


def scope_tag(cache_prefix: str, job_type: str) -> str:
    digest = hashlib.blake2b(f"{cache_prefix}\x00{job_type}".encode(), digest_size=8).hexdigest()
    tag = int(digest[:TAG_LEN], 16) >> (40 - TAG_BITS) << (40 - TAG_BITS)
    return f"{tag:0{TAG_LEN}x}"


def actor_digest(actor: str | None) -> str:
    """A fixed-size name for an actor (or for none) inside key names."""
    name = b"\x00" if actor is None else b"u" + actor.encode()
    return hashlib.blake2b(name, digest_size=8).hexdigest()


def binding_tag(actor: str | None, request_id: str) -> str:
    """The hash tag of an idempotency key's binding: a digest of (actor, message_id)."""
    key = f"{actor_digest(actor)}\x00{request_id}".encode()
    return "b" + hashlib.blake2b(key, digest_size=8).hexdigest()[:TAG_LEN]


def due_slot(job_id: str) -> int:
    """The due set of a job: from the random part of its id, so one busy scope spreads too."""
    return int(job_id[-8:], 16) % DUE_SLOTS


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

    def ended(self, tag: str, cache_prefix: str, job_type: str) -> str:
        """Sorted set: the scope's terminal jobs, job id by when it became terminal (µs since the
        epoch, Redis server time); past `max_history_jobs` members the oldest are deleted with
        their job hash and history (prelude.lua: retire). Expires `terminal_ttl` after its last
        addition."""
        return f"{self.base(tag)}:ended:{cache_prefix}:{job_type}"

    def job_prefix(self, tag: str) -> str:
        """`<prefix><job_id>` is the job hash; `<prefix><job_id>:h` its history list."""
        return f"{self.base(tag)}:job:"

    def job(self, job_id: str) -> str:
        tag = tag_of_job(job_id)
        assert tag is not None
        return f"{self.job_prefix(tag)}{job_id}"

    def history(self, job_id: str) -> str:
        return f"{self.job(job_id)}:h"

    def request(self, tag: str, actor: str | None, request_id: str) -> str:
        """Hash: `dg` (digest of the request), `f` (the decision's facts), `ok` (its job and
        events were published again after a redelivery). Expires after the idempotency TTL."""
        return f"{self.base(tag)}:req:{request_id}:{actor_digest(actor)}"

    def no_request(self, tag: str) -> str:
        """A slot-mate placeholder passed when a request carries no message_id (never written)."""
        return f"{self.base(tag)}:req:-"

    def binding(self, actor: str | None, request_id: str) -> str:
        """String: the digest of the one request that (actor, message_id) is bound to (expires)."""
        tag = binding_tag(actor, request_id)
        return f"{self.base(tag)}:bind:{request_id}:{actor_digest(actor)}"

    def due(self, slot: int) -> str:
        """Sorted set: scheduled job ids by due time (ms since the epoch, Redis server time)."""
        return f"{self.namespace}:{{d{slot}}}:due"

    def due_taken(self, slot: int) -> str:
        """Sorted set: job ids a daemon took from `due(slot)` to publish, by lease deadline (ms)."""
        return f"{self.namespace}:{{d{slot}}}:taken"

    @property
    def job_types(self) -> str:
        """Set: the unconfigured job types admitted to a queue (at most max_job_types)."""
        return f"{self.namespace}:job-types"

    @property
    def cancel_channel(self) -> str:
        """Pub/sub channel on which running-job cancellations are pushed to workers."""
        return f"{self.namespace}:cancel"
