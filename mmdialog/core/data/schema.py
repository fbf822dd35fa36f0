"""The one internal dialogue type every dataset reader produces.

Readers (PhotoChat, DialogCC, JSONL) map their records onto these classes;
collate turns them into model batches. Nothing here imports torch.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mmdialog.core import markup


@dataclass
class Photo:
    """A photo shared in a turn.

    ``description`` is the text the sharer's turn carries as ``[img] … [/img]``
    (PhotoChat: the cleaned object list; DialogCC: the GPT-4 description).
    ``path`` is the resolved local image file, ``None`` when not available.
    ``offset`` (added by the data layer) is the character position in the
    owning turn's ``text`` at which the photo was shared; ``None`` means "after
    the text" (see ``Turn.text_with_photos``).
    """

    id: str | None = None
    url: str | None = None
    description: str = ""
    path: Path | None = None
    offset: int | None = None


@dataclass
class Turn:
    """Consecutive messages of one speaker, merged (the reference code does so)."""

    speaker: str
    text: str = ""
    photos: list[Photo] = field(default_factory=list)

    @property
    def shares_photo(self) -> bool:
        return bool(self.photos)

    @property
    def ordered_photos(self) -> list[Photo]:
        """The photos in the order they appear in the turn (by ``offset``; ``None`` = after the text)."""
        end = len(self.text)
        return [p for _, p in sorted(enumerate(self.photos),
                                     key=lambda ip: (end if ip[1].offset is None else ip[1].offset, ip[0]))]

    def text_with_photos(self, render: Callable[[Photo], str] = lambda p: markup.render(p.description)) -> str:
        """The turn text with each photo rendered (default ``[img] description [/img]``).

        A photo is inserted at its ``offset`` in ``text`` (PhotoChat: where the
        share message sat among the speaker's merged messages), or appended
        after the text when ``offset`` is ``None``. Pieces are joined by single
        spaces.
        """
        parts: list[str] = []
        pos = 0
        for photo in self.ordered_photos:
            off = len(self.text) if photo.offset is None else max(0, min(photo.offset, len(self.text)))
            parts += [self.text[pos:off].strip(), render(photo)]
            pos = off
        parts.append(self.text[pos:].strip())
        return " ".join(p for p in parts if p)


@dataclass
class Dialogue:
    """``source`` names the reader (``photochat``, ``dialogcc``, ``jsonl``);
    ``split`` (added by the data layer) is ``train``/``dev``/``test`` when known
    (``valid``/``validation``/``val`` are normalised to ``dev``)."""

    id: str
    turns: list[Turn]
    source: str = ""
    split: str | None = None

    @property
    def speakers(self) -> list[str]:
        """Speakers in order of first appearance."""
        seen: dict[str, None] = {}
        for t in self.turns:
            seen.setdefault(t.speaker, None)
        return list(seen)

    @property
    def photos(self) -> list[Photo]:
        return [p for t in self.turns for p in t.photos]
