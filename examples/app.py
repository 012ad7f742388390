"""One worker app, three job types: `jlm worker examples.app:app`.

Each job type has its handler and its concurrency; `thumb.make` takes a typed payload (a payload
that does not fit `ThumbIn` fails the job at once, with the validation message, and is not
retried). Try it:

    jlm submit thumb.make --payload '{"image": "cat.png", "width": 128}' --until-done
    jlm submit thumb.make --payload '{"image": "cat.png", "width": -1}' --until-done   # failed
    jlm submit report.render --payload '{"pages": 8}' --until-done
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel, Field

from jlm.worker import App, Job

app = App()


class ThumbIn(BaseModel):
    image: str
    width: int = Field(gt=0, le=4096)


@app.on_startup
async def start(app: App) -> None:
    # What the handlers share (a connection pool, a model) is opened once, here.
    app.state.sizes = {"small": 64, "large": 512}


@app.on_shutdown
async def stop(app: App) -> None:
    app.state.sizes.clear()


@app.job("report.render", concurrency=2)
async def render(job: Job) -> dict[str, Any]:
    """Render a report page by page (`pages`, default 1; `page_seconds`, default 0)."""
    pages = int(job.payload.get("pages", 1))
    for page in range(1, pages + 1):
        await asyncio.sleep(float(job.payload.get("page_seconds", 0)))
        await job.progress(page / pages, f"page {page} of {pages}")  # `jlm status` shows it
    return {"report": job.cache_prefix, "pages": pages}


@app.job("thumb.make", payload=ThumbIn, concurrency=4)
async def thumb(job: Job[ThumbIn]) -> dict[str, Any]:
    """Make a thumbnail: `job.payload` is a `ThumbIn`."""
    await asyncio.sleep(0.005)
    return {"thumb": f"{job.payload.image}@{job.payload.width}w"}


@app.job("mail.send", concurrency=8)
async def mail(job: Job) -> dict[str, Any]:
    """Send a mail (here: wait as long as a mail server would take to answer)."""
    await asyncio.sleep(0.01)
    return {"sent_to": job.payload.get("to")}
