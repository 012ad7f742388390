"""Tools outside Python that some tests run (installed by `make tools`)."""

from __future__ import annotations

import shutil

import pytest


def require_tool(name: str, package: str) -> str:
    """The tool's path; a missing tool fails the test, naming the Debian package to install."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(
            f"`{name}` is not installed: apt-get install -y --no-install-recommends {package}"
        )
    return path
