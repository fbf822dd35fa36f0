"""Image metrics: FID, KID and Inception Score over the reference's two
unpaired photo sets (``set_scores``), via ``torch-fidelity`` as the
reference computes them (``fidelity.py``), or via ``torchmetrics`` with a
pluggable feature network (``ImageMetrics``, ``feature_extractor``;
without Inception weights the stand-in of ``stand_in.py``). The CLIP score is
``clip.py``.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from mmdialog.core.evaluation.metrics.fidelity import (
    TorchFidelityInceptionExtractor,
    fidelity_weights_file,
    load_inception_weights,
    require_torch_fidelity,
)
from mmdialog.core.evaluation.metrics.stand_in import NOT_COMPARABLE_NOTE, RandomConvFeatureExtractor, to_uint8


def feature_extractor(inception_weights: str | None = None, *, seed: int = 0) -> nn.Module:
    """Build the feature network for ``ImageMetrics``.

    * ``inception_weights`` given: the published-metrics Inception-v3 loaded from
      that local file through ``torch-fidelity`` (``TorchFidelityInceptionExtractor``,
      ``comparable = True``). Raises ``DependencyError`` saying what to
      install when ``torch_fidelity`` (and hence torchvision) is unavailable,
      and ``ConfigError`` when the file is missing or holds other weights.
    * ``None``: ``RandomConvFeatureExtractor`` (``comparable = False``) -
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

    ``extractor`` (default: ``feature_extractor`` of ``inception_weights``)
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
        x = to_uint8(images).to(self.device)
        self.fid.update(x, real=True)
        self.kid.update(x, real=True)
        self._cache.clear()
        self.n_real += x.shape[0]

    @torch.no_grad()
    def update_fake(self, images: Tensor) -> None:
        """Add a batch of generated images."""
        x = to_uint8(images).to(self.device)
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

    With ``inception_weights`` (a local copy of ``INCEPTION_FILE``) the
    scores come from torch-fidelity itself and are ``comparable``; without, from
    ``ImageMetrics`` with the seeded stand-in network (not comparable).
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
        with fidelity_weights_file(inception_weights) as weights:
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
