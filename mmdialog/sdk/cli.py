"""The ``mmdialog`` command: one table of commands, each implemented in
``sdk/commands/``. User errors (``MMDialogError``: bad config, unknown
plugin, missing checkpoint, bad data) print one line and exit with status 2,
caught here and only here (``one_line_errors``, around every command); bugs
keep their traceback."""
from __future__ import annotations

import functools
import os
import sys
from typing import Any

import typer

from mmdialog.core.errors import MMDialogError
from mmdialog.sdk.commands import chat, data, evaluate, export, info, serve, train

#: name → function (a command) or Typer app (a group of commands).
COMMANDS = {
    "train": train.train,          # train a model (end-to-end by default)
    "eval": evaluate.evaluate,     # per-turn evaluation: BLEU, ROUGE-L, intent F1, FID/IS
    "chat": chat.chat,             # chat in the terminal
    "serve": serve.serve,          # HTTP API + chat page
    "export": export.export,       # a self-contained model folder from a training checkpoint
    "plugins": info.plugins,       # every plugin found
    "config": info.config_app,     # show / check configs
    "data": data.data_app,         # check, fetch photos of, convert datasets
}

def one_line_errors(command):
    """A user error inside ``command`` is one line on stderr and exit status 2."""
    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except MMDialogError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None

    return wrapper


app = typer.Typer(help="Photo-sharing multimodal dialogue: train, inspect, run.",
                  pretty_exceptions_enable=False, no_args_is_help=True, add_completion=False)


def _version(value: bool) -> None:
    if value:
        from mmdialog import __version__

        typer.echo(f"mmdialog {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="print the version and exit")) -> None:
    """Photo-sharing multimodal dialogue: train, inspect, run."""
for name, command in COMMANDS.items():
    if isinstance(command, typer.Typer):
        for sub in command.registered_commands:
            sub.callback = one_line_errors(sub.callback)
        app.add_typer(command, name=name)
    else:
        app.command(name)(one_line_errors(command))


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
