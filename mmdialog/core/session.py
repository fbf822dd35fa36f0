"""A conversation with a model: history kept, photos in and out as files.

    session = mmdialog.load("my-model").session(seed=0)   # or mmdialog.Session(model, seed=0)
    reply = session.send("look at my cat!", images=["chelsea.png"])
    reply.text, reply.images, reply.shared, reply.paths

The user speaks as ``"user"``, the model as ``"assistant"``. Photos the model
shares are saved (PNG) to the session's folder and re-enter the history as
``Photo(description, path)``, so later turns see them as the model was
trained to. When the history no longer fits ``config.model.max_length`` LLM
tokens (with room for the reply), the oldest turns are dropped: the reply says
so (``reply.truncated``, and ``reply.notice`` the first time; the one place
that fact travels), and ``send`` warns once per session
(``HistoryTruncatedWarning``).
"""
from __future__ import annotations

import atexit
import contextlib
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmdialog.core import markup
from mmdialog.core.data.images import MAX_PIXELS, caption_from_filename, verify_image
from mmdialog.core.data.schema import Photo, Turn
from mmdialog.core.errors import DataError, ImageError, MMDialogError
from mmdialog.core.reply import GenerationOptions, Reply, StreamCallback

if TYPE_CHECKING:  # torch: `mmdialog chat` checks its photos before it imports any
    from mmdialog.core.interfaces import GeneratedImage

USER, AGENT = "user", "assistant"


class HistoryTruncatedWarning(UserWarning):
    """The oldest turns were dropped to fit the model's context."""


class Session:
    """History + generation options around a ``DialogueModel`` (see the module docs)."""

    def __init__(self, model, *, photos_dir: str | Path | None = None, history: Iterable[Turn] = (),
                 options: GenerationOptions | None = None, **fields: Any) -> None:
        """``options``: generation options parsed already; or their ``fields`` as keywords."""
        if options is not None and fields:
            raise TypeError(f"Session: give options or their fields, not both ({', '.join(fields)})")
        self.options = options if options is not None else GenerationOptions.parse(fields)
        self.model = model.eval()
        self.history: list[Turn] = list(history)
        if photos_dir is None:  # a temporary folder: gone at exit unless a photo was saved in it
            photos_dir = tempfile.mkdtemp(prefix="mmdialog-session-")
            atexit.register(_remove_if_empty, Path(photos_dir))
        self.photos_dir = Path(photos_dir)
        self.photos_dir.mkdir(parents=True, exist_ok=True)
        self.dropped_turns = 0
        self._cut = False     # the reply being written had older turns dropped
        self._warned = False  # the user was told (reply.notice), once per session

    # -- public ---------------------------------------------------------------------------------
    def send(self, text: str = "", images: Iterable[Any] = (),
             stream: Callable[[str | GeneratedImage], None] | None = None, **options: Any) -> Reply:
        """Add the user's turn, write the model's, return it. ``options`` override
        the session's generation options for this reply only. ``stream`` gets the
        reply as it is written: text deltas that concatenate to ``reply.text`` and
        each photo when it is produced (``DialogueModel.respond_batch``); the photos
        are saved once the reply is complete."""
        opts = self.options_for(**options)
        self.begin(text, images, opts)
        rows = None if stream is None else lambda _, piece: stream(piece)
        reply = reply_batch([self], opts, rows)[0]
        if reply.notice:
            warnings.warn(HistoryTruncatedWarning(reply.notice), stacklevel=2)
        return reply

    def options_for(self, **options: Any) -> GenerationOptions:
        """The session's generation options with ``options`` over them."""
        return GenerationOptions.parse({**self.options.model_dump(), **options}) if options else self.options

    def begin(self, text: str, images: Iterable[Any], options: GenerationOptions) -> None:
        """Add the user's turn and fit the history for a reply (first half of
        ``send``); whether older turns were dropped is on the reply ``finish`` makes."""
        photos = [self.photo(img) for img in images]
        text = (text or "").strip()
        if not text and not photos:
            raise MMDialogError("empty message: give some text or a photo")
        self.history.append(Turn(USER, text, photos))
        try:
            self._cut = self.fit(options.max_new_tokens)
        except MMDialogError:
            self.history.pop()
            raise

    def finish(self, reply: Reply) -> Reply:
        """Save the reply's photos and add its turn (second half of ``send``)."""
        reply.paths = [self.save_photo(img) for img in reply.images]
        reply.truncated, self._cut = self._cut, False
        if reply.truncated and not self._warned:
            self._warned = True
            reply.notice = (f"the conversation is longer than the model's context "
                            f"({self.model.config.model.max_length} tokens): dropping the oldest turns from now on")
        # Each photo stays where it was shared in the reply: the next prompt lays the turn
        # out as the model wrote and saw it (text after a photo stays after it).
        plain, offsets = markup.placed(reply.text)
        shared = [Photo(description=d.strip(), path=p, offset=o)
                  for d, p, o in zip(reply.descriptions, reply.paths, offsets)]
        self.history.append(Turn(AGENT, plain, shared))
        return reply

    def reset(self) -> None:
        self.history.clear()
        self.dropped_turns = 0
        self._cut = self._warned = False

    def photo(self, image: Any) -> Photo:
        """A user photo: a path, a PIL image, or ``(either, description)``."""
        from PIL import Image

        description = ""
        if isinstance(image, tuple) and len(image) == 2:
            image, description = image
        if isinstance(image, Image.Image):
            return Photo(description=description or "a photo", path=self.save_photo(image, prefix="user-"))
        if not isinstance(image, (str, Path)):
            raise ImageError(f"images must be file paths or PIL images, not {type(image).__name__}")
        path = Path(image).expanduser()
        check_image(path)
        return Photo(description=description or caption_from_filename(path.name) or "a photo", path=path)

    def save_photo(self, image: Any, prefix: str = "") -> Path:
        path = self.photos_dir / f"{prefix}{uuid.uuid4().hex}.png"
        rgb = image if image.mode in ("RGB", "L") else image.convert("RGB")
        rgb.save(path, format="PNG")
        return path

    def prompt_tokens(self, turns: list[Turn] | None = None) -> int:
        """LLM tokens of the prompt for ``turns`` (default: the history)."""
        model = self.model
        text = model.collator.prompt_text(self.history if turns is None else turns, AGENT)
        return len(model.llm.tokenizer(text, add_special_tokens=False)["input_ids"])

    def fit(self, max_new_tokens: int) -> bool:
        """Drop the oldest turns until prompt + reply fit ``max_length``; True if any went."""
        limit = self.model.config.model.max_length
        n = self.prompt_tokens()
        dropped = 0
        while n + max_new_tokens > limit and len(self.history) > 1:
            self.history.pop(0)
            dropped += 1
            n = self.prompt_tokens()
        if n + max_new_tokens > limit:
            raise MMDialogError(f"message too long: {n} prompt tokens + {max_new_tokens} new tokens exceed the "
                                f"model's max_length {limit}; shorten it or lower max_new_tokens")
        self.dropped_turns += dropped
        return bool(dropped)


def reply_batch(sessions: list[Session], options: GenerationOptions,
                stream: StreamCallback | None = None) -> list[Reply]:
    """The replies of sessions whose user turn is in (``Session.begin`` ran): one
    ``respond_batch`` over all of them, then ``finish`` (how ``mmdialog serve``
    answers concurrent requests together)."""
    model = sessions[0].model
    if any(s.model is not model for s in sessions):
        raise MMDialogError("reply_batch: the sessions must share one model")
    replies = model.respond_batch([(s.history, AGENT) for s in sessions], stream=stream, options=options)
    return [s.finish(r) for s, r in zip(sessions, replies)]


def _remove_if_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):
        folder.rmdir()


def check_image(path: Path, max_pixels: int | None = None) -> None:
    """Raise ``ImageError`` (one line) unless ``path`` is a readable image."""
    if not path.is_file():
        raise ImageError(f"image '{path}' does not exist")
    try:
        verify_image(path, max_pixels=max_pixels or MAX_PIXELS)
    except DataError as e:
        raise ImageError(f"cannot read image '{path}': {e}") from None
