"""uvicorn, configured to hold under slow and hostile clients.

uvicorn's own guards stop short: ``timeout_keep_alive`` closes a connection
idle *between* requests, but one that never finishes its request line and
headers is held forever, and ``limit_concurrency`` answers 503 to every new
request (health checks too) once slow connections fill it. So the HTTP
protocol here is uvicorn's h11 one with two additions:

* **header timeout**: a connection whose request line and headers are not
  all in ``Limits.header_timeout_s`` after it opened (or after its last
  answer) is closed (the body has its own deadline: ``BodyLimit``);
* **connection cap**: past ``Limits.max_connections`` open connections, the
  one idle longest (no request in progress) is closed to make room; with
  none idle the new one is. The cap also stays under the process's file
  limit, so accepting never fails with "Too many open files".

h11's header size limit stays at its 16 KiB default; keep-alive idle
connections close after 5 s.
"""
from __future__ import annotations

import resource
from collections import OrderedDict
from typing import Any

from mmdialog.sdk.server.limits import Limits

KEEP_ALIVE_S = 5
SPARE_FDS = 64  # files the process needs besides its connections (model files, photos, uploads)


def raise_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(limits: Limits) -> int:
    return max(8, min(limits.max_connections, raise_file_limit() - SPARE_FDS))


def guarded_protocol(limits: Limits) -> type:
    """uvicorn's h11 protocol with the header timeout and the connection cap."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    cap = connection_cap(limits)
    idle: OrderedDict[Any, None] = OrderedDict()  # connections with no request in progress, longest idle first

    class GuardedH11Protocol(H11Protocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._waiting()
            while len(self.connections) > cap:
                oldest = next((c for c in idle if c is not self), None)
                victim = oldest if oldest is not None else self
                victim._close()
                if victim is self:
                    break

        def connection_lost(self, exc) -> None:
            idle.pop(self, None)
            self._stop_timer()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a request's headers are in
                idle.pop(self, None)
                self._stop_timer()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._waiting()

        def _waiting(self) -> None:
            idle.pop(self, None)
            idle[self] = None
            self._stop_timer()
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self._header_timeout)

        def _stop_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
                self._close()

        def _close(self) -> None:
            idle.pop(self, None)
            self._stop_timer()
            self.connections.discard(self)
            if not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


def uvicorn_config(app, limits: Limits, **kwargs: Any):
    """A ``uvicorn.Config`` for ``app`` with the guards above (``kwargs``: host,
    port, log_level, … as ``uvicorn.Config`` takes them)."""
    import uvicorn

    return uvicorn.Config(app, http=guarded_protocol(limits), timeout_keep_alive=KEEP_ALIVE_S, access_log=False,
                          **kwargs)
