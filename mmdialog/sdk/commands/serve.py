"""``mmdialog serve``: the HTTP API and the chat page (the app is ``sdk/server``)."""
from __future__ import annotations

import ipaddress
from pathlib import Path

import typer

from mmdialog.core.errors import MMDialogError
from mmdialog.sdk.commands import precheck
from mmdialog.sdk.commands.common import MODEL_ARG, ModelUse, load_model, model_flags


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@model_flags
def serve(
    model: str = MODEL_ARG,
    host: str = typer.Option("127.0.0.1", help="address to bind; 0.0.0.0 exposes the model to your network"),
    port: int = typer.Option(8000, min=0, max=65535),
    photos_dir: str | None = typer.Option(None, "--photos-dir", help="folder for shared photos and uploads "
                                                                        "(default: a new temporary folder)"),
    max_body_mb: float = typer.Option(24.0, min=0.001, help="largest request body"),
    max_image_mb: float = typer.Option(8.0, min=0.001, help="largest image"),
    max_images: int = typer.Option(4, min=0, help="images per request"),
    max_messages: int = typer.Option(64, min=1, help="messages per request"),
    max_queue: int = typer.Option(16, min=1, help="requests waiting beyond the next batch before 503"),
    max_batch: int = typer.Option(8, min=1, help="concurrent requests answered together (one batch)"),
    max_connections: int = typer.Option(1000, min=8, help="open connections; past it the longest-idle one is "
                                                         "closed"),
    keep_photos: int = typer.Option(1000, min=1, help="shared photos kept and served (the oldest go first; "
                                                      "each for at most 24 h)"),
    allowed_host: list[str] = typer.Option([], "--allowed-host", metavar="NAME",
                                           help="another name clients reach the server by (its Host header: a LAN "
                                                "name, a reverse proxy's); loopback names and --host are always "
                                                "allowed (repeatable)"),
    api_key: str | None = typer.Option(None, "--api-key", metavar="KEY", envvar="MMDIALOG_API_KEY",
                                       help="require 'Authorization: Bearer KEY' or 'X-API-Key: KEY' on the API "
                                            "(the page: open /?key=KEY); prefer the env var, flags show in ps"),
    *, use: ModelUse,
) -> None:
    """Serve the chat API (POST /v1/chat, OpenAI-style /v1/chat/completions, docs at /docs) and a chat page."""
    precheck.model(model)  # before torch and the model load: a typo should not cost a minute
    import logging

    import uvicorn

    from mmdialog.sdk.server import Limits, create_app
    from mmdialog.sdk.server.guard import check_api_key, host_names
    from mmdialog.sdk.server.serving import uvicorn_config

    host_names([host, *allowed_host])
    check_api_key(api_key)
    m = load_model(model, use)
    limits = Limits(max_body_bytes=int(max_body_mb * 2**20), max_image_bytes=int(max_image_mb * 2**20),
                    max_images=max_images, max_messages=max_messages, max_queue=max_queue,
                    max_batch=max_batch, max_connections=max_connections, keep_photos=keep_photos)
    app = create_app(m, photos_dir, limits, allowed_hosts=[host, *allowed_host], api_key=api_key,
                     name=Path(model).name or model, **use.options)
    if not _is_loopback(host) and api_key is None:
        typer.echo(f"warning: binding {host} makes the model reachable from other machines with no "
                   "authentication; use --api-key KEY (or MMDIALOG_API_KEY)", err=True)
    how = "; open it as /?key=YOUR_KEY" if api_key is not None else ""
    typer.echo(f"mmdialog: chat page at http://{host}:{port}/ (photos in {app.state.root}){how}", err=True)
    access = logging.StreamHandler()  # one line per request, on stderr (uvicorn's own access log is off)
    access.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logging.getLogger("mmdialog.server").addHandler(access)  # its errors, and the access lines below it
    logging.getLogger("mmdialog.server.access").setLevel(logging.INFO)
    try:
        uvicorn.Server(uvicorn_config(app, limits, host=host, port=port, log_level="warning")).run()
    except OSError as e:
        raise MMDialogError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
