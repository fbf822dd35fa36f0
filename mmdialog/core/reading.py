"""Reading the files a model folder, a cache or a dataset hands us: one bounded
reader per kind (the writing side is ``core/files.py``).

Every reader refuses, before it parses anything,

* a path that is not a regular file (a FIFO would block forever, ``/dev/zero``
  never ends, a folder is no file),
* a symbolic link that leaves the folder the file belongs to (``root``): a
  received folder names only its own files,
* a file larger than its kind's cap, and text nested deeper than ``MAX_DEPTH``;

then parses without ever building something much bigger than the text: YAML
aliases (``*name``, the anchor bomb) are refused rather than expanded; numbers
with more than ``MAX_DIGITS`` digits, and ones that overflow to infinity
(``1e999``), are refused. Every failure is one ``ConfigError`` line naming the
file; a dataset reader reports it against the file instead (``data/records.py``).
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from pathlib import Path
from typing import Any, BinaryIO

import yaml

from mmdialog.core.errors import ConfigError

#: Caps on what one file may hold, by kind.
MANIFEST_BYTES = 1 << 20          # mmdialog.json
CONFIG_BYTES = 1 << 20            # config.yaml, a --config file
SMALL_JSON_BYTES = 16 << 20       # tokenizer additions, metrics, weight indexes
INDEX_BYTES = 64 << 20            # a library's captions.json
RECORDS_BYTES = 4 << 30           # one dataset file (JSON / JSON lines, gzip or not, after decompression)
MAX_DEPTH = 64                    # nesting of lists / mappings
MAX_DIGITS = 100                  # digits of one number

_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)  # a JSON string, as an unrolled loop (linear)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = str.maketrans({"[": "\x01", "{": "\x01", "]": "\xff", "}": "\xff"})


# -- files ------------------------------------------------------------------------------------
def check_file(path: str | os.PathLike, what: str, root: str | os.PathLike | None = None,
               max_bytes: int | None = None) -> Path:
    """``path`` if it is a regular file (through links that stay inside ``root``)
    of at most ``max_bytes``; one-line ``ConfigError`` otherwise."""
    p = Path(path)
    if root is not None:
        real, top = p.resolve(), Path(root).resolve()
        if not real.is_relative_to(top):
            raise ConfigError(f"{what} '{p}' is a link to '{real}', outside its folder '{root}'; a received "
                              "folder may only name its own files")
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise ConfigError(f"{what} '{p}' does not exist") from None
    except OSError as e:
        raise ConfigError(f"{what} '{p}' cannot be read: {e.strerror or e}") from None
    _check_stat(st, p, what, max_bytes)
    return p


def _check_stat(st: os.stat_result, p: Path, what: str, max_bytes: int | None) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file")
        raise ConfigError(f"{what} '{p}' is {kind}, not a regular file; refusing to read it")
    if max_bytes is not None and st.st_size > max_bytes:
        raise ConfigError(f"{what} '{p}' is {st.st_size:,} bytes, more than the {max_bytes:,} such a file may "
                          "hold; refusing to read it")


def open_file(path: str | os.PathLike, what: str, root: str | os.PathLike | None = None,
              max_bytes: int | None = None) -> BinaryIO:
    """A checked file (``check_file``), opened for reading: for a reader that streams it."""
    p = check_file(path, what, root, max_bytes)
    try:
        # O_NONBLOCK: had the file been swapped for a FIFO since the check, open would block on it.
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise ConfigError(f"{what} '{p}' cannot be read: {e.strerror or e}") from None
    f = os.fdopen(fd, "rb")
    try:
        _check_stat(os.fstat(f.fileno()), p, what, max_bytes)  # what was opened, not what was checked
    except ConfigError:
        f.close()
        raise
    return f


def read_bytes(path: str | os.PathLike, what: str, root: str | os.PathLike | None = None,
               max_bytes: int = SMALL_JSON_BYTES) -> bytes:
    """The bytes of a checked file, never more than ``max_bytes``."""
    p = Path(path)
    with open_file(p, what, root, max_bytes) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ConfigError(f"{what} '{p}' holds more than the {max_bytes:,} bytes such a file may hold")
    return data


def read_text(path: str | os.PathLike, what: str, root: str | os.PathLike | None = None,
              max_bytes: int = SMALL_JSON_BYTES) -> str:
    try:
        return read_bytes(path, what, root, max_bytes).decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} '{path}' is not UTF-8 text ({e.reason} at byte {e.start})") from None


# -- JSON -------------------------------------------------------------------------------------
def json_depth(text: str) -> int:
    """How deeply the lists and objects of JSON ``text`` nest (brackets in strings ignored)."""
    import numpy as np

    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).translate(_STEP).encode("latin-1")
    steps = np.frombuffer(brackets, dtype=np.int8)            # +1 opens, -1 closes
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_DIGITS:
        raise ValueError(f"a number of {len(text.lstrip('-')):,} digits")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if len(text) > MAX_DIGITS + 10 or not math.isfinite(value):
        raise ValueError(f"the number {text[:20]}{'…' if len(text) > 20 else ''}, too large to hold")
    return value


def _constant(name: str) -> Any:
    raise ValueError(f"{name}, which is not JSON")


def parse_json(text: str, where: str) -> Any:
    """JSON ``text`` parsed within the bounds; ``where`` starts the error line."""
    if (depth := json_depth(text)) > MAX_DEPTH:
        raise ConfigError(f"{where} nests {depth} levels deep, more than the {MAX_DEPTH} allowed")
    try:
        return json.loads(text, parse_int=bounded_int, parse_float=_float, parse_constant=_constant)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{where} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{where} holds {e or 'too deep a nesting'}") from None


def read_json(path: str | os.PathLike, what: str, root: str | os.PathLike | None = None,
              max_bytes: int = SMALL_JSON_BYTES, kind: type = dict) -> Any:
    """A JSON value of type ``kind`` (an object by default) from a checked file."""
    data = parse_json(read_text(path, what, root, max_bytes), f"{what} file '{path}'")
    if not isinstance(data, kind):
        raise ConfigError(f"{what} file '{path}' must hold a JSON {'object' if kind is dict else kind.__name__}, "
                          f"not {type(data).__name__}")
    return data


# -- YAML -------------------------------------------------------------------------------------
class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases, deep nesting and huge numbers."""

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed",
                                              self.peek_event().start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_yaml_int(self, node: Any) -> int:
        if len(node.value.lstrip("+-")) > MAX_DIGITS:
            raise yaml.constructor.ConstructorError(None, None, f"a number of {len(node.value):,} digits",
                                                    node.start_mark)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node: Any) -> float:
        value = super().construct_yaml_float(node)
        if not math.isfinite(value) and not node.value.lower().lstrip("+-").startswith((".inf", ".nan")):
            raise yaml.constructor.ConstructorError(None, None, f"the number {node.value[:20]}, too large to hold",
                                                    node.start_mark)
        return value


_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)
_BoundedLoader.add_constructor("tag:yaml.org,2002:float", _BoundedLoader.construct_yaml_float)


def parse_yaml(text: str, where: str) -> Any:
    """YAML ``text`` parsed within the bounds (no aliases); ``where`` starts the error line."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 — a SafeLoader, bounded
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{where} is not valid YAML: {e.problem or e.context}{at}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{where} nests too deeply") from None


def read_yaml(path: str | os.PathLike, what: str, root: str | os.PathLike | None = None,
              max_bytes: int = CONFIG_BYTES) -> Any:
    return parse_yaml(read_text(path, what, root, max_bytes), f"{what} '{path}'")


# -- GGUF -------------------------------------------------------------------------------------
def check_gguf(path: str | os.PathLike, what: str, root: str | os.PathLike | None = None) -> Path:
    """A GGUF file's header checked (magic, version, counts that fit the file):
    the parser (``gguf.GGUFReader``, through transformers) reads the rest, and
    its failures on a file cut short are turned into one line by the caller."""
    p = check_file(path, what, root)
    head = _head(p, 24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise ConfigError(f"{what} '{p}' is not a GGUF file (it does not start with the GGUF header)")
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    size = p.stat().st_size
    if version not in (2, 3) or n_tensors > size // 8 or n_kv > size // 8:
        raise ConfigError(f"{what} '{p}' has a damaged GGUF header (version {version}, {n_tensors:,} tensors, "
                          f"{n_kv:,} metadata keys in {size:,} bytes)")
    return p


def _head(path: Path, n: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        return f.read(n)


# -- caches -----------------------------------------------------------------------------------
def cache_file(path: str | os.PathLike, root: str | os.PathLike, max_bytes: int = 4 << 30) -> bool:
    """Whether a cache entry may be read: a regular file inside the cache ``root``
    within ``max_bytes``. Anything else is a miss, and the entry is written again
    (``atomic_write`` replaces whatever stands under the name)."""
    try:
        check_file(path, "cache file", root, max_bytes)
    except ConfigError:
        return False
    return True
