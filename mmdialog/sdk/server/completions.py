"""``POST /v1/chat/completions``: the OpenAI chat format, whole or streamed.

The reply's photos are image parts in ``message.images`` (``delta.images``
when streamed, after the text); ``usage`` counts the prompt's and the reply's
LLM tokens; ``stop`` ends the reply's text before the first stop string (the
model still writes its turn to the end: the batch it shares runs on), and
drops the photos placed after that point.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from mmdialog.core import markup
from mmdialog.core.reply import Reply
from mmdialog.sdk.server.batching import Job
from mmdialog.sdk.server.limits import ApiError
from mmdialog.sdk.server.routes import server_of
from mmdialog.sdk.server.schema import CompletionRequest, from_openai, read_body

log = logging.getLogger("mmdialog.server")


class StopText:
    """A reply's visible text cut before the first of ``stops``; while it is
    written, the end that may still grow into a stop string is held back."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops

    def cut(self, text: str, final: bool = False) -> tuple[str, bool]:
        """What of ``text`` may be shown, and whether a stop string ended it."""
        found = [i for s in self.stops if (i := text.find(s)) >= 0]
        if found:
            return text[:min(found)], True
        if not final:
            for k in range(min(len(text), max(map(len, self.stops), default=1) - 1), 0, -1):
                if any(s.startswith(text[-k:]) for s in self.stops):
                    return text[:-k], False
        return text, False


def answer(reply: Reply, stops: StopText) -> tuple[str, int, str]:
    """The reply's text as sent, how many of its photos go with it, and the finish reason."""
    plain, offsets = markup.placed(reply.text)
    text, stopped = stops.cut(plain, final=True)
    kept = sum(1 for o in offsets if o <= len(text)) if stopped else len(offsets)
    return text, kept, "stop" if stopped or not reply.length_capped else "length"


def usage(job: Job) -> dict[str, int]:
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens,
            "total_tokens": job.prompt_tokens + job.completion_tokens}


async def completions(request: Request):
    server = server_of(request)
    req, uploads = await read_body(request, CompletionRequest, server.limits)
    chat_req = from_openai(req)
    stops = StopText(req.stops())
    base = str(request.base_url).rstrip("/")
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": server.name}

    def images(reply: Reply, upto: int) -> list[dict[str, Any]]:
        return [{"type": "image_url", "image_url": {"url": r.pop("url")}, **r}
                for r in server.photo_records(reply, base, upto)]

    if not req.stream:
        job = await server.submit(chat_req, uploads)
        reply = await server.reply(job)
        text, kept, finish = answer(reply, stops)
        return {**head, "object": "chat.completion", "usage": usage(job), "choices": [{
            "index": 0, "finish_reason": finish,
            "message": {"role": "assistant", "content": text, "images": images(reply, kept)}}]}

    with_usage = req.stream_options is not None and req.stream_options.include_usage
    pieces: asyncio.Queue = asyncio.Queue()
    job = await server.submit(chat_req, uploads, on_piece=pieces.put_nowait)
    # Queued now, not when the stream is first read: a client gone before that still has
    # its job run and its uploads deleted when the job ends.
    replied = asyncio.ensure_future(server.reply(job))
    replied.add_done_callback(lambda f: f.cancelled() or f.exception())  # read even if the client left

    def event(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> str:
        chunk = {**head, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}], **extra}
        if with_usage:
            chunk.setdefault("usage", None)
        return f"data: {json.dumps(chunk)}\n\n"

    async def events() -> AsyncIterator[str]:
        yield event({"role": "assistant", "content": ""})
        raw, shown, stopped = "", "", False
        while True:
            nxt = asyncio.ensure_future(pieces.get())
            await asyncio.wait({nxt, replied}, return_when=asyncio.FIRST_COMPLETED)
            if not nxt.done():
                nxt.cancel()
                break
            if isinstance(piece := nxt.result(), str) and not stopped:
                raw += piece
                now, stopped = stops.cut(markup.visible(raw))
                if now.startswith(shown) and len(now) > len(shown):
                    yield event({"content": now[len(shown):]})
                    shown = now
        try:
            reply = replied.result()
        except ApiError as e:
            yield event(error={"code": e.code, "message": e.message})
            yield "data: [DONE]\n\n"
            return
        except Exception:
            log.exception("a streamed reply failed")
            yield event(error={"code": "internal", "message": "internal error; see the server log"})
            yield "data: [DONE]\n\n"
            return
        text, kept, finish = answer(reply, stops)
        if text.startswith(shown) and len(text) > len(shown):
            yield event({"content": text[len(shown):]})
        for image in images(reply, kept):
            yield event({"images": [image]})
        yield event(finish=finish)
        if with_usage:
            yield f"data: {json.dumps({**head, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage(job)})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})
