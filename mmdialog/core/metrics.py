"""Evaluation metrics for photo-sharing multimodal dialogue generation.

This module reproduces the evaluation protocol of Guo et al. (2024), "An
End-to-End Model for Photo-Sharing Multi-modal Dialogue Generation":

* **Text replies** (with ``[img] ... [/img]`` description spans removed):
  BLEU-1, BLEU-2 (the paper's single-n-gram variant, see :func:`bleu`) and
  ROUGE-L F1 (:func:`rouge_l`); standard sacreBLEU (:func:`sacrebleu_score`) is
  offered for comparability with other work.
* **Photo-sharing decision** ("intent"): precision / recall / F1 of the
  share-a-photo prediction (:func:`intent_prf`).
* **Image descriptions** on share turns: BLEU-1/2 and ROUGE-L between
  generated and gold descriptions (:func:`description_scores`).
* **Generated images**: FID, KID and Inception Score via ``torchmetrics`` with a
  pluggable feature network (:class:`ImageMetrics`, :func:`feature_extractor`),
  and CLIP score (:func:`clip_score`).
* A Markdown :func:`results_table` in the paper's column layout.

Tokenisation used by BLEU / ROUGE-L (:func:`tokenize`): the text is lower-cased
and split with the regular expression ``\\w+|[^\\w\\s]``, i.e. maximal runs of
word characters (letters, digits, underscore, Unicode-aware) are tokens and
every other non-space character is a token on its own
(``"Hi, it's me!"`` -> ``["hi", ",", "it", "'", "s", "me", "!"]``). It needs no
downloaded data (``nltk.word_tokenize`` does, and fails offline).

Image metrics and comparability: published FID/IS numbers use the TF-ported
Inception-v3 (``pt_inception-2015-12-05``) network. Only that network, loaded
from a local weights file, gives ``comparable = True`` results; the fallback
extractor is a seeded random-init conv net whose numbers are useful only for
relative comparisons inside one run, and are flagged "not comparable with
published FID/IS" everywhere they are reported.
"""
from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn

__all__ = [
    "tokenize",
    "strip_descriptions",
    "ngram_stats",
    "bleu",
    "bleu_geometric",
    "rouge_l",
    "sacrebleu_score",
    "text_scores",
    "intent_prf",
    "description_scores",
    "RandomConvFeatureExtractor",
    "TorchFidelityInceptionExtractor",
    "feature_extractor",
    "ImageMetrics",
    "clip_scores",
    "clip_score",
    "results_table",
    "NOT_COMPARABLE_NOTE",
]

#: One reference string per hypothesis, or several references per hypothesis.
References = Union[Sequence[str], Sequence[Sequence[str]]]

NOT_COMPARABLE_NOTE = "not comparable with published FID/IS"

# --------------------------------------------------------------------------- #
# Text utilities
# --------------------------------------------------------------------------- #

_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)
# A closed [img] ... [/img] span (non-greedy, may span lines), or an [img] left
# unclosed at the end of a (truncated) generation.
_DESC_RE = re.compile(r"\[img\].*?(?:\[/img\]|$)", re.IGNORECASE | re.DOTALL)
_STRAY_CLOSE_RE = re.compile(r"\[/img\]", re.IGNORECASE)
_WS_RE = re.compile(r"\s+")


def tokenize(text: str) -> list[str]:
    """Lower-case ``text`` and split it into word and punctuation tokens.

    Uses ``re.findall(r"\\w+|[^\\w\\s]", text.lower())``: runs of word
    characters are one token, each other non-whitespace character is a token.
    """
    return _TOKEN_RE.findall(text.lower())


def strip_descriptions(text: str) -> str:
    """Remove every ``[img] ... [/img]`` description span from a reply.

    The paper scores the textual reply without the photo description, which is
    evaluated separately. Matching is case-insensitive and non-greedy; an
    ``[img]`` left unclosed (a truncated generation) is removed up to the end
    of the text, and a stray ``[/img]`` is dropped. Whitespace is collapsed.

    >>> strip_descriptions("look! [img] a dog on grass [/img] cute, right?")
    'look! cute, right?'
    """
    text = _DESC_RE.sub(" ", text)
    text = _STRAY_CLOSE_RE.sub(" ", text)
    return _WS_RE.sub(" ", text).strip()


def _normalise_refs(refs: References, n_hyps: int) -> list[list[str]]:
    """Return ``refs`` as one list of reference strings per hypothesis."""
    if len(refs) != n_hyps:
        raise ValueError(f"got {n_hyps} hypotheses but {len(refs)} reference entries")
    out: list[list[str]] = []
    for r in refs:
        if isinstance(r, str):
            out.append([r])
        else:
            rs = list(r)
            if not rs:
                raise ValueError("every hypothesis needs at least one reference")
            out.append(rs)
    return out


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _closest_ref_len(hyp_len: int, ref_lens: Sequence[int]) -> int:
    """Reference length closest to ``hyp_len``; ties go to the shorter one
    (Papineni et al. 2002; identical to sacreBLEU's ``_get_closest_ref_len``)."""
    return min(ref_lens, key=lambda r: (abs(r - hyp_len), r))


def ngram_stats(
    hyps: Sequence[str], refs: References, max_n: int = 4
) -> dict[str, Any]:
    """Corpus-level sufficient statistics for BLEU.

    Returns ``{"matches": [m_1..m_N], "totals": [t_1..t_N], "hyp_len": c,
    "ref_len": r}`` where ``m_n`` is the sum over sentences of clipped n-gram
    counts (each hypothesis n-gram count is clipped to its maximum count in any
    single reference), ``t_n`` the total number of hypothesis n-grams, ``c`` the
    total hypothesis length and ``r`` the sum of per-sentence closest
    reference lengths (Papineni et al. 2002, "BLEU", sec. 2.1 and 2.2.2).
    """
    if max_n < 1:
        raise ValueError("max_n must be >= 1")
    ref_lists = _normalise_refs(refs, len(hyps))
    matches = [0] * max_n
    totals = [0] * max_n
    hyp_len = ref_len = 0
    for hyp, rs in zip(hyps, ref_lists):
        h = tokenize(hyp)
        r_toks = [tokenize(r) for r in rs]
        hyp_len += len(h)
        ref_len += _closest_ref_len(len(h), [len(r) for r in r_toks])
        for n in range(1, max_n + 1):
            h_counts = _ngrams(h, n)
            max_ref: Counter[tuple[str, ...]] = Counter()
            for r in r_toks:
                max_ref |= _ngrams(r, n)  # element-wise max
            matches[n - 1] += sum(min(c, max_ref[g]) for g, c in h_counts.items())
            totals[n - 1] += sum(h_counts.values())
    return {"matches": matches, "totals": totals, "hyp_len": hyp_len, "ref_len": ref_len}


def _brevity_penalty(hyp_len: int, ref_len: int) -> float:
    """BP = 1 if c > r else exp(1 - r/c) (0 when c == 0), Papineni et al. eq. 1."""
    if hyp_len == 0:
        return 0.0
    if hyp_len >= ref_len:
        return 1.0
    return math.exp(1.0 - ref_len / hyp_len)


def bleu(hyps: Sequence[str], refs: References, n: int = 1) -> float:
    """The paper's BLEU-n: single-order modified n-gram precision x brevity penalty.

    ``BLEU-n = 100 * BP * p_n`` with the corpus-level modified precision
    ``p_n = sum_s sum_g min(count_hyp(g), max_ref count_ref(g)) / sum_s #ngrams_n(hyp_s)``
    and ``BP = 1 if c > r else exp(1 - r / c)`` (``c``: total hypothesis tokens,
    ``r``: summed closest reference lengths). Unlike standard BLEU-4 there is
    no geometric mean over orders 1..n: BLEU-2 uses bigram precision only, as
    in the photo-sharing dialogue literature (PhotoChat / Guo et al. 2024).
    Texts are tokenised with :func:`tokenize`. Returns 0 when the hypotheses
    contain no n-grams.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    if not hyps:
        return 0.0
    st = ngram_stats(hyps, refs, max_n=n)
    total = st["totals"][n - 1]
    if total == 0:
        return 0.0
    precision = st["matches"][n - 1] / total
    return 100.0 * _brevity_penalty(st["hyp_len"], st["ref_len"]) * precision


def bleu_geometric(hyps: Sequence[str], refs: References, max_n: int = 4) -> float:
    """Standard corpus BLEU (Papineni et al. 2002) without smoothing, x100.

    ``100 * BP * exp(mean_{n=1..N} log p_n)``, built from the same statistics as
    :func:`bleu`. It equals ``sacrebleu.corpus_bleu(..., tokenize="none",
    smooth_method="none")`` on text pre-tokenised with :func:`tokenize` and
    joined with spaces; it exists mainly to cross-check :func:`bleu`.
    """
    if not hyps:
        return 0.0
    st = ngram_stats(hyps, refs, max_n=max_n)
    if any(m == 0 for m in st["matches"]) or any(t == 0 for t in st["totals"]):
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(st["matches"], st["totals"])) / max_n
    return 100.0 * _brevity_penalty(st["hyp_len"], st["ref_len"]) * math.exp(log_p)


def _lcs_len(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) DP)."""
    if not a or not b:
        return 0
    if len(b) > len(a):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b, 1):
            cur.append(prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1]))
        prev = cur
    return prev[-1]


def _rouge_l_f1(hyp: Sequence[str], ref: Sequence[str]) -> float:
    lcs = _lcs_len(hyp, ref)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(hyp), lcs / len(ref)
    return 2 * p * r / (p + r)


def rouge_l(hyps: Sequence[str], refs: References) -> float:
    """Mean sentence-level ROUGE-L F1 (Lin 2004, sec. 3.1), x100.

    Per sentence: ``P = LCS/|hyp|``, ``R = LCS/|ref|``,
    ``F = (1 + b^2) P R / (R + b^2 P)`` with ``b = 1`` (i.e. ``2PR/(P+R)``);
    with several references the best F is kept (as ``rouge_score``'s
    ``score_multi``). Empty hypothesis or reference scores 0. Texts are
    tokenised with :func:`tokenize` (no stemming).
    """
    ref_lists = _normalise_refs(refs, len(hyps))
    if not hyps:
        return 0.0
    total = 0.0
    for hyp, rs in zip(hyps, ref_lists):
        h = tokenize(hyp)
        total += max(_rouge_l_f1(h, tokenize(r)) for r in rs)
    return 100.0 * total / len(hyps)


def sacrebleu_score(hyps: Sequence[str], refs: References, **kwargs: Any) -> float:
    """Standard sacreBLEU corpus BLEU-4 (Post 2018), default ``13a`` tokeniser.

    ``refs`` is one reference per hypothesis or a list of references per
    hypothesis (every hypothesis must then have the same number of
    references; they are transposed into sacreBLEU's reference streams). Extra ``kwargs`` go to ``sacrebleu.corpus_bleu``
    (e.g. ``tokenize="none"``, ``lowercase=True``). ``sacrebleu`` is imported
    lazily.
    """
    import sacrebleu  # lazy: optional dependency

    ref_lists = _normalise_refs(refs, len(hyps))
    n_refs = {len(r) for r in ref_lists}
    if len(n_refs) > 1:
        raise ValueError("sacrebleu_score needs the same number of references per hypothesis")
    k = n_refs.pop() if n_refs else 1
    ref_streams = [[r[i] for r in ref_lists] for i in range(k)]
    return float(sacrebleu.corpus_bleu(list(hyps), ref_streams, **kwargs).score)


def text_scores(
    hyps: Sequence[str], refs: References, *, strip: bool = True
) -> dict[str, float]:
    """BLEU-1, BLEU-2 and ROUGE-L of replies, descriptions removed first.

    With ``strip=True`` (the paper's protocol) :func:`strip_descriptions` is
    applied to hypotheses and references. Returns
    ``{"bleu1", "bleu2", "rouge_l"}``, all x100.
    """
    if strip:
        hyps = [strip_descriptions(h) for h in hyps]
        refs = [
            strip_descriptions(r) if isinstance(r, str) else [strip_descriptions(x) for x in r]
            for r in refs
        ]
    return {
        "bleu1": bleu(hyps, refs, 1),
        "bleu2": bleu(hyps, refs, 2),
        "rouge_l": rouge_l(hyps, refs),
    }


# --------------------------------------------------------------------------- #
# Photo-sharing decision and descriptions
# --------------------------------------------------------------------------- #


def intent_prf(pred: Sequence[bool], gold: Sequence[bool]) -> dict[str, float]:
    """Precision, recall and F1 (x100) of the binary share-a-photo decision.

    The positive class is "share a photo in this turn". ``P = TP/(TP+FP)``,
    ``R = TP/(TP+FN)``, ``F1 = 2PR/(P+R)``; any 0/0 is defined as 0 (as
    ``sklearn``'s ``zero_division=0``).
    """
    if len(pred) != len(gold):
        raise ValueError(f"pred has {len(pred)} items but gold has {len(gold)}")
    tp = sum(1 for p, g in zip(pred, gold) if p and g)
    fp = sum(1 for p, g in zip(pred, gold) if p and not g)
    fn = sum(1 for p, g in zip(pred, gold) if g and not p)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": 100.0 * precision, "recall": 100.0 * recall, "f1": 100.0 * f1}


def description_scores(
    pred_descs: Sequence[str | None], gold_descs: References
) -> dict[str, float]:
    """BLEU-1, BLEU-2 and ROUGE-L (x100) of generated vs. gold photo descriptions.

    Call it on the gold share turns only. A ``None`` prediction (the model did
    not produce a description) counts as the empty string, i.e. scores 0 and
    contributes to the BLEU brevity penalty. Returns
    ``{"bleu1", "bleu2", "rouge_l", "n"}``.
    """
    hyps = ["" if d is None else d for d in pred_descs]
    return {
        "bleu1": bleu(hyps, gold_descs, 1),
        "bleu2": bleu(hyps, gold_descs, 2),
        "rouge_l": rouge_l(hyps, gold_descs),
        "n": float(len(hyps)),
    }


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


class TorchFidelityInceptionExtractor(nn.Module):
    """The TF-ported Inception-v3 used for published FID/IS (via ``torch-fidelity``).

    Wraps ``torch_fidelity.FeatureExtractorInceptionV3("inception-v3-compat",
    ["2048", "logits_unbiased"], feature_extractor_weights_path=...)``; the
    weights file is ``weights-inception-2015-12-05-6726825d.pth``. Input uint8
    (N,3,H,W) of any size (resized internally to 299). Output
    ``(pool features (N, 2048), logits (N, 1008))``.
    """

    comparable = True
    num_features = 2048

    def __init__(self, weights_path: str) -> None:
        super().__init__()
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except Exception as exc:  # ImportError, or torchvision failing to import
            raise ImportError(
                "Inception-v3 FID/IS needs torch-fidelity, which needs torchvision: "
                "`pip install torch-fidelity torchvision` with a torchvision matching your "
                f"torch (see research-notes section 4, set B); import failed: {exc!r}"
            ) from exc
        self.net = FeatureExtractorInceptionV3(
            "inception-v3-compat",
            ["2048", "logits_unbiased"],
            feature_extractor_weights_path=str(weights_path),
        )
        self.net.eval()
        self.name = f"inception-v3-compat({weights_path})"

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        feats, logits = self.net(_to_uint8(images))
        return feats.flatten(1), logits.flatten(1)


def feature_extractor(inception_weights: str | None = None, *, seed: int = 0) -> nn.Module:
    """Build the feature network for :class:`ImageMetrics`.

    * ``inception_weights`` given: the published-metrics Inception-v3 loaded from
      that local file through ``torch-fidelity`` (:class:`TorchFidelityInceptionExtractor`,
      ``comparable = True``). Raises ``ImportError`` saying what to install when
      ``torch_fidelity`` (and hence torchvision) is unavailable, and
      ``FileNotFoundError`` when the file does not exist.
    * ``None``: :class:`RandomConvFeatureExtractor` (``comparable = False``) -
      results are **not comparable with published FID/IS**.

    Every returned module maps uint8 (N,3,H,W) to ``(features, logits)`` and
    has ``name``, ``num_features`` and ``comparable`` attributes.
    """
    if inception_weights is None:
        return RandomConvFeatureExtractor(seed=seed)
    from pathlib import Path

    if not Path(inception_weights).is_file():
        raise FileNotFoundError(f"Inception weights file not found: {inception_weights}")
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
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.inception import InceptionScore
        from torchmetrics.image.kid import KernelInceptionDistance

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


# --------------------------------------------------------------------------- #
# Results table
# --------------------------------------------------------------------------- #

# (header, accepted keys in priority order, is_image_metric)
_COLUMNS: list[tuple[str, tuple[str, ...], bool]] = [
    ("Model", ("model",), False),
    ("Dataset", ("dataset",), False),
    ("BLEU-1", ("bleu1", "bleu-1", "BLEU-1"), False),
    ("BLEU-2", ("bleu2", "bleu-2", "BLEU-2"), False),
    ("ROUGE-L", ("rouge_l", "rougeL", "ROUGE-L"), False),
    ("FID ↓", ("fid", "FID"), True),
    ("IS ↑", ("is", "is_mean", "IS"), True),
    ("Intent F1", ("intent_f1", "f1", "Intent F1"), False),
]
_MISSING = "–"


def _cell(value: Any) -> str:
    if value is None:
        return _MISSING
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        if isinstance(value, float) and math.isnan(value):
            return _MISSING
        return f"{value:.2f}"
    return str(value).replace("|", "\\|")


def results_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table in the paper's layout, one row per model.

    Columns: Model, Dataset, BLEU-1, BLEU-2, ROUGE-L, FID, IS, Intent F1.
    Keys looked up per row: ``model``, ``dataset``, ``bleu1``, ``bleu2``,
    ``rouge_l``, ``fid``, ``is`` (or ``is_mean``, as returned by
    :meth:`ImageMetrics.compute`), ``intent_f1``; missing / None / NaN values
    print as "–", numbers with two decimals. A row with ``comparable`` False
    (e.g. ``{**text, **image_metrics.compute()}``) gets its FID/IS marked with
    "†" and a footnote line saying they are not comparable with published
    FID/IS.
    """
    lines = [
        "| " + " | ".join(h for h, _, _ in _COLUMNS) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(_COLUMNS))) + "|",
    ]
    any_non_comparable = False
    for row in rows:
        non_comparable = row.get("comparable", True) is False
        cells = []
        for _, keys, is_image in _COLUMNS:
            value = next((row[k] for k in keys if k in row), None)
            text = _cell(value)
            if is_image and non_comparable and text != _MISSING:
                text += " †"
                any_non_comparable = True
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    if any_non_comparable:
        lines.append("")
        lines.append(
            "† FID/IS computed with a non-comparable feature extractor "
            f"(random-init fallback, not Inception-v3): {NOT_COMPARABLE_NOTE}."
        )
    return "\n".join(lines) + "\n"
