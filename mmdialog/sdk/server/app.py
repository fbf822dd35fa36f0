"""``mmdialog serve``: a JSON chat API and one small HTML chat page.

    POST /v1/chat     {"messages": [{"role": "user", "content": "hi", "images": ["<base64>"]}],
                       "options": {"max_new_tokens": 64, "seed": 0}}
                      or multipart/form-data: field ``messages`` (that JSON list), optional
                      field ``options`` (JSON), files ``images`` (attached to the last message)
                  →   {"text", "raw_text", "shared", "photos": [{"url", "description", "source"}],
                       "truncated", "dropped_turns"}
    GET  /health      {"status": "ok", "queued", "busy", "served"}
    GET  /files/NAME  a photo the model shared (only this server's own folder)
    GET  /            the chat page (inline JS and CSS, no external assets)

Requests are checked before the model runs: body and image sizes, image type
(PNG, JPEG or WebP, verified by decoding with Pillow), pixel count, message
count and length, option ranges. Every error is ``{"error": {"code",
"message"}}`` with a 4xx status. One model serves one request at a time:
others wait in a bounded queue (503 when it is full), they never run
concurrently.
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import tempfile
import uuid
import warnings
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmdialog.core.data.schema import Photo, Turn
from mmdialog.core.errors import MMDialogError, validation_message
from mmdialog.core.generation import GenerationOptions
from mmdialog.core.session import HistoryTruncatedWarning
from mmdialog.sdk.server.limits import ApiError, BodyLimit, Limits, decode_image

log = logging.getLogger("mmdialog.server")
FILE_NAME = re.compile(r"^[0-9a-f]{32}\.png$")
PAGE = resources.files("mmdialog.sdk.server").joinpath("static/chat.html").read_text(encoding="utf-8")


# -- request models ------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SharedPhotoRef(BaseModel):
    """A photo from an earlier reply, sent back as it came (extra keys ignored)."""

    url: str
    description: str = ""


class Message(_Strict):
    role: Literal["user", "assistant"]
    content: str = ""
    images: list[str] = Field(default_factory=list, description="base64 or data: URLs (user messages)")
    photos: list[SharedPhotoRef] = Field(default_factory=list, description="photos this server shared")


class ChatRequest(_Strict):
    messages: list[Message] = Field(min_length=1)
    options: dict[str, Any] = Field(default_factory=dict, description="GenerationOptions fields for this "
                                                                      "reply: max_new_tokens, temperature, …")


# -- the app -----------------------------------------------------------------------------------
SessionFactory = Callable[[Path], Any]  # photos folder -> mmdialog Session


def create_app(model_or_factory: Any, out_dir: str | Path | None = None, limits: Limits | None = None,
               **gen_defaults: Any):
    """A FastAPI app serving ``model_or_factory`` (a ``DialogueModel``, or a
    callable ``photos_dir -> Session``). Shared photos go to ``out_dir/photos``
    and are served from ``/files/``; uploads go to ``out_dir/uploads`` (never
    served). ``gen_defaults`` are the session's generation options."""
    limits = limits or Limits()
    root = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="mmdialog-serve-"))
    photos_dir, uploads_dir = root / "photos", root / "uploads"
    photos_dir.mkdir(parents=True, exist_ok=True)
    uploads_dir.mkdir(parents=True, exist_ok=True)
    if callable(model_or_factory) and not hasattr(model_or_factory, "respond"):
        factory: SessionFactory = model_or_factory
    else:
        model = model_or_factory
        factory = lambda d: model.session(photos_dir=d, **gen_defaults)
    factory(photos_dir)  # fail now, not on the first request, if the options are bad

    app = FastAPI(title="mmdialog", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.root, app.state.photos_dir, app.state.limits = root, photos_dir, limits
    state = {"queued": 0, "active": 0, "max_active": 0, "served": 0}
    app.state.counters = state
    lock = asyncio.Lock()

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
        err = exc.errors()[0]
        return error(422, "invalid_request", f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}")

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("request failed")
        return error(500, "internal", "internal error; see the server log")

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE, headers={"Content-Security-Policy":
                                           "default-src 'self'; img-src 'self' data: blob:; "
                                           "script-src 'unsafe-inline'; style-src 'unsafe-inline'"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": state["queued"], "busy": lock.locked(), "served": state["served"]}

    @app.get("/files/{name}")
    async def files(name: str):
        if not FILE_NAME.match(name) or not (photos_dir / name).is_file():
            raise ApiError(404, "not_found", "no such photo")
        return FileResponse(photos_dir / name, media_type="image/png")

    @app.post("/v1/chat")
    async def chat(request: Request):
        req, uploads = await _parse(request, limits)
        history, last = _turns(req, uploads, limits, photos_dir, uploads_dir)
        opts = _options(req.options, limits)
        if state["queued"] >= limits.max_queue:
            raise ApiError(503, "busy", f"{state['queued']} requests are already waiting; try again shortly")
        state["queued"] += 1
        waiting = True
        try:
            async with lock:
                state["queued"] -= 1
                waiting = False
                state["active"] += 1
                state["max_active"] = max(state["max_active"], state["active"])
                try:
                    result = await run_in_threadpool(_respond, factory, photos_dir, history, last, opts)
                finally:
                    state["active"] -= 1
        finally:
            if waiting:  # the client went away while queued
                state["queued"] -= 1
        state["served"] += 1
        return result

    return app


async def _parse(request, limits: Limits) -> tuple[ChatRequest, list[bytes]]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    uploads: list[bytes] = []
    try:
        if ctype == "multipart/form-data":
            form = await request.form(max_files=limits.max_images, max_fields=8,
                                      max_part_size=limits.max_image_bytes)
            raw_messages = form.get("messages")
            if not isinstance(raw_messages, str):
                raise ApiError(422, "invalid_request", "multipart field 'messages' (a JSON list) is required")
            raw_options = form.get("options")
            data = {"messages": json.loads(raw_messages),
                    "options": json.loads(raw_options) if isinstance(raw_options, str) else {}}
            for f in form.getlist("images"):
                if isinstance(f, str):
                    raise ApiError(422, "invalid_request", "multipart 'images' must be files")
                blob = await f.read(limits.max_image_bytes + 1)
                if len(blob) > limits.max_image_bytes:
                    raise ApiError(413, "too_large", f"image '{f.filename}' is over {limits.max_image_bytes:,} bytes")
                uploads.append(blob)
        elif ctype == "application/json":
            data = json.loads(await request.body())
        else:
            raise ApiError(415, "unsupported_media_type", "send application/json or multipart/form-data")
    except json.JSONDecodeError as e:
        raise ApiError(400, "bad_json", f"body is not valid JSON: {e.msg} (line {e.lineno})") from None
    except ApiError:
        raise
    except Exception as e:  # multipart parser limits and malformed forms
        if type(e).__name__ in ("MultiPartException", "HTTPException"):
            raise ApiError(413 if "size" in str(e).lower() or "too" in str(e).lower() else 400,
                           "bad_form", str(getattr(e, "detail", e) or e)) from None
        raise
    try:
        return ChatRequest.model_validate(data), uploads
    except ValidationError as e:
        raise ApiError(422, "invalid_request", validation_message(e)) from None


def _turns(req: ChatRequest, uploads: list[bytes], limits: Limits, photos_dir: Path,
           uploads_dir: Path) -> tuple[list[Turn], tuple[str, list[Path]]]:
    msgs = req.messages
    if len(msgs) > limits.max_messages:
        raise ApiError(422, "too_many_messages", f"{len(msgs)} messages; the limit is {limits.max_messages}")
    if msgs[-1].role != "user":
        raise ApiError(422, "invalid_request", "the last message must be the user's")
    n_images = sum(len(m.images) for m in msgs) + len(uploads)
    if n_images > limits.max_images:
        raise ApiError(422, "too_many_images", f"{n_images} images; the limit is {limits.max_images} per request")
    for i, m in enumerate(msgs):
        if len(m.content) > limits.max_message_chars:
            raise ApiError(422, "message_too_long", f"messages.{i}.content has {len(m.content)} characters; "
                                                    f"the limit is {limits.max_message_chars}")
        if m.role == "assistant" and m.images:
            raise ApiError(422, "invalid_request", f"messages.{i}: images belong to user messages "
                                                   "(an assistant's shared photos go in 'photos')")
    checked: list[list[tuple[bytes, str]]] = [
        [decode_image(b, limits, f"messages.{i}.images.{j}") for j, b in enumerate(m.images)]
        for i, m in enumerate(msgs)]
    checked[-1] += [decode_image(b, limits, f"images.{j}") for j, b in enumerate(uploads)]

    def save(blob: bytes, ext: str) -> Path:
        path = uploads_dir / f"{uuid.uuid4().hex}{ext}"
        path.write_bytes(blob)
        return path

    history: list[Turn] = []
    for i, (m, imgs) in enumerate(zip(msgs[:-1], checked[:-1])):
        photos = [Photo(description="a photo", path=save(b, e)) for b, e in imgs]
        for ref in m.photos:
            name = ref.url.rsplit("/", 1)[-1]
            if not (ref.url.startswith("/files/") and FILE_NAME.match(name) and (photos_dir / name).is_file()):
                raise ApiError(422, "invalid_request", f"messages.{i}.photos: '{ref.url}' is not a photo this "
                                                       "server shared")
            photos.append(Photo(description=ref.description, path=photos_dir / name))
        history.append(Turn(m.role, m.content.strip(), photos))
    last = (msgs[-1].content, [save(b, e) for b, e in checked[-1]])
    if not last[0].strip() and not last[1]:
        raise ApiError(422, "invalid_request", "the last message is empty: give some text or an image")
    return history, last


def _options(options: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """The request's generation options, checked against ``GenerationOptions``
    and this server's own caps."""
    try:
        GenerationOptions.parse(options, field="options")
    except MMDialogError as e:
        raise ApiError(422, "invalid_request", str(e)) from None
    for name, cap in (("max_new_tokens", limits.max_new_tokens), ("num_inference_steps", limits.max_inference_steps),
                      ("num_beams", limits.max_beams)):
        value = options.get(name)
        if value is not None and value > cap:
            raise ApiError(422, "invalid_request", f"options.{name}: {value} is over this server's limit of {cap}")
    return {k: v for k, v in options.items() if v is not None}


def _respond(factory: SessionFactory, photos_dir: Path, history: list[Turn],
             last: tuple[str, list[Path]], options: dict[str, Any]) -> dict[str, Any]:
    session = factory(photos_dir)
    session.history = list(history)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HistoryTruncatedWarning)
        try:
            reply = session.send(last[0], images=last[1], **options)
        except MMDialogError as e:
            raise ApiError(422, "invalid_request", str(e)) from None
    notices = [str(w.message) for w in caught if issubclass(w.category, HistoryTruncatedWarning)]
    photos = [{"url": f"/files/{Path(r.pop('path')).name}", **r} for r in reply.photo_records()]
    out = {"text": reply.plain, "raw_text": reply.text, "shared": reply.shared, "photos": photos,
           "truncated": reply.truncated, "dropped_turns": session.dropped_turns}
    if notices:
        out["notice"] = notices[0]
    return out
