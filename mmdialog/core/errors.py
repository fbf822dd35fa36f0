"""One hierarchy of user-facing errors: the CLI prints any ``MMDialogError``
as one line and exits with status 2; anything else is a bug and keeps its
traceback."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class MMDialogError(Exception):
    """Base class of errors caused by the user's input, not by a bug."""


class ConfigError(MMDialogError, ValueError):
    """A config, preset, plugin name or checkpoint folder that cannot be used."""


class UnsafeFileError(ConfigError):
    """A received file that only code could load: refused, and never passed over for a fallback."""


class PluginError(ConfigError):
    """An unknown plugin name or a plugin that failed to register."""


class DataError(MMDialogError, ValueError):
    """Bad or unreadable user data. ``str(err)`` is one line: ``FILE[ record R]: what``."""

    def __init__(self, message: str, *, file: str | None = None, record: str | None = None) -> None:
        super().__init__(" ".join(str(message).split()))
        self.file = file
        self.record = record


class ImageError(MMDialogError):
    """A photo given to a session that cannot be used."""


class TrainingError(MMDialogError):
    """A run that had to stop (non-finite loss, out of memory)."""


class DependencyError(MMDialogError, ImportError):
    """An optional extra that the asked-for feature needs is missing or does not import."""


def validation_message(error: ValidationError, prefix: str = "") -> str:
    """The first problem of a pydantic ``ValidationError`` as ``a.b.c: message``."""
    err = error.errors()[0]
    loc = ".".join(str(x) for x in (prefix, *err["loc"]) if x != "") or "value"
    return f"{loc}: {err['msg'].removeprefix('Value error, ')}"  # a validator's own message
