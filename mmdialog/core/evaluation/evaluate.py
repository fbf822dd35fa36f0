"""Per-turn evaluation with gold context (both speakers), as in the paper's
Table 1: text quality on replies with descriptions removed, the photo-sharing
decision, description quality on share turns, and image quality.

Writes ``results.json``, ``results.md`` (one row per model, the paper's
columns), ``replies.jsonl`` and the generated photos under ``images/``.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from mmdialog.core import markup
from mmdialog.core.data.samples import TurnSample, dialogue_samples
from mmdialog.core.data.schema import Dialogue
from mmdialog.core.evaluation.metrics import text
from mmdialog.core.evaluation.metrics.fidelity import METRICS_EXTRA
from mmdialog.core.evaluation.metrics.image import REFERENCE_IMAGE_SIZE, set_scores
from mmdialog.core.evaluation.table import results_table
from mmdialog.core.model import DialogueModel

Progress = Callable[[int, int], None]  # (turns done, turns in all)


@dataclass
class GeneratedTurn:
    key: str
    speaker: str
    reply: str
    gold: str
    shared: bool
    gold_shared: bool
    description: str | None
    gold_description: str | None
    image: str | None = None
    gold_image: str | None = None


def generate_turns(model: DialogueModel, samples: list[TurnSample], image_dir: Path | None,
                   batch_size: int = 8, progress: Progress | None = None, **options: Any) -> list[GeneratedTurn]:
    """Generate every sample's reply (and its photos, when ``image_dir`` is given);
    ``progress(done, total)`` is called after each batch."""
    out: list[GeneratedTurn] = []
    for i in range(0, len(samples), batch_size):
        if progress is not None:
            progress(i, len(samples))
        chunk = samples[i:i + batch_size]
        # Each turn draws from noise seeded by its own key: photos do not depend on the batch size.
        replies = model.respond_batch([(list(s.context), s.speaker) for s in chunk],
                                      draw=image_dir is not None, keys=[s.key for s in chunk], **options)
        for s, r in zip(chunk, replies):
            gold_photo = s.target.photos[0] if s.target.photos else None
            image = None
            if r.photos and image_dir is not None:
                image_dir.mkdir(parents=True, exist_ok=True)
                name = s.key.replace("/", "_").replace("#", "_") + ".png"
                r.photos[0].image.save(image_dir / name)
                image = str(image_dir / name)
            out.append(GeneratedTurn(
                key=s.key, speaker=s.speaker, reply=r.text, gold=s.target.text_with_photos(), shared=r.shared,
                gold_shared=s.shares_photo, description=r.descriptions[0] if r.descriptions else None,
                gold_description=gold_photo.description if gold_photo else None, image=image,
                gold_image=str(gold_photo.path) if gold_photo and gold_photo.path else None))
    if progress is not None:
        progress(len(samples), len(samples))
    return out


def image_sets(turns: list[GeneratedTurn]) -> tuple[list[str], list[str], dict[str, str]]:
    """The reference's two photo sets: one generated photo per turn whose reply
    has a description (drawn from the first), and the gold photo of every turn
    whose gold text has one (with a file), whether or not the reply shared.
    Unpaired: FID compares the sets. Also why a set is empty, for the table."""
    generated = [t.image for t in turns if t.description is not None and t.image]
    gold_turns = [t for t in turns if t.gold_shared]
    gold = [t.gold_image for t in gold_turns if t.gold_image and Path(t.gold_image).is_file()]
    notes = {"generated": "no photos drawn (--no-images)" if any(t.description is not None for t in turns)
             else "no reply shared a photo",
             "gold": f"no gold photos with files ({len(gold_turns)} gold turns share one)" if gold_turns
             else "no gold turn shares a photo"}
    return generated, gold, notes


def score(turns: list[GeneratedTurn], inception_weights: str | None = None, clip_model: str | None = None,
          image_size: int = REFERENCE_IMAGE_SIZE, scoring: Literal["ours", "reference"] = "ours") -> dict[str, Any]:
    """All metrics of one model's generated turns; FID/KID/IS over the
    ``image_sets`` at ``image_size``² (``set_scores``). ``reasons``
    says why a metric is None. ``clip_model``: a local CLIP folder; adds the
    CLIP score of each generated photo against the description it was drawn from.
    ``scoring="reference"``: the text as the reference scores it (``markup.strip_reference``:
    a description cut by the token limit and a stray ``[/img]`` stay in the text)."""
    clean = markup.strip_reference if scoring == "reference" else markup.strip
    preds, golds = [clean(t.reply) for t in turns], [clean(t.gold) for t in turns]
    result: dict[str, Any] = {"n_turns": len(turns), **text.text_scores(preds, golds, strip=False)}
    reasons: dict[str, str] = {}
    try:
        result["sacrebleu"] = text.sacrebleu_score(preds, golds)
    except ImportError:  # sacrebleu is an optional extra
        result["sacrebleu"] = None
        reasons["sacrebleu"] = f"sacrebleu not installed: {METRICS_EXTRA}"
    intent = text.intent_prf([t.shared for t in turns], [t.gold_shared for t in turns])
    result.update({f"intent_{k}": v for k, v in intent.items()})
    share = [t for t in turns if t.gold_shared]
    desc = text.description_scores([t.description for t in share], [t.gold_description or "" for t in share])
    result.update({f"desc_{k}": v for k, v in desc.items()})
    generated, gold, notes = image_sets(turns)
    images = set_scores(generated, gold, inception_weights, size=image_size, notes=notes)
    reasons.update(images.pop("reasons"))
    result.update(images)
    drawn = [t for t in turns if t.image and t.description]
    if clip_model and drawn:
        from PIL import Image
        from transformers import CLIPModel, CLIPProcessor

        from mmdialog.core.evaluation.metrics.clip import clip_score
        from mmdialog.core.pretrained import require_folder

        folder = require_folder(clip_model, ["config.json"], "--clip-model")
        model, processor = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
        with torch.no_grad():
            result["clip_score"] = clip_score([Image.open(t.image).convert("RGB") for t in drawn],
                                                      [t.description for t in drawn], model, processor)
    result["reasons"] = reasons
    return result


def evaluate(model: DialogueModel, dialogues: list[Dialogue], out_dir: str | Path, name: str = "model",
             dataset: str = "", limit: int | None = None, batch_size: int = 8, draw: bool = True,
             inception_weights: str | None = None, clip_model: str | None = None,
             progress: Progress | None = None, scoring: Literal["ours", "reference"] = "ours",
             **options: Any) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = dialogue_samples(dialogues)[:limit]
    model.eval()
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"
    turns = generate_turns(model, samples, out / "images" / slug if draw else None, batch_size, progress,
                           **options)
    result = {"model": name, "dataset": dataset, "decoding": options,
              **score(turns, inception_weights, clip_model, scoring=scoring)}
    with open(out / f"replies_{slug}.jsonl", "w", encoding="utf-8") as f:
        for t in turns:
            f.write(json.dumps(asdict(t), ensure_ascii=False) + "\n")
    return result


def write_results(rows: list[dict[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    (out / "results.json").write_text(json.dumps(clean, indent=2))
    (out / "results.md").write_text(results_table(rows) + "\n")
    return out / "results.json", out / "results.md"
