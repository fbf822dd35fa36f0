"""The description markup, defined once.

A shared photo appears in an agent's turn as ``[img] description [/img]``:
the LLM learns to write it, and the description is what the generator draws
(or the retriever matches). A photo the LLM *sees* is ``<image>`` repeated K
times, each replaced by one of the perceiver's K embeddings.
"""
from __future__ import annotations

import re

IMG_OPEN = "[img]"
IMG_CLOSE = "[/img]"
IMAGE_TOKEN = "<image>"

_SPAN = re.compile(r"\s*\[img\](.*?)(?:\[/img\]|$)\s*", re.IGNORECASE | re.DOTALL)
_STRAY_CLOSE = re.compile(r"\[/img\]", re.IGNORECASE)
#: The reference's IMG_DESC_REGEXP: greedy, one line, case kept; an open span or a stray [/img] stays.
_REFERENCE_SPAN = re.compile(r"\[img\].*\[/img\]")


def render(description: str) -> str:
    """``[img] description [/img]``."""
    return " ".join(p for p in (IMG_OPEN, description.strip(), IMG_CLOSE) if p)


def strip(text: str) -> str:
    """``text`` without its description spans, white space collapsed.

    An ``[img]`` left open (a reply cut by the token limit) is removed up to
    the end; a stray ``[/img]`` is dropped.
    """
    return " ".join(_STRAY_CLOSE.sub(" ", _SPAN.sub(" ", text)).split())


def strip_reference(text: str) -> str:
    """``text`` as the reference scores it (its ``sanitize_image_description``):
    the span from the first ``[img]`` to the last ``[/img]`` removed, white space
    collapsed; a description cut by the token limit and a stray ``[/img]`` stay."""
    return " ".join(_REFERENCE_SPAN.sub(" ", text).split())


def visible(partial: str) -> str:
    """What a reader may see of a reply still being written: ``strip`` of it,
    with a description span still open (or an ``[img`` just begun) held back.
    For a growing reply each result extends the one before, up to white space."""
    cut = partial.lower().rfind(IMG_OPEN[:1])
    if cut >= 0 and IMG_CLOSE not in partial[cut:].lower() and IMG_OPEN.startswith(partial[cut:cut + 5].lower()):
        partial = partial[:cut]  # "[", "[i", … "[img]…": perhaps a span's start
    return strip(partial)


def placed(text: str) -> tuple[str, list[int]]:
    """``strip(text)`` and, for each description span, the character offset in
    it where the span was (what ``Photo.offset`` records)."""
    offsets, pos, before = [], 0, []
    for m in _SPAN.finditer(text):
        before.append(text[pos:m.start()])
        offsets.append(len(strip(" ".join(before))))
        pos = m.end()
    return strip(text), offsets


def descriptions(text: str) -> list[str]:
    """The descriptions of ``text``'s spans, in order (an open span counts)."""
    return [m.group(1).strip() for m in _SPAN.finditer(text)]


def spans(ids: list[int], open_id: int, close_id: int, closed: bool = False) -> list[list[int]]:
    """Token ids between each ``[img]`` and the next ``[/img]`` (or the end; with
    ``closed``, as the reference draws, only spans that ``[/img]`` closes and that are not empty)."""
    out, cur = [], None
    for i in ids:
        if i == open_id:
            cur = []
        elif i == close_id and cur is not None:
            if cur or not closed:
                out.append(cur)
            cur = None
        elif cur is not None:
            cur.append(i)
    if cur and not closed:  # generation stopped inside a description: use what was written
        out.append(cur)
    return out
