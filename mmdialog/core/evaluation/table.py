"""The Markdown results table of ``mmdialog eval``, in the paper's column layout."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from mmdialog.core.evaluation.metrics.image import NOT_COMPARABLE_NOTE

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
    # Beside the paper's columns: the normalised-token BLEU-2, standard sacreBLEU, what was scored.
    ("BLEU-2 (norm.)", ("bleu2_norm",), False),
    ("sacreBLEU", ("sacrebleu",), False),
    ("Turns", ("n_turns",), False),
    ("Photo pairs", ("n_image_pairs",), False),
]
_COUNTS = {"Turns", "Photo pairs"}
_MISSING = "–"


def _cell(value: Any, count: bool = False) -> str:
    if value is None:
        return _MISSING
    if isinstance(value, bool):
        return str(value)
    if count and isinstance(value, (int, float)):
        return f"{int(value):,}"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and math.isnan(value):
            return _MISSING
        return f"{value:.2f}"
    return str(value).replace("|", "\\|")


def results_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table in the paper's layout, one row per model.

    Columns: Model, Dataset, BLEU-1, BLEU-2, ROUGE-L, FID, IS, Intent F1 (the
    paper's; BLEU and ROUGE-L on ``str.split()`` tokens as the reference code),
    then BLEU-2 on normalised tokens, sacreBLEU, and the turns and photo pairs
    scored. Keys looked up per row: ``model``, ``dataset``, ``bleu1``,
    ``bleu2``, ``rouge_l``, ``fid``, ``is`` (or ``is_mean``, as returned by
    :meth:`ImageMetrics.compute`), ``intent_f1``, ``bleu2_norm``,
    ``sacrebleu``, ``n_turns``, ``n_image_pairs``; missing / None / NaN values
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
        for header, keys, is_image in _COLUMNS:
            value = next((row[k] for k in keys if k in row), None)
            text = _cell(value, header in _COUNTS)
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
