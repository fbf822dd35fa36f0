"""Concurrent requests, answered together: one ``respond_batch`` per batch.

Requests wait in one queue. Whenever the model is free, the oldest request and
every other waiting one that can share its batch (same model, same generation
options), up to ``max_batch``, are answered by one ``reply_batch`` call, run
in a worker thread; an idle model first waits for the requests already on
their way (``arriving``: read, being checked and tokenised), so that those sent
together share a batch (``_gather``). Nothing runs two batches at once: one
model, one batch.
A full queue answers 503, never a crash.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool

from mmdialog.core.reply import GenerationOptions, Reply
from mmdialog.core.session import Session, reply_batch
from mmdialog.sdk.server.limits import ApiError


@dataclass
class Job:
    session: Session             # history ends with the user's turn (``Session.begin`` ran)
    options: GenerationOptions
    prompt_tokens: int = 0       # LLM tokens of the prompt's text
    on_piece: Callable[[Any], None] | None = None  # called in the event loop with text deltas / photos
    future: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    completion_tokens: int = 0   # LLM tokens of the reply's text, counted in the batch's thread

    def key(self) -> tuple[int, str]:
        return id(self.session.model), self.options.model_dump_json()


class Batcher:
    def __init__(self, max_batch: int, max_queue: int, wait_s: float = 0.01, max_wait_s: float = 1.0) -> None:
        self.max_batch, self.max_queue, self.wait_s, self.max_wait_s = max_batch, max_queue, wait_s, max_wait_s
        self.waiting: list[Job] = []
        self.arriving = 0  # requests admitted and being prepared (``Server.submit``), not queued yet
        self.counters = {"queued": 0, "active": 0, "max_active": 0, "served": 0, "batches": 0}
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    @property
    def busy(self) -> bool:
        return self.counters["active"] > 0

    def check_room(self) -> None:
        """503 unless a request can wait: ``max_batch`` for the next batch and
        ``max_queue`` more for later ones."""
        if len(self.waiting) >= self.max_batch + self.max_queue:
            raise ApiError(503, "busy", f"{len(self.waiting)} requests are already waiting; try again shortly")

    async def submit(self, job: Job) -> Reply:
        """Queue ``job`` and wait for its reply (503 when the queue is full). A
        waiter cancelled (its client gone) leaves the job to finish: its batch
        may already be reading its photos."""
        try:
            self.check_room()
        except ApiError:
            job.future.cancel()  # it never runs: its done-callbacks (deleting its uploads) run now
            raise
        if self._worker is None or self._worker.done():
            self._wake = asyncio.Event()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        self.waiting.append(job)
        self.counters["queued"] = len(self.waiting)
        self._wake.set()
        return await asyncio.shield(job.future)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._gather()
            while self.waiting:
                await self._answer(self._take())

    async def _gather(self) -> None:
        """Requests sent together reach the queue apart: each is read, checked and
        tokenised first. While some are on their way (``arriving``) or the queue grew
        in the last ``wait_s``, and the batch has room, wait (up to ``max_wait_s``): a
        reply takes seconds, a request's checks milliseconds. A lone request waits one
        ``wait_s``."""
        waited, seen = 0.0, -1
        while (self.arriving or seen != len(self.waiting)) and len(self.waiting) < self.max_batch \
                and waited < self.max_wait_s:
            seen = len(self.waiting)
            await asyncio.sleep(self.wait_s)
            waited += self.wait_s

    def _take(self) -> list[Job]:
        key = self.waiting[0].key()
        batch = [j for j in self.waiting if j.key() == key and not j.future.done()][: self.max_batch]
        self.waiting = [j for j in self.waiting if j not in batch and not j.future.done()]
        self.counters["queued"] = len(self.waiting)
        return batch

    async def _answer(self, batch: list[Job]) -> None:
        if not batch:
            return
        loop = asyncio.get_running_loop()

        def stream(row: int, piece: Any) -> None:  # from the worker thread
            if batch[row].on_piece is not None:
                loop.call_soon_threadsafe(batch[row].on_piece, piece)

        self.counters.update(active=len(batch), batches=self.counters["batches"] + 1)
        self.counters["max_active"] = max(self.counters["max_active"], len(batch))
        try:
            streaming = any(j.on_piece is not None for j in batch)
            replies = await run_in_threadpool(_reply_batch, batch, stream if streaming else None)
        except Exception as e:  # every request of the batch gets the error; the server goes on
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(e)
        else:
            for j, r in zip(batch, replies):
                if not j.future.done():
                    j.future.set_result(r)
            self.counters["served"] += len(batch)
        finally:
            self.counters["active"] = 0


def _reply_batch(batch: list[Job], stream) -> list[Reply]:
    """One ``reply_batch``, and each reply's token count (in the worker thread:
    tokenizing is no work for the event loop)."""
    replies = reply_batch([j.session for j in batch], batch[0].options, stream)
    tokenizer = batch[0].session.model.llm.tokenizer
    for j, r in zip(batch, replies):
        j.completion_tokens = len(tokenizer(r.text, add_special_tokens=False)["input_ids"])
    return replies
