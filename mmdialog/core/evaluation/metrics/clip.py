"""CLIP score of photos against their descriptions (Hessel et al. 2021),
computed from a local CLIP folder: our own, since torchmetrics' ``CLIPScore``
breaks on transformers 5's ``get_*_features`` outputs (docs/design.md §7)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from mmdialog.core.evaluation.metrics.stand_in import to_uint8


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
        arr = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()
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
    """Mean of ``clip_scores`` over all pairs (0 for no pairs)."""
    s = clip_scores(images, texts, model, processor, batch_size=batch_size)
    return float(s.mean()) if s.numel() else 0.0
