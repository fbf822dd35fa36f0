"""The Markdown results table of ``mmdialog eval``, in the paper's column layout."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from mmdialog.core.evaluation.metrics.stand_in import NOT_COMPARABLE_NOTE

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
    # Beside the paper's columns: KID on the same sets, the normalised-token BLEU-2, standard sacreBLEU,
    # and what was scored (turns; photos in the generated and the gold set).
    ("KID ↓", ("kid_mean", "kid"), True),
    ("BLEU-2 (norm.)", ("bleu2_norm",), False),
    ("sacreBLEU", ("sacrebleu",), False),
    ("Turns", ("n_turns",), False),
    ("Photos gen.", ("n_generated",), False),
    ("Photos gold", ("n_gold",), False),
]
_COUNTS = {"Turns", "Photos gen.", "Photos gold"}
_MISSING = "–"
NOT_REPORTED = "not reported for this row"


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _cell(value: Any, count: bool = False) -> str:
    if isinstance(value, bool):
        return str(value)
    if count and isinstance(value, (int, float)):
        return f"{int(value):,}"
    if isinstance(value, (int, float)):
        return f"{value:.2f}"
    return str(value).replace("|", "\\|")


def results_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table in the paper's layout, one row per model.

    Columns: Model, Dataset, BLEU-1, BLEU-2, ROUGE-L, FID, IS, Intent F1 (the
    paper's; BLEU and ROUGE-L on ``str.split()`` tokens as the reference code;
    FID and IS over the reference's unpaired photo sets), then KID on the same
    sets, BLEU-2 on normalised tokens, sacreBLEU, the turns scored and the
    photos in the generated and the gold set. Keys looked up per row:
    ``model``, ``dataset``, ``bleu1``, ``bleu2``, ``rouge_l``, ``fid``, ``is``
    (or ``is_mean``), ``intent_f1``, ``kid_mean``, ``bleu2_norm``,
    ``sacrebleu``, ``n_turns``, ``n_generated``, ``n_gold``.

    A missing / None / NaN value prints as "– (k)", with list item k below the
    table giving its reason: ``row["reasons"][key]`` (as
    ``mmdialog.core.evaluation.score`` fills it), else "not reported for
    this row". Numbers print with two
    decimals. A row with ``comparable`` False gets its image metrics marked
    "†" and a footnote saying they are not comparable with published FID/IS.
    """
    lines = [
        "| " + " | ".join(h for h, _, _ in _COLUMNS) + " |",
        "|" + "|".join("---" if i < 2 else "---:" for i in range(len(_COLUMNS))) + "|",
    ]
    notes: list[str] = []  # the reasons of missing cells, in order of first use; footnote k is notes[k - 1]
    any_non_comparable = False
    for row in rows:
        non_comparable = row.get("comparable", True) is False
        reasons = row.get("reasons") or {}
        cells = []
        for header, keys, is_image in _COLUMNS:
            key = next((k for k in keys if k in row), keys[0])
            value = row.get(key)
            if _missing(value):
                why = reasons.get(key) or next((reasons[k] for k in keys if k in reasons), NOT_REPORTED)
                if why not in notes:
                    notes.append(why)
                cells.append(f"{_MISSING} ({notes.index(why) + 1})")
                continue
            text = _cell(value, header in _COUNTS)
            if is_image and non_comparable:
                text += " †"
                any_non_comparable = True
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    if notes:
        lines += ["", *(f"- ({k}) {why}" for k, why in enumerate(notes, 1))]
    if any_non_comparable:
        lines += [
            "",
            "† FID/KID/IS computed with a non-comparable feature extractor "
            f"(random-init fallback, not Inception-v3; pass --inception-weights): {NOT_COMPARABLE_NOTE}.",
        ]
    return "\n".join(lines) + "\n"
