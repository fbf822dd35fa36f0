"""What one request may hold and what the server holds at once, and the
checks that keep requests to that before the model runs: the body middleware
(size, time, ``Connection: close`` when a body is refused) and the image
decoder. Who may ask is ``guard.py``."""
from __future__ import annotations

import asyncio
import base64
import binascii
import io
import time
import warnings
from dataclasses import dataclass

from starlette.responses import JSONResponse

# Bodies declared up to limit + this are read (and dropped, for at most
# DRAIN_SECONDS) before the 413, so the client reads the answer instead of a
# connection reset while it still sends; anything else is not read at all.
DRAIN_BYTES = 4 * 2**20
DRAIN_SECONDS = 5.0
IMAGE_TYPES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}


class ApiError(Exception):
    """A 4xx/5xx answer: ``{"error": {"code", "message", "param"}}``; ``param``
    names the request field at fault (as OpenAI's errors do), when there is one."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


def error_response(status: int, code: str, message: str, param: str | None = None, *, close: bool = False,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The one shape of every error; ``close``: end the connection after it
    (the request's body was not, or not all, read)."""
    error = {"code": code, "message": message, "type": "invalid_request_error" if status < 500 else "server_error"}
    if param is not None:
        error["param"] = param
    extra = {"X-Content-Type-Options": "nosniff", **(headers or {})}
    if close:
        extra["Connection"] = "close"
    return JSONResponse({"error": error}, status_code=status, headers=extra)


@dataclass
class Limits:
    """What one request may hold (every limit answers with a 4xx JSON error)
    and what the server holds at once."""

    max_body_bytes: int = 24 * 2**20
    max_image_bytes: int = 8 * 2**20
    max_image_pixels: int = 40_000_000
    max_images: int = 4  # images *and* photo references, in all messages of a request
    max_messages: int = 64
    max_message_chars: int = 4000
    max_new_tokens: int = 256
    max_inference_steps: int = 100
    max_beams: int = 4
    max_batch: int = 8  # requests answered together by one respond_batch
    max_queue: int = 16  # requests waiting, beyond the next batch, before 503
    image_types: tuple[str, ...] = ("PNG", "JPEG", "WEBP")
    body_timeout_s: float = 60.0  # the whole body must arrive within this (408 after)
    header_timeout_s: float = 10.0  # a connection's request line and headers, likewise (closed after)
    max_connections: int = 1000  # open connections; beyond it the longest-idle one is closed
    keep_photos: int = 1000  # shared photos kept (and served) at most; the oldest go first
    keep_photos_s: float = 24 * 3600.0  # and for at most this long


class BodyLimit:
    """ASGI middleware for the request body: 413 for one over ``max_bytes``
    (by Content-Length, or counted while it streams in), 408 when it takes
    longer than ``timeout_s``; any answer sent before the body was all read
    carries ``Connection: close``, so the server reads no more of it. Adds
    ``nosniff`` to every response."""

    def __init__(self, app, max_bytes: int, timeout_s: float = 60.0) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and not length.isdigit():
            return await error_response(400, "bad_request", "invalid Content-Length", close=True)(scope, receive, send)
        if length is not None and int(length) > self.max_bytes:
            if int(length) <= self.max_bytes + DRAIN_BYTES:
                await _drain(receive, DRAIN_SECONDS)
            message = f"request body of {int(length):,} bytes is over the limit of {self.max_bytes:,}"
            return await error_response(413, "too_large", message, close=True)(scope, receive, send)
        seen, done = 0, scope["method"] in ("GET", "HEAD") and length in (None, b"0")
        deadline = time.monotonic() + self.timeout_s

        async def counted():
            nonlocal seen, done
            if done:  # the body is in: the app now only waits for a disconnect
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0.001))
            except asyncio.TimeoutError:
                raise ApiError(408, "body_timeout", f"the request body did not arrive within "
                                                    f"{self.timeout_s:g} s") from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise ApiError(413, "too_large", f"request body is over the limit of {self.max_bytes:,} bytes")
                done = not message.get("more_body", False)
            else:
                done = True
            return message

        async def send_checked(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection" or done]
                if not any(k.lower() == b"x-content-type-options" for k, _ in headers):
                    headers.append((b"x-content-type-options", b"nosniff"))
                if not done:  # answered before the body ended: read none of the rest
                    headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, counted, send_checked)


async def _drain(receive, seconds: float) -> None:
    """Read and drop the body for up to ``seconds``."""
    async def read_all():
        while (await receive()).get("more_body", False):
            pass

    try:
        await asyncio.wait_for(read_all(), seconds)
    except asyncio.TimeoutError:
        pass


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
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        cap = min(limits.max_image_pixels, Image.MAX_IMAGE_PIXELS or limits.max_image_pixels)
        raise ApiError(413, "too_large", f"{what} declares more pixels than the limit of {cap:,}") from None
    except UnidentifiedImageError:
        raise ApiError(415, "unsupported_image_type",
                       f"{what} is not a PNG, JPEG or WebP image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ApiError(400, "bad_image", f"{what} is damaged or truncated ({e})") from None
    return blob, IMAGE_TYPES[fmt]


