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
    GET  /health      {"status": "ok", "model", "queued", "busy", "served", "batches", "photos_kept"} (also HEAD)
    GET  /files/NAME  a photo the model shared (only this server's own folder; the newest
                      ``Limits.keep_photos``, for ``Limits.keep_photos_s``)
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
they are deleted when its reply is written (or it failed, was refused with
503, or its stream was cut), and are never served. ``/files/NAME`` serves only
photos this server process wrote to ``out_dir/photos`` (by name, and never
through a symlink leading elsewhere).

Where things live: ``routes.py`` (the routes and ``Server``, the one path of a
request to the model), ``completions.py`` (the OpenAI route), ``guard.py``
(Host/Origin/API key, CORS), ``limits.py`` (sizes, times, the body
middleware, images), ``schema.py`` (request and response shapes),
``batching.py`` (the queue), ``photos.py`` (the shared photos and their
bounds), ``serving.py`` (uvicorn with header timeouts and a connection cap).
"""
from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmdialog.core.errors import validation_message
from mmdialog.sdk.server import completions, routes
from mmdialog.sdk.server.guard import RequestGuard, check_api_key, host_names
from mmdialog.sdk.server.limits import ApiError, BodyLimit, Limits, error_response
from mmdialog.sdk.server.routes import Server, SessionFactory
from mmdialog.sdk.server.schema import ChatRequest, ChatResponse, Completion, CompletionRequest

log = logging.getLogger("mmdialog.server")
access_log = logging.getLogger("mmdialog.server.access")


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
    if callable(model_or_factory) and not hasattr(model_or_factory, "respond"):
        factory: SessionFactory = model_or_factory
    else:
        model = model_or_factory
        factory = lambda d: model.session(photos_dir=d, **gen_defaults)
    server = Server(factory, root, limits, name)
    factory(server.photos_dir)  # fail now, not on the first request, if the options are bad

    app = FastAPI(title="mmdialog", summary=f"serving {name}", docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json")
    app.state.server, app.state.name, app.state.root = server, name, root
    app.state.counters = server.batcher.counters
    _errors(app)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, timeout_s=limits.body_timeout_s)
    app.add_middleware(RequestGuard, allowed=allowed, api_key=key)
    app.add_middleware(AccessLog)  # added last: runs first, sees every answer (the guard's too)
    _routes(app)
    _with_request_schemas(app, ChatRequest, CompletionRequest)
    return app


def _routes(app: FastAPI) -> None:
    add = app.add_api_route
    add("/", routes.page, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)
    add("/docs", routes.docs, methods=["GET"], response_class=HTMLResponse, include_in_schema=False)
    add("/health", routes.health, methods=["GET"], summary="Liveness and load")
    add("/health", routes.health, methods=["HEAD"], include_in_schema=False)  # load balancers probe with HEAD
    add("/v1/models", routes.models, methods=["GET"], summary="The model this server serves (OpenAI format)")
    add("/files/{file}", routes.files, methods=["GET"], summary="A photo this server shared",
        response_class=FileResponse)
    add("/v1/chat", routes.chat, methods=["POST"], summary="The next reply, with its photos",
        openapi_extra=_body_schema(ChatRequest), responses={200: {"model": ChatResponse}})
    add("/v1/chat/completions", completions.completions, methods=["POST"],
        summary="The next reply in the OpenAI chat format (stream: SSE)",
        openapi_extra=_body_schema(CompletionRequest), responses={200: {"model": Completion}})


def _errors(app: FastAPI) -> None:
    """Every error is ``{"error": {"code", "message", "type"[, "param"]}}``."""

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}
        return error_response(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        return error_response(422, "invalid_request", validation_message(exc))

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.exception("request failed")
        return error_response(500, "internal", "internal error; see the server log")


class AccessLog:
    """ASGI middleware: one ``mmdialog.server.access`` line per request, when
    its answer ends: client, method, path (never the query: it may hold the
    page's key), status, bytes sent, milliseconds."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, sent = time.perf_counter(), 0, 0

        async def counted(message):
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            client = scope.get("client") or ("-", 0)
            access_log.info('%s "%s %s" %d %dB %.0fms', client[0], scope["method"], scope["path"], status or 500,
                            sent, (time.perf_counter() - start) * 1000)


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
