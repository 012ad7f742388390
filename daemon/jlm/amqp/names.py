"""The AMQP names: the exchanges and queues of the `jlm.*` topology, and the content type."""

REQUESTS = "jlm.requests"
JOBS = "jlm.jobs"
EVENTS = "jlm.events"
PROVENANCE = "jlm.provenance"
DEAD = "jlm.dead"
JSON = "application/json"
