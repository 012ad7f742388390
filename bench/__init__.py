"""`make bench`: the daemon's `manage` path against a bare aio-pika relay.

Run as `python -m bench.run` (`--help` for the options); each run appends to `bench/RESULTS.md`.
"""
