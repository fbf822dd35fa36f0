"""What one request may hold, and the checks that hold it to that before the
model runs: who may ask (``RequestGuard``: Host, Origin, API key), the
body-size middleware and the image decoder."""
from __future__ import annotations

import base64
import binascii
import hmac
import io
import ipaddress
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

from starlette.responses import JSONResponse

from mmdialog.core.errors import ConfigError

DRAIN_BYTES = 64 * 2**20  # bodies up to limit + this are read before a 413, bigger ones cut off
IMAGE_TYPES = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp"}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/", "/health", "/docs", "/openapi.json"})  # GET/HEAD of these need no API key
_HOST_NAME = re.compile(r"^[a-z0-9._-]+$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


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
    max_batch: int = 8  # requests answered together by one respond_batch
    max_queue: int = 16  # requests waiting, beyond the next batch, before 503
    image_types: tuple[str, ...] = ("PNG", "JPEG", "WEBP")


def split_host(value: str) -> tuple[str, int | None] | None:
    """``(name, port)`` of a ``Host`` header (``name[:port]``, ``[v6][:port]``),
    the name lowercased; None when it is malformed."""
    value = value.lower()
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[:end + 1], value[end + 1:]
        try:
            ipaddress.IPv6Address(name[1:-1])
        except ValueError:
            return None
    else:
        name, colon, port = value.partition(":")
        rest = colon + port
        if not _HOST_NAME.match(name):
            return None
    if not rest:
        return name, None
    port = rest[1:]
    if rest[0] != ":" or not (port.isascii() and port.isdigit()) or len(port) > 5 or not 0 < int(port) < 65536:
        return None
    return name, int(port)


def host_names(extra: Iterable[str] = ()) -> frozenset[str]:
    """The loopback names plus ``extra`` (names or addresses; bare IPv6 is
    bracketed, a port is ignored), normalized as ``split_host`` gives them."""
    names = set(LOOPBACK_HOSTS)
    for entry in extra:
        entry = str(entry).strip()
        try:
            entry = f"[{ipaddress.IPv6Address(entry)}]"
        except ValueError:
            pass
        parsed = split_host(entry)
        if parsed is None:
            raise ConfigError(f"allowed host {entry!r} is not a host name or IP address")
        names.add(parsed[0])
    return frozenset(names)


def check_api_key(api_key: str | None) -> bytes | None:
    if api_key is None:
        return None
    if not isinstance(api_key, str) or not api_key or not all("!" <= c <= "~" for c in api_key):
        raise ConfigError("the API key must be a non-empty string of printable ASCII without spaces")
    return api_key.encode("ascii")


class RequestGuard:
    """ASGI middleware run before anything reads the body:

    * ``Host`` must name this server (``allowed``: loopback names, the bound
      host, ``--allowed-host``; or the address the connection came in on),
      else 400 ``bad_host``: a DNS-rebinding page cannot talk to it;
    * a state-changing request (not GET/HEAD/OPTIONS) that carries ``Origin``
      must come from this server's own origin (an allowed name on the port of
      its ``Host``), and one a browser marks ``Sec-Fetch-Site: cross-site`` or
      ``same-site`` is refused too, else 403 ``foreign_origin``; requests with
      no ``Origin`` (curl, scripts) pass;
    * with ``api_key`` set, everything but GET ``/`` and ``/health`` needs
      ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``, else 401."""

    def __init__(self, app, allowed: frozenset[str], api_key: bytes | None = None) -> None:
        self.app, self.allowed, self.api_key = app, allowed, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        problem = self.check(scope)
        if problem is None:
            return await self.app(scope, receive, send)
        status, code, message = problem
        headers = {"X-Content-Type-Options": "nosniff", "Connection": "close"}
        if status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="mmdialog"'
        response = JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)
        await response(scope, receive, send)

    def _allowed(self, name: str, scope) -> bool:
        if name in self.allowed:
            return True
        server = scope.get("server")  # the local address this connection came in on
        if not server or not server[0]:
            return False
        try:
            local = ipaddress.ip_address(server[0])
        except ValueError:
            return False
        return name == (f"[{local}]" if local.version == 6 else str(local))

    def check(self, scope) -> tuple[int, str, str] | None:
        headers: dict[bytes, list[bytes]] = {}
        for k, v in scope["headers"]:
            headers.setdefault(k.lower(), []).append(v)
        hosts = headers.get(b"host", [])
        host = split_host(hosts[0].decode("latin-1")) if len(hosts) == 1 else None
        if host is None or not self._allowed(host[0], scope):
            return 400, "bad_host", ("the Host header does not name this server; reach it by an address it serves "
                                     "(start it with --allowed-host NAME to add one)")
        method = scope["method"].upper()
        if method not in SAFE_METHODS:
            origins = headers.get(b"origin")
            if origins is not None:
                if len(origins) != 1 or not self._same_origin(origins[0].decode("latin-1"), host, scope):
                    return 403, "foreign_origin", ("requests from other web pages are not accepted (Origin is "
                                                   "not this server)")
            elif headers.get(b"sec-fetch-site", [b""])[0].lower() in (b"cross-site", b"same-site"):
                return 403, "foreign_origin", "requests from other web pages are not accepted"
        if self.api_key is not None and not (method in ("GET", "HEAD") and scope["path"] in OPEN_PATHS):
            if not self._has_key(headers):
                return 401, "unauthorized", ("this server needs an API key: send 'Authorization: Bearer KEY' or "
                                             "'X-API-Key: KEY' (in a browser, open the page as /?key=KEY)")
        return None

    def _same_origin(self, origin: str, host: tuple[str, int | None], scope) -> bool:
        scheme, sep, authority = origin.partition("://")
        scheme = scheme.lower()
        if not sep or scheme not in _DEFAULT_PORTS:
            return False  # includes "null" (sandboxed frames, file: pages)
        parsed = split_host(authority)
        if parsed is None or not self._allowed(parsed[0], scope):
            return False
        default = _DEFAULT_PORTS[scheme]
        return (parsed[1] or default) == (host[1] or default)

    def _has_key(self, headers: dict[bytes, list[bytes]]) -> bool:
        candidates = list(headers.get(b"x-api-key", []))
        for value in headers.get(b"authorization", []):
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                candidates.append(token)
        ok = False
        for token in candidates:  # compare every one, in constant time
            ok |= hmac.compare_digest(token.strip(), self.api_key)
        return ok


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
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        cap = min(limits.max_image_pixels, Image.MAX_IMAGE_PIXELS or limits.max_image_pixels)
        raise ApiError(413, "too_large", f"{what} declares more pixels than the limit of {cap:,}") from None
    except UnidentifiedImageError:
        raise ApiError(415, "unsupported_image_type",
                       f"{what} is not a PNG, JPEG or WebP image Pillow can read") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ApiError(400, "bad_image", f"{what} is damaged or truncated ({e})") from None
    return blob, IMAGE_TYPES[fmt]


