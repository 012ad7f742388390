"""job-lifecycle-manager: a deduplicating job lifecycle daemon, its worker SDK and its client.

The public API: `App`, `Worker` and `Job` (the worker SDK, `jlm.worker`), `JobsClient` and `Client`
(`jlm.client`) and `__version__` (the installed package's, from pyproject.toml). Each is imported
on first use, so that `import jlm` (and the command line's start-up) costs nothing of AMQP, Redis
or pydantic.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jlm.client import Client, JobsClient
    from jlm.worker import App, Job, Worker

    __version__: str

__all__ = ["App", "Client", "Job", "JobsClient", "Worker", "__version__"]

_LAZY = {
    "App": "jlm.worker",
    "Client": "jlm.client",
    "JobsClient": "jlm.client",
    "Job": "jlm.worker",
    "Worker": "jlm.worker",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value: Any = version("job-lifecycle-manager")
        except PackageNotFoundError:  # run from a source tree that was never installed
            value = "unknown"
    elif name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'jlm' has no attribute {name!r}")
    globals()[name] = value
    return value
