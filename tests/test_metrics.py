"""Tests for mmdialog.core.metrics: real computations, cross-checked against
sacrebleu / rouge-score and hand-computed examples."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from mmdialog.core import markup
from mmdialog.core.errors import ConfigError
from mmdialog.core.evaluation import table as T
from mmdialog.core.evaluation.metrics import clip as CLIP
from mmdialog.core.evaluation.metrics import image as I
from mmdialog.core.evaluation.metrics import text as M

# --------------------------------------------------------------------------- #
# Text: tokenisation and description stripping
# --------------------------------------------------------------------------- #


def test_tokenize_lowercases_and_splits_punctuation():
    assert M.tokenize("Hi, it's ME!") == ["hi", ",", "it", "'", "s", "me", "!"]
    assert M.tokenize("  ") == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("look! [img] a dog on grass [/img] cute, right?", "look! cute, right?"),
        ("[IMG] upper case [/Img] hi", "hi"),
        ("a [img] one [/img] b [img] two\nlines [/img] c", "a b c"),
        ("no photo here", "no photo here"),
        ("truncated [img] a cat on a", "truncated"),
        ("stray [/img] close", "stray close"),
        ("[img] only a description [/img]", ""),
    ],
)
def test_strip_descriptions(text, expected):
    assert markup.strip(text) == expected


# --------------------------------------------------------------------------- #
# BLEU: hand-computed example
# --------------------------------------------------------------------------- #

# Corpus of two segments.
#   hyp1 = "the cat the cat on the mat"  -> 7 tokens
#   ref1 = "the cat is on the mat"       -> 6 tokens
#   hyp2 = "hello"                       -> 1 token
#   ref2 = "hello there world"           -> 3 tokens
#
# Unigrams. hyp1 counts: the 3, cat 2, on 1, mat 1; ref1 counts: the 2, cat 1,
#   is 1, on 1, mat 1. Clipped: the min(3,2)=2, cat min(2,1)=1, on 1, mat 1 -> 5/7.
#   hyp2: hello clipped 1 -> 1/1.        Corpus p1 = (5+1)/(7+1) = 6/8 = 0.75
# Bigrams. hyp1: (the cat) x2, (cat the), (cat on), (on the), (the mat) = 6;
#   ref1 bigrams: (the cat), (cat is), (is on), (on the), (the mat).
#   Clipped: (the cat) min(2,1)=1, (cat the) 0, (cat on) 0, (on the) 1, (the mat) 1 -> 3/6.
#   hyp2 has no bigrams (0/0).           Corpus p2 = 3/6 = 0.5
# Brevity penalty: c = 7+1 = 8, r = 6+3 = 9, c < r -> BP = exp(1 - 9/8) = exp(-0.125)
#   = 0.8824969...
# BLEU-1 = 100 * BP * 0.75 = 66.18727...
# BLEU-2 = 100 * BP * 0.5  = 44.12484...   (paper variant: bigram precision only,
#          the standard geometric mean would give 100 * BP * sqrt(0.75 * 0.5))
HAND_HYPS = ["the cat the cat on the mat", "hello"]
HAND_REFS = ["The cat is on the mat", "hello there world"]  # upper case: tokenize lowercases
BP = math.exp(1 - 9 / 8)


def test_bleu_hand_example():
    st = M.ngram_stats(HAND_HYPS, HAND_REFS, max_n=2)
    assert st == {"matches": [6, 3], "totals": [8, 6], "hyp_len": 8, "ref_len": 9}
    assert M.bleu(HAND_HYPS, HAND_REFS, 1) == pytest.approx(100 * BP * 0.75)
    assert M.bleu(HAND_HYPS, HAND_REFS, 2) == pytest.approx(100 * BP * 0.5)
    assert M.bleu(HAND_HYPS, HAND_REFS, 1) == pytest.approx(66.18727, abs=1e-4)
    assert M.bleu(HAND_HYPS, HAND_REFS, 2) == pytest.approx(44.12484, abs=1e-4)
    assert M.bleu_geometric(HAND_HYPS, HAND_REFS, max_n=2) == pytest.approx(
        100 * BP * math.sqrt(0.75 * 0.5)
    )


def test_bleu_no_penalty_when_longer_and_multi_reference_clipping():
    # hyp "the the the" vs refs ["the cat", "the the dog"]: 'the' clipped to the
    # max count in any single reference (2) -> p1 = 2/3. Closest ref length to
    # 3 is 3 ("the the dog"), c = r -> BP = 1.
    assert M.bleu(["the the the"], [["the cat", "the the dog"]], 1) == pytest.approx(200 / 3)
    # Tie on closest length goes to the shorter reference (|3-2| = |3-4|): r = 2, c = 3 > r.
    st = M.ngram_stats(["a b c"], [["a b", "a b c d"]], max_n=1)
    assert st["ref_len"] == 2


def test_bleu_edge_cases():
    assert M.bleu([], [], 1) == 0.0
    assert M.bleu([""], ["a reference"], 1) == 0.0
    assert M.bleu(["one"], ["one two"], 2) == 0.0  # no hypothesis bigrams
    assert M.bleu(["same words here"], ["Same words here"], 2) == pytest.approx(100.0)
    with pytest.raises(ValueError):
        M.bleu(["a", "b"], ["a"], 1)


# --------------------------------------------------------------------------- #
# BLEU vs sacreBLEU (where the definitions coincide)
# --------------------------------------------------------------------------- #

SB_HYPS = [
    "The quick brown fox jumps over the lazy dog.",
    "I went to the beach yesterday and it was sunny!",
    "Do you want to see a photo of my new puppy?",
    "we had pizza for dinner , it was great",
    "Sure, here is the picture of the mountain we climbed.",
]
SB_REFS = [
    "The quick brown fox jumped over the lazy dog.",
    "Yesterday I went to the beach and it was really sunny!",
    "Do you want to see a picture of my new puppy?",
    "we had pizza for dinner and it was great",
    "Here is a picture of the mountain we climbed last week.",
]
SB_REFS2 = [
    "A quick brown fox jumps over a lazy dog.",
    "I was at the beach yesterday, it was sunny.",
    "Want to see a photo of my puppy?",
    "pizza for dinner was great",
    "Sure, this is the mountain we climbed.",
]


def _pretok(texts):
    return [" ".join(M.tokenize(t)) for t in texts]


def _sacrebleu_pretok(hyps, ref_streams):
    import sacrebleu

    return sacrebleu.corpus_bleu(
        _pretok(hyps),
        [_pretok(s) for s in ref_streams],
        tokenize="none",
        smooth_method="none",
        force=True,
    )


@pytest.mark.parametrize("multi", [False, True])
def test_bleu_agrees_with_sacrebleu_on_pretokenised_text(multi):
    streams = [SB_REFS, SB_REFS2] if multi else [SB_REFS]
    refs = [list(r) for r in zip(*streams)] if multi else SB_REFS
    sb = _sacrebleu_pretok(SB_HYPS, streams)
    # Standard BLEU-4 (geometric mean) must match exactly.
    assert M.bleu_geometric(SB_HYPS, refs, max_n=4) == pytest.approx(sb.score, abs=1e-9)
    # The paper's single-order BLEU-n is BP * p_n from the same statistics.
    for n in (1, 2, 3, 4):
        assert M.bleu(SB_HYPS, refs, n) == pytest.approx(sb.bp * sb.precisions[n - 1], abs=1e-9)
    # Sufficient statistics too.
    st = M.ngram_stats(SB_HYPS, refs, max_n=4)
    assert st["matches"] == list(sb.counts)
    assert st["totals"] == list(sb.totals)
    assert (st["hyp_len"], st["ref_len"]) == (sb.sys_len, sb.ref_len)


def test_bleu_agrees_with_sacrebleu_with_brevity_penalty():
    hyps = ["the cat sat", "a photo of a dog on the beach"]
    refs = ["the cat sat on the mat today", "a photo of a dog playing on the sunny beach"]
    sb = _sacrebleu_pretok(hyps, [refs])
    assert sb.bp < 1
    assert M.bleu(hyps, refs, 1) == pytest.approx(sb.bp * sb.precisions[0], abs=1e-9)
    assert M.bleu(hyps, refs, 2) == pytest.approx(sb.bp * sb.precisions[1], abs=1e-9)


def test_sacrebleu_score_wrapper():
    import sacrebleu

    expected = sacrebleu.corpus_bleu(SB_HYPS, [SB_REFS, SB_REFS2]).score
    refs = [[a, b] for a, b in zip(SB_REFS, SB_REFS2)]
    assert M.sacrebleu_score(SB_HYPS, refs) == pytest.approx(expected)
    assert M.sacrebleu_score(SB_HYPS, SB_REFS) == pytest.approx(
        sacrebleu.corpus_bleu(SB_HYPS, [SB_REFS]).score
    )
    # Pre-tokenised + tokenize="none": identical to our geometric BLEU.
    assert M.sacrebleu_score(
        _pretok(SB_HYPS), _pretok(SB_REFS), tokenize="none", smooth_method="none", force=True
    ) == pytest.approx(M.bleu_geometric(SB_HYPS, SB_REFS, 4), abs=1e-9)


# --------------------------------------------------------------------------- #
# ROUGE-L vs rouge-score
# --------------------------------------------------------------------------- #

ROUGE_PAIRS = [
    ("the cat was found under the bed", "the cat was under the bed"),
    ("police killed the gunman", "the gunman killed police"),
    ("a b c d e f g", "g f e d c b a"),
    ("completely different words", "nothing in common here"),
    ("i love this photo of my dog at the park", "my dog loves the park so much"),
    ("Hello there", "hello THERE"),
]


def test_rouge_l_hand_example():
    # LCS("police killed the gunman", "the gunman killed police") = 2
    # ("police killed" or "the gunman"), P = R = 2/4 -> F1 = 0.5
    assert M.rouge_l(["police killed the gunman"], ["the gunman killed police"]) == pytest.approx(50.0)
    assert M.rouge_l([""], ["abc"]) == 0.0


def test_rouge_l_matches_rouge_score_default_tokenizer():
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    per_pair = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in ROUGE_PAIRS]
    for (hyp, ref), expected in zip(ROUGE_PAIRS, per_pair):
        assert M.rouge_l([hyp], [ref]) == pytest.approx(100 * expected)
    hyps, refs = zip(*ROUGE_PAIRS)
    assert M.rouge_l(hyps, refs) == pytest.approx(100 * sum(per_pair) / len(per_pair))


def test_rouge_l_matches_rouge_score_with_our_tokenizer_and_multi_ref():
    from rouge_score import rouge_scorer

    class Tok:
        def tokenize(self, text):
            return M.tokenize(text)

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Tok())
    pairs = [
        ("Wow, that's a great shot!", "That's a great shot, wow."),
        ("Sure! Here it is.", "Here it is: my dog."),
    ]
    for hyp, ref in pairs:
        assert M.rouge_l([hyp], [ref]) == pytest.approx(100 * scorer.score(ref, hyp)["rougeL"].fmeasure)
    refs = ["That's a great shot, wow.", "a great shot!"]
    expected = scorer.score_multi(refs, "Wow, that's a great shot!")["rougeL"].fmeasure
    assert M.rouge_l(["Wow, that's a great shot!"], [refs]) == pytest.approx(100 * expected)


def test_text_scores_strip_descriptions():
    hyps = ["nice! [img] a dog on the beach [/img] look at this"]
    refs = ["nice! look at this [img] something else entirely [/img]"]
    s = M.text_scores(hyps, refs)
    assert s == {k + suffix: pytest.approx(100.0) for k in ("bleu1", "bleu2", "rouge_l") for suffix in ("", "_norm")}
    assert M.text_scores(hyps, refs, strip=False)["bleu1"] < 100


# --------------------------------------------------------------------------- #
# Intent and descriptions
# --------------------------------------------------------------------------- #


def test_intent_prf_hand_example():
    pred = [True, True, True, False, False, False]
    gold = [True, False, False, True, False, False]
    # TP = 1, FP = 2, FN = 1 -> P = 1/3, R = 1/2, F1 = 2*(1/6)/(5/6) = 0.4
    out = M.intent_prf(pred, gold)
    assert out["precision"] == pytest.approx(100 / 3)
    assert out["recall"] == pytest.approx(50.0)
    assert out["f1"] == pytest.approx(40.0)


def test_intent_prf_zero_division():
    assert M.intent_prf([False, False], [False, False]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    # No positive predictions: P = 0/0 -> 0, R = 0/1 = 0.
    assert M.intent_prf([False, False], [True, False]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert M.intent_prf([], []) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert M.intent_prf([True], [True]) == {"precision": 100.0, "recall": 100.0, "f1": 100.0}
    with pytest.raises(ValueError):
        M.intent_prf([True], [True, False])


def test_description_scores():
    out = M.description_scores(
        ["a dog on the beach", None], ["a dog on the beach", "a red car"]
    )
    # None counts as "": p1 = 5/5, c = 5, r = 5 + 3 = 8 -> BP = exp(1 - 8/5)
    assert out["bleu1"] == pytest.approx(100 * math.exp(1 - 8 / 5))
    assert out["bleu2"] == pytest.approx(100 * math.exp(1 - 8 / 5))
    assert out["rouge_l"] == pytest.approx(50.0)
    assert out["n"] == 2


# --------------------------------------------------------------------------- #
# Image metrics
# --------------------------------------------------------------------------- #


def _noise(n, seed, lo=0, hi=256, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi, (n, 3, size, size), generator=g, dtype=torch.uint8)


def _smooth(n, seed, size=32):
    """Low-frequency colour blobs, float in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(small, size=(size, size), mode="bilinear")


def test_feature_extractor_fallback_is_deterministic_and_labelled():
    a, b = I.feature_extractor(None), I.feature_extractor(None)
    assert a.comparable is False and "fallback" in a.name
    x = _noise(4, 0)
    fa, la = a(x)
    fb, lb = b(x)
    assert fa.shape == (4, a.num_features) and la.shape == (4, a.num_classes)
    assert torch.equal(fa, fb) and torch.equal(la, lb)
    # float [0, 1] input is treated like the equivalent uint8 input
    assert torch.allclose(a(x.float() / 255)[0], fa)


def test_feature_extractor_inception_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        I.feature_extractor(str(tmp_path / "missing.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not really weights")
    with pytest.raises(ConfigError, match="not a readable weights file"):
        I.feature_extractor(str(tmp_path / "junk.pth"))
    try:
        import torch_fidelity  # noqa: F401

        pytest.skip("torch_fidelity is installed; the missing-dependency error cannot be tested")
    except Exception:
        pass
    weights = tmp_path / "weights.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3), "fc.weight": torch.zeros(1008, 2048)}, weights)
    with pytest.raises(ImportError, match=re.escape("pip install 'mmdialog[metrics]'")):
        I.feature_extractor(str(weights))


def test_image_metrics_identical_sets_give_zero_fid():
    m = I.ImageMetrics()
    imgs = _noise(24, 0)
    m.update_real(imgs[:12])
    m.update_real(imgs[12:])
    m.update_fake(imgs)
    out = m.compute()
    assert out["fid"] == pytest.approx(0.0, abs=1e-3)
    assert out["kid_mean"] == pytest.approx(0.0, abs=1e-3)
    assert out["is_mean"] >= 1.0 - 1e-6
    assert out["n_images"] == 24 and out["n_real"] == 24
    assert out["comparable"] is False and out["note"] == I.NOT_COMPARABLE_NOTE
    assert "fallback" in out["feature_extractor"]


def test_image_metrics_distribution_shift_increases_fid():
    real = _noise(24, 1)
    fakes = {
        "same": _noise(24, 2),  # same distribution, other samples
        "shifted": _smooth(24, 3),  # smooth colour blobs, float input in [0, 1]
        "dark": _noise(24, 4, hi=100),  # darker noise
    }
    results = {}
    for name, fake in fakes.items():
        m = I.ImageMetrics(kid_subsets=10)
        m.update_real(real)
        m.update_fake(fake)
        results[name] = m.compute()
    same = results["same"]
    for name in ("shifted", "dark"):
        assert results[name]["fid"] > 5 * max(same["fid"], 1e-3)
        assert results[name]["kid_mean"] > 10 * max(same["kid_mean"], 1e-5)
    for r in results.values():
        assert r["is_mean"] >= 1.0 - 1e-6
        assert math.isfinite(r["is_std"]) and r["kid_std"] >= 0
    # varied images give a non-trivial IS with the fallback logits
    assert results["shifted"]["is_mean"] > 1.01


def test_image_metrics_small_samples_and_determinism():
    m = I.ImageMetrics()  # default kid_subset_size 1000 > n: clipped to n
    m.update_real(_noise(3, 4))
    m.update_fake(_smooth(3, 5))
    first, second = m.compute(), m.compute()
    assert math.isfinite(first["fid"]) and math.isfinite(first["kid_mean"])
    assert first == second  # compute() is seeded
    single = I.ImageMetrics()
    single.update_real(_noise(1, 6))
    single.update_fake(_noise(1, 7))
    out = single.compute()
    assert math.isnan(out["fid"]) and math.isnan(out["kid_mean"])
    assert out["is_mean"] == pytest.approx(1.0, abs=1e-5) and out["is_std"] == 0.0
    with pytest.raises(ValueError):
        single.update_fake(torch.zeros(2, 1, 8, 8))


# --------------------------------------------------------------------------- #
# CLIP score with a tiny random-init CLIP
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    out = tmp_path_factory.mktemp("tiny_clip")
    from mmdialog.core.assets import _bytes_to_unicode

    chars = list(_bytes_to_unicode().values())
    merges = ["t h", "th e</w>", "d o", "do g</w>", "c a", "ca t</w>"]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (out / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(vocab=str(out / "vocab.json"), merges=str(out / "merges.txt"), model_max_length=77)
    bos, eos = len(vocab) - 2, len(vocab) - 1
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tok)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77,
            bos_token_id=bos, eos_token_id=eos, pad_token_id=eos,
        ),
        vision_config=dict(
            image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
            num_hidden_layers=1, num_attention_heads=2,
        ),
        projection_dim=16,
    )
    model = CLIPModel(config).eval()
    return model, processor


def test_clip_score_tiny_model(tiny_clip):
    model, processor = tiny_clip
    images = _noise(3, 8, size=40)
    texts = ["the dog", "a cat on the mat", "the " * 100]  # last one needs truncation
    per_pair = CLIP.clip_scores(images, texts, model, processor, batch_size=2)
    assert per_pair.shape == (3,)
    assert torch.all(per_pair >= 0) and torch.all(per_pair <= 100)
    mean = CLIP.clip_score(_smooth(3, 9, size=40), texts, model, processor)
    assert 0.0 <= mean <= 100.0
    # PIL input gives the same scores as the equivalent uint8 tensor
    from PIL import Image

    pil = [Image.fromarray(a) for a in images.permute(0, 2, 3, 1).numpy()]
    assert torch.allclose(CLIP.clip_scores(pil, texts, model, processor), per_pair, atol=1e-5)
    with pytest.raises(ValueError):
        CLIP.clip_scores(images, texts[:2], model, processor)


# --------------------------------------------------------------------------- #
# Results table
# --------------------------------------------------------------------------- #


def test_results_table_formatting():
    rows = [
        {"model": "Divter", "dataset": "PhotoChat", "bleu1": 6.52, "bleu2": 1.66, "rouge_l": 5.69,
         "fid": 29.16, "is": 15.8, "intent_f1": None},
        {"model": "Ours", "dataset": "PhotoChat", "bleu1": 10.0, "bleu2": 3.456, "rouge_l": 11.0,
         "fid": 40.0, "is_mean": 2.5, "kid_mean": 0.5, "comparable": False, "intent_f1": 55.5, "bleu2_norm": 4.0,
         "sacrebleu": None, "n_turns": 1234, "n_generated": 12, "n_gold": 30,
         "reasons": {"sacrebleu": "sacrebleu not installed"}},
        {"model": "Text-only", "dataset": "DialogCC", "bleu1": 9.0, "fid": float("nan"),
         "reasons": {"fid": "no reply shared a photo"}},
    ]
    table = T.results_table(rows)
    lines = table.strip().split("\n")
    assert lines[0] == ("| Model | Dataset | BLEU-1 | BLEU-2 | ROUGE-L | FID ↓ | IS ↑ | Intent F1 | KID ↓ "
                        "| BLEU-2 (norm.) | sacreBLEU | Turns | Photos gen. | Photos gold |")
    assert lines[1] == "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    assert lines[2] == ("| Divter | PhotoChat | 6.52 | 1.66 | 5.69 | 29.16 | 15.80 | – (1) | – (1) | – (1) | – (1) "
                        "| – (1) | – (1) | – (1) |")
    assert lines[3] == ("| Ours | PhotoChat | 10.00 | 3.46 | 11.00 | 40.00 † | 2.50 † | 55.50 | 0.50 † | 4.00 "
                        "| – (2) | 1,234 | 12 | 30 |")
    assert lines[4] == ("| Text-only | DialogCC | 9.00 | – (1) | – (1) | – (3) | – (1) | – (1) | – (1) | – (1) "
                        "| – (1) | – (1) | – (1) | – (1) |")
    assert lines[5:9] == ["", "- (1) not reported for this row", "- (2) sacrebleu not installed",
                          "- (3) no reply shared a photo"]
    assert lines[9] == "" and lines[10].startswith("†") and I.NOT_COMPARABLE_NOTE in lines[10]
    # all rows comparable -> no † footnote; nothing missing -> no reasons
    assert "†" not in T.results_table(rows[:1])
    assert T.results_table([]).count("\n") == 2


def test_results_table_from_image_metrics_output():
    m = I.ImageMetrics()
    m.update_real(_noise(4, 10))
    m.update_fake(_noise(4, 11))
    row = {"model": "m", "dataset": "d", **M.text_scores(["hi"], ["hi"]), **m.compute()}
    table = T.results_table([row])
    assert "100.00" in table and "†" in table and I.NOT_COMPARABLE_NOTE in table


def _reference_formula(hyps, refs):
    """An independent implementation of the reference code's text metrics
    (utils/bleu.py, utils/rouge.py): str.split() tokens, case kept; BLEU-n the
    corpus-level clipped n-gram precision of that single n times the corpus
    brevity penalty; ROUGE-L the mean sentence-level LCS F1; all x100."""
    import math
    from collections import Counter

    def grams(toks, n):
        return Counter(tuple(toks[i:i + n]) for i in range(len(toks) - n + 1))

    out = {}
    for n in (1, 2):
        match = total = 0
        for h, r in zip(hyps, refs):
            hg, rg = grams(h.split(), n), grams(r.split(), n)
            match += sum(min(c, rg[g]) for g, c in hg.items())
            total += sum(hg.values())
        c, r_len = sum(len(h.split()) for h in hyps), sum(len(r.split()) for r in refs)
        bp = 1.0 if c >= r_len else math.exp(1 - r_len / c)
        out[f"bleu{n}"] = 100 * bp * match / total
    f1s = []
    for h, r in zip(hyps, refs):
        a, b = h.split(), r.split()
        table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
        for i, x in enumerate(a):
            for j, y in enumerate(b):
                table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
        lcs = table[-1][-1]
        f1s.append(0.0 if lcs == 0 else 2 * (lcs / len(a)) * (lcs / len(b)) / (lcs / len(a) + lcs / len(b)))
    out["rouge_l"] = 100 * sum(f1s) / len(f1s)
    return out


def test_headline_text_metrics_are_the_reference_formula():
    hyps = ["Hi, how are you?", "I went to the beach [img] a beach [/img] yesterday.", "That sounds GREAT!",
            "ok", "My dog loves the park , too"]
    refs = ["hi how are you", "I went to the beach yesterday!", "that sounds great", "Okay then.",
            "My dog loves the park, too"]
    ours = M.text_scores(hyps, refs)
    expected = _reference_formula([markup.strip(h) for h in hyps], refs)
    for key in ("bleu1", "bleu2", "rouge_l"):
        assert ours[key] == pytest.approx(expected[key], abs=1e-9), key
    # the normalised variant ignores case and punctuation, so it scores these pairs higher
    assert ours["bleu1_norm"] > ours["bleu1"] and ours["rouge_l_norm"] > ours["rouge_l"]
