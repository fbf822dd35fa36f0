"""perceiver ``qformer``: BLIP-2's frozen ViT + Q-Former + query tokens, and a
new linear projection to the LLM width (BLIP-2, Li et al. 2023, §3.1–3.2).

A photo becomes K = ``num_query_tokens`` embeddings that replace K ``<image>``
placeholders in the LLM input. From a local BLIP-2 folder only the vision
model, Q-Former and query tokens are read — never its language model.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mmdialog.core.caching import Entry, FeatureStore, cached_per_photo, component_store, require_pixels, resident
from mmdialog.core.interfaces import BuildContext, Perceiver, PluginOptions
from mmdialog.core.pretrained import load_prefixed, resolve_folder

# BLIP-2 / EVA-CLIP image normalisation (BlipImageProcessor defaults).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: A small random-init configuration for the embedded default.
TINY_BLIP2 = {
    "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "image_size": 64, "patch_size": 16},
    "qformer_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "encoder_hidden_size": 64,
                       "cross_attention_frequency": 1, "vocab_size": 100},
    "num_query_tokens": 8,
}


class QFormerOptions(PluginOptions):
    path: str | None = Field(None, description="local BLIP-2 folder (Blip2ForConditionalGeneration layout)")
    config: dict[str, Any] = Field(default_factory=lambda: dict(TINY_BLIP2),
                                   description="Blip2Config kwargs when no path is given (random init)")
    num_query_tokens: int | None = Field(None, gt=0, description="override K (random init only)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="the ViT and Q-Former (frozen by default; BLIP-2 itself runs its ViT in "
                               "half precision); the new projection stays float32")
    feature_cache: bool = Field(True, description="training, with the ViT and Q-Former frozen: compute each "
                                                  "photo's Q-Former output once and keep it in the feature "
                                                  "store on disk (core/caching.py)")


class QFormerPerceiver(Perceiver):
    Options = QFormerOptions
    # BLIP-2's ViT and Q-Former stay frozen; the projection into the LLM's width trains.
    trainable_by_default = ("projection",)

    def __init__(self, options: QFormerOptions, llm_width: int) -> None:
        super().__init__()
        from transformers import Blip2Config, Blip2QFormerModel, Blip2VisionModel

        self.options = options
        if options.path:
            folder = resolve_folder(options.path, ["config.json"], "perceiver qformer")
            cfg = Blip2Config.from_pretrained(folder)
        else:
            kw = dict(options.config)
            if options.num_query_tokens:
                kw["num_query_tokens"] = options.num_query_tokens
            cfg = Blip2Config(**kw)
        self.vision = Blip2VisionModel(cfg.vision_config)
        self.qformer = Blip2QFormerModel(cfg.qformer_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_query_tokens, cfg.qformer_config.hidden_size))
        nn.init.normal_(self.query_tokens, std=cfg.qformer_config.initializer_range)
        # Always new: BLIP-2's own projection targets its own LM's width.
        self.projection = nn.Linear(cfg.qformer_config.hidden_size, llm_width)
        if options.path:
            load_prefixed(folder, {"vision_model": self.vision, "qformer": self.qformer,
                                   "query_tokens": self.query_tokens})
        dtype = getattr(torch, options.dtype)
        self.vision.to(dtype)
        self.qformer.to(dtype)
        self.query_tokens.data = self.query_tokens.data.to(dtype)
        self.num_tokens = cfg.num_query_tokens
        self.image_size = cfg.vision_config.image_size
        self.register_buffer("mean", torch.tensor(OPENAI_CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_CLIP_STD).view(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_options(cls, options: QFormerOptions, ctx: BuildContext) -> QFormerPerceiver:
        assert ctx.llm is not None
        return cls(options, ctx.llm.hidden_size)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"vision": list(self.vision.parameters()),
                "qformer": [self.query_tokens, *self.qformer.parameters()],
                "projection": list(self.projection.parameters())}

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The Q-Former's output for photos in [0, 1]: (N, 3, H, W) → (N, K, Dq)."""
        if pixels.shape[-1] != self.image_size or pixels.shape[-2] != self.image_size:
            pixels = F.interpolate(pixels, size=(self.image_size, self.image_size),
                                   mode="bicubic", align_corners=False).clamp(0, 1)
        x = ((pixels - self.mean) / self.std).to(self.vision.dtype)           # (N, 3, H, W)
        with resident(x.device, self.vision, self.qformer):
            img = self.vision(pixel_values=x).last_hidden_state               # (N, P, Dv)
            q = self.query_tokens.expand(img.shape[0], -1, -1)                # (N, K, Dq)
            mask = torch.ones(img.shape[:2], dtype=torch.long, device=img.device)
            return self.qformer(query_embeds=q, encoder_hidden_states=img,
                                encoder_attention_mask=mask).last_hidden_state  # (N, K, Dq)

    def _frozen(self) -> bool:
        return not any(p.requires_grad for p in (self.query_tokens, *self.vision.parameters(),
                                                 *self.qformer.parameters()))

    def _fixed(self) -> bool:
        """Frozen and in eval mode (as DialogueModel.train leaves it), the trunk is a
        fixed function of the photo."""
        return not (self.vision.training or self.qformer.training) and self._frozen()

    def cached_encoders(self) -> list[nn.Module]:
        return [self.vision, self.qformer] if self.options.feature_cache and self._fixed() else []

    def feature_store(self, root: str | None = None) -> FeatureStore | None:
        if not (self.options.feature_cache and self._frozen()):
            return None
        return component_store(self, root, "qformer-v1", (self.vision, self.qformer, self.query_tokens),
                               self.image_size)

    def encode_photo(self, pixels: torch.Tensor, variant: str = "") -> Entry:
        return {"features": self.features(pixels)[0]}                        # (K, Dq)

    def forward(self, pixels: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        store = self.feature_store() if self._fixed() and torch.is_grad_enabled() and keys and all(keys) else None
        if store is not None:
            rows = cached_per_photo(store, keys, lambda i: self.encode_photo(
                require_pixels(pixels[i:i + 1], keys[i], store)))
            h = torch.stack([r["features"] for r in rows]).to(pixels.device)  # (N, K, Dq)
        else:
            h = self.features(pixels)
        return self.projection(h.to(self.projection.weight.dtype))           # (N, K, D)
