"""Text metrics of the paper's Table 1 (Guo et al. 2024): BLEU-1, BLEU-2 (the
paper's single-n-gram variant, ``bleu``) and ROUGE-L F1 (``rouge_l``)
on replies with their ``[img] … [/img]`` spans removed; standard sacreBLEU
(``sacrebleu_score``) for comparability with other work; intent
precision / recall / F1 (``intent_prf``) and description scores on share
turns (``description_scores``).

Two tokenisations. The headline numbers use the reference code's,
``reference_tokenize`` (``str.split()``, case kept), so they can be put
next to the paper's. The normalised variant (``tokenize``, the default of
the functions below) is reported beside them, labelled: the text is lower-cased
and split with the regular expression ``\\w+|[^\\w\\s]``, i.e. maximal runs of
word characters (letters, digits, underscore, Unicode-aware) are tokens and
every other non-space character is a token on its own
(``"Hi, it's me!"`` -> ``["hi", ",", "it", "'", "s", "me", "!"]``). It needs no
downloaded data (``nltk.word_tokenize`` does, and fails offline).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, Union

from mmdialog.core import markup

#: One reference string per hypothesis, or several references per hypothesis.
References = Union[Sequence[str], Sequence[Sequence[str]]]

# --------------------------------------------------------------------------- #
# Text utilities
# --------------------------------------------------------------------------- #

_TOKEN_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)
_WS_RE = re.compile(r"\s+")


Tokenizer = Callable[[str], list[str]]


def reference_tokenize(text: str) -> list[str]:
    """The reference code's tokenisation for BLEU and ROUGE-L: ``text.split()``, case kept."""
    return text.split()


def tokenize(text: str) -> list[str]:
    """Lower-case ``text`` and split it into word and punctuation tokens.

    Uses ``re.findall(r"\\w+|[^\\w\\s]", text.lower())``: runs of word
    characters are one token, each other non-whitespace character is a token.
    """
    return _TOKEN_RE.findall(text.lower())


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
    hyps: Sequence[str], refs: References, max_n: int = 4, tokenizer: Tokenizer = tokenize
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
        h = tokenizer(hyp)
        r_toks = [tokenizer(r) for r in rs]
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


def bleu(hyps: Sequence[str], refs: References, n: int = 1, tokenizer: Tokenizer = tokenize) -> float:
    """The paper's BLEU-n: single-order modified n-gram precision x brevity penalty.

    ``BLEU-n = 100 * BP * p_n`` with the corpus-level modified precision
    ``p_n = sum_s sum_g min(count_hyp(g), max_ref count_ref(g)) / sum_s #ngrams_n(hyp_s)``
    and ``BP = 1 if c > r else exp(1 - r / c)`` (``c``: total hypothesis tokens,
    ``r``: summed closest reference lengths). Unlike standard BLEU-4 there is
    no geometric mean over orders 1..n: BLEU-2 uses bigram precision only, as
    in the photo-sharing dialogue literature (PhotoChat / Guo et al. 2024).
    Texts are tokenised with ``tokenizer`` (``tokenize``; the reference's is
    ``reference_tokenize``). Returns 0 when the hypotheses contain no n-grams.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    if not hyps:
        return 0.0
    st = ngram_stats(hyps, refs, max_n=n, tokenizer=tokenizer)
    total = st["totals"][n - 1]
    if total == 0:
        return 0.0
    precision = st["matches"][n - 1] / total
    return 100.0 * _brevity_penalty(st["hyp_len"], st["ref_len"]) * precision


def bleu_geometric(hyps: Sequence[str], refs: References, max_n: int = 4) -> float:
    """Standard corpus BLEU (Papineni et al. 2002) without smoothing, x100.

    ``100 * BP * exp(mean_{n=1..N} log p_n)``, built from the same statistics as
    ``bleu``. It equals ``sacrebleu.corpus_bleu(..., tokenize="none",
    smooth_method="none")`` on text pre-tokenised with ``tokenize`` and
    joined with spaces; it exists mainly to cross-check ``bleu``.
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


def rouge_l(hyps: Sequence[str], refs: References, tokenizer: Tokenizer = tokenize) -> float:
    """Mean sentence-level ROUGE-L F1 (Lin 2004, sec. 3.1), x100.

    Per sentence: ``P = LCS/|hyp|``, ``R = LCS/|ref|``,
    ``F = (1 + b^2) P R / (R + b^2 P)`` with ``b = 1`` (i.e. ``2PR/(P+R)``);
    with several references the best F is kept (as ``rouge_score``'s
    ``score_multi``). Empty hypothesis or reference scores 0. Texts are
    tokenised with ``tokenizer`` (no stemming).
    """
    ref_lists = _normalise_refs(refs, len(hyps))
    if not hyps:
        return 0.0
    total = 0.0
    for hyp, rs in zip(hyps, ref_lists):
        h = tokenizer(hyp)
        total += max(_rouge_l_f1(h, tokenizer(r)) for r in rs)
    return 100.0 * total / len(hyps)


def sacrebleu_score(hyps: Sequence[str], refs: References, **kwargs: Any) -> float:
    """Standard sacreBLEU corpus BLEU-4 (Post 2018), default ``13a`` tokeniser.

    ``refs`` is one reference per hypothesis or a list of references per
    hypothesis (every hypothesis must then have the same number of
    references; they are transposed into sacreBLEU's reference streams). Extra ``kwargs`` go to
    ``sacrebleu.corpus_bleu``
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

    With ``strip=True`` (the paper's protocol) ``markup.strip`` is
    applied to hypotheses and references. Returns ``{"bleu1", "bleu2",
    "rouge_l"}`` computed as the reference code computes them
    (``reference_tokenize``), and the same three with the normalised
    tokenisation as ``bleu1_norm``, ``bleu2_norm``, ``rouge_l_norm``; all x100.
    """
    if strip:
        hyps = [markup.strip(h) for h in hyps]
        refs = [
            markup.strip(r) if isinstance(r, str) else [markup.strip(x) for x in r]
            for r in refs
        ]
    out = {}
    for suffix, tok in (("", reference_tokenize), ("_norm", tokenize)):
        out[f"bleu1{suffix}"] = bleu(hyps, refs, 1, tok)
        out[f"bleu2{suffix}"] = bleu(hyps, refs, 2, tok)
        out[f"rouge_l{suffix}"] = rouge_l(hyps, refs, tok)
    return out


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
