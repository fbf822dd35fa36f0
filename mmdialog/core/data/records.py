"""Reading raw records out of JSON / JSON-lines files, robustly.

Shared by all readers. A file may be

* a JSON array of records (PhotoChat, DialogCC ``*.json``),
* JSON lines, one record per line (our ``*.jsonl``; DialogCC exports),
* a single JSON object (one record), or an object holding the record list under
  ``data`` / ``dialogues`` / ``records``,

optionally gzip-compressed (``*.gz``). Decoding is UTF-8 (a BOM is accepted;
UTF-16 with a BOM too). Bytes that are not UTF-8 do not sink the file: they are
decoded with ``surrogateescape`` and the records that contain them are reported
as bad records (``invalid UTF-8``). A JSON syntax error inside an array keeps
the records before it and reports the file (``bad_file``) with line/column.
"""
from __future__ import annotations

import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmdialog.core import reading
from mmdialog.core.data.report import BAD_FILE, BAD_RECORD, WARNING, LoadReport
from mmdialog.core.data.schema import Photo, Turn
from mmdialog.core.errors import ConfigError
from mmdialog.core.reading import MAX_DEPTH, RECORDS_BYTES, json_depth

#: Canonical split names. ``valid``/``validation``/``val`` map to ``dev``.
SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "dev": "dev", "valid": "dev", "validation": "dev", "val": "dev",
    "test": "test", "testing": "test",
}
DATA_SUFFIXES = (".json", ".jsonl", ".ndjson", ".json.gz", ".jsonl.gz", ".ndjson.gz", ".parquet")
_SPLIT_RE = re.compile(r"^(train|training|dev|valid|validation|val|test|testing)(?:[_\-.]|$)", re.I)
_WS = re.compile(r"[ \t\n\r]*")
#: json's decoder with numbers bounded (a 5000-digit integer is a bad record, not a traceback).
_DECODER = json.JSONDecoder(parse_int=reading.bounded_int)


def normalize_split(name: object) -> str | None:
    """``"valid"`` → ``"dev"`` etc.; unknown names are returned lower-cased; ``None`` stays."""
    if name is None or name == "":
        return None
    s = str(name).strip().lower()
    return SPLIT_ALIASES.get(s, s)


def split_hint(path: Path, root: Path | None = None) -> str | None:
    """The split a file belongs to by its name (``train_00.json``, ``valid.json``) or by
    a folder between ``root`` and it (``dev/dev_00.json``; without ``root``, its parent)."""
    m = _SPLIT_RE.match(path.name)
    if m:
        return normalize_split(m.group(1))
    if root is not None and path.parent != root and root in path.parents:
        parents = path.parent.relative_to(root).parts
    else:
        parents = (path.parent.name,)
    for part in reversed(parents):
        if part.lower() in SPLIT_ALIASES:
            return SPLIT_ALIASES[part.lower()]
    return None


def is_data_file(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and not name.startswith(".") and name.endswith(DATA_SUFFIXES)


def collect_files(path: Path, split: str | None = None) -> list[Path]:
    """Data files under ``path`` (a file, or a folder searched recursively, sorted).

    With ``split``, files whose name/folder names another split are left out.
    """
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if is_data_file(p) and not any(
        part.startswith(".") for part in p.relative_to(path).parts))
    if split is not None:
        want = normalize_split(split)
        files = [p for p in files if split_hint(p, path) in (None, want)]
    return files


# -- decoding ------------------------------------------------------------------------
def read_bytes(path: Path, root: Path | None = None) -> bytes:
    """The bytes of a data file (gunzipped), through the bounded reader: a regular
    file inside the dataset folder ``root``, at most ``RECORDS_BYTES`` either way."""
    data = reading.read_bytes(path, "data file", root, RECORDS_BYTES)
    if data[:2] == b"\x1f\x8b":
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
            data = f.read(RECORDS_BYTES + 1)
        if len(data) > RECORDS_BYTES:
            raise ConfigError(f"data file '{path}' holds more than {RECORDS_BYTES:,} bytes once decompressed")
    return data


def decode(data: bytes) -> str:
    """UTF-8 (BOM tolerated; UTF-16/32 with a BOM decoded); invalid bytes become
    lone surrogates (``surrogateescape``) so the damaged records can be found."""
    if data.startswith(b"\xef\xbb\xbf"):
        return data[3:].decode("utf-8", "surrogateescape")
    if data.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return data.decode("utf-32")
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16")
    return data.decode("utf-8", "surrogateescape")


def find_bad_text(obj: Any, where: str = "") -> str | None:
    """Path of the first string in ``obj`` holding undecodable bytes (surrogates), else None."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError as e:
            bad = obj[e.start].encode("utf-8", "surrogateescape")
            return f"{where or 'value'} (byte 0x{bad.hex().upper()})"
        return None
    if isinstance(obj, dict):
        for k, v in obj.items():
            hit = find_bad_text(k, where) or find_bad_text(v, f"{where}.{k}" if where else str(k))
            if hit:
                return hit
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            hit = find_bad_text(v, f"{where}[{i}]")
            if hit:
                return hit
    return None


def _line_col(text: str, pos: int) -> tuple[int, int]:
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return line, col


# -- records -------------------------------------------------------------------------
class RecordError(Exception):
    """Raised by a record parser: the record is bad and is skipped (message = why)."""


def object_list(rec: Any, key: str, item: str) -> list[dict]:
    """``rec[key]`` of a record: a non-empty list of objects (``item``: what one is
    called in messages, e.g. "message"). Otherwise RecordError saying what is wrong."""
    if not isinstance(rec, dict):
        raise RecordError(f"record is a {type(rec).__name__}, expected an object")
    if key not in rec:
        raise RecordError(f"missing '{key}'")
    value = rec[key]
    if not isinstance(value, list):
        raise RecordError(f"'{key}' is a {type(value).__name__}, expected a list of {item}s")
    if not value:
        raise RecordError(f"empty dialogue (no {item}s)")
    for i, v in enumerate(value):
        if not isinstance(v, dict):
            raise RecordError(f"{item} {i} is a {type(v).__name__}, expected an object")
    return value


def text_field(value: Any, what: str) -> str:
    """A record's optional text, stripped ("" when absent); RecordError if it is not a string."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RecordError(f"{what} is a {type(value).__name__}, expected a string")
    return value.strip()


def add_message(turns: list[Turn], speaker: str, text: str, photos: list[Photo]) -> None:
    """Append one message to ``turns``: consecutive messages of one speaker merge
    into one turn, joined by a space (as the reference code merges them); each
    photo's ``offset`` is where in the merged text it was shared."""
    if not turns or turns[-1].speaker != speaker:
        turns.append(Turn(speaker=speaker))
    turn = turns[-1]
    if text:
        turn.text = f"{turn.text} {text}" if turn.text else text
    for p in photos:
        p.offset = len(turn.text)
        turn.photos.append(p)


@dataclass
class RawRecord:
    """One record and its position label (``#3`` = 4th array element, ``line 7``)."""

    label: str
    value: Any


def iter_records(path: Path, report: LoadReport, root: Path | None = None) -> Iterator[RawRecord]:
    """Yield the raw records of ``path`` (a file of the dataset folder ``root``);
    problems go to ``report`` (bad_file/bad_record)."""
    file = str(path)
    try:
        data = read_bytes(path, root)
    except ConfigError as e:  # the bounded reader's refusal: a link out, a FIFO, too large
        report.add_problem(BAD_FILE, file, None, f"cannot read file: {e}")
        return
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        report.add_problem(BAD_FILE, file, None, f"cannot read file: {e}")
        return
    try:
        text = decode(data)
    except UnicodeDecodeError as e:
        report.add_problem(BAD_FILE, file, None, f"cannot decode file: {e}")
        return
    start = _WS.match(text).end()
    if start == len(text):
        report.add_problem(WARNING, file, None, "empty file (no records)")
        return
    if (depth := json_depth(text)) > MAX_DEPTH:  # before parsing: json recurses once per level
        report.add_problem(BAD_FILE, file, None, f"nests {depth} levels deep, more than the {MAX_DEPTH} allowed")
        return
    if text[start] == "[":
        yield from _iter_array(text, start, file, report)
        return
    # A single object, or JSON lines.
    try:
        obj = _DECODER.decode(text)
    except ValueError:  # not one JSON value (or a number too long to hold): JSON lines
        yield from _iter_lines(text, file, report)
        return
    if isinstance(obj, dict) and not _looks_like_record(obj):
        for key in ("data", "dialogues", "records"):
            if isinstance(obj.get(key), list):
                for i, rec in enumerate(obj[key]):
                    yield RawRecord(f"#{i}", rec)
                return
    yield RawRecord("#0", obj)


def _looks_like_record(obj: dict) -> bool:
    return any(k in obj for k in ("dialogue", "turns", "dialogue_id", "id"))


def _iter_array(text: str, pos: int, file: str, report: LoadReport) -> Iterator[RawRecord]:
    decoder = _DECODER
    pos += 1  # past "["
    index = 0
    n = len(text)
    while True:
        pos = _WS.match(text, pos).end()
        if pos < n and text[pos] == "]" and index == 0:
            pos += 1
            break
        try:
            value, pos = decoder.raw_decode(text, pos)
        except ValueError as e:
            line, col = _line_col(text, getattr(e, "pos", pos))
            report.add_problem(BAD_FILE, file, None,
                               f"invalid JSON at line {line} column {col} ({getattr(e, 'msg', e)}); "
                               f"kept the {index} record(s) before it, skipped the rest of the file")
            return
        yield RawRecord(f"#{index}", value)
        index += 1
        pos = _WS.match(text, pos).end()
        if pos < n and text[pos] == ",":
            pos += 1
            continue
        if pos < n and text[pos] == "]":
            pos += 1
            break
        line, col = _line_col(text, pos)
        what = "end of file" if pos >= n else repr(text[pos])
        report.add_problem(BAD_FILE, file, None,
                           f"invalid JSON at line {line} column {col} (expected ',' or ']' but found {what}); "
                           f"kept the {index} record(s) before it, skipped the rest of the file")
        return
    rest = _WS.match(text, pos).end()
    if rest < n:
        line, col = _line_col(text, rest)
        report.add_problem(BAD_FILE, file, None, f"extra data after the JSON array at line {line} column {col}")


def _iter_lines(text: str, file: str, report: LoadReport) -> Iterator[RawRecord]:
    """JSON lines. If no line parses at all, the file is reported once as a bad file."""
    parsed: list[RawRecord] = []
    errors: list[tuple[int, str]] = []
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON may hold raw U+2028
        if not line.strip():
            continue
        try:
            value = _DECODER.decode(line)
        except json.JSONDecodeError as e:
            errors.append((lineno, f"invalid JSON ({e.msg} at column {e.colno})"))
            continue
        except ValueError as e:
            errors.append((lineno, f"invalid JSON ({e})"))
            continue
        parsed.append(RawRecord(f"line {lineno}", value))
    if errors and not parsed:
        lineno, msg = errors[0]
        report.add_problem(BAD_FILE, file, None, f"not valid JSON or JSON lines: line {lineno}: {msg}")
        return
    err = iter(errors)
    pending = next(err, None)
    for rec in parsed:  # report bad lines in file order, interleaved with the good ones
        lineno = int(rec.label.split()[1])
        while pending is not None and pending[0] < lineno:
            report.add_problem(BAD_RECORD, file, f"line {pending[0]}", pending[1])
            pending = next(err, None)
        yield rec
    while pending is not None:
        report.add_problem(BAD_RECORD, file, f"line {pending[0]}", pending[1])
        pending = next(err, None)
