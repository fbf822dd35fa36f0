"""The photos this server shared: what ``/files/NAME`` serves, and for how long.

Each shared photo is a PNG in ``photos_dir`` and an entry (name →
description, time) in one map, kept in the order they were written. Both are
bounded: past ``keep`` photos, or once a photo is older than ``keep_s``
seconds, the oldest go (file and entry). A client that sends an expired photo
back as history gets a 422 naming it; it can send the conversation without it.
"""
from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from pathlib import Path

FILE_NAME = re.compile(r"^[0-9a-f]{32}\.png$")


class SharedPhotos:
    def __init__(self, folder: Path, keep: int = 1000, keep_s: float = 24 * 3600.0) -> None:
        self.folder, self.keep, self.keep_s = folder, keep, keep_s
        self.real = folder.resolve()
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()  # name → (description, written at)
        self._lock = threading.Lock()  # written from batch threads, read from the event loop

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, paths: list[Path], descriptions: list[str]) -> None:
        """Record a reply's photos (already written in ``folder``), then drop
        what is over the bounds."""
        now = time.monotonic()
        with self._lock:
            for path, description in zip(paths, descriptions):
                self._entries[path.name] = (description, now)
            self._expire(now)

    def get(self, name: str) -> tuple[Path, str] | None:
        """``folder/name`` and its description if this server wrote it, it has
        not expired, and it is still a plain file inside ``folder``, else None."""
        if not FILE_NAME.match(name):
            return None
        with self._lock:
            self._expire(time.monotonic())
            entry = self._entries.get(name)
        if entry is None:
            return None
        path = self.folder / name
        try:
            if path.is_symlink() or not path.is_file() or path.resolve().parent != self.real:
                return None
        except OSError:
            return None
        return path, entry[0]

    def _expire(self, now: float) -> None:
        while self._entries:
            name, (_, written) = next(iter(self._entries.items()))
            if len(self._entries) <= self.keep and now - written <= self.keep_s:
                break
            del self._entries[name]
            (self.folder / name).unlink(missing_ok=True)
