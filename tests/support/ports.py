"""Free loopback ports for the servers and daemons a test starts."""

from __future__ import annotations

import random
import socket


def free_port() -> int:
    """A loopback port nobody listens on now (the kernel's pick, in the ephemeral range)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(n: int, low: int = 20000, high: int = 30000) -> list[int]:
    """n distinct free loopback ports in [low, high): below the ephemeral range, for servers whose
    port + 10000 must still be a valid port (an Erlang distribution port, a Redis bus port)."""
    ports: list[int] = []
    rng = random.Random()
    while len(ports) < n:
        p = rng.randrange(low, high)
        if p not in ports and port_free(p):
            ports.append(p)
    return ports
