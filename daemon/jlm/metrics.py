"""Prometheus collectors on one injected registry, and the health checks /readyz sums."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase

from jlm import __version__
from jlm.facts import ManageFacts

# `_created` series double every counter for no reader we have.
disable_created_metrics()  # type: ignore[no-untyped-call]

log = logging.getLogger(__name__)

OTHER = "other"
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """Every collector the daemon and the worker SDK export, built on one injected registry."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        max_job_types: int = 1000,
        configured: Iterable[str] = (),
        *,
        process: bool = True,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        if process:
            # process_* (resident memory, CPU seconds, open and max fds, start time; Linux only)
            # and python_info, on this registry rather than the library's global one.
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
        self._max_job_types = max_job_types
        self._configured = frozenset(configured)
        self._job_types: set[str] = set()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        self.requests = Counter(
            "jlm_requests",
            "Requests handled, by operation and outcome.",
            ["op", "outcome"],
            registry=r,
        )
        self.jobs_enqueued = Counter(
            "jlm_jobs_enqueued",
            "Jobs accepted and published to a job queue.",
            ["job_type", "priority"],
            registry=r,
        )
        self.jobs_scheduled = Counter(
            "jlm_jobs_scheduled",
            "Decisions that left a job scheduled (policy debounce, not_before): a new scheduled "
            "job, or a debounce that restarted the wait of the scope's scheduled job.",
            ["job_type"],
            registry=r,
        )
        self.scheduler_lateness = Histogram(
            "jlm_scheduler_lateness_seconds",
            "From a scheduled job's due time to the broker's confirm of its job message.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.jobs_superseded = Counter(
            "jlm_jobs_superseded",
            "Jobs replaced by a newer job of their scope.",
            ["job_type"],
            registry=r,
        )
        self.jobs_deduplicated = Counter(
            "jlm_jobs_deduplicated",
            "Requests answered with an existing job or cached result.",
            ["job_type", "policy"],
            registry=r,
        )
        self.jobs_cancelled = Counter(
            "jlm_jobs_cancelled",
            "Jobs cancelled, by reason.",
            ["job_type", "reason"],
            registry=r,
        )
        self.cache_invalidations = Counter(
            "jlm_cache_invalidations",
            "Scope results invalidated.",
            ["job_type"],
            registry=r,
        )
        self.request_duration = Histogram(
            "jlm_request_duration_seconds",
            "From delivery to ack, by operation.",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge("jlm_inflight_requests", "Requests being handled now.", registry=r)
        self.dependency_up = Gauge(
            "jlm_dependency_up",
            "1 while the dependency answers.",
            ["dependency"],
            registry=r,
        )
        self.build_info = Gauge("jlm_build_info", "The running version.", ["version"], registry=r)
        self.build_info.labels(version=__version__).set(1)
        self.dead_lettered = Counter(
            "jlm_dead_lettered",
            "Requests dead-lettered to jlm.dead, by error code.",
            ["code"],
            registry=r,
        )
        self.redis_script_duration = Histogram(
            "jlm_redis_script_duration_seconds",
            "Redis script round trips, by script.",
            ["script"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.publish_confirm_duration = Histogram(
            "jlm_publish_confirm_duration_seconds",
            "From publish to broker confirm, for the job messages and events of one decision.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.poison_messages = Counter(
            "jlm_poison_messages",
            "Requests whose properties the AMQP client could not decode, dead-lettered.",
            registry=r,
        )
        self.retries = Counter(
            "jlm_request_retries",
            "Request steps retried after a passing failure, by dependency.",
            ["dependency"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "jlm_queue_messages",
            "Messages ready in a queue the daemon owns (sampled).",
            ["queue"],
            registry=r,
        )
        self.ready = Gauge("jlm_ready", "1 while /readyz answers 200.", registry=r)
        # Worker side (the SDK exports the same names from its own process).
        self.jobs_claimed = Counter(
            "jlm_jobs_claimed",
            "Jobs claimed by a worker.",
            ["job_type"],
            registry=r,
        )
        self.jobs_skipped = Counter(
            "jlm_jobs_skipped",
            "Job messages a worker acked without running (cancelled, superseded, finished).",
            ["job_type", "reason"],
            registry=r,
        )
        self.jobs_finished = Counter(
            "jlm_jobs_finished",
            "Jobs that reached a final state in a worker.",
            ["job_type", "state"],
            registry=r,
        )
        self.jobs_recovered = Counter(
            "jlm_jobs_recovered",
            "Jobs whose worker was lost, run again or failed.",
            ["job_type", "outcome"],
            registry=r,
        )
        self.zombie_completions = Counter(
            "jlm_zombie_completions",
            "Late results of superseded or cancelled jobs, refused.",
            ["job_type"],
            registry=r,
        )
        self.cancel_latency = Histogram(
            "jlm_cancel_latency_seconds",
            "From cancellation asked to the handler stopped.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.handlers_abandoned = Counter(
            "jlm_handlers_abandoned",
            "Handlers that ignored cancellation past the grace period.",
            ["job_type"],
            registry=r,
        )
        self.job_duration = Histogram(
            "jlm_job_duration_seconds",
            "Handler run time, by job type and final state.",
            ["job_type", "state"],
            buckets=(*_LATENCY_BUCKETS, 10.0, 30.0, 60.0, 300.0),
            registry=r,
        )

    def count_manage(self, job_type: str, priority: int, policy: str, f: ManageFacts) -> None:
        """The counters of one `manage` decision."""
        jt = self.job_type_label(job_type)
        if f.enqueued:
            self.child(self.jobs_enqueued, jt, str(priority)).inc()
        elif f.scheduled:
            self.child(self.jobs_scheduled, jt).inc()  # enqueued once the scheduler publishes it
        else:
            self.child(self.jobs_deduplicated, jt, policy).inc()
        if f.superseded:
            self.child(self.jobs_superseded, jt).inc()
        if f.stale_cancelled or f.running_cancelled:
            self.child(self.jobs_cancelled, jt, "superseded").inc()
        if f.cache_invalidated:
            self.child(self.cache_invalidations, jt).inc()

    def job_type_label(self, job_type: str) -> str:
        """Bound the label's cardinality: configured job types always keep their name; of the
        others, the first `max_job_types` seen, then `other`."""
        if job_type in self._job_types or job_type in self._configured:
            return job_type
        if len(self._job_types) < self._max_job_types:
            self._job_types.add(job_type)
            return job_type
        return OTHER

    def child(self, metric: MetricWrapperBase, *values: str) -> Any:
        """`metric.labels(*values)`, looked up once: `labels()` validates and locks on each call.

        Label values are bounded (operations, outcomes, capped job types, priorities 1..10).
        """
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class HealthState:
    """What /readyz reports: the sum of named checks, each set by the part that knows."""

    checks: dict[str, bool] = field(default_factory=dict)

    def set(self, name: str, ok: bool) -> None:
        self.checks[name] = ok

    @property
    def ready(self) -> bool:
        return bool(self.checks) and all(self.checks.values())
