"""Checks of the per-scope outcome shared by the cluster tests."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from tests.cluster.publisher import Request

from jlm.protocol import iso, micros, parse_time

BASE_TIME = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)


def manage_requests(
    n: int, scopes: int, job_type: str, id_prefix: str, *, step_us: int = 1000
) -> list[Request]:
    """n `manage` requests, round-robin over scopes, requested_at increasing with the index."""
    out = []
    for i in range(n):
        scope = f"s{i % scopes:03d}"
        at = iso(BASE_TIME + timedelta(microseconds=i * step_us))
        body = {
            "job_type": job_type,
            "cache_prefix": scope,
            "payload": {"n": i},
            "requested_at": at,
        }
        out.append(Request(f"{id_prefix}{i:06d}", scope, at, orjson.dumps(body)))
    return out


def newest_per_scope(requests: list[Request]) -> dict[str, Request]:
    newest: dict[str, Request] = {}
    for r in requests:
        if r.scope not in newest or r.requested_at > newest[r.scope].requested_at:
            newest[r.scope] = r
    return newest


def live_jobs(jobs: dict[str, dict[str, str]]) -> dict[str, list[str]]:
    """scope (cache_prefix) -> ids of its pending or running jobs."""
    out: dict[str, list[str]] = defaultdict(list)
    for job_id, fields in jobs.items():
        if fields.get("state") in ("pending", "running"):
            out[fields["cache_prefix"]].append(job_id)
    return out


def check_one_live_job_of_the_newest(
    requests: list[Request],
    jobs: dict[str, dict[str, str]],
    replies: dict[str, list[dict[str, Any]]],
) -> None:
    """Each scope has exactly one live job, and it is the job of its newest request."""
    live = live_jobs(jobs)
    newest = newest_per_scope(requests)
    assert set(live) == set(newest), set(newest) ^ set(live)
    several = {s: ids for s, ids in live.items() if len(ids) != 1}
    assert not several, f"scopes with several live jobs: {list(several.items())[:3]}"
    for scope, (job_id,) in live.items():
        winner = newest[scope]
        assert jobs[job_id]["request_id"] == winner.message_id, scope
        assert replies[winner.message_id][0]["new_job_id"] == job_id, scope


def check_supersede_chains(jobs: dict[str, dict[str, str]]) -> int:
    """A job is only ever superseded by the job of a request at least as new; returns the count."""
    n = 0
    for job_id, fields in jobs.items():
        successor = fields.get("superseded_by")
        if not successor:
            continue
        assert successor in jobs, (job_id, successor)
        mine, theirs = int(fields["requested_at"]), int(jobs[successor]["requested_at"])
        assert theirs >= mine, f"{job_id} ({mine}) superseded by older {successor} ({theirs})"
        n += 1
    return n


def check_stale_answers(
    records: dict[str, dict[str, Any]],
    jobs: dict[str, dict[str, str]],
    replies: dict[str, list[dict[str, Any]]],
    requests: list[Request],
) -> int:
    """A request decided after a newer one of its scope enqueued nothing and was answered
    `deduplicated` with that newer job; returns how many there were."""
    by_request = Counter(f.get("request_id") for f in jobs.values())
    at_of = {r.message_id: _micros(r.requested_at) for r in requests}
    stale = 0
    for message_id, facts in records.items():
        if facts.get("why") != "stale":
            continue
        stale += 1
        assert facts["d"] == "deduplicated"
        assert by_request[message_id] == 0, f"{message_id} was stale but enqueued a job"
        current = jobs.get(facts["job"])
        if current is not None:  # the newer job is still known (it always is within job_ttl)
            assert int(current["requested_at"]) > at_of[message_id], message_id
        reply = replies[message_id][0]
        assert reply["success"] is True
        assert reply["deduplicated"] is True
        assert reply["new_job_id"] == facts["job"]
    return stale


def _micros(rfc3339: str) -> int:
    return micros(parse_time(rfc3339))
