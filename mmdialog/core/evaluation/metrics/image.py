"""Image metrics: FID, KID and Inception Score over the reference's two
unpaired photo sets (:func:`set_scores`), via ``torch-fidelity`` as the
reference computes them, or via ``torchmetrics`` with a pluggable feature
network (:class:`ImageMetrics`, :func:`feature_extractor`); and CLIP score
(:func:`clip_score`).

Comparability: published FID/IS numbers use the TF-ported Inception-v3
(``pt_inception-2015-12-05``) network. Only that network, loaded from a local
weights file (:func:`load_inception_weights`; nothing is downloaded), gives
``comparable = True`` results; the fallback extractor is a seeded random-init
conv net whose numbers are useful only for relative comparisons inside one
run, and are flagged "not comparable with published FID/IS" everywhere they
are reported.
"""
from __future__ import annotations

import math
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmdialog.core.errors import ConfigError, DependencyError

NOT_COMPARABLE_NOTE = "not comparable with published FID/IS"

# --------------------------------------------------------------------------- #
# Image metrics
# --------------------------------------------------------------------------- #


def _to_uint8(images: Tensor) -> Tensor:
    """Convert (N,3,H,W) uint8 or float in [0, 1] images to uint8."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"expected uint8 or float images, got {images.dtype}")
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


class RandomConvFeatureExtractor(nn.Module):
    """Deterministic fallback feature network (**not comparable with published FID/IS**).

    A small conv net with weights drawn from a private ``torch.Generator``
    seeded with ``seed`` (global RNG untouched), so the same seed gives the
    same network everywhere. Input: uint8 (N,3,H,W); images are resized to
    ``resize`` x ``resize`` and mapped to [-1, 1]. Output:
    ``(features (N, num_features), logits (N, num_classes))`` - the logits feed
    the Inception Score; they are multiplied by ``logit_scale`` so that the
    class posteriors are not near-uniform (which would pin IS at 1).
    """

    comparable = False

    def __init__(
        self,
        num_features: int = 64,
        num_classes: int = 100,
        seed: int = 0,
        resize: int = 64,
        logit_scale: float = 10.0,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.logit_scale = logit_scale
        self.num_classes = num_classes
        self.resize = resize
        self.name = f"random-conv-fallback(seed={seed},d={num_features})"
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, num_features, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(num_features, num_classes)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.parameters():
                if p.ndim > 1:
                    fan_in = p[0].numel()
                    p.copy_(torch.randn(p.shape, generator=gen) * math.sqrt(2.0 / fan_in))
                else:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
        self.eval()
        self.requires_grad_(False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        x = _to_uint8(images).float() / 127.5 - 1.0
        x = nn.functional.interpolate(
            x, size=(self.resize, self.resize), mode="bilinear", align_corners=False
        )
        feats = self.body(x)
        return feats, self.logit_scale * self.head(feats)


METRICS_EXTRA = "pip install 'mmdialog[metrics]'"
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def require_torch_fidelity() -> Any:
    """The ``torch_fidelity`` module, or a one-line :class:`DependencyError`
    saying what to install (it imports torchvision, which must be the build
    made for the installed torch)."""
    try:
        import torch_fidelity
    except Exception as exc:  # ImportError, or a torchvision built for another torch failing at import
        cause = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DependencyError(f"comparable FID/IS need torch-fidelity and the torchvision built for your torch: "
                              f"{METRICS_EXTRA} (import failed: {cause})") from None
    return torch_fidelity


def load_inception_weights(path: str | Path) -> dict[str, Tensor]:
    """The state dict of torch-fidelity's Inception-v3 (``inception-v3-compat``,
    the TF 2015-12-05 graph that published FID/IS use) from a local file, read
    without executing code: safetensors, or ``torch.load(weights_only=True)``.
    A missing file, another format or another network is a one-line ``ConfigError``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"Inception weights file not found: {p}; pass the local copy of {INCEPTION_FILE} "
                          "(README, Evaluation)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(p)
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip or safetensors header errors: all mean "not a weights file"
        raise ConfigError(f"{p}: not a readable weights file ({type(exc).__name__}); pass {INCEPTION_FILE} "
                          "or its safetensors conversion") from None
    fc = state.get("fc.weight") if isinstance(state, dict) else None
    if not isinstance(fc, Tensor) or tuple(fc.shape) != (1008, 2048) or "Conv2d_1a_3x3.conv.weight" not in state:
        raise ConfigError(f"{p}: not torch-fidelity's Inception-v3 weights (expected Conv2d_1a_3x3.* … fc.weight "
                          f"of shape (1008, 2048)); pass {INCEPTION_FILE}")
    return state


@contextmanager
def _fidelity_weights_file(path: str | Path) -> Iterator[str]:
    """A private copy of the weights holding only the tensors read safely by
    :func:`load_inception_weights`: torch-fidelity opens its weights path with
    ``weights_only=False``, so it never sees the user's file itself."""
    state = load_inception_weights(path)
    with tempfile.TemporaryDirectory(prefix="mmdialog-inception-") as tmp:
        copy = Path(tmp) / INCEPTION_FILE
        torch.save(state, copy)
        yield str(copy)


class TorchFidelityInceptionExtractor(nn.Module):
    """The TF-ported Inception-v3 used for published FID/IS (via ``torch-fidelity``).

    Wraps ``torch_fidelity.FeatureExtractorInceptionV3("inception-v3-compat",
    ["2048", "logits_unbiased"])`` with the weights of
    :func:`load_inception_weights`. Input uint8 (N,3,H,W) of any size
    (resized internally to 299). Output ``(pool features (N, 2048), logits (N, 1008))``.
    """

    comparable = True
    num_features = 2048

    def __init__(self, weights_path: str) -> None:
        super().__init__()
        fidelity = require_torch_fidelity()
        with _fidelity_weights_file(weights_path) as copy:
            self.net = fidelity.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                            feature_extractor_weights_path=copy)
        self.net.eval()
        self.name = f"inception-v3-compat({weights_path})"

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        feats, logits = self.net(_to_uint8(images))
        return feats.flatten(1), logits.flatten(1)


def feature_extractor(inception_weights: str | None = None, *, seed: int = 0) -> nn.Module:
    """Build the feature network for :class:`ImageMetrics`.

    * ``inception_weights`` given: the published-metrics Inception-v3 loaded from
      that local file through ``torch-fidelity`` (:class:`TorchFidelityInceptionExtractor`,
      ``comparable = True``). Raises :class:`DependencyError` saying what to
      install when ``torch_fidelity`` (and hence torchvision) is unavailable,
      and ``ConfigError`` when the file is missing or holds other weights.
    * ``None``: :class:`RandomConvFeatureExtractor` (``comparable = False``) -
      results are **not comparable with published FID/IS**.

    Every returned module maps uint8 (N,3,H,W) to ``(features, logits)`` and
    has ``name``, ``num_features`` and ``comparable`` attributes.
    """
    if inception_weights is None:
        return RandomConvFeatureExtractor(seed=seed)
    load_inception_weights(inception_weights)  # the file's errors before the dependency's
    return TorchFidelityInceptionExtractor(inception_weights)


class _CachedExtractor(nn.Module):
    """Runs the wrapped extractor once per input tensor and serves both heads.

    torchmetrics' FID, KID and IS each call their feature module on the same
    tensor; caching by tensor identity avoids three forward passes.
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self._last_input: Tensor | None = None
        self._last_output: tuple[Tensor, Tensor] | None = None

    def outputs(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if self._last_input is not images or self._last_output is None:
            with torch.no_grad():
                self._last_output = self.base(images)
            self._last_input = images
        return self._last_output

    def clear(self) -> None:
        self._last_input = None
        self._last_output = None


class _Head(nn.Module):
    """A torchmetrics-compatible view (``num_features`` + forward) on one output."""

    def __init__(self, cache: _CachedExtractor, index: int, num_features: int) -> None:
        super().__init__()
        self.cache = [cache]  # list: don't register as a submodule twice
        self.index = index
        self.num_features = num_features

    def forward(self, images: Tensor) -> Tensor:
        return self.cache[0].outputs(images)[self.index]


class ImageMetrics:
    """FID, KID and Inception Score of generated vs. real images (torchmetrics).

    * FID: Heusel et al. 2017, ``||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^(1/2))``
      on the extractor's features.
    * KID: Binkowski et al. 2018, unbiased MMD^2 with the cubic polynomial kernel,
      mean/std over ``kid_subsets`` random subsets of size ``min(kid_subset_size, n)``.
    * IS: Salimans et al. 2016, ``exp(E_x KL(p(y|x) || p(y)))`` on the *generated*
      images, mean/std over ``min(is_splits, n_fake)`` splits.

    ``extractor`` (default: :func:`feature_extractor` of ``inception_weights``)
    must map uint8 (N,3,H,W) to ``(features, logits)`` and have an integer
    ``num_features`` (optional ``name``, ``comparable``, ``num_classes``).
    ``update_real`` / ``update_fake`` take uint8 (N,3,H,W) or float in [0, 1].
    ``compute()`` is seeded (``seed``) so KID/IS subsets are reproducible, and
    returns NaN for metrics that need more samples than were given (FID and
    KID need >= 2 real and >= 2 generated images, IS >= 1 generated image).
    """

    def __init__(
        self,
        extractor: nn.Module | None = None,
        *,
        inception_weights: str | None = None,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        is_splits: int = 10,
        seed: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance
            from torchmetrics.image.inception import InceptionScore
            from torchmetrics.image.kid import KernelInceptionDistance
        except Exception:  # torchmetrics imports torch-fidelity whenever it is installed, even when it cannot import
            require_torch_fidelity()
            raise

        base = extractor if extractor is not None else feature_extractor(inception_weights)
        self.extractor = base
        self.name: str = str(getattr(base, "name", type(base).__name__))
        self.comparable: bool = bool(getattr(base, "comparable", False))
        self.kid_subset_size = kid_subset_size
        self.is_splits = is_splits
        self.seed = seed
        self.device = torch.device(device)
        self._cache = _CachedExtractor(base)
        feats = _Head(self._cache, 0, int(base.num_features))
        logits = _Head(self._cache, 1, int(getattr(base, "num_classes", 1008)))
        with warnings.catch_warnings():  # "will save all extracted features in buffer"
            warnings.filterwarnings("ignore", message=".*save all extracted features.*")
            self.fid = FrechetInceptionDistance(feature=feats)
            self.kid = KernelInceptionDistance(feature=feats, subsets=kid_subsets, subset_size=1)
            self.inception_score = InceptionScore(feature=logits, splits=1)
        self._cache.to(self.device)
        for m in (self.fid, self.kid, self.inception_score):
            m.to(self.device)
        self.n_real = 0
        self.n_fake = 0

    @torch.no_grad()
    def update_real(self, images: Tensor) -> None:
        """Add a batch of real (reference) images."""
        x = _to_uint8(images).to(self.device)
        self.fid.update(x, real=True)
        self.kid.update(x, real=True)
        self._cache.clear()
        self.n_real += x.shape[0]

    @torch.no_grad()
    def update_fake(self, images: Tensor) -> None:
        """Add a batch of generated images."""
        x = _to_uint8(images).to(self.device)
        self.fid.update(x, real=False)
        self.kid.update(x, real=False)
        self.inception_score.update(x)
        self._cache.clear()
        self.n_fake += x.shape[0]

    def reset(self) -> None:
        for m in (self.fid, self.kid, self.inception_score):
            m.reset()
        self.n_real = self.n_fake = 0

    def compute(self) -> dict[str, Any]:
        """Return ``{fid, kid_mean, kid_std, is_mean, is_std, n_images, n_real,
        feature_extractor, comparable}`` (``n_images`` = number of generated
        images). Non-comparable results also carry ``"note"``."""
        nan = float("nan")
        out: dict[str, Any] = {
            "fid": nan, "kid_mean": nan, "kid_std": nan, "is_mean": nan, "is_std": nan,
            "n_images": self.n_fake, "n_real": self.n_real,
            "feature_extractor": self.name, "comparable": self.comparable,
        }
        if not self.comparable:
            out["note"] = NOT_COMPARABLE_NOTE
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            if self.n_real >= 2 and self.n_fake >= 2:
                out["fid"] = float(self.fid.compute())
                self.kid.subset_size = max(2, min(self.kid_subset_size, self.n_real, self.n_fake))
                kid_mean, kid_std = self.kid.compute()
                out["kid_mean"], out["kid_std"] = float(kid_mean), float(kid_std)
            if self.n_fake >= 1:
                splits = max(1, min(self.is_splits, self.n_fake))
                self.inception_score.splits = splits
                with warnings.catch_warnings():  # std() of a single split
                    warnings.filterwarnings("ignore", message=".*degrees of freedom.*")
                    is_mean, is_std = self.inception_score.compute()
                out["is_mean"] = float(is_mean)
                out["is_std"] = float(is_std) if splits > 1 else 0.0
        return out


# --------------------------------------------------------------------------- #
# FID / KID / IS over the reference's image sets
# --------------------------------------------------------------------------- #

REFERENCE_IMAGE_SIZE = 512  # the reference writes both sets as 512² PNGs before scoring them


class ImageFiles(torch.utils.data.Dataset):
    """Image files as uint8 ``(3, size, size)`` tensors: shorter side resized to
    ``size``, centre crop (the reference's 512² crops; it also flips gold photos
    at random, which we leave out so that scores repeat)."""

    def __init__(self, paths: Sequence[str | Path], size: int = REFERENCE_IMAGE_SIZE) -> None:
        self.paths, self.size = [Path(p) for p in paths], size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Tensor:
        import numpy as np

        from mmdialog.core.data.images import load_image

        pixels = np.asarray(load_image(self.paths[i], self.size), dtype=np.uint8)  # (H, W, 3)
        return torch.from_numpy(pixels.copy()).permute(2, 0, 1)                   # (3, H, W)


def _too_few(n: int, which: str, note: str | None) -> str | None:
    """Why a set of ``n`` photos cannot be scored (FID, KID and IS need two), or None."""
    if n >= 2:
        return None
    return (note or f"no {which} photos") if n == 0 else f"fewer than 2 {which} photos (1)"


def set_scores(generated: Sequence[str | Path], gold: Sequence[str | Path], inception_weights: str | Path | None = None,
               *, size: int = REFERENCE_IMAGE_SIZE, is_splits: int = 10, batch_size: int = 32,
               notes: Mapping[str, str] | None = None) -> dict[str, Any]:
    """FID and KID of the generated photos against the gold photos (two
    unpaired sets, set-level) and the Inception Score of the generated photos
    over ``is_splits`` splits, as the reference evaluates (``torch_fidelity.
    calculate_metrics(input1=generated, input2=gold, isc=True, isc_splits=10,
    fid=True, batch_size=32)`` on 512² photos).

    With ``inception_weights`` (a local copy of :data:`INCEPTION_FILE`) the
    scores come from torch-fidelity itself and are ``comparable``; without, from
    :class:`ImageMetrics` with the seeded stand-in network (not comparable).
    ``notes["generated" | "gold"]``: why that set is empty, for the reason.

    Returns ``fid, kid_mean, kid_std, is_mean, is_std`` (None when they cannot
    be computed, with the reason in ``reasons[key]``), ``n_generated``,
    ``n_gold``, ``is_splits``, ``feature_extractor`` and ``comparable``.
    """
    notes = notes or {}
    n_gen, n_gold = len(generated), len(gold)
    splits = max(1, min(is_splits, n_gen))
    out: dict[str, Any] = {"fid": None, "kid_mean": None, "kid_std": None, "is_mean": None, "is_std": None,
                           "n_generated": n_gen, "n_gold": n_gold, "is_splits": splits,
                           "comparable": inception_weights is not None, "reasons": {}}
    gen_reason, gold_reason = _too_few(n_gen, "generated", notes.get("generated")), \
        _too_few(n_gold, "gold", notes.get("gold"))
    pair_reason = gen_reason or gold_reason
    for key in ("is_mean", "is_std"):
        if gen_reason:
            out["reasons"][key] = gen_reason
    for key in ("fid", "kid_mean", "kid_std"):
        if pair_reason:
            out["reasons"][key] = pair_reason
    pair = pair_reason is None
    if inception_weights is not None:
        out["feature_extractor"] = "inception-v3-compat (torch-fidelity)"
        if gen_reason:
            return out
        fidelity = require_torch_fidelity()
        with _fidelity_weights_file(inception_weights) as weights:
            m = fidelity.calculate_metrics(
                input1=ImageFiles(generated, size), input2=ImageFiles(gold, size) if pair else None,
                isc=True, fid=pair, kid=pair, isc_splits=splits, kid_subset_size=min(1000, n_gen, n_gold),
                batch_size=batch_size, feature_extractor_weights_path=weights, cuda=torch.cuda.is_available(),
                save_cpu_ram=True, verbose=False)
        out.update(is_mean=m["inception_score_mean"], is_std=m["inception_score_std"])
        if pair:
            out.update(fid=m["frechet_inception_distance"], kid_mean=m["kernel_inception_distance_mean"],
                       kid_std=m["kernel_inception_distance_std"])
        return out
    im = ImageMetrics(is_splits=is_splits)
    out["feature_extractor"], out["note"] = im.name, NOT_COMPARABLE_NOTE
    if gen_reason:
        return out
    for files, update in ((ImageFiles(generated, size), im.update_fake), (ImageFiles(gold, size), im.update_real)):
        for i in range(0, len(files), batch_size):
            update(torch.stack([files[j] for j in range(i, min(i + batch_size, len(files)))]))  # (B, 3, H, W)
    m = im.compute()
    out.update(is_mean=m["is_mean"], is_std=m["is_std"])
    if pair:
        out.update(fid=m["fid"], kid_mean=m["kid_mean"], kid_std=m["kid_std"])
    return out


# --------------------------------------------------------------------------- #
# CLIP score
# --------------------------------------------------------------------------- #


def _embeds(output: Any) -> Tensor:
    """Projected embedding from ``get_*_features``: a tensor in transformers 4,
    a ModelOutput whose ``pooler_output`` is the projection in transformers 5."""
    if isinstance(output, Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None and isinstance(output, Mapping):
        pooled = output.get("pooler_output")
    if pooled is None:
        raise TypeError(f"cannot find embeddings in {type(output).__name__}")
    return pooled


def _as_pil_list(images: Any) -> list[Any]:
    from PIL import Image

    if isinstance(images, Tensor):
        arr = _to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
        return [Image.fromarray(a) for a in arr]
    return list(images)


@torch.no_grad()
def clip_scores(
    images: Any,
    texts: Sequence[str],
    model: Any,
    processor: Any,
    *,
    batch_size: int = 32,
) -> Tensor:
    """Per-pair CLIP score (Hessel et al. 2021, without their w=2.5 rescaling).

    ``score_i = 100 * max(cos(E_img(image_i), E_txt(text_i)), 0)``, as
    torchmetrics' ``CLIPScore``. ``images``: a (N,3,H,W) uint8 / float [0,1]
    tensor or a list of PIL images; ``processor``: a ``CLIPProcessor`` (or any
    callable taking ``text=``, ``images=``, ``return_tensors=``, ``padding=``,
    ``truncation=``). Texts longer than the tokenizer's maximum are truncated.
    Returns a float tensor of shape (N,) on the CPU.
    """
    pil = _as_pil_list(images)
    if len(pil) != len(texts):
        raise ValueError(f"got {len(pil)} images but {len(texts)} texts")
    device = next(model.parameters()).device
    scores: list[Tensor] = []
    for i in range(0, len(pil), batch_size):
        batch = processor(
            text=list(texts[i : i + batch_size]),
            images=pil[i : i + batch_size],
            return_tensors="pt",
            padding=True,
            truncation=True,
        )
        img = _embeds(model.get_image_features(pixel_values=batch["pixel_values"].to(device)))
        txt_kwargs = {"input_ids": batch["input_ids"].to(device)}
        if "attention_mask" in batch:
            txt_kwargs["attention_mask"] = batch["attention_mask"].to(device)
        txt = _embeds(model.get_text_features(**txt_kwargs))
        cos = nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1)
        scores.append((100.0 * cos.clamp(min=0)).cpu())
    return torch.cat(scores) if scores else torch.zeros(0)


def clip_score(
    images: Any, texts: Sequence[str], model: Any, processor: Any, *, batch_size: int = 32
) -> float:
    """Mean of :func:`clip_scores` over all pairs (0 for no pairs)."""
    s = clip_scores(images, texts, model, processor, batch_size=batch_size)
    return float(s.mean()) if s.numel() else 0.0
