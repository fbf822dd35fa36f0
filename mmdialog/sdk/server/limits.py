"""What one request may hold, and the checks that hold it to that before the
model runs: the body-size middleware and the image decoder."""
from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

from starlette.responses import JSONResponse

DRAIN_BYTES = 64 * 2**20  # bodies up to limit + this are read before a 413, bigger ones cut off
IMAGE_TYPES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


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


