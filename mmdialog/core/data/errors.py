"""The one exception type of the data layer.

Every problem with user data (a malformed file or record, a missing or corrupt
image, a failed download in strict mode) is a :class:`DataError` whose message
is a single line naming the file (and the record, where there is one), so a
command line can print it without a stack trace.
"""
from __future__ import annotations


class DataError(ValueError):
    """Bad or unreadable user data. ``str(err)`` is one line: ``FILE[ record R]: what``."""

    def __init__(self, message: str, *, file: str | None = None, record: str | None = None) -> None:
        message = " ".join(str(message).split()) if "\n" in str(message) else str(message)
        super().__init__(message)
        self.file = file
        self.record = record
