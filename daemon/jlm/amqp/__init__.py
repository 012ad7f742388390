"""The AMQP code the daemon, the worker and the client share.

`names` (the exchanges and queues), `connect` (fail-over, one-line failure causes), `session`
(one connection with a consumer and a confirmed publisher) and `transport` (the coalescing
writer and the frame guard). Nothing is imported here, so that `jlm.amqp.names` stays cheap.
"""
