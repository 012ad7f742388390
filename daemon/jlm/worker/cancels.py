"""Cancellations pushed on Redis pub/sub: the handler of a job running here is interrupted; a
notice for a job not running here is remembered, since it can overtake the claim's reply."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

from jlm.config import redact_url
from jlm.keys import Keys
from jlm.metrics import HealthState
from jlm.retry import RECONNECT_START, Backoff
from jlm.worker.job import Active
from jlm.worker.runner import Deps, beat
from jlm.worker.store import redis_client

log = logging.getLogger(__name__)
RECENT_CANCELS = 10_000


class CancelListener:
    """Subscribes to the cancel channel and interrupts the handlers of the jobs cancelled."""

    def __init__(
        self, deps: Deps, keys: Keys, health: HealthState, active: dict[str, Active]
    ) -> None:
        self._deps = deps
        self.settings = deps.settings
        self._keys = keys
        self.health = health
        self._active = active
        self._recent_cancels: OrderedDict[str, None] = OrderedDict()

    def cancelled(self, job_id: str) -> bool:
        """Whether a cancel notice for `job_id` arrived before its run started here."""
        return job_id in self._recent_cancels

    async def run(self) -> None:
        """Subscribe to the cancel channel; after each (re)subscribe, ask Redis about every running
        job, since a notice published while not subscribed is lost.

        On a Redis Cluster a PUBLISH on any node reaches the subscribers of every node, so one
        plain connection to one node is enough: the configured node first, and when the
        subscription fails, the next node the cluster client knows, at once; the retry delay
        grows after a whole round of nodes failed."""
        backoff = Backoff(RECONNECT_START, self.settings.retry_max_delay)
        tried = 0
        url = self.settings.redis_url
        while True:
            # No reconnect attempts inside redis-py: a dead node is left for the next at once.
            client = redis_client(self.settings, False, url, retry=False)
            try:
                async with client.pubsub() as pubsub:
                    await pubsub.subscribe(self._keys.cancel_channel)
                    self.health.set("redis", True)
                    backoff.reset()
                    tried = 0
                    if url != self.settings.redis_url:
                        log.info("cancel channel: subscribed on %s", redact_url(url))
                    for active in list(self._active.values()):
                        await beat(self._deps, active)
                    while True:
                        note = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if note is not None and note.get("type") == "message":
                            data = note["data"]
                            self._on_cancel(data.decode() if isinstance(data, bytes) else str(data))
            except (RedisError, OSError) as exc:
                self.health.set("redis", False)
                self._deps.warn("pubsub", "cancel channel: redis unavailable: %s", str(exc))
                urls = self._pubsub_urls()
                url = urls[(urls.index(url) + 1) % len(urls)] if url in urls else urls[0]
                tried += 1
                if tried >= len(urls):
                    tried = 0
                    await asyncio.sleep(backoff.next())
            finally:
                await client.aclose()

    def _pubsub_urls(self) -> list[str]:
        """Where the cancel channel can be subscribed: the configured URL, then (on a cluster)
        every other node the cluster client knows, with the configured URL's scheme, credentials
        and database."""
        urls = [self.settings.redis_url]
        client = self._deps.store.store.client
        if isinstance(client, RedisCluster):
            for node in client.get_nodes():
                url = _node_url(self.settings.redis_url, node.host, node.port)
                if url not in urls:
                    urls.append(url)
        return urls

    def _on_cancel(self, job_id: str) -> None:
        active = self._active.get(job_id)
        if active is not None:
            log.info("job %s cancelled: stopping its handler", job_id, extra={"job_id": job_id})
            active.interrupt("cancelled")
            return
        self._recent_cancels[job_id] = None
        if len(self._recent_cancels) > RECENT_CANCELS:
            self._recent_cancels.popitem(last=False)


def _node_url(url: str, host: str, port: str | int) -> str:
    """`url` pointed at another node: same scheme, credentials, database and query."""
    parts = urlsplit(url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=f"{userinfo}{at}{address}"))
