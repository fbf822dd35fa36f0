"""``load_dialogues``: any supported file/folder → dialogues + a report."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mmdialog.core.data import hub
from mmdialog.core.data.images import VerifiedPhotos, image_index
from mmdialog.core.data.limits import MAX_RECORD_CHARS, MAX_TURN_CHARS, oversize
from mmdialog.core.data.records import (
    RawRecord,
    RecordError,
    collect_files,
    find_bad_text,
    iter_records,
    normalize_split,
    split_hint,
)
from mmdialog.core.data.report import (
    BAD_RECORD,
    CORRUPT_IMAGE,
    MISSING_IMAGE,
    WARNING,
    LoadReport,
    LoadResult,
)
from mmdialog.core.data.schema import Dialogue
from mmdialog.core.errors import DataError
from mmdialog.core.hookspecs import DatasetFormat


def formats() -> list[str]:
    """Every dataset format name (built-in and installed), in detection order."""
    from mmdialog.core.registry import default_registry

    return default_registry().dataset_formats()


def detect_record_format(rec: Any) -> str | None:
    """The first format (in registry order) whose ``detect`` accepts a record, or None."""
    from mmdialog.core.registry import default_registry

    reg = default_registry()
    for name in reg.dataset_formats():
        if reg.dataset_format(name).detect(rec):
            return name
    return None


def records_of(path: Path, report: LoadReport, root: Path | None = None):
    """The raw records of a data file of the dataset folder ``root``: JSON / JSON lines
    (read by the bounded reader), or Parquet (the Hub's layout)."""
    if path.name.lower().endswith(".parquet"):
        return hub.parquet_records(path, report, root)
    return iter_records(path, report, root)


def detect_format(path: str | os.PathLike, sample: int = 20) -> str | None:
    """The format of a file (or of the first data file in a folder), by content."""
    files = collect_files(Path(path))
    root = Path(path) if Path(path).is_dir() else None
    for f in files:
        probe = LoadReport()
        for i, raw in enumerate(records_of(f, probe, root)):
            fmt = detect_record_format(raw.value)
            if fmt or i >= sample:
                if fmt:
                    return fmt
                break
    return None


def load_dialogues(
    path: str | os.PathLike,
    format: str = "auto",
    split: str | None = None,
    strict: bool = False,
    image_dir: str | os.PathLike | None = None,
    *,
    verify_images: bool = False,
    description_style: str = "objects",
    person: str = "drop",
    speaker_names: str = "keep",
    limit: int | None = None,
    max_turn_chars: int = MAX_TURN_CHARS,
    max_record_chars: int = MAX_RECORD_CHARS,
) -> LoadResult:
    """Load dialogues from a PhotoChat / DialogCC / mmdialog-JSONL file or folder:
    a ``LoadResult`` with ``dialogues`` and ``report`` (counts and one problem
    message per bad file / record / image, naming file and record).

    ``path``: a data file (``.json``, ``.jsonl``, optionally ``.gz``) or a folder,
    searched recursively (PhotoChat root ``{train,dev,test}/*.json``, DialogCC
    ``{train,valid,test}.json``, any ``*.jsonl``, the Hub's Parquet files), or
    ``hf:OWNER/NAME`` (a dataset on the Hugging Face Hub, through its cache).
    ``format``: ``"auto"`` (detected per file from the records' keys),
    ``"photochat"``, ``"dialogcc"``, ``"jsonl"``, or a format a plugin registers
    through the ``mmdialog_dataset_formats`` hook. ``split``: ``"train"`` /
    ``"dev"`` / ``"test"`` (``valid`` = ``dev``) leaves out files named for
    another split (``dev_00.json``, ``test/…``, ``valid.json``) and dialogues
    whose record says another split; ``None``: everything. ``strict``: raise
    ``DataError`` at the first problem (bad file, bad record, missing image
    when images were asked for, corrupt image) instead of reporting it and
    skipping. ``image_dir``: folder of local images, matched by id / URL hash
    (``mmdialog.core.data.images``), which sets ``Photo.path``.
    ``verify_images``: decode every found image (cheaply); a corrupt one is
    reported and its ``path`` reset to None. ``description_style``, ``person``:
    PhotoChat description cleaning (``mmdialog.core.data.photochat``).
    ``speaker_names``: DialogCC speakers, ``"keep"`` names or ``"index"`` → "0",
    "1", …. ``limit``: stop after this many dialogues (quick looks at big files).
    ``max_turn_chars``, ``max_record_chars``: a record with a turn, or a total,
    over this many characters is skipped and counted (``core/data/limits.py``).
    """
    from mmdialog.core.registry import default_registry

    reg = default_registry()
    if format != "auto" and format not in reg.dataset_formats():
        raise DataError(f"--format must be one of auto, {', '.join(reg.dataset_formats())}, not {format!r}")
    options = {"description_style": description_style, "person": person, "speaker_names": speaker_names,
               "caps": (max_turn_chars, max_record_chars)}
    for fmt in map(reg.dataset_format, reg.dataset_formats()):  # each reader checks its own options, early
        try:
            if fmt.check is not None:
                fmt.check(**{k: options[k] for k in fmt.options})
        except ValueError as e:
            raise DataError(str(e)) from None
    want = normalize_split(split)
    report = LoadReport(strict=strict)
    if str(path).startswith(hub.PREFIX):
        root, sources = Path(path), hub.hub_sources(str(path), want, report)
    else:
        root = Path(path).expanduser()
        if not root.exists():
            raise DataError(f"{root}: no such file or folder", file=str(root))
        folder = root if root.is_dir() else None
        sources = [(str(f), split_hint(f, folder), lambda f=f: records_of(f, report, folder))
                   for f in collect_files(root, want)]
    if not sources:
        what = f" for split {want!r}" if want else ""
        raise DataError(f"{path}: no data files (.json, .jsonl, .parquet){what} found", file=str(path))
    if image_dir is not None and not Path(image_dir).is_dir():
        raise DataError(f"{image_dir}: image folder does not exist", file=str(image_dir))

    dialogues: list[Dialogue] = []
    origin: list[str] = []  # data file of each dialogue, for image problems
    seen_ids: dict[str, str] = {}
    other_split = 0
    for f, hint, records in sources:
        if limit is not None and len(dialogues) >= limit:
            break
        report.files += 1
        fmt = None if format == "auto" else format
        for raw in records():
            if limit is not None and len(dialogues) >= limit:
                break
            if fmt is None:
                fmt = detect_record_format(raw.value)
                if fmt is None:
                    report.add_problem(BAD_RECORD, str(f), raw.label,
                                       f"not a record of any known format ({', '.join(reg.dataset_formats())}); "
                                       "cannot detect the format")
                    continue
            d = _parse(reg.dataset_format(fmt), raw, str(f), report, hint, options)
            if d is None:
                continue
            if want is not None and d.split is not None and d.split != want:
                other_split += 1
                continue
            prev = seen_ids.get(d.id)
            if prev is not None:
                report.add_problem(WARNING, str(f), raw.label, f"duplicate dialogue id {d.id!r} "
                                   f"(first in {prev}); both kept")
            else:
                seen_ids[d.id] = str(f)
            dialogues.append(d)
            origin.append(str(f))
    if other_split and not dialogues:
        report.add_problem(WARNING, str(root), None, f"all {other_split} dialogue(s) belong to another "
                           f"split than {want!r}; nothing loaded")
    _resolve_images(dialogues, origin, report, image_dir, verify_images)
    report.count_dialogues(dialogues)
    return LoadResult(dialogues=dialogues, report=report)


def _parse(fmt: DatasetFormat, raw: RawRecord, file: str, report: LoadReport, split: str | None,
           options: dict[str, Any]) -> Dialogue | None:
    rid = fmt.record_id(raw.value, raw)
    bad = find_bad_text(raw.value)
    if bad:
        report.add_problem(BAD_RECORD, file, rid, f"invalid UTF-8 in {bad}")
        return None
    try:
        d, n_messages = fmt.parse(raw, file=file, report=report, split=split,
                                  **{k: options[k] for k in fmt.options})
    except RecordError as e:
        report.add_problem(BAD_RECORD, file, rid, f"{fmt.name}: {e}")
        return None
    too_big = oversize(d, *options["caps"])
    if too_big:
        report.add_problem(BAD_RECORD, file, rid, too_big)
        return None
    report.messages += n_messages
    return d


def _resolve_images(dialogues: list[Dialogue], origin: list[str], report: LoadReport,
                    image_dir: Any, verify: bool) -> None:
    index = image_index(image_dir) if image_dir is not None else None
    checked: dict[Path, str | None] = {}
    verified = VerifiedPhotos() if verify else None
    try:
        _resolve(dialogues, origin, report, image_dir, index, checked, verified)
    finally:
        if verified is not None:
            verified.close()


def _resolve(dialogues: list[Dialogue], origin: list[str], report: LoadReport, image_dir: Any, index: Any,
             checked: dict[Path, str | None], verified: VerifiedPhotos | None) -> None:
    for d, file in zip(dialogues, origin):
        for t in d.turns:
            for p in t.photos:
                given = p.path
                found = Path(given) if given is not None and Path(given).is_file() else None
                if found is None and index is not None:
                    found = index.find(p)
                if found is None:
                    p.path = None
                    if given is not None or index is not None:
                        label = p.id or p.url or (str(given) if given is not None else "?")
                        where = f"path {given} does not exist" if given is not None else \
                            f"not found in {image_dir}"
                        report.add_problem(MISSING_IMAGE, file, d.id,
                                           f"image {label}: {where}")
                    continue
                if verified is not None:
                    if found not in checked:
                        checked[found] = verified.check(found)
                    if checked[found] is not None:
                        p.path = None
                        report.add_problem(CORRUPT_IMAGE, file, d.id, checked[found])
                        continue
                p.path = found


__all__ = ["detect_format", "detect_record_format", "formats", "load_dialogues"]
