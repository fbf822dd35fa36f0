"""The embedded demo set (no download needed).

``demo/photochat/`` is a verbatim 42-dialogue excerpt of PhotoChat (train 9,
dev 9, test 24 dialogues; no local images -- they train the text loss).
``demo/chat.jsonl`` holds 8 short PhotoChat-style dialogues (train 6, dev 1,
test 1) written for mmdialog, each sharing one real photograph bundled with
scikit-image; the photo paths (``pkg:skimage/data/…``) are resolved from the
installed package at load time. ``demo/share.jsonl`` holds 44 shorter ones
(train 40, dev 2, test 2) that teach *when* to share: a photo asked for or an
offer taken is shared at once, small talk never is, and 16 share again later
(two or three photos, asked at different points, about different things). They are the ``tiny``
preset's training set (``embedded:demo-share``, what ``make demo`` trains on).
See ``demo/README.md`` for sources and licences.
"""
from __future__ import annotations

from pathlib import Path

from mmdialog.core.data.loader import load_dialogues
from mmdialog.core.data.schema import Dialogue

DEMO_DIR = Path(__file__).resolve().parent / "demo"
DEMO_PHOTOCHAT = DEMO_DIR / "photochat"
DEMO_JSONL = DEMO_DIR / "chat.jsonl"
DEMO_SHARE = DEMO_DIR / "share.jsonl"


def demo_dialogues(split: str | None = "train", *, photochat: bool = True, photos: bool = True,
                   description_style: str = "objects", person: str = "drop") -> list[Dialogue]:
    """The demo dialogues of ``split`` (``"train"``, ``"dev"``, ``"test"``; ``None`` = all).

    ``photochat``: include the PhotoChat excerpt (photos without local files);
    ``photos``: include the JSONL dialogues whose photos resolve to scikit-image
    files (their ``Photo.path`` is ``None`` if scikit-image is not installed).
    The JSONL dialogues come first.
    """
    out: list[Dialogue] = []
    if photos:
        out += load_dialogues(DEMO_JSONL, format="jsonl", split=split).dialogues
    if photochat:
        out += load_dialogues(DEMO_PHOTOCHAT, format="photochat", split=split,
                              description_style=description_style, person=person).dialogues
    return out


def share_dialogues(split: str | None = "train") -> list[Dialogue]:
    """The dialogues of ``demo/share.jsonl`` in ``split``: when to share, and when not."""
    return load_dialogues(DEMO_SHARE, format="jsonl", split=split).dialogues


DEMO_LIBRARY = DEMO_DIR / "library.json"


def demo_library() -> list[tuple[Path, str]]:
    """(file, caption) of the embedded photo library: the CC0 / public-domain
    photos that ship with scikit-image (those whose package is installed)."""
    import json

    from mmdialog.core.data.jsonl import resolve_package_path

    entries = json.loads(DEMO_LIBRARY.read_text(encoding="utf-8"))
    return [(p, caption) for ref, caption in entries.items() if (p := resolve_package_path(ref)) is not None]
