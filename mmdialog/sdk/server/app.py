"""``mmdialog serve``: a JSON chat API and one small HTML chat page.

    POST /v1/chat     {"messages": [{"role": "user", "content": "hi", "images": ["<base64>"]}],
                       "options": {"max_new_tokens": 64, "seed": 0}}
                      or multipart/form-data: field ``messages`` (that JSON list), optional
                      field ``options`` (JSON), files ``images`` (attached to the last message)
                  →   {"text", "raw_text", "shared", "photos": [{"url", "description", "source"}],
                       "truncated", "length_capped", "dropped_turns"}
    GET  /health      {"status": "ok", "queued", "busy", "served"}
    GET  /files/NAME  a photo the model shared (only this server's own folder)
    GET  /            the chat page (inline JS and CSS, no external assets)

The server serves only its page. Before any body is read, every request's
``Host`` must name this server (the loopback names, the bound host, the
address the connection came in on, and ``allowed_hosts`` /
``--allowed-host``; anything else is 400 ``bad_host``, which closes DNS
rebinding); a POST that carries an ``Origin`` other than the server's own is
403 ``foreign_origin`` (requests without ``Origin``, from curl or scripts,
pass); and with ``api_key`` / ``--api-key`` every request but GET ``/`` and
``/health`` needs ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` (401
without it; open the page as ``/?key=KEY`` and it sends the key itself).

Requests are checked before the model runs: body and image sizes, image type
(PNG, JPEG or WebP, verified by decoding with Pillow), pixel count
(decompression bombs are 413), message count and length, option ranges, JSON
that is not UTF-8, nested too deeply or holds lone surrogates. Every error is
``{"error": {"code", "message"}}`` with a 4xx status. One model serves one
request at a time: others wait in a bounded queue (503 when it is full), they
never run concurrently.

Uploaded images live in ``out_dir/uploads`` only while their request runs:
they are deleted when it ends, answered or failed, and are never served.
``/files/NAME`` serves only photos this server process wrote to
``out_dir/photos`` (by name, and never through a symlink leading elsewhere).
"""
from __future__ import annotations

import asyncio
import json
import logging
import re
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterable
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
from mmdialog.sdk.server.limits import ApiError, BodyLimit, Limits, RequestGuard, check_api_key, decode_image, host_names

log = logging.getLogger("mmdialog.server")
FILE_NAME = re.compile(r"^[0-9a-f]{32}\.png$")
SURROGATE = re.compile(r"[\ud800-\udfff]")
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


def create_app(model_or_factory: Any, out_dir: str | Path | None = None, limits: Limits | None = None, *,
               allowed_hosts: Iterable[str] = (), api_key: str | None = None, **gen_defaults: Any):
    """A FastAPI app serving ``model_or_factory`` (a ``DialogueModel``, or a
    callable ``photos_dir -> Session``). Shared photos go to ``out_dir/photos``
    and are served from ``/files/``; uploads go to ``out_dir/uploads`` for the
    length of their request (never served). ``allowed_hosts``: names, besides
    the loopback ones, that requests may give as ``Host`` (pass the bound host
    here); ``api_key``: required on every request but the page and /health.
    ``gen_defaults`` are the session's generation options."""
    limits = limits or Limits()
    allowed = host_names(allowed_hosts)
    key = check_api_key(api_key)
    root = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="mmdialog-serve-"))
    photos_dir, uploads_dir = root / "photos", root / "uploads"
    photos_dir.mkdir(parents=True, exist_ok=True)
    uploads_dir.mkdir(parents=True, exist_ok=True)
    photos_real = photos_dir.resolve()
    shared: set[str] = set()  # names of the photos this process wrote: the only ones /files/ serves
    if callable(model_or_factory) and not hasattr(model_or_factory, "respond"):
        factory: SessionFactory = model_or_factory
    else:
        model = model_or_factory
        factory = lambda d: model.session(photos_dir=d, **gen_defaults)
    factory(photos_dir)  # fail now, not on the first request, if the options are bad

    app = FastAPI(title="mmdialog", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.root, app.state.photos_dir, app.state.limits = root, photos_dir, limits
    app.state.uploads_dir, app.state.shared_photos, app.state.allowed_hosts = uploads_dir, shared, allowed
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
        return error(422, "invalid_request", validation_message(exc))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("request failed")
        return error(500, "internal", "internal error; see the server log")

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(RequestGuard, allowed=allowed, api_key=key)  # added last: runs first

    def own_photo(name: str) -> Path | None:
        """``photos_dir/name`` if this process wrote it and it is still a plain
        file inside ``photos_dir``, else None."""
        if not FILE_NAME.match(name) or name not in shared:
            return None
        path = photos_dir / name
        try:
            if path.is_symlink() or not path.is_file() or path.resolve().parent != photos_real:
                return None
        except OSError:
            return None
        return path

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE, headers={"Content-Security-Policy":
                                           "default-src 'self'; img-src 'self' data: blob:; "
                                           "script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                           "frame-ancestors 'none'",
                                           "Referrer-Policy": "no-referrer"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "queued": state["queued"], "busy": lock.locked(), "served": state["served"]}

    @app.get("/files/{name}")
    async def files(name: str):
        path = own_photo(name)
        if path is None:
            raise ApiError(404, "not_found", "no such photo")
        return FileResponse(path, media_type="image/png")

    @app.post("/v1/chat")
    async def chat(request: Request):
        written: list[Path] = []  # this request's uploads, deleted when it ends
        try:
            req, uploads = await _parse(request, limits)
            history, last = _turns(req, uploads, limits, own_photo, uploads_dir, written)
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
        finally:
            for path in written:
                path.unlink(missing_ok=True)
        shared.update(p["url"].rsplit("/", 1)[-1] for p in result["photos"])
        state["served"] += 1
        return result

    return app


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _loads(text: str | bytes, what: str) -> Any:
    """``json.loads`` whose every failure is a 400: bad syntax, bytes that are
    not UTF-8, nesting too deep for the parser, NaN/Infinity, numbers too long."""
    try:
        return json.loads(text, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise ApiError(400, "bad_json", f"{what} is not valid JSON: {e.msg} (line {e.lineno})") from None
    except UnicodeDecodeError:
        raise ApiError(400, "bad_encoding", f"{what} is not valid UTF-8") from None
    except RecursionError:
        raise ApiError(400, "bad_json", f"{what} is not valid JSON: nested too deeply") from None
    except ValueError as e:
        first = str(e).splitlines()[0][:200] if str(e) else "bad value"
        raise ApiError(400, "bad_json", f"{what} is not valid JSON: {first}") from None


def _check_text(data: Any, what: str) -> None:
    """400 for a string holding a lone UTF-16 surrogate (a ``\\ud800`` escape):
    it cannot be encoded, saved or sent back. Iterative: depth costs no stack."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if SURROGATE.search(item):
                raise ApiError(400, "bad_text", f"{what} holds a lone surrogate (\\ud800-\\udfff): send valid "
                                                "Unicode text")
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


async def _parse(request, limits: Limits) -> tuple[ChatRequest, list[bytes]]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    uploads: list[bytes] = []
    try:
        if ctype == "multipart/form-data":
            form = await request.form(max_files=limits.max_images, max_fields=8,
                                      max_part_size=limits.max_image_bytes)
            try:
                raw_messages = form.get("messages")
                if not isinstance(raw_messages, str):
                    raise ApiError(422, "invalid_request", "multipart field 'messages' (a JSON list) is required")
                raw_options = form.get("options")
                data = {"messages": _loads(raw_messages, "field 'messages'"),
                        "options": _loads(raw_options, "field 'options'") if isinstance(raw_options, str) else {}}
                for j, f in enumerate(form.getlist("images")):
                    if isinstance(f, str):
                        raise ApiError(422, "invalid_request", "multipart 'images' must be files")
                    blob = await f.read(limits.max_image_bytes + 1)
                    if len(blob) > limits.max_image_bytes:
                        raise ApiError(413, "too_large", f"images.{j} is over {limits.max_image_bytes:,} bytes")
                    uploads.append(blob)
            finally:
                await form.close()  # the parser's spooled temporary files
        elif ctype == "application/json":
            data = _loads(await request.body(), "body")
        else:
            raise ApiError(415, "unsupported_media_type", "send application/json or multipart/form-data")
    except ApiError:
        raise
    except Exception as e:  # multipart parser limits and malformed forms
        if type(e).__name__ in ("MultiPartException", "HTTPException"):
            raise ApiError(413 if "size" in str(e).lower() or "too" in str(e).lower() else 400,
                           "bad_form", str(getattr(e, "detail", e) or e)) from None
        raise
    _check_text(data, "the request")
    try:
        return ChatRequest.model_validate(data), uploads
    except ValidationError as e:
        raise ApiError(422, "invalid_request", validation_message(e)) from None


def _turns(req: ChatRequest, uploads: list[bytes], limits: Limits, own_photo: Callable[[str], Path | None],
           uploads_dir: Path, written: list[Path]) -> tuple[list[Turn], tuple[str, list[Path]]]:
    """The request as turns; its images are checked, then written to
    ``uploads_dir`` and listed in ``written`` (the caller deletes them)."""
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
        written.append(path)
        path.write_bytes(blob)
        return path

    history: list[Turn] = []
    for i, (m, imgs) in enumerate(zip(msgs[:-1], checked[:-1])):
        photos = [Photo(description="a photo", path=save(b, e)) for b, e in imgs]
        for ref in m.photos:
            name = ref.url.rsplit("/", 1)[-1]
            path = own_photo(name) if ref.url == f"/files/{name}" else None
            if path is None:
                raise ApiError(422, "invalid_request", f"messages.{i}.photos: {ref.url[:200]!r} is not a photo this "
                                                       "server shared")
            photos.append(Photo(description=ref.description, path=path))
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
           "truncated": reply.truncated, "length_capped": reply.length_capped,
           "dropped_turns": session.dropped_turns}
    if notices:
        out["notice"] = notices[0]
    return out
