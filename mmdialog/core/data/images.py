"""Finding a photo's local file, and loading it safely.

File names
----------
A photo is looked up in an image folder (searched recursively, indexed once)
by, in order:

1. its ``id``: ``<dir>/<id>`` if the id has an image extension, else
   ``<dir>/<id>.<ext>`` (PhotoChat/Open Images ids look like
   ``train/a1a9d7a530eade0b``), then ``<dir>/<basename(id)>.<ext>``;
2. its ``url``: ``<dir>/<url_filename(url)>`` -- the first 16 hex digits of
   the SHA-1 of the URL plus the URL's extension (``.jpg`` when it has none
   we know) -- which is the name ``mmdialog.core.data.fetch.fetch_images``
   downloads to; the hash stem with any image extension is accepted too;
3. the URL's own file name (``15705071685_5d905852c2_o.jpg``), for folders
   filled with wget.

Loading
-------
``load_image`` always returns an 8-bit RGB ``PIL.Image``: transparency
(RGBA/LA/PA, palette or colour-key ``tRNS``) is composited on white, palette,
greyscale, 1-bit, CMYK and 16-bit images are converted, and EXIF orientation is
applied. A **huge image** raises ``DataError`` before any pixel is
decoded when ``width × height > max_pixels`` (default: Pillow's own limit,
89,478,485 px, about 9459²); we chose a clear error over silent downscaling,
since such a file is almost always a mistake or a decompression bomb -- pass a
larger ``max_pixels`` to accept it. A corrupt or truncated file raises
``DataError`` naming the path.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import re
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Union
from urllib.parse import unquote, urlsplit

from PIL import Image, ImageOps

from mmdialog.core.data.schema import Photo
from mmdialog.core.errors import DataError

if TYPE_CHECKING:  # pragma: no cover
    import torch

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
DEFAULT_EXT = ".jpg"
#: Default pixel limit of ``load_image`` (Pillow's ``Image.MAX_IMAGE_PIXELS`` default).
MAX_PIXELS = 89_478_485

PathLike = Union[str, os.PathLike]


# -- names -----------------------------------------------------------------------------
def caption_from_filename(name: str) -> str:
    """``golden_retriever-onBeach_2.jpg`` → ``golden retriever on beach 2``."""
    stem = Path(name).stem
    stem = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", stem)
    return " ".join(re.split(r"[\s_\-.+]+", stem)).strip().lower()


def url_hash(url: str) -> str:
    """First 16 hex digits of the SHA-1 of the URL (as given, UTF-8)."""
    return hashlib.sha1(url.encode("utf-8")).hexdigest()[:16]


def url_extension(url: str) -> str:
    """The URL path's image extension, lower-cased (``.jpeg`` kept), else ``.jpg``."""
    ext = posixpath.splitext(unquote(urlsplit(url).path))[1].lower()
    return ext if ext in IMAGE_EXTS else DEFAULT_EXT


def url_filename(url: str) -> str:
    """The stable local file name of a photo URL: ``sha1(url)[:16] + ext``."""
    return url_hash(url) + url_extension(url)


def _safe_rel(rel: str) -> str | None:
    """A relative posix path without ``..``/absolute parts, or None."""
    rel = rel.replace("\\", "/").strip()
    parts = [p for p in rel.split("/") if p not in ("", ".")]
    if not parts or any(p == ".." for p in parts) or rel.startswith("/"):
        return None
    return "/".join(parts)


class ImageIndex:
    """Index of the image files under a folder: by relative path and by file name,
    each with and without extension (lower-cased keys). Built once, then O(1)."""

    def __init__(self, root: PathLike) -> None:
        self.root = Path(root)
        self.by_rel: dict[str, Path] = {}
        self.by_name: dict[str, Path] = {}
        if not self.root.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(self.root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                if fn.startswith(".") or not fn.lower().endswith(IMAGE_EXTS):
                    continue
                full = Path(dirpath) / fn
                rel = full.relative_to(self.root).as_posix().lower()
                stem_rel = posixpath.splitext(rel)[0]
                name = fn.lower()
                for key, table in ((rel, self.by_rel), (stem_rel, self.by_rel),
                                   (name, self.by_name), (posixpath.splitext(name)[0], self.by_name)):
                    table.setdefault(key, full)

    def __len__(self) -> int:
        return len({p for p in self.by_rel.values()})

    def find(self, photo: Photo) -> Path | None:
        if photo.id:
            rel = _safe_rel(str(photo.id))
            if rel:
                key = rel.lower()
                hit = self.by_rel.get(key)
                if hit is None:
                    base = key.rsplit("/", 1)[-1]
                    hit = self.by_name.get(base)
                if hit is not None:
                    return hit
        if photo.url:
            hit = self.by_name.get(url_filename(photo.url)) or self.by_name.get(url_hash(photo.url))
            if hit is not None:
                return hit
            own = posixpath.basename(unquote(urlsplit(photo.url).path)).lower()
            if own:
                hit = self.by_name.get(own)
                if hit is not None:
                    return hit
        return None


_INDEX_CACHE: dict[tuple[str, float], ImageIndex] = {}
_INDEX_LOCK = threading.Lock()


def image_index(image_dir: PathLike, *, refresh: bool = False) -> ImageIndex:
    """A (cached per folder and modification time) ``ImageIndex``."""
    root = Path(image_dir).resolve()
    try:
        mtime = root.stat().st_mtime
    except OSError:
        mtime = -1.0
    key = (str(root), mtime)
    with _INDEX_LOCK:
        if refresh or key not in _INDEX_CACHE:
            _INDEX_CACHE[key] = ImageIndex(root)
        return _INDEX_CACHE[key]


def resolve_image(photo: Photo, image_dir: PathLike | None = None) -> Path | None:
    """The local file of ``photo``: its existing ``path``, else a match in ``image_dir``
    (see the module docs for the names tried), else None."""
    if photo.path is not None and Path(photo.path).is_file():
        return Path(photo.path)
    if image_dir is None:
        return None
    return image_index(image_dir).find(photo)


# -- loading ---------------------------------------------------------------------------
def _composite_on_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(bg, rgba).convert("RGB")


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
        return _composite_on_white(im)
    if mode == "RGB":
        return im.copy()
    if mode.startswith("I") or mode == "F":
        import numpy as np

        arr = np.asarray(im, dtype=np.float64)
        hi = float(arr.max()) if arr.size else 0.0
        if mode.startswith("I;16") or 255 < hi <= 65535:
            arr = arr / 257.0
        elif hi > 65535:
            arr = arr * (255.0 / hi)
        elif mode == "F" and hi <= 1.0:
            arr = arr * 255.0
        grey = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        return grey.convert("RGB")
    return im.convert("RGB")


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (bicubic), then center-crop ``size × size``."""
    if size <= 0:
        raise ValueError(f"size must be positive, not {size}")
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_image(path: PathLike, size: int | None = None, *, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Open an image file as 8-bit RGB (see the module docs).

    With ``size``, the result is ``size × size``: shorter side resized to
    ``size``, then center-cropped (JPEGs are decoded at a reduced scale when
    that is enough, which is much faster for big photos).
    Raises ``DataError`` (message names the path) for a missing, corrupt,
    truncated or too large file.
    """
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO would block Image.open forever; /dev/zero never ends
        raise DataError(f"{path}: not a regular file (a FIFO, device or folder)", file=str(path))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if max_pixels is not None and w * h > max_pixels:
                    raise DataError(f"{path}: image too large ({w}x{h} = {w * h:,} pixels > limit "
                                    f"{max_pixels:,}); pass a larger max_pixels to accept it",
                                    file=str(path))
                if size is not None and im.format == "JPEG":
                    im.draft("RGB", (size, size))
                im.load()
                im = ImageOps.exif_transpose(im) or im
                out = _to_rgb(im)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: image file not found", file=str(path)) from None
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: image too large ({e})", file=str(path)) from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError,
            Image.UnidentifiedImageError) as e:
        raise DataError(f"{path}: corrupt or unreadable image ({type(e).__name__}: {e})",
                        file=str(path)) from None
    if size is not None:
        out = center_crop_resize(out, size)
    return out


def to_tensor(image: Union[Image.Image, PathLike], size: int = 512) -> torch.Tensor:
    """A float tensor ``(3, size, size)`` in ``[0, 1]``: shorter side resized to ``size``,
    center crop (the paper's 512² crop). ``image`` is a PIL image or a file path."""
    import numpy as np
    import torch

    if not isinstance(image, Image.Image):
        image = load_image(image)
    elif image.mode != "RGB":
        image = _to_rgb(image)
    image = center_crop_resize(image, size)
    arr = np.asarray(image, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).to(torch.float32).div_(255.0)


def verify_image(path: PathLike, *, max_pixels: int | None = MAX_PIXELS) -> None:
    """Decode ``path`` (cheaply, at a small draft size for JPEGs); raise DataError if bad."""
    load_image(path, size=32, max_pixels=max_pixels)


class VerifiedPhotos:
    """What ``verify_image`` said of each photo, remembered between starts in
    ``$MMDIALOG_CACHE/verified.sqlite`` by (path, size, mtime): a second start does not
    decode every photo again, and a photo changed since is decoded anew. Several
    processes may share the file (SQLite locks it)."""

    def __init__(self, file: PathLike | None = None) -> None:
        import sqlite3

        if file is None:
            from mmdialog.core.assets import cache_dir

            file = cache_dir() / "verified.sqlite"
        self.db = sqlite3.connect(str(file), timeout=60)
        self.db.execute("CREATE TABLE IF NOT EXISTS verified (path TEXT PRIMARY KEY, size INTEGER, "
                        "mtime INTEGER, error TEXT)")
        self.new: list[tuple[str, int, int, str | None]] = []

    def check(self, path: Path) -> str | None:
        """None when the photo decodes, else the error message."""
        st = path.stat()
        row = self.db.execute("SELECT size, mtime, error FROM verified WHERE path = ?", (str(path),)).fetchone()
        if row is not None and row[:2] == (st.st_size, st.st_mtime_ns):
            return row[2]
        try:
            verify_image(path)
            error = None
        except DataError as e:
            error = str(e)
        self.new.append((str(path), st.st_size, st.st_mtime_ns, error))
        return error

    def close(self) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO verified VALUES (?, ?, ?, ?)", self.new)
        self.db.close()
