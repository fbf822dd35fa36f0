"""Who may ask: the ``Host`` / ``Origin`` / API-key guard that runs before
any body is read, and the server's CORS stance.

CORS: none. The API is for this server's own page and for programs (curl,
SDKs), never for other web pages: no response carries an
``Access-Control-Allow-*`` header, so browsers keep other origins from
reading any answer, and a CORS preflight (``OPTIONS`` with
``Access-Control-Request-Method``) is 403 ``cors_refused``. A page on another
origin that needs the model goes through its own backend.
"""
from __future__ import annotations

import hmac
import ipaddress
import re
from collections.abc import Iterable

from mmdialog.core.errors import ConfigError
from mmdialog.sdk.server.limits import error_response

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/", "/health", "/docs", "/openapi.json"})  # GET/HEAD of these need no API key
_HOST_NAME = re.compile(r"^[a-z0-9._-]+$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


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
        headers = {"WWW-Authenticate": 'Bearer realm="mmdialog"'} if status == 401 else {}
        await error_response(status, code, message, close=True, headers=headers)(scope, receive, send)

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
        if method == "OPTIONS" and b"access-control-request-method" in headers:
            return 403, "cors_refused", ("cross-origin requests are not supported: call this API from its own page "
                                         "or from a program (no CORS headers are sent)")
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
