"""``mmdialog chat``, ``mmdialog serve`` and ``mmdialog export``.

``register(app)`` adds them to the ``mmdialog`` typer app (``sdk/cli.py``).
User errors raise ``MMDialogError``: ``cli.main`` prints them as one line.
"""
from __future__ import annotations

import ipaddress
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import typer

from mmdialog.core.config import chain_spec
from mmdialog.core.errors import ConfigError, MMDialogError

MODEL_ARG = typer.Argument("tiny", help="an exported folder, a training checkpoint (trainable.pt, .ckpt, run "
                                        "folder), a preset (tiny, paper) or a YAML config")
GENERATOR = typer.Option(None, "--generator", "-g",
                         help="swap the generator: library (share real photos), library,sd (retrieve, else "
                              "draw), sd, …")
LIBRARY = typer.Option(None, "--library", help="photo folder for the library generator (captions.json or "
                                               "file names); default: the embedded photos")
MAX_NEW = typer.Option(64, "--max-new-tokens", min=1, max=4096, help="reply length limit (tokens)")
TEMPERATURE = typer.Option(0.0, "--temperature", min=0.0, help="0 = greedy")
BEAMS = typer.Option(1, "--beams", min=1, max=16, help="beam search width")
STEPS = typer.Option(None, "--steps", min=1, max=1000, help="diffusion steps (default: the generator's)")
GUIDANCE = typer.Option(None, "--guidance", min=0.0, help="classifier-free guidance scale")
SEED = typer.Option(None, "--seed", min=0, help="fix sampling and diffusion noise")

HELP = """commands: /image PATH  attach a photo to your next message
          /reset       start a new conversation
          /quit        leave (or Ctrl-D)"""


def generator_spec(generator: str | None, library: str | None = None) -> dict[str, Any] | None:
    """``"library,sd"`` → ``{"name": "library", "fallback": {"name": "sd"}}``; ``--library`` sets its folder."""
    if generator is None:
        if library is not None:
            generator = "library"
        else:
            return None
    try:
        spec = chain_spec(generator)
    except ConfigError as e:
        raise MMDialogError(f"--generator {e}") from None
    if library is not None:
        if spec["name"] != "library":
            raise MMDialogError("--library needs the library generator first: --generator library[,sd]")
        folder = Path(library).expanduser()
        if not folder.is_dir():
            raise MMDialogError(f"--library '{library}' is not a folder of photos")
        spec["folder"] = str(folder.resolve())
    return spec


def _quiet() -> None:
    """Loading progress bars and library deprecation notes are not for chat users."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _load(model: str, generator: str | None, library: str | None):
    from mmdialog.core.config import PRESETS
    from mmdialog.sdk.export import load

    spec = generator_spec(generator, library)
    if model not in PRESETS and not Path(model).expanduser().exists():
        raise MMDialogError(f"model '{model}' does not exist; give an exported folder (`mmdialog export`), "
                            f"a training checkpoint, or a preset ({', '.join(PRESETS)})")
    _quiet()
    typer.echo(f"loading {model} …", err=True)
    return load(model, generator=spec)


def _print_reply(reply, as_json: bool = False) -> None:
    photos = [{"path": str(p), "description": d.strip(),
               "source": img.info.get("source", "generated") if hasattr(img, "info") else "generated"}
              for p, d, img in zip(reply.paths, reply.descriptions, reply.images)]
    if as_json:
        typer.echo(json.dumps({"text": reply.plain, "raw_text": reply.text, "shared": reply.shared,
                               "photos": photos, "truncated": reply.truncated}))
        return
    typer.echo(reply.plain)
    for ph in photos:
        src = ph["source"]
        origin = f" (library: {Path(src).name})" if src and not src.startswith("generated") else ""
        typer.echo(f"photo: {ph['path']}  — {ph['description']}{origin}")


def _send(session, text: str, images: list[str], as_json: bool = False):
    from mmdialog.sdk.session import HistoryTruncatedWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HistoryTruncatedWarning)
        reply = session.send(text, images=images)
    for w in caught:
        if issubclass(w.category, HistoryTruncatedWarning):
            typer.echo(f"note: {w.message}", err=True)
    _print_reply(reply, as_json)
    return reply


def chat(
    model: str = MODEL_ARG,
    message: str | None = typer.Option(None, "--message", "-m", help="send one message, print the reply, exit"),
    image: list[str] = typer.Option([], "--image", "-i", help="photo to attach to --message (repeatable)"),
    photos_dir: str | None = typer.Option(None, "--photos-dir", help="where shared photos are saved "
                                                                        "(default: a new temporary folder)"),
    generator: str | None = GENERATOR,
    library: str | None = LIBRARY,
    max_new_tokens: int = MAX_NEW,
    temperature: float = TEMPERATURE,
    beams: int = BEAMS,
    steps: int | None = STEPS,
    guidance: float | None = GUIDANCE,
    seed: int | None = SEED,
    as_json: bool = typer.Option(False, "--json", help="with --message: print the reply as one JSON line"),
) -> None:
    """Chat in the terminal. Shared photos are saved and their paths printed."""
    from mmdialog.sdk.session import Session, check_image

    if image and message is None:
        raise MMDialogError("--image goes with --message; in the interactive chat type /image PATH")
    for path in image:  # before the model loads: a typo should not cost a minute
        check_image(Path(path).expanduser())
    m = _load(model, generator, library)
    session = Session(m, photos_dir=photos_dir, max_new_tokens=max_new_tokens, temperature=temperature,
                      num_beams=beams, num_inference_steps=steps, guidance_scale=guidance, seed=seed)
    if message is not None:
        _send(session, message, image, as_json)
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


def serve(
    model: str = MODEL_ARG,
    host: str = typer.Option("127.0.0.1", help="address to bind; 0.0.0.0 exposes the model to your network"),
    port: int = typer.Option(8000, min=0, max=65535),
    photos_dir: str | None = typer.Option(None, "--photos-dir", help="folder for shared photos and uploads "
                                                                        "(default: a new temporary folder)"),
    generator: str | None = GENERATOR,
    library: str | None = LIBRARY,
    max_new_tokens: int = MAX_NEW,
    temperature: float = TEMPERATURE,
    beams: int = BEAMS,
    steps: int | None = STEPS,
    guidance: float | None = GUIDANCE,
    seed: int | None = SEED,
    max_body_mb: float = typer.Option(24.0, min=0.001, help="largest request body"),
    max_image_mb: float = typer.Option(8.0, min=0.001, help="largest image"),
    max_images: int = typer.Option(4, min=0, help="images per request"),
    max_messages: int = typer.Option(64, min=1, help="messages per request"),
    max_queue: int = typer.Option(16, min=1, help="requests waiting for the model before 503"),
) -> None:
    """Serve a JSON chat API (POST /v1/chat) and a chat page (/) over HTTP."""
    import uvicorn

    from mmdialog.sdk.server import Limits, create_app

    m = _load(model, generator, library)
    limits = Limits(max_body_bytes=int(max_body_mb * 2**20), max_image_bytes=int(max_image_mb * 2**20),
                    max_images=max_images, max_messages=max_messages, max_queue=max_queue)
    app = create_app(m, photos_dir, limits, max_new_tokens=max_new_tokens, temperature=temperature,
                     num_beams=beams, num_inference_steps=steps, guidance_scale=guidance, seed=seed)
    if not _is_loopback(host):
        typer.echo(f"warning: binding {host} makes the model reachable from other machines; "
                   "there is no authentication", err=True)
    typer.echo(f"mmdialog: chat page at http://{host}:{port}/ (photos in {app.state.root})", err=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
    except OSError as e:
        raise MMDialogError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def export(
    ckpt: str = typer.Argument(..., help="trainable.pt, a Lightning .ckpt, or a run folder"),
    out_dir: str = typer.Argument(..., help="new folder to write"),
    metrics: str | None = typer.Option(None, help="JSON file of evaluation metrics for the model card"),
    force: bool = typer.Option(False, "--force", help="replace OUT_DIR if it is not empty"),
) -> None:
    """Write a self-contained model folder: config, trainable weights, tokenizer additions, model card."""
    from mmdialog.sdk.export import check_folder
    from mmdialog.sdk.export import export as run

    if not Path(ckpt).expanduser().exists():
        raise MMDialogError(f"checkpoint '{ckpt}' does not exist; give the trainable.pt or .ckpt written by "
                            "`mmdialog train`")
    _quiet()
    out = run(ckpt, out_dir, metrics, overwrite=force)
    check_folder(out)
    manifest = json.loads((out / "mmdialog.json").read_text())
    typer.echo(f"exported {manifest['num_tensors']} trainable tensors ({manifest['num_parameters']:,} parameters) "
               f"to {out}")
    typer.echo(f"use it: mmdialog chat {out}   |   mmdialog.load({str(out)!r}).session()")


COMMANDS = {"chat": chat, "serve": serve, "export": export}


def register(app: typer.Typer) -> None:
    """Add ``chat``, ``serve`` and ``export`` to ``app`` (once; a second call does nothing)."""
    have = {c.name or (c.callback.__name__ if c.callback else None) for c in app.registered_commands}
    for name, fn in COMMANDS.items():
        if name not in have:
            app.command(name)(fn)


if __name__ == "__main__":  # python -m mmdialog.sdk.commands … (same as the mmdialog command)
    from mmdialog.sdk import cli

    register(cli.app)
    sys.argv[0] = "mmdialog"
    cli.main()
