"""What ``DialogueModel.respond`` takes and gives: ``GenerationOptions`` (the
one definition of the options and their bounds, for the session, the server
and the CLI), ``Reply``, and ``TextDeltas`` (a reply's text as it grows, for
streaming)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmdialog.core import markup
from mmdialog.core.errors import MMDialogError, validation_message

if TYPE_CHECKING:  # torch: the CLI checks options before it imports any (a typo costs no seconds)
    from mmdialog.core.interfaces import GeneratedImage


class GenerationOptions(BaseModel):
    """What ``respond`` takes, with its bounds: the one definition the session,
    the server and the CLI check options against."""

    model_config = ConfigDict(extra="forbid", strict=True)
    max_new_tokens: int = Field(64, ge=1, le=4096, description="reply length limit (tokens)")
    temperature: float = Field(0.0, ge=0, le=10, allow_inf_nan=False, description="0 = greedy")
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False, description="nucleus sampling (with a temperature)")
    num_beams: int = Field(1, ge=1, le=16, description="beam search width")
    num_inference_steps: int | None = Field(None, ge=1, le=1000, description="diffusion steps "
                                                                            "(default: the generator's)")
    guidance_scale: float | None = Field(None, ge=0, le=100, allow_inf_nan=False,
                                         description="classifier-free guidance scale")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="fix sampling and diffusion noise")
    max_photos: int = Field(4, ge=0, le=16, description="photos per reply; after the last one the reply "
                                                        "goes on in text ([img] is no longer written)")
    photo_in_loop: bool = Field(True, description="stop at [/img], produce and perceive the photo, go on after "
                                                  "it; false: the reference's decoding, one decode (one beam "
                                                  "search) per turn with [/img] an ordinary token, and a photo "
                                                  "for each closed, non-empty description afterwards")

    @classmethod
    def parse(cls, options: dict[str, Any], field: str = "") -> GenerationOptions:
        """Validate ``options``; a bad one is an ``MMDialogError`` naming it
        (as ``field.name`` when the options came in a field of a request)."""
        unknown = sorted(set(options) - set(cls.model_fields))
        if unknown:
            name = f"{field}.{unknown[0]}" if field else unknown[0]
            raise MMDialogError(f"unknown generation option '{name}'; use {', '.join(cls.model_fields)}")
        try:
            return cls.model_validate(options)
        except ValidationError as e:
            raise MMDialogError(validation_message(e, field) if field
                                else f"generation option {validation_message(e)}") from None


@dataclass
class Reply:
    """What the agent says. ``text`` keeps any ``[img] … [/img]`` markup
    (``plain`` is without it); ``shared`` is the agent's decision to share;
    ``photos`` are the photos produced for ``descriptions``, in order (empty
    when not drawn). A ``Session`` fills ``paths`` (where it saved each photo),
    ``truncated`` (older turns were dropped to fit the context) and, the first
    time that happens in the session, ``notice``: the one line to tell the user.
    ``length_capped``: the reply hit ``max_new_tokens`` before the end of its turn."""

    text: str
    photos: list[GeneratedImage] = field(default_factory=list)
    shared: bool = False
    descriptions: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    truncated: bool = False
    notice: str | None = None
    length_capped: bool = False

    @property
    def images(self) -> list[Any]:
        """The PIL images of ``photos``."""
        return [p.image for p in self.photos]

    @property
    def plain(self) -> str:
        return markup.strip(self.text)

    def photo_records(self) -> list[dict[str, Any]]:
        """One JSON-ready record per photo: its description, where it came from
        (``source`` drawn | retrieved, the ``plugin``, the library ``file`` and
        ``caption``, the retriever's ``score``) and the ``path`` it was saved to."""
        paths = self.paths or [None] * len(self.photos)
        return [{"description": d, "source": p.source, "plugin": p.plugin, "file": str(p.file) if p.file else None,
                 "caption": p.caption, "score": p.score, "path": str(path) if path else None}
                for d, p, path in zip(self.descriptions, self.photos, paths)]


#: ``respond_batch``'s streaming callback: ``(row, text delta | photo)``.
StreamCallback = Callable[[int, Union[str, "GeneratedImage"]], None]


class TextDeltas:
    """The text of a growing token list, handed out in pieces.

    ``update(ids)`` returns what ``decode(ids).strip()`` gained since the last
    call, so the pieces concatenate to the final text. A piece is held back
    while the text ends in an incomplete character (a multi-byte character
    split over byte tokens decodes to U+FFFD) or is not an extension of what
    was handed out (should a decoder rewrite earlier text): whole decoded
    prefixes are compared, never single tokens, so SentencePiece's leading
    ``▁`` and byte-fallback pieces come out right. Trailing white space waits
    for the text that follows it (the final text is stripped).
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.sent = ""

    def update(self, ids: list[int], final: bool = False) -> str:
        """The new piece of text (may be empty); ``final``: ``ids`` are complete, hold nothing back."""
        text = self.decode(ids).strip()
        if not text.startswith(self.sent) or (text.endswith("\ufffd") and not final):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta
