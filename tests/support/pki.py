"""Throw-away credentials: a test CA with server and client certificates (openssl), passwords."""

from __future__ import annotations

import ssl
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def secret(label: str) -> str:
    """A password that is easy to search for and found nowhere else."""
    return f"{label}-{uuid.uuid4().hex}"


_LEAF_EXT = """[leaf]
subjectAltName = IP:127.0.0.1, DNS:localhost
extendedKeyUsage = serverAuth, clientAuth
keyUsage = critical, digitalSignature, keyEncipherment
basicConstraints = critical, CA:FALSE
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


@dataclass(frozen=True)
class Pki:
    """A throw-away CA, one server certificate (127.0.0.1, localhost) and one client certificate."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def client_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.client_cert), str(self.client_key))
        return ctx

    def redis_options(self) -> dict[str, Any]:
        return {
            "ssl_ca_certs": str(self.ca),
            "ssl_certfile": str(self.client_cert),
            "ssl_keyfile": str(self.client_key),
        }


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_pki(directory: Path, name: str = "jlm-test-ca") -> Pki:
    """Create the CA and the two leaf certificates in `directory` (EC P-256, valid two days)."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", f"/CN={name}", cwd=directory)  # fmt: skip
    (directory / "leaf.cnf").write_text(_LEAF_EXT)
    for leaf in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{leaf}.key", "-out", f"{leaf}.csr",
                 "-subj", f"/CN={leaf}.{name}", cwd=directory)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{leaf}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{leaf}.crt", "-days", "2",
                 "-extfile", "leaf.cnf", "-extensions", "leaf", cwd=directory)  # fmt: skip
    for path in directory.iterdir():
        path.chmod(0o644)  # the RabbitMQ node runs as the rabbitmq user; these are throw-away keys
    directory.chmod(0o755)
    return Pki(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )
