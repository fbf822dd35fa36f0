"""``mmdialog chat``: a conversation with a trained model in the terminal."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import typer

from mmdialog.core.errors import MMDialogError
from mmdialog.sdk.commands import precheck
from mmdialog.sdk.commands.common import MODEL_ARG, ModelUse, load_model, model_flags

HELP = """commands: /image PATH  attach a photo to your next message
          /reset       start a new conversation
          /quit        leave (or Ctrl-D)"""


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

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HistoryTruncatedWarning)  # said here, from the reply
        reply = session.send(text, images=images)
    if reply.notice:
        typer.echo(f"note: {reply.notice}", err=True)
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
    m = load_model(model, use)
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
