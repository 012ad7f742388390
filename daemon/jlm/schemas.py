"""The machine-readable contract: one JSON Schema (2020-12) per message kind, generated from the
pydantic models of `jlm.protocol` (requests) and `jlm.messages` (replies, job message, event).

`python -m jlm.schemas DIR` (`make schemas`) writes them as DIR/<kind>.json; a test fails when the
files in docs/schemas/ differ from what this module generates.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from jlm.messages import REPLIES, ErrorReply, EventModel, JobMessageModel
from jlm.protocol import CancelRequest, ManageRequest, ScopeRequest, StatusRequest

DIALECT = "https://json-schema.org/draft/2020-12/schema"

REQUESTS: dict[str, type[BaseModel]] = {
    "manage": ManageRequest,
    "cancel": CancelRequest,
    "status": StatusRequest,
    "invalidate": ScopeRequest,
    "result": ScopeRequest,
}


def _models() -> dict[str, tuple[type[BaseModel], str]]:
    """Each schema's name, its model and its title."""
    out: dict[str, tuple[type[BaseModel], str]] = {}
    for op, model in REQUESTS.items():
        out[f"{op}-request"] = (model, f"{op} request (routing key {op!r} on jlm.requests)")
    for op, reply in REPLIES.items():
        out[f"{op}-reply"] = (reply, f"{op} reply (success)")
    out["error-reply"] = (ErrorReply, "error reply (to any request)")
    out["job-message"] = (JobMessageModel, "job message (jlm.jobs, routing key = job_type)")
    out["event"] = (EventModel, "lifecycle event (jlm.events and the jlm.provenance stream)")
    return out


def schema_of(name: str, model: type[BaseModel], title: str) -> dict[str, Any]:
    body = model.model_json_schema(mode="validation")
    return {"$schema": DIALECT, "$id": f"{name}.json", **body, "title": title}


def all_schemas() -> dict[str, dict[str, Any]]:
    """Every schema by its file name (without `.json`)."""
    return {name: schema_of(name, model, title) for name, (model, title) in _models().items()}


def render(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def write(directory: Path) -> list[Path]:
    """Write every schema to `directory`; the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, schema in all_schemas().items():
        path = directory / f"{name}.json"
        path.write_text(render(schema), encoding="utf-8")
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/schemas")):
        print(written)
