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
import base64
import binascii
import io
import json
import logging
import re
import tempfile
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmdialog.core.data.schema import Photo, Turn
from mmdialog.core.errors import MMDialogError

log = logging.getLogger("mmdialog.server")
FILE_NAME = re.compile(r"^[0-9a-f]{32}\.png$")
DRAIN_BYTES = 64 * 2**20  # bodies up to limit + this are read before a 413, bigger ones cut off
IMAGE_TYPES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}


@dataclass
class Limits:
    """What one request may hold; every limit answers with a 4xx JSON error."""

    max_body_bytes: int = 24 * 2**20
    max_image_bytes: int = 8 * 2**20
    max_image_pixels: int = 40_000_000
    max_images: int = 4
    max_messages: int = 64
    max_message_chars: int = 4000
    max_new_tokens: int = 256
    max_inference_steps: int = 100
    max_beams: int = 4
    max_queue: int = 16
    image_types: tuple[str, ...] = ("PNG", "JPEG", "WEBP")


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


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


class Options(_Strict):
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=10)
    num_beams: int | None = Field(None, ge=1)
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    seed: int | None = Field(None, ge=0, lt=2**63)


class ChatRequest(_Strict):
    messages: list[Message] = Field(min_length=1)
    options: Options = Field(default_factory=Options)


def _validation_message(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "body"
    return f"{loc}: {err['msg']}"


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


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes`` (by Content-Length, or
    counted while it streams in), and ``nosniff`` on every response."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        status = None
        if length is not None and not length.isdigit():
            status, code, msg = 400, "bad_request", "invalid Content-Length"
        elif length is not None and int(length) > self.max_bytes:
            status, code, msg = 413, "too_large", (f"request body of {int(length):,} bytes is over the limit "
                                                   f"of {self.max_bytes:,}")
        if status is not None:
            if status == 413 and int(length) <= self.max_bytes + DRAIN_BYTES:
                # Read (and drop) a moderately large body, so the client gets the
                # answer instead of a connection reset while it is still sending.
                more = True
                while more:
                    message = await receive()
                    more = message["type"] == "http.request" and message.get("more_body", False)
            response = JSONResponse({"error": {"code": code, "message": msg}}, status_code=status,
                                    headers={"X-Content-Type-Options": "nosniff", "Connection": "close"})
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(413, "too_large", f"request body is over the limit of {self.max_bytes:,} bytes")
            return message

        async def send_nosniff(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(k.lower() == b"x-content-type-options" for k, _ in headers):
                    headers.append((b"x-content-type-options", b"nosniff"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, counted, send_nosniff)


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
        raise ApiError(422, "invalid_request", _validation_message(e)) from None


def decode_image(blob: bytes | str, limits: Limits, what: str) -> tuple[bytes, str]:
    """Bytes and extension of an uploaded image, verified by decoding it."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(blob, str):
        text = blob.split(",", 1)[1] if blob.startswith("data:") and "," in blob else blob
        if len(text) * 3 // 4 > limits.max_image_bytes + 3:
            raise ApiError(413, "too_large", f"{what} is over {limits.max_image_bytes:,} bytes")
        try:
            blob = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "bad_image", f"{what} is not valid base64") from None
    if len(blob) > limits.max_image_bytes:
        raise ApiError(413, "too_large", f"{what} is over {limits.max_image_bytes:,} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(blob)) as im:
                fmt = im.format
                if fmt not in limits.image_types:
                    raise ApiError(415, "unsupported_image_type",
                                   f"{what} is {fmt or 'not an image'}; send {', '.join(limits.image_types)}")
                if im.width * im.height > limits.max_image_pixels:
                    raise ApiError(413, "too_large", f"{what} has {im.width}x{im.height} pixels, over the "
                                                     f"limit of {limits.max_image_pixels:,}")
                im.load()
    except ApiError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ApiError(415, "unsupported_image_type",
                       f"{what} is not a PNG, JPEG or WebP image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ApiError(400, "bad_image", f"{what} is damaged or truncated ({e})") from None
    return blob, IMAGE_TYPES[fmt]


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


def _options(o: Options, limits: Limits) -> dict[str, Any]:
    for name, value, cap in (("max_new_tokens", o.max_new_tokens, limits.max_new_tokens),
                             ("num_inference_steps", o.num_inference_steps, limits.max_inference_steps),
                             ("num_beams", o.num_beams, limits.max_beams)):
        if value is not None and value > cap:
            raise ApiError(422, "invalid_request", f"options.{name}: {value} is over this server's limit of {cap}")
    return {k: v for k, v in o.model_dump().items() if v is not None}


def _respond(factory: SessionFactory, photos_dir: Path, history: list[Turn],
             last: tuple[str, list[Path]], options: dict[str, Any]) -> dict[str, Any]:
    from mmdialog.sdk.session import HistoryTruncatedWarning

    session = factory(photos_dir)
    session.history = list(history)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HistoryTruncatedWarning)
        try:
            reply = session.send(last[0], images=last[1], **options)
        except MMDialogError as e:
            raise ApiError(422, "invalid_request", str(e)) from None
    notices = [str(w.message) for w in caught if issubclass(w.category, HistoryTruncatedWarning)]
    photos = [{"url": f"/files/{p.name}", "description": d.strip(),
               "source": img.info.get("source", "generated") if hasattr(img, "info") else "generated"}
              for p, d, img in zip(reply.paths, reply.descriptions, reply.images)]
    out = {"text": reply.plain, "raw_text": reply.text, "shared": reply.shared, "photos": photos,
           "truncated": reply.truncated, "dropped_turns": session.dropped_turns}
    if notices:
        out["notice"] = notices[0]
    return out


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>mmdialog chat</title><link rel="icon" href="data:,">
<style>
body{font-family:system-ui,sans-serif;max-width:46rem;margin:0 auto;padding:1rem;background:#fafafa;color:#222}
h1{font-size:1.2rem;margin:.2rem 0 1rem}
#log{display:flex;flex-direction:column;gap:.6rem;min-height:50vh}
.msg{padding:.55rem .8rem;border-radius:.8rem;max-width:80%;white-space:pre-wrap;word-wrap:break-word}
.user{align-self:flex-end;background:#d8ecff}.assistant{align-self:flex-start;background:#fff;border:1px solid #ddd}
.msg img{display:block;max-width:100%;max-height:18rem;margin-top:.4rem;border-radius:.4rem}
.caption{font-size:.8rem;color:#666}.notice{font-size:.8rem;color:#a60;align-self:center}
.error{align-self:center;color:#b00;font-size:.9rem}
form{display:flex;gap:.4rem;margin-top:1rem;position:sticky;bottom:0;background:#fafafa;padding:.5rem 0}
#message{flex:1;padding:.5rem;font-size:1rem}button{padding:.5rem 1rem}
</style></head>
<body>
<h1>mmdialog &mdash; photo-sharing chat</h1>
<div id="log" aria-live="polite"></div>
<form id="form">
  <input id="message" autocomplete="off" placeholder="Say something&hellip;" maxlength="4000">
  <input id="photo" type="file" accept="image/png,image/jpeg,image/webp" title="attach a photo">
  <button id="send" type="submit">Send</button>
</form>
<script>
"use strict";
const log = document.getElementById("log"), form = document.getElementById("form");
const input = document.getElementById("message"), file = document.getElementById("photo");
const button = document.getElementById("send");
const history = [];
function bubble(role, text, images, photos) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const p = document.createElement("div"); p.textContent = text; div.appendChild(p);
  for (const src of images || []) { const im = document.createElement("img"); im.src = src; im.alt = "your photo"; div.appendChild(im); }
  for (const ph of photos || []) {
    const im = document.createElement("img"); im.src = ph.url; im.alt = ph.description; im.className = "shared";
    div.appendChild(im);
    const c = document.createElement("div"); c.className = "caption"; c.textContent = ph.description; div.appendChild(c);
  }
  log.appendChild(div); div.scrollIntoView({block: "end"});
  return div;
}
function note(cls, text) { const d = document.createElement("div"); d.className = cls; d.textContent = text; log.appendChild(d); }
function readFile(f) {
  return new Promise((ok, fail) => { const r = new FileReader(); r.onload = () => ok(r.result); r.onerror = fail; r.readAsDataURL(f); });
}
form.addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = input.value.trim();
  const images = file.files.length ? [await readFile(file.files[0])] : [];
  if (!text && !images.length) return;
  bubble("user", text, images, []);
  history.push({role: "user", content: text, images: images});
  input.value = ""; file.value = ""; button.disabled = true;
  const waiting = bubble("assistant", "\\u2026", [], []); waiting.classList.add("pending");
  try {
    const res = await fetch("/v1/chat", {method: "POST", headers: {"Content-Type": "application/json"},
                                         body: JSON.stringify({messages: history})});
    const data = await res.json();
    waiting.remove();
    if (!res.ok) { history.pop(); note("error", data.error ? data.error.message : "request failed"); return; }
    if (data.notice) note("notice", data.notice);
    history[history.length - 1].images = [];  // photos travel once; later turns keep the text
    bubble("assistant", data.text, [], data.photos);
    history.push({role: "assistant", content: data.text,
                  photos: data.photos.map(p => ({url: p.url, description: p.description}))});
  } catch (e) {
    waiting.remove(); history.pop(); note("error", "cannot reach the server: " + e);
  } finally { button.disabled = false; input.focus(); }
});
</script>
</body></html>
"""
