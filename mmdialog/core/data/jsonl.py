"""mmdialog JSONL: our own dialogue format for custom data.

One dialogue per line, UTF-8, as a JSON object::

    {"id": "cat-1",                      # required, string (ints are accepted)
     "split": "train",                   # optional: train / dev / test (valid → dev)
     "source": "my-corpus",              # optional, free text (default "jsonl")
     "turns": [                          # required, non-empty list
       {"speaker": "0",                  # required: string (ints are accepted)
        "text": "look at my cat",        # optional string, default ""
        "photos": [                      # optional list, default []
          {"id": "cat_001",              # optional: used to find the file in --image-dir
           "url": "https://…/cat.jpg",   # optional: downloaded by `mmdialog data fetch-images`
           "description": "A tabby cat", # optional: the text the sharer's turn carries
           "path": "images/cat.jpg",     # optional local file, see below
           "offset": 14}                 # optional: char position in "text" where the
        ]}                               #   photo was shared (default: after the text)
     ]}

Rules:

* A turn needs text or at least one photo; a photo needs at least one of
  ``id``, ``url``, ``description``, ``path``.
* Turns are taken as they are (consecutive turns of one speaker are **not**
  merged, so files round-trip exactly).
* ``path`` is resolved when loading: absolute paths as they are; relative
  paths against the folder of the JSONL file; ``pkg:<package>/<path>`` against
  the folder of an installed Python package, without importing it (the demo
  set uses ``pkg:skimage/data/chelsea.png``). A path that does not exist is a
  missing image (``path`` is ``None`` unless found in ``--image-dir``).
* Blank lines are ignored. A ``.json`` file holding a list of such objects is
  read too, and files may be gzip-compressed (``.jsonl.gz``).

``write_jsonl`` writes this format, so every reader's output can be
converted to it and read back unchanged.
"""
from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mmdialog.core.data.records import RawRecord, RecordError, normalize_split, object_list
from mmdialog.core.data.report import LoadReport
from mmdialog.core.data.schema import Dialogue, Photo, Turn
from mmdialog.core.files import atomic_write
from mmdialog.core.hookspecs import DatasetFormat, hookimpl

PKG_PREFIX = "pkg:"


def is_jsonl_record(rec: Any) -> bool:
    return isinstance(rec, dict) and "turns" in rec


def record_id(rec: Any, raw: RawRecord) -> str:
    if isinstance(rec, dict) and isinstance(rec.get("id"), (str, int)):
        return f"{rec['id']} ({raw.label})"
    return raw.label


def resolve_package_path(ref: str) -> Path | None:
    """``pkg:skimage/data/x.png`` → the file inside the installed package (no import), or None."""
    rest = ref[len(PKG_PREFIX):].lstrip("/")
    pkg, _, rel = rest.partition("/")
    if not pkg:
        return None
    try:
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    roots = list(spec.submodule_search_locations or [])
    if not roots and spec.origin:
        roots = [str(Path(spec.origin).parent)]
    for root in roots:
        cand = Path(root) / rel
        if cand.exists():
            return cand
    return Path(roots[0]) / rel if roots else None


def resolve_path(value: str, base: Path | None) -> Path:
    if value.startswith(PKG_PREFIX):
        found = resolve_package_path(value)
        return found if found is not None else Path(value)
    p = Path(value).expanduser()
    if not p.is_absolute() and base is not None:
        p = Path(os.path.normpath(base / p))
    return p


def _str(v: Any, what: str, required: bool = False) -> str | None:
    if v is None:
        if required:
            raise RecordError(f"missing {what}")
        return None
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise RecordError(f"{what} is a {type(v).__name__}, expected a string")
    return str(v)


def parse_record(raw: RawRecord, *, file: str, report: LoadReport, split: str | None = None) -> tuple[Dialogue, int]:
    """One JSONL object → (Dialogue, number of turns). Raises RecordError."""
    rec = raw.value
    if not isinstance(rec, dict):
        raise RecordError(f"record is a {type(rec).__name__}, expected an object")
    did = _str(rec.get("id"), "'id'", required=True).strip()
    if not did:
        raise RecordError("empty 'id'")
    raw_turns = object_list(rec, "turns", "turn")
    base = Path(file).parent
    turns = []
    for i, t in enumerate(raw_turns):
        spk = t.get("speaker")
        if isinstance(spk, bool) or not isinstance(spk, (str, int)) or not str(spk).strip():
            raise RecordError(f"turn {i}: unknown speaker type {type(spk).__name__} ({spk!r}); "
                              "expected a string or an int")
        text = _str(t.get("text"), f"turn {i} text") or ""
        photos_raw = t.get("photos") or []
        if not isinstance(photos_raw, list):
            raise RecordError(f"turn {i}: 'photos' is a {type(photos_raw).__name__}, expected a list")
        photos = []
        for j, p in enumerate(photos_raw):
            where = f"turn {i} photo {j}"
            if not isinstance(p, dict):
                raise RecordError(f"{where} is a {type(p).__name__}, expected an object")
            pid, url = _str(p.get("id"), f"{where} id"), _str(p.get("url"), f"{where} url")
            desc = _str(p.get("description"), f"{where} description") or ""
            path = _str(p.get("path"), f"{where} path")
            off = p.get("offset")
            if off is not None and (isinstance(off, bool) or not isinstance(off, int) or off < 0):
                raise RecordError(f"{where}: offset {off!r} is not a non-negative int")
            if not (pid or url or desc or path):
                raise RecordError(f"{where} has no id, url, description or path")
            photos.append(Photo(id=pid, url=url, description=desc,
                                path=resolve_path(path, base) if path else None, offset=off))
        if not text.strip() and not photos:
            raise RecordError(f"turn {i} has neither text nor photos")
        turns.append(Turn(speaker=str(spk).strip(), text=text, photos=photos))
    rsplit = rec.get("split")
    rsplit = normalize_split(rsplit) if isinstance(rsplit, str) else None
    source = rec.get("source") if isinstance(rec.get("source"), str) else "jsonl"
    return Dialogue(id=did, turns=turns, source=source or "jsonl", split=rsplit or split), len(turns)


# -- writing -------------------------------------------------------------------------
def dialogue_to_dict(d: Dialogue, *, relative_to: Path | None = None) -> dict[str, Any]:
    """The JSONL object of one dialogue (keys with default values are left out)."""
    out: dict[str, Any] = {"id": d.id}
    if d.split:
        out["split"] = d.split
    if d.source and d.source != "jsonl":
        out["source"] = d.source
    turns = []
    for t in d.turns:
        td: dict[str, Any] = {"speaker": t.speaker, "text": t.text}
        if t.photos:
            plist = []
            for p in t.photos:
                pd: dict[str, Any] = {}
                if p.id is not None:
                    pd["id"] = p.id
                if p.url is not None:
                    pd["url"] = p.url
                if p.description:
                    pd["description"] = p.description
                if p.path is not None:
                    path = Path(p.path)
                    if relative_to is not None:
                        try:
                            path = Path(os.path.relpath(path, relative_to))
                        except ValueError:  # other drive (Windows)
                            pass
                    pd["path"] = path.as_posix()
                if p.offset is not None:
                    pd["offset"] = p.offset
                plist.append(pd)
            td["photos"] = plist
        turns.append(td)
    out["turns"] = turns
    return out


def write_jsonl(dialogues: Iterable[Dialogue], path: str | Path, *, relative_paths: bool = False) -> int:
    """Write dialogues as mmdialog JSONL (atomically: temp file, then rename).

    Photo paths are written absolute, or relative to the output file's folder
    with ``relative_paths=True`` (the reader resolves them against that folder).
    Returns the number of dialogues written.
    """
    path = Path(path)
    base = path.parent.absolute() if relative_paths else None
    n = 0
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
        for d in dialogues:
            f.write(json.dumps(dialogue_to_dict(d, relative_to=base), ensure_ascii=False) + "\n")
            n += 1
    return n


@hookimpl(trylast=True)  # after installed formats: ``format: auto`` tries the more specific first
def mmdialog_dataset_formats() -> list[DatasetFormat]:
    return [DatasetFormat("jsonl", is_jsonl_record, record_id, parse_record,
                          "mmdialog's own JSONL schema (one dialogue a line)", ())]
