"""``mmdialog serve``: a JSON chat API, its OpenAI-format twin, and one small chat page.

    POST /v1/chat     {"messages": [{"role": "user", "content": "hi", "images": ["<base64>"]}],
                       "options": {"max_new_tokens": 64, "seed": 0}}
                      or multipart/form-data: field ``messages`` (that JSON list), optional
                      field ``options`` (JSON), files ``images`` (attached to the last message)
                  →   {"text", "raw_text", "shared", "photos": [{"url", "description", "source", …}],
                       "truncated", "length_capped", "dropped_turns"}
    POST /v1/chat/completions   the OpenAI chat format (``schema.CompletionRequest``); the
                      reply's photos are image parts in ``message.images``; ``"stream": true``
                      sends server-sent events: the text as it is written, then each photo
    GET  /v1/models   the one model served
    GET  /health      {"status": "ok", "model", "queued", "busy", "served", "batches"}
    GET  /files/NAME  a photo the model shared (only this server's own folder)
    GET  /docs        the API reference (from /openapi.json; no external assets)
    GET  /            the chat page (inline JS and CSS, no external assets)

The server serves only its page. Before any body is read, every request's
``Host`` must name this server (the loopback names, the bound host, the
address the connection came in on, and ``allowed_hosts`` /
``--allowed-host``; anything else is 400 ``bad_host``, which closes DNS
rebinding); a POST that carries an ``Origin`` other than the server's own is
403 ``foreign_origin`` (requests without ``Origin``, from curl or scripts,
pass); and with ``api_key`` / ``--api-key`` every request but GET ``/``,
``/docs``, ``/openapi.json`` and ``/health`` needs ``Authorization: Bearer
KEY`` or ``X-API-Key: KEY`` (401 without it; open the page as ``/?key=KEY``
and it sends the key itself).

Requests are checked before the model runs (``schema.py``, ``limits.py``):
body and image sizes, image type (PNG, JPEG or WebP, verified by decoding with
Pillow), pixel count (decompression bombs are 413), message count and length,
option ranges, JSON that is not UTF-8, nested too deeply or holds lone
surrogates. Every error is ``{"error": {"code", "message"}}`` with a 4xx
status. Concurrent requests are answered together, in batches of up to
``Limits.max_batch`` through one ``respond_batch`` (``batching.py``); the
others wait in a bounded queue (503 when it is full).

Uploaded images live in ``out_dir/uploads`` only while their request runs:
they are deleted when its reply is written (or it failed), and are never
served. ``/files/NAME`` serves only photos this server process wrote to
``out_dir/photos`` (by name, and never through a symlink leading elsewhere).
"""
from __future__ import annotations

import asyncio
import html
import json
import logging
import re
import tempfile
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmdialog.core import markup
from mmdialog.core.errors import MMDialogError, validation_message
from mmdialog.core.generation import GenerationOptions, Reply
from mmdialog.core.session import HistoryTruncatedWarning, Session
from mmdialog.sdk.server.batching import Batcher, Job
from mmdialog.sdk.server.limits import ApiError, BodyLimit, Limits, RequestGuard, check_api_key, host_names
from mmdialog.sdk.server.schema import (
    ChatRequest,
    CompletionRequest,
    from_openai,
    read_body,
    to_options,
    to_turns,
    validate,
)

log = logging.getLogger("mmdialog.server")
FILE_NAME = re.compile(r"^[0-9a-f]{32}\.png$")
STATIC = resources.files("mmdialog.sdk.server").joinpath("static")
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                                           "script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                           "frame-ancestors 'none'",
                "Referrer-Policy": "no-referrer"}
SessionFactory = Callable[[Path], Session]  # photos folder -> mmdialog Session


def _body_schema(model) -> dict[str, Any]:
    """An OpenAPI request body for routes that read their body themselves (to
    check it before pydantic does): documented, not parsed, by FastAPI."""
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}}


def _with_request_schemas(app: FastAPI, *models) -> None:
    """Add ``models`` (and the models they use) to the app's OpenAPI components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                js = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(js.pop("$defs", {}))
                components[model.__name__] = js
        return app.openapi_schema

    app.openapi = openapi


def create_app(model_or_factory: Any, out_dir: str | Path | None = None, limits: Limits | None = None, *,
               allowed_hosts: Iterable[str] = (), api_key: str | None = None, name: str = "mmdialog",
               **gen_defaults: Any):
    """A FastAPI app serving ``model_or_factory`` (a ``DialogueModel``, or a
    callable ``photos_dir -> Session``) under the model name ``name``. Shared
    photos go to ``out_dir/photos`` and are served from ``/files/``; uploads go
    to ``out_dir/uploads`` until their reply is written (never served).
    ``allowed_hosts``: names, besides the loopback ones, that requests may give
    as ``Host`` (pass the bound host here); ``api_key``: required on every
    request but the page, the docs and /health. ``gen_defaults`` are the
    session's generation options."""
    limits = limits or Limits()
    allowed = host_names(allowed_hosts)
    key = check_api_key(api_key)
    root = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="mmdialog-serve-"))
    photos_dir, uploads_dir = root / "photos", root / "uploads"
    photos_dir.mkdir(parents=True, exist_ok=True)
    uploads_dir.mkdir(parents=True, exist_ok=True)
    photos_real = photos_dir.resolve()
    shared: dict[str, str] = {}  # name → description of the photos this process wrote: all /files/ serves
    if callable(model_or_factory) and not hasattr(model_or_factory, "respond"):
        factory: SessionFactory = model_or_factory
    else:
        model = model_or_factory
        factory = lambda d: model.session(photos_dir=d, **gen_defaults)
    factory(photos_dir)  # fail now, not on the first request, if the options are bad
    batcher = Batcher(limits.max_batch, limits.max_queue)

    app = FastAPI(title="mmdialog", summary=f"serving {name}", docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.root, app.state.photos_dir, app.state.limits = root, photos_dir, limits
    app.state.uploads_dir, app.state.shared_photos, app.state.allowed_hosts = uploads_dir, shared, allowed
    app.state.counters, app.state.batcher, app.state.name = batcher.counters, batcher, name

    def error(status: int, code: str, message: str) -> JSONResponse:
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=status,
                            headers={"X-Content-Type-Options": "nosniff"})

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error(exc.status, exc.code, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        return error(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        return error(422, "invalid_request", validation_message(exc))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("request failed")
        return error(500, "internal", "internal error; see the server log")

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(RequestGuard, allowed=allowed, api_key=key)  # added last: runs first

    def own_photo(file: str) -> tuple[Path, str] | None:
        """``photos_dir/file`` and its description if this process wrote it and
        it is still a plain file inside ``photos_dir``, else None."""
        if not FILE_NAME.match(file) or file not in shared:
            return None
        path = photos_dir / file
        try:
            if path.is_symlink() or not path.is_file() or path.resolve().parent != photos_real:
                return None
        except OSError:
            return None
        return path, shared[file]

    async def submit(req: ChatRequest, uploads: list[bytes], on_piece=None) -> tuple[Job, str | None]:
        """Check ``req``, add its user turn to a new session and queue it for
        the next batch; its uploads are deleted once its reply is written."""
        written: list[Path] = []

        def clean(_=None) -> None:
            for path in written:
                path.unlink(missing_ok=True)

        try:
            history, last = to_turns(req, uploads, limits, own_photo, uploads_dir, written)
            opts = to_options(req.options, limits)
            batcher.check_room()
            session, truncated, gen, notice = await run_in_threadpool(_begin, factory, photos_dir, history, last,
                                                                      opts)
        except BaseException:
            clean()
            raise
        job = Job(session, truncated, gen, on_piece)
        job.future.add_done_callback(clean)
        return job, notice

    async def reply_of(job: Job) -> Reply:
        try:
            reply = await batcher.submit(job)
        except MMDialogError as e:
            raise ApiError(422, "invalid_request", str(e)) from None
        shared.update((p.name, d) for p, d in zip(reply.paths, reply.descriptions))
        return reply

    def photo_records(reply: Reply, base: str = "") -> list[dict[str, Any]]:
        """The reply's photos for a client: their URL here, never a path on this machine."""
        out = []
        for r in reply.photo_records():
            saved, file = Path(r.pop("path")), r.pop("file")
            out.append({**r, "file": Path(file).name if file else None, "url": f"{base}/files/{saved.name}"})
        return out

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        text = STATIC.joinpath("chat.html").read_text(encoding="utf-8")
        return HTMLResponse(text.replace("{{MODEL_NAME}}", html.escape(name)), headers=PAGE_HEADERS)

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs():
        return HTMLResponse(STATIC.joinpath("docs.html").read_text(encoding="utf-8"), headers=PAGE_HEADERS)

    @app.get("/health", summary="Liveness and load")
    async def health():
        c = batcher.counters
        return {"status": "ok", "model": name, "queued": c["queued"], "busy": batcher.busy,
                "served": c["served"], "batches": c["batches"]}

    @app.get("/v1/models", summary="The model this server serves (OpenAI format)")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "mmdialog"}]}

    @app.get("/files/{file}", summary="A photo this server shared", response_class=FileResponse)
    async def files(file: str):
        found = own_photo(file)
        if found is None:
            raise ApiError(404, "not_found", "no such photo")
        return FileResponse(found[0], media_type="image/png")

    @app.post("/v1/chat", summary="The next reply, with its photos", openapi_extra=_body_schema(ChatRequest))
    async def chat(request: Request):
        data, uploads = await read_body(request, limits)
        job, notice = await submit(validate(ChatRequest, data), uploads)
        reply = await reply_of(job)
        out = {"text": reply.plain, "raw_text": reply.text, "shared": reply.shared, "photos": photo_records(reply),
               "truncated": reply.truncated, "length_capped": reply.length_capped,
               "dropped_turns": job.session.dropped_turns}
        if notice:
            out["notice"] = notice
        return out

    @app.post("/v1/chat/completions", summary="The next reply in the OpenAI chat format (stream: SSE)",
              openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request):
        data, uploads = await read_body(request, limits)
        req = validate(CompletionRequest, data)
        base = str(request.base_url).rstrip("/")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}

        def images(reply: Reply) -> list[dict[str, Any]]:
            return [{"type": "image_url", "image_url": {"url": r.pop("url")}, **r} for r in photo_records(reply, base)]

        def finish_reason(reply: Reply) -> str:
            return "length" if reply.length_capped else "stop"

        if not req.stream:
            job, _ = await submit(from_openai(req), uploads)
            reply = await reply_of(job)
            return {**head, "object": "chat.completion", "choices": [{
                "index": 0, "finish_reason": finish_reason(reply),
                "message": {"role": "assistant", "content": reply.plain, "images": images(reply)}}]}
        pieces: asyncio.Queue = asyncio.Queue()
        job, _ = await submit(from_openai(req), uploads, on_piece=pieces.put_nowait)
        # Queued now, not when the stream is first read: a client gone before that still has
        # its job run and its uploads deleted when the job ends.
        answer = asyncio.ensure_future(reply_of(job))

        def event(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> str:
            chunk = {**head, "object": "chat.completion.chunk",
                     "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}], **extra}
            return f"data: {json.dumps(chunk)}\n\n"

        async def events() -> AsyncIterator[str]:
            yield event({"role": "assistant", "content": ""})
            raw, shown = "", ""
            while True:
                nxt = asyncio.ensure_future(pieces.get())
                await asyncio.wait({nxt, answer}, return_when=asyncio.FIRST_COMPLETED)
                if not nxt.done():
                    nxt.cancel()
                    break
                if isinstance(piece := nxt.result(), str):
                    raw += piece
                    now = markup.visible(raw)
                    if now.startswith(shown) and len(now) > len(shown):
                        yield event({"content": now[len(shown):]})
                        shown = now
            try:
                reply = answer.result()
            except ApiError as e:
                yield event(error={"code": e.code, "message": e.message})
                yield "data: [DONE]\n\n"
                return
            if reply.plain.startswith(shown) and len(reply.plain) > len(shown):
                yield event({"content": reply.plain[len(shown):]})
            for image in images(reply):
                yield event({"images": [image]})
            yield event(finish=finish_reason(reply))
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"})

    _with_request_schemas(app, ChatRequest, CompletionRequest)
    return app


def _begin(factory: SessionFactory, photos_dir: Path, history: list, last: tuple[str, list[Path]],
           options: dict[str, Any]) -> tuple[Session, bool, GenerationOptions, str | None]:
    """A session with ``history`` and the user's turn ``last`` in, whether older
    turns were dropped, its options, and the notice that says so."""
    session = factory(photos_dir)
    session.history = list(history)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HistoryTruncatedWarning)
        try:
            opts = session.options_for(**options)
            truncated = session.begin(last[0], last[1], opts)
        except MMDialogError as e:
            raise ApiError(422, "invalid_request", str(e)) from None
    notices = [str(w.message) for w in caught if issubclass(w.category, HistoryTruncatedWarning)]
    return session, truncated, opts, (notices[0] if notices else None)
