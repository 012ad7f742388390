"""The machine-readable contract: docs/schemas/*.json are what the models generate, the examples
of docs/contract.md and the messages of a real run validate, and docs/asyncapi.yaml is valid
AsyncAPI 3.0."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aio_pika
import jsonschema
import orjson
import pytest
import yaml
from aio_pika.abc import AbstractQueue
from tests.amqp_helpers import rpc, tap
from tests.support.services import start_daemon

from jlm import errors
from jlm.config import Settings
from jlm.messages import ERROR_CODES
from jlm.schemas import all_schemas, render
from jlm.worker import Job, Worker

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "docs" / "schemas"
ASYNCAPI = ROOT / "docs" / "asyncapi.yaml"
ASYNCAPI_SPEC = Path(__file__).resolve().parent / "vendor" / "asyncapi-3.0.0.json"
_EXAMPLE = re.compile(r"<!-- schema: ([a-z-]+) -->\n```json\n(.*?)\n```", re.DOTALL)


def validator(name: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / f"{name}.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def assert_valid(name: str, message: Any) -> None:
    problems = [e.message for e in validator(name).iter_errors(message)]
    assert not problems, f"{name}: {problems} in {message}"


@pytest.mark.unit
def test_the_schema_files_are_what_the_models_generate() -> None:
    """Fails when a model changed and `make schemas` was not run (or a file was edited)."""
    generated = all_schemas()
    on_disk = {p.stem for p in SCHEMAS.glob("*.json")}
    assert on_disk == set(generated), "run `make schemas`"
    for name, schema in generated.items():
        assert (SCHEMAS / f"{name}.json").read_text() == render(schema), f"{name}: run make schemas"


@pytest.mark.unit
def test_one_schema_per_message_kind_each_a_valid_2020_12_schema() -> None:
    ops = ("manage", "cancel", "status", "invalidate", "result")
    expected = {f"{op}-{kind}" for op in ops for kind in ("request", "reply")}
    assert set(all_schemas()) == expected | {"error-reply", "job-message", "event"}
    for name, schema in all_schemas().items():
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        jsonschema.Draft202012Validator.check_schema(schema)
        assert schema["title"], name


@pytest.mark.unit
def test_every_json_example_of_the_contract_validates_against_its_schema() -> None:
    text = (ROOT / "docs" / "contract.md").read_text()
    assert text.count("```json") == len(_EXAMPLE.findall(text)), "a JSON example names no schema"
    named = set()
    for name, example in _EXAMPLE.findall(text):
        assert_valid(name, json.loads(example))
        named.add(name)
    assert named == set(all_schemas())  # an example of every kind


@pytest.mark.unit
def test_the_schemas_refuse_what_the_daemon_refuses() -> None:
    """The validation is not vacuous: wrong messages fail."""
    bad = [
        ("manage-request", {"job_type": "a b", "payload": {}}),
        ("manage-request", {"job_type": "a", "payload": {}, "priorty": 5}),
        ("manage-request", {"job_type": "a", "payload": {}, "priority": 11}),
        ("manage-reply", {"success": False}),
        ("error-reply", {"success": False, "error": {"code": "oops", "message": ""}}),
        ("job-message", {"job_id": "x", "job_type": "a", "cache_prefix": "p", "payload": {}}),
        ("event", {"provenance_id": "x", "type": "enqueued"}),
    ]
    for name, message in bad:
        assert list(validator(name).iter_errors(message)), (name, message)


@pytest.mark.unit
def test_every_error_code_of_the_daemon_is_in_the_schema() -> None:
    codes = {
        cls.code for cls in vars(errors).values() if isinstance(cls, type) and hasattr(cls, "code")
    }
    assert codes <= set(ERROR_CODES)


def asyncapi_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(json.loads(ASYNCAPI_SPEC.read_text()))


@pytest.mark.unit
def test_the_asyncapi_document_is_valid_asyncapi_3() -> None:
    doc = yaml.safe_load(ASYNCAPI.read_text())
    assert doc["asyncapi"] == "3.0.0"
    problems = [f"{e.json_path}: {e.message[:200]}" for e in asyncapi_validator().iter_errors(doc)]
    assert not problems
    # The validator checks deeply: an AsyncAPI 2 action, or an unknown operation field, fails.
    broken = yaml.safe_load(ASYNCAPI.read_text())
    broken["operations"]["manage"]["action"] = "publish"
    assert list(asyncapi_validator().iter_errors(broken))
    broken = yaml.safe_load(ASYNCAPI.read_text())
    broken["operations"]["manage"]["subscribe"] = True
    assert list(asyncapi_validator().iter_errors(broken))


@pytest.mark.unit
def test_the_asyncapi_document_references_every_schema_file() -> None:
    text = ASYNCAPI.read_text()
    refs = set(re.findall(r"\$ref: '\./schemas/([a-z-]+)\.json'", text))
    assert refs == set(all_schemas())
    doc = yaml.safe_load(text)
    for name, message in doc["components"]["messages"].items():
        ref = message["payload"]["schema"]["$ref"]
        assert (ASYNCAPI.parent / ref).is_file(), (name, ref)


async def _collect(queue: AbstractQueue, into: list[Any]) -> None:
    async def on(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        into.append(orjson.loads(message.body))
        await message.ack()

    await queue.consume(on)


def _requests() -> list[tuple[str, dict[str, Any]]]:
    """A mix: every operation, every policy, and requests the daemon refuses."""
    out: list[tuple[str, dict[str, Any]]] = []
    for i in range(12):
        policy = ("replace", "skip", "reuse")[i % 3]
        body = {"job_type": "schm", "cache_prefix": f"p{i % 4}", "payload": {"i": i}}
        out.append(("manage", {**body, "policy": policy, "priority": 1 + i % 10}))
    out += [("invalidate", {"job_type": "schm", "cache_prefix": "p1"})]
    out += [("result", {"job_type": "schm", "cache_prefix": f"p{i}"}) for i in range(4)]
    out += [("result", {"job_type": "schm", "cache_prefix": "never"})]
    out += [("status", {"job_id": "0000000000-unknown"}), ("cancel", {"job_id": "nope"})]
    out += [("manage", {"job_type": "schm", "payload": {}, "priorty": 5})]  # invalid_request
    out += [("manage", {"job_type": "bad type", "payload": {}})]
    return out


@pytest.mark.timeout(120)
async def test_messages_of_a_real_run_validate(make_settings: Callable[..., Settings]) -> None:
    """Requests, replies, job messages and events of a daemon and a worker at work."""

    async def handle(job: Job) -> dict[str, Any]:
        return {"done": job.payload}

    settings = make_settings()
    running = await start_daemon(settings)
    worker = Worker(settings, handle, "schm")
    worker_task = asyncio.create_task(worker.run())
    requests: list[tuple[str, dict[str, Any]]] = []
    replies: list[tuple[str, dict[str, Any]]] = []
    jobs: list[Any] = []
    events: list[Any] = []
    try:
        await asyncio.wait_for(worker.started.wait(), 20)
        async with await aio_pika.connect(settings.amqp_urls[0]) as conn:
            ch = await conn.channel()
            reply_q = await ch.declare_queue("", exclusive=True, auto_delete=True)
            await _collect(await tap(ch, "jlm.jobs", "schm"), jobs)
            await _collect(await tap(ch, "jlm.events", "#"), events)
            job_ids: list[str] = []
            for round_ in range(2):
                for op, body in _requests():
                    reply = orjson.loads((await rpc(ch, reply_q, op, body)).body)
                    requests.append((op, body))
                    replies.append((op, reply))
                    if op == "manage" and reply["success"]:
                        job_ids.append(reply["new_job_id"])
                for job_id in job_ids[-4:]:
                    for op, body in (
                        ("status", {"job_id": job_id}),
                        ("cancel", {"job_id": job_id}),
                    ):
                        requests.append((op, body))
                        replies.append((op, orjson.loads((await rpc(ch, reply_q, op, body)).body)))
                await asyncio.sleep(0.5 * (round_ + 1))  # the worker runs what it can
            await asyncio.sleep(1)
    finally:
        worker.stop()
        await asyncio.wait_for(worker_task, 30)
        await running.stop()

    for op, body in requests:
        if op == "manage" and (body.get("priorty") or body["job_type"] == "bad type"):
            assert list(validator("manage-request").iter_errors(body))  # refused by both
        else:
            assert_valid(f"{op}-request", body)
    for op, reply in replies:
        assert_valid(f"{op}-reply" if reply["success"] else "error-reply", reply)
    for job in jobs:
        assert_valid("job-message", job)
    for event in events:
        assert_valid("event", event)
    kinds = {e["type"] for e in events}
    assert {"job.enqueued", "job.claimed", "job.succeeded", "request.rejected"} <= kinds, kinds
    assert {r["error"]["code"] for _, r in replies if not r["success"]} >= {
        "invalid_request",
        "not_found",
    }
    total = len(requests) + len(replies) + len(jobs) + len(events)
    print(
        f"validated {total} messages: {len(requests)} requests, {len(replies)} replies, "
        f"{len(jobs)} job messages, {len(events)} events ({len(kinds)} event types)"
    )
    assert total >= 100
