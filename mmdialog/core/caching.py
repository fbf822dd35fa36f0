"""What frozen encoders compute per photo (the VAE's posterior, the perceiver's
ViT + Q-Former features), kept on disk: a photo repeats every epoch, every run,
every resume and every evaluation; its encoding does not.

The **feature store** is a folder per encoder, ``<root>/<encoder>-<weights>-<resolution>/``
(``root``: ``data.feature_store``, default ``$MMDIALOG_CACHE/features``), holding one
safetensors file per photo, named by the hash of the photo file's bytes
(``content_key``). So the same photo under another name or in another dataset is
the same entry, and another encoder's weights or resolution is another folder.

* Reads are memory-mapped and hold nothing afterwards: a process's memory does not
  grow with the number of photos stored.
* Writes are atomic (temporary file, then rename); each entry carries a CRC-32 of
  its tensors. A torn or damaged entry (a copy cut short, a crash without a flush)
  is detected, removed and recomputed, never read.
* Several processes of a node, or of several nodes on shared storage, fill one
  store: the process that first claims a photo (``<key>.claim``, created with
  ``O_EXCL``) encodes it; the others wait for its entry. A claim whose process
  died (same host) or that is older than ``STALE_CLAIM_S`` is taken over.

Once every training photo is stored, the encoders behind the store may leave the
accelerator (``offload``) and come back only when called (``resident``): the same
numbers, gigabytes less memory (ViT-g alone is 2 GB in bf16).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import struct
import time
import zlib
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmdialog.core.errors import TrainingError
from mmdialog.core.files import atomic_write

#: A claim older than this (seconds) is abandoned: one photo's encoding takes far less.
STALE_CLAIM_S = 300.0
_POLL_S = 0.02
Entry = dict[str, torch.Tensor]


def store_root(folder: str | os.PathLike | None = None) -> Path:
    """``folder``, else ``$MMDIALOG_CACHE/features`` (default ``~/.cache/mmdialog/features``)."""
    if folder is not None:
        return Path(folder).expanduser()
    from mmdialog.core.assets import cache_dir

    return cache_dir() / "features"


_KEYS: dict[tuple[str, int, int], str] = {}


def content_key(path: str | os.PathLike) -> str:
    """The hash of a photo file's bytes (BLAKE2b, 128 bits, hex): the store's key.
    Remembered per (path, size, mtime) in this process, so a photo is read once."""
    st = os.stat(path)
    memo = (str(path), st.st_size, st.st_mtime_ns)
    key = _KEYS.get(memo)
    if key is None:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        key = _KEYS[memo] = h.hexdigest()
    return key


def weights_digest(tag: str, *parts: nn.Module | torch.Tensor) -> str:
    """A digest of an encoder's weights (names, dtypes, shapes, bytes) and ``tag``
    (what it computes and how, e.g. ``"qformer-v1"``): its store folder's name."""
    h = hashlib.blake2b(tag.encode(), digest_size=8)
    for i, part in enumerate(parts):
        named = [(str(i), part)] if torch.is_tensor(part) else [*part.named_parameters(), *part.named_buffers()]
        for name, t in named:
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_SAFE = re.compile(r"[0-9A-Za-z_-]{1,100}")


def _file_name(key: str) -> str:
    """``key`` when it is a plain name (content keys are), else its hash: a key never
    names a file outside the store."""
    return key if _SAFE.fullmatch(key) else hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def _crc(entry: Entry) -> str:
    crc = 0
    for name in sorted(entry):
        crc = zlib.crc32(entry[name].contiguous().reshape(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


def _complete(path: Path) -> bool:
    """The file is a whole safetensors file: its header's offsets reach exactly its size
    (a truncated copy is not), read from the first bytes only."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = struct.unpack("<Q", f.read(8))[0]
            if n > size:
                return False
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error):
        return False
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    return 8 + n + max(ends, default=0) == size


class FeatureStore:
    """One encoder's entries: ``folder`` = ``<root>/<encoder>-<digest>-<resolution>``.

    ``variants``: the key suffixes training may ask for per photo (``"-hflip"``: the
    generator's mirror image with random flips); a photo is ``complete`` when all are
    stored. ``encoded`` counts the entries this process computed."""

    def __init__(self, root: str | os.PathLike, encoder: str, digest: str, resolution: int,
                 variants: tuple[str, ...] = ("",)) -> None:
        self.folder = Path(root) / f"{encoder}-{digest}-{resolution}"
        self.encoder, self.resolution, self.variants = encoder, resolution, variants
        self.encoded = 0

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{_file_name(key)}.safetensors"

    def complete(self, key: str) -> bool:
        """Every variant of the photo is stored whole (no tensor is read)."""
        return all(_complete(self.path(key + v)) for v in self.variants)

    def get(self, key: str) -> Entry | None:
        """The stored entry, or None; a torn or damaged one is removed."""
        from safetensors import safe_open

        path = self.path(key)
        try:
            with safe_open(path, framework="pt") as f:
                crc = (f.metadata() or {}).get("crc32")
                entry = {name: f.get_tensor(name) for name in f.keys()}
        except FileNotFoundError:
            return None
        except Exception:  # SafetensorError: a torn header or a short file
            crc, entry = None, {}
        if crc is None or crc != _crc(entry):
            path.unlink(missing_ok=True)
            return None
        return entry

    def put(self, key: str, entry: Entry) -> None:
        from safetensors.torch import save_file

        entry = {k: v.detach().to("cpu").contiguous() for k, v in entry.items()}
        with atomic_write(self.path(key)) as tmp:
            save_file(entry, str(tmp), metadata={"crc32": _crc(entry)})

    # -- one process encodes each photo --------------------------------------------------
    def _claim_path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{_file_name(key)}.claim"

    def claim(self, key: str) -> bool:
        """True when this process now holds the right to encode ``key``."""
        path = self._claim_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale(path):
                    return False
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{socket.gethostname()} {os.getpid()}")
            return True
        return False

    def release(self, key: str) -> None:
        self._claim_path(key).unlink(missing_ok=True)

    @staticmethod
    def _stale(path: Path) -> bool:
        try:
            host, pid = path.read_text().split()
            age = time.time() - path.stat().st_mtime
        except (OSError, ValueError):  # gone, or still being written
            return False
        if age > STALE_CLAIM_S:
            return True
        if host != socket.gethostname():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True  # its process died mid-encoding
        except (PermissionError, ValueError):
            pass
        return False

    def fetch(self, keys: list[str], compute: Callable[[int], Entry]) -> list[Entry]:
        """The entries of ``keys``, computing (``compute(i)``: from photo ``i`` of the batch
        alone) and storing those no process has stored; those another process is encoding
        are waited for."""
        found: dict[str, Entry] = {}
        for k in keys:
            if k not in found and (e := self.get(k)) is not None:
                found[k] = e
        waiting = []
        for i, k in enumerate(keys):
            if k in found:
                continue
            if self.claim(k):
                found[k] = self._encode(k, i, compute)
            else:
                waiting.append(i)
        for i in waiting:  # after our own claims are done: no two processes wait for each other
            k = keys[i]
            while k not in found:
                if (e := self.get(k)) is not None:
                    found[k] = e
                elif self.claim(k):  # its claimant gave up or died
                    found[k] = self._encode(k, i, compute)
                else:
                    time.sleep(_POLL_S)
        return [found[k] for k in keys]

    def _encode(self, key: str, i: int, compute: Callable[[int], Entry]) -> Entry:
        try:
            entry = self.get(key)  # stored between our look and our claim
            if entry is None:
                entry = compute(i)
                self.put(key, entry)
                self.encoded += 1
            return entry
        finally:
            self.release(key)


def component_store(component: nn.Module, root: str | os.PathLike | None, encoder: str,
                    parts: tuple[nn.Module | torch.Tensor, ...], resolution: int,
                    variants: tuple[str, ...] = ("",)) -> FeatureStore:
    """A component's store, opened once (its weights hashed once): under ``root``, or
    under the root it was last opened with, else the default."""
    store = component.__dict__.get("_feature_store")  # not a buffer or a module: never saved
    if store is None or (root is not None and store.folder.parent != store_root(root)) or store.variants != variants:
        root = store_root(root) if root is not None or store is None else store.folder.parent
        store = FeatureStore(root, encoder, weights_digest(encoder, *parts), resolution, variants)
        component.__dict__["_feature_store"] = store
    return store


def cached_per_photo(cache: FeatureStore | MutableMapping[str, Any], names: list[str],
                     compute: Callable[[int], Any]) -> list[Any]:
    """The entries for ``names``, computing each missing one from its photo (index
    ``i`` of the batch) alone: an entry never depends on its batch-mates, so a
    resumed run, or another process, computes the same values. ``cache`` is a
    ``FeatureStore`` (entries are dicts of tensors) or an in-memory mapping."""
    with torch.no_grad():
        if isinstance(cache, FeatureStore):
            return cache.fetch(names, compute)
        for i, name in enumerate(names):
            if name not in cache:
                cache[name] = compute(i)
        return [cache[name] for name in names]


def require_pixels(pixels: torch.Tensor, key: str, store: FeatureStore) -> torch.Tensor:
    """A photo's pixels for encoding: the collator leaves them out (empty, or NaN
    in a batch that mixes) when the store held the photo whole; if its entry was
    damaged since, there is nothing to encode it from, and saying so beats storing
    features of an empty image."""
    if pixels.numel() == 0 or not bool(torch.isfinite(pixels).all()):
        raise TrainingError(f"the stored features of photo {key} in {store.folder} were damaged after the "
                            "batch was built (the entry is removed): resume with --resume last to encode it again")
    return pixels


def offload(modules: list[nn.Module]) -> None:
    """Move frozen ``modules`` to the CPU; ``resident`` brings them back for a call."""
    for module in modules:
        module.to("cpu")


@contextmanager
def resident(device: torch.device, *modules: nn.Module) -> Iterator[None]:
    """Run with ``modules`` on ``device``: one that was offloaded comes back for
    the call (a photo missing from the store, or inference) and leaves again."""
    homes = [(m, p.device) for m in modules if (p := next(m.parameters(), None)) is not None and p.device != device]
    for module, _ in homes:
        module.to(device)
    try:
        yield
    finally:
        for module, home in homes:
            module.to(home)


def fill_stores(components: dict[str, Any], stores: dict[str, FeatureStore], photos: list[Path],
                device: torch.device, progress: Callable[[int], None] | None = None) -> dict[str, int]:
    """Encode every photo the ``stores`` lack, as training would (``component.encode_photo``
    on the collator's pixels, one photo at a time, each variant), and store it: what
    ``mmdialog data cache`` runs ahead of training. ``progress(1)`` after each photo.
    Returns the photos encoded per store, and ``unreadable``."""
    from mmdialog.core.data.images import load_image, to_tensor
    from mmdialog.core.errors import DataError

    counts = {kind: 0 for kind in stores} | {"unreadable": 0}
    seen: set[str] = set()
    for path in photos:
        try:
            key = content_key(path)
            if key not in seen:
                seen.add(key)
                for kind, store in stores.items():
                    if store.complete(key):
                        continue
                    # The collator's pixels (its default_image_loader): centre crop, [0, 1].
                    pixels = to_tensor(load_image(path), store.resolution)[None].to(device)  # (1, 3, S, S)
                    before = store.encoded
                    cached_per_photo(store, [key + v for v in store.variants],
                                     lambda j, c=components[kind], v=store.variants: c.encode_photo(pixels, v[j]))
                    counts[kind] += store.encoded > before
        except (DataError, OSError):
            counts["unreadable"] += 1
        if progress is not None:
            progress(1)
    return counts
