"""``mmdialog chat``, ``mmdialog serve`` and ``mmdialog export``: using a trained model."""
from __future__ import annotations

import ipaddress
import json
import warnings
from pathlib import Path

import typer

from mmdialog.core.errors import MMDialogError
from mmdialog.sdk.commands import precheck
from mmdialog.sdk.commands.common import MODEL_ARG, TRUST_REMOTE_CODE, ModelUse, model_flags, quiet

HELP = """commands: /image PATH  attach a photo to your next message
          /reset       start a new conversation
          /quit        leave (or Ctrl-D)"""


def _load(model: str, use: ModelUse):
    from mmdialog.core.assembler import load

    quiet()
    typer.echo(f"loading {model} …", err=True)
    return load(model, **use.chain, trust_remote_code=use.trust_remote_code, allow_unverified=use.allow_unverified)


def _print_reply(reply, as_json: bool = False) -> None:
    photos = reply.photo_records()
    if as_json:
        typer.echo(json.dumps({"text": reply.plain, "raw_text": reply.text, "shared": reply.shared,
                               "photos": photos, "truncated": reply.truncated,
                               "length_capped": reply.length_capped}))
        return
    typer.echo(reply.plain)
    for ph in photos:
        # Where it came from: a real photo of the library, or drawn by the generator (noise when random-init).
        origin = (f"retrieved from the library: {Path(ph['file']).name}" if ph["source"] == "retrieved"
                  else f"drawn by {ph['plugin']}")
        typer.echo(f"photo: {ph['path']}  — {ph['description']} ({origin})")


def _send(session, text: str, images: list[str], as_json: bool = False):
    from mmdialog.core.session import HistoryTruncatedWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HistoryTruncatedWarning)
        reply = session.send(text, images=images)
    for w in caught:
        if issubclass(w.category, HistoryTruncatedWarning):
            typer.echo(f"note: {w.message}", err=True)
    _print_reply(reply, as_json)
    return reply


@model_flags
def chat(
    model: str = MODEL_ARG,
    message: list[str] = typer.Option([], "--message", "-m", help="send a message, print the reply, exit; "
                                                                  "repeated: one conversation, printed turn by turn"),
    image: list[str] = typer.Option([], "--image", "-i", help="photo to attach to the first --message (repeatable)"),
    photos_dir: str | None = typer.Option(None, "--photos-dir", help="where shared photos are saved "
                                                                        "(default: a new temporary folder)"),
    as_json: bool = typer.Option(False, "--json", help="with --message: print the reply as one JSON line"),
    *, use: ModelUse,
) -> None:
    """Chat in the terminal. Shared photos are saved and their paths printed."""
    from mmdialog.core.session import Session, check_image  # no torch yet

    if image and not message:
        raise MMDialogError("--image goes with --message; in the interactive chat type /image PATH")
    precheck.model(model)  # before torch and the model load: a typo should not cost a minute
    for path in image:
        check_image(Path(path).expanduser())
    m = _load(model, use)
    session = Session(m, photos_dir=photos_dir, options=use.generation)
    if message:
        for i, text in enumerate(message):  # several: a scripted conversation (`make demo` ends with one)
            if len(message) > 1 and not as_json:
                typer.echo(f"you> {text}\nassistant> ", nl=False)
            _send(session, text, image if i == 0 else [], as_json)
        return
    typer.echo(f"chatting with {model}; photos are saved in {session.photos_dir}\n{HELP}", err=True)
    pending: list[str] = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            typer.echo("", err=True)
            return
        if not line:
            continue
        try:
            if line.startswith("/"):
                cmd, _, arg = line.partition(" ")
                if cmd in ("/quit", "/exit"):
                    return
                if cmd == "/help":
                    typer.echo(HELP)
                elif cmd == "/reset":
                    session.reset()
                    pending.clear()
                    typer.echo("(new conversation)")
                elif cmd == "/image":
                    if not arg.strip():
                        raise MMDialogError("usage: /image PATH")
                    path = Path(arg.strip().strip("'\"")).expanduser()
                    check_image(path)
                    pending.append(str(path))
                    typer.echo(f"(attached {path.name}; it goes with your next message)")
                else:
                    raise MMDialogError(f"unknown command {cmd}; try /help")
                continue
            typer.echo("assistant> ", nl=False)
            _send(session, line, pending)
            pending.clear()
        except MMDialogError as e:
            typer.echo(f"error: {e}", err=True)


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
    m = _load(model, use)
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


def export(
    ckpt: str | None = typer.Argument(None, help="trainable.pt, a Lightning .ckpt, or a run folder"),
    out_dir: str | None = typer.Argument(None, help="new folder to write"),
    metrics: str | None = typer.Option(None, help="JSON file of evaluation metrics for the model card"),
    force: bool = typer.Option(False, "--force", help="replace OUT_DIR if it is not empty"),
    upgrade: str | None = typer.Option(None, "--upgrade", metavar="FOLDER",
                                       help="instead: re-hash an exported folder written by an older mmdialog "
                                            "(manifest format 1 or 2) in place, so it loads verified; only one "
                                            "you trust"),
    trust_remote_code: bool = TRUST_REMOTE_CODE,
) -> None:
    """Write a self-contained model folder: config, trainable weights, tokenizer additions, model card."""
    if upgrade is not None:
        from mmdialog.core.export import read_manifest, upgrade_folder

        if ckpt is not None or out_dir is not None:
            raise MMDialogError("--upgrade FOLDER re-hashes that folder in place; give no CKPT or OUT_DIR with it")
        folder, before = upgrade_folder(Path(upgrade).expanduser())
        typer.echo(f"{folder}: manifest format {before} → {read_manifest(folder).format_version}; every file "
                   "that decides what loads has its SHA-256 recorded")
        return
    if ckpt is None or out_dir is None:
        raise MMDialogError("give CKPT and OUT_DIR (mmdialog export RUN/trainable.pt OUT), or --upgrade FOLDER")
    precheck.checkpoints([ckpt])  # before torch: a typo should not cost seconds
    from mmdialog.core.export import check_destination, check_folder, read_manifest

    check_destination(out_dir, force)  # before the model builds: a typo should not cost a minute
    quiet()
    from mmdialog.core.assembler import export as run

    out = run(ckpt, out_dir, metrics, overwrite=force, trust_remote_code=trust_remote_code)
    check_folder(out)
    manifest = read_manifest(out)
    typer.echo(f"exported {manifest.model_extra['num_tensors']} trainable tensors "
               f"({manifest.model_extra['num_parameters']:,} parameters) to {out}")
    typer.echo(f"use it: mmdialog chat {out}   |   mmdialog.load({str(out)!r}).session()")
