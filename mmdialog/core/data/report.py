"""Load reports: counts plus one message per problem (file + record id).

Readers never raise on bad records by default; they call
``LoadReport.add_problem``, which records the problem and, when the report
is ``strict``, raises ``mmdialog.core.errors.DataError`` at once.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from mmdialog.core.data.schema import Dialogue
from mmdialog.core.errors import DataError

#: Problem kinds. All but ``warning`` are errors (``strict`` raises on them).
BAD_RECORD = "bad_record"  # record skipped
BAD_FILE = "bad_file"  # whole file (or its rest) unreadable
MISSING_IMAGE = "missing_image"  # photo kept, ``path`` is None
CORRUPT_IMAGE = "corrupt_image"  # photo kept, ``path`` reset to None
WARNING = "warning"  # data kept as is

ERROR_KINDS = frozenset({BAD_RECORD, BAD_FILE, MISSING_IMAGE, CORRUPT_IMAGE})


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@dataclass
class Problem:
    kind: str
    file: str
    record: str | None
    message: str

    @property
    def is_error(self) -> bool:
        return self.kind in ERROR_KINDS

    def __str__(self) -> str:
        where = self.file if self.record is None else f"{self.file} [record {self.record}]"
        return _one_line(f"{where}: {self.message}")


@dataclass
class LoadReport:
    """Counts of one load. ``messages`` counts raw messages/utterances before
    merging consecutive ones of a speaker into turns; ``share_turns`` counts turns
    carrying at least one photo; ``missing_images`` counts photos without a local
    file (all of them when no image folder was given)."""

    strict: bool = False
    files: int = 0
    dialogues: int = 0
    messages: int = 0
    turns: int = 0
    photos: int = 0
    share_turns: int = 0
    images_found: int = 0
    missing_images: int = 0
    corrupt_images: int = 0
    bad_records: int = 0
    bad_files: int = 0
    warnings: int = 0
    problems: list[Problem] = field(default_factory=list)

    # -- recording ---------------------------------------------------------------
    def add_problem(self, kind: str, file: str, record: object, message: str) -> Problem:
        rec = None if record is None else _one_line(str(record))
        problem = Problem(kind, str(file), rec, _one_line(message))
        if kind == BAD_RECORD:
            self.bad_records += 1
        elif kind == BAD_FILE:
            self.bad_files += 1
        elif kind == CORRUPT_IMAGE:
            self.corrupt_images += 1
        elif kind == WARNING:
            self.warnings += 1
        self.problems.append(problem)
        if self.strict and problem.is_error:
            raise DataError(str(problem), file=problem.file, record=problem.record)
        return problem

    def count_dialogues(self, dialogues: list[Dialogue]) -> None:
        """Recompute the dialogue/turn/photo counts from the loaded dialogues."""
        self.dialogues = len(dialogues)
        self.turns = sum(len(d.turns) for d in dialogues)
        self.share_turns = sum(1 for d in dialogues for t in d.turns if t.photos)
        photos = [p for d in dialogues for p in d.photos]
        self.photos = len(photos)
        self.images_found = sum(1 for p in photos if p.path is not None)
        self.missing_images = self.photos - self.images_found

    # -- reading -----------------------------------------------------------------
    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.is_error]

    @property
    def ok(self) -> bool:
        """No bad record, bad file or corrupt image (missing images are allowed)."""
        return not (self.bad_records or self.bad_files or self.corrupt_images)

    def counts(self) -> dict[str, int]:
        keys = ("files", "dialogues", "messages", "turns", "photos", "share_turns",
                "images_found", "missing_images", "corrupt_images", "bad_records",
                "bad_files", "warnings")
        return {k: getattr(self, k) for k in keys}

    def summary(self) -> str:
        c = self.counts()
        return ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in c.items())

    def headline(self) -> str:
        """One line: ``42 dialogues (557 messages → 420 turns), 42 photos (0 found), 0 bad records``."""
        text = (f"{self.dialogues} dialogues ({self.messages} messages → {self.turns} turns), "
                f"{self.photos} photos in {self.share_turns} share turns ({self.images_found} found locally), "
                f"{self.bad_records} bad records, {self.bad_files} bad files")
        if self.corrupt_images:
            text += f", {self.corrupt_images} corrupt images"
        return text

    def format(self, max_problems: int | None = 20) -> str:
        """Multi-line human report: ``headline``, one ``name  value`` line per
        count, then up to ``max_problems`` problems (one line each)."""
        width = max(len(k) for k in self.counts())
        lines = [self.headline()]
        lines += [f"{k.replace('_', ' '):<{width}}  {v}" for k, v in self.counts().items()]
        shown = self.problems if max_problems is None else self.problems[:max_problems]
        if shown:
            lines.append("problems:")
            lines += [f"  {p.kind}: {p}" for p in shown]
            if len(self.problems) > len(shown):
                lines.append(f"  ... and {len(self.problems) - len(shown)} more")
        return "\n".join(lines)


@dataclass
class LoadResult:
    """What ``mmdialog.core.data.load_dialogues`` returns."""

    dialogues: list[Dialogue]
    report: LoadReport

    def __iter__(self) -> Iterator[Dialogue]:
        return iter(self.dialogues)

    def __len__(self) -> int:
        return len(self.dialogues)

    def __getitem__(self, i: int) -> Dialogue:
        return self.dialogues[i]

    def by_id(self) -> dict[str, Dialogue]:
        return {d.id: d for d in self.dialogues}

    def split(self, name: str) -> list[Dialogue]:
        return [d for d in self.dialogues if d.split == name]
