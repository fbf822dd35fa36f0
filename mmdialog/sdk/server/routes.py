"""The routes of ``mmdialog serve`` but the OpenAI one (``completions.py``),
and ``Server``: what every route shares (the sessions, the limits, the queue,
the shared photos) and the one path of a request to the model."""
from __future__ import annotations

import html
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import FileResponse, HTMLResponse
from starlette.concurrency import run_in_threadpool

from mmdialog.core.errors import MMDialogError
from mmdialog.core.reply import GenerationOptions, Reply
from mmdialog.core.session import Session
from mmdialog.sdk.server.batching import Batcher, Job
from mmdialog.sdk.server.limits import ApiError, Limits
from mmdialog.sdk.server.photos import SharedPhotos
from mmdialog.sdk.server.schema import ChatRequest, read_body, to_options, to_turns

STATIC = resources.files("mmdialog.sdk.server").joinpath("static")
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                                           "script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                           "frame-ancestors 'none'",
                "Referrer-Policy": "no-referrer"}
SessionFactory = Callable[[Path], Session]  # photos folder -> mmdialog Session


class Server:
    """What the routes share (``app.state.server``)."""

    def __init__(self, factory: SessionFactory, root: Path, limits: Limits, name: str) -> None:
        self.factory, self.root, self.limits, self.name = factory, root, limits, name
        self.photos_dir, self.uploads_dir = root / "photos", root / "uploads"
        self.photos_dir.mkdir(parents=True, exist_ok=True)
        self.uploads_dir.mkdir(parents=True, exist_ok=True)
        self.photos = SharedPhotos(self.photos_dir, limits.keep_photos, limits.keep_photos_s)
        self.batcher = Batcher(limits.max_batch, limits.max_queue)

    async def submit(self, req: ChatRequest, uploads: list[bytes], on_piece=None) -> Job:
        """Check ``req``, write its images, start a session with its turns and
        queue it for the next batch (in a worker thread: decoding images and
        tokenizing are no work for the event loop). Its uploads are deleted when
        the job ends, however it ends (or now, if it never starts)."""
        written: list[Path] = []

        def clean(_=None) -> None:
            for path in written:
                path.unlink(missing_ok=True)

        self.batcher.check_room()
        self.batcher.arriving += 1
        try:
            session, opts, n_prompt = await run_in_threadpool(self._prepare, req, uploads, written)
        except BaseException:
            clean()
            raise
        finally:
            self.batcher.arriving -= 1
        job = Job(session, opts, prompt_tokens=n_prompt, on_piece=on_piece)
        job.future.add_done_callback(clean)
        return job

    def _prepare(self, req: ChatRequest, uploads: list[bytes],
                 written: list[Path]) -> tuple[Session, GenerationOptions, int]:
        """The session (turns dropped to fit are said by its reply), its options and
        its prompt's token count (for ``usage``)."""
        history, (text, images) = to_turns(req, uploads, self.limits, self.photos.get, self.uploads_dir, written)
        options = to_options(req.options, self.limits)
        session = self.factory(self.photos_dir)
        session.history = list(history)
        try:
            opts: GenerationOptions = session.options_for(**options)
            session.begin(text, images, opts)
        except MMDialogError as e:
            raise ApiError(422, "invalid_request", str(e)) from None
        return session, opts, session.prompt_tokens()

    async def reply(self, job: Job) -> Reply:
        """The job's reply (its photos now served), once its batch ran."""
        try:
            reply = await self.batcher.submit(job)
        except MMDialogError as e:
            raise ApiError(422, "invalid_request", str(e)) from None
        self.photos.add(reply.paths, reply.descriptions)
        return reply

    def photo_records(self, reply: Reply, base: str = "", upto: int | None = None) -> list[dict[str, Any]]:
        """The reply's photos for a client (the first ``upto``): their URL here,
        never a path on this machine."""
        out = []
        for r in reply.photo_records()[:upto]:
            saved, file = Path(r.pop("path")), r.pop("file")
            out.append({**r, "file": Path(file).name if file else None, "url": f"{base}/files/{saved.name}"})
        return out


def server_of(request: Request) -> Server:
    return request.app.state.server


async def page(request: Request):
    text = STATIC.joinpath("chat.html").read_text(encoding="utf-8")
    return HTMLResponse(text.replace("{{MODEL_NAME}}", html.escape(server_of(request).name)), headers=PAGE_HEADERS)


async def docs():
    return HTMLResponse(STATIC.joinpath("docs.html").read_text(encoding="utf-8"), headers=PAGE_HEADERS)


async def health(request: Request):
    server = server_of(request)
    c = server.batcher.counters
    return {"status": "ok", "model": server.name, "queued": c["queued"], "busy": server.batcher.busy,
            "served": c["served"], "batches": c["batches"], "photos_kept": len(server.photos)}


async def models(request: Request):
    return {"object": "list", "data": [{"id": server_of(request).name, "object": "model", "created": 0,
                                        "owned_by": "mmdialog"}]}


async def files(request: Request, file: str):
    found = server_of(request).photos.get(file)
    if found is None:
        raise ApiError(404, "not_found", "no such photo (photos are kept for a bounded time)")
    return FileResponse(found[0], media_type="image/png")


async def chat(request: Request):
    server = server_of(request)
    req, uploads = await read_body(request, ChatRequest, server.limits)
    job = await server.submit(req, uploads)
    reply = await server.reply(job)
    out = {"text": reply.plain, "raw_text": reply.text, "shared": reply.shared, "photos": server.photo_records(reply),
           "truncated": reply.truncated, "length_capped": reply.length_capped,
           "dropped_turns": job.session.dropped_turns}
    if reply.notice:
        out["notice"] = reply.notice
    return out
