"""generator ``sd``: Stable Diffusion 1.5 / 2.1 (Rombach et al. 2022) from a
local diffusers folder, or tiny random-init components (the embedded default).

One CLIP text tower; its last hidden layer conditions the UNet by cross-
attention. The paper's generator is SD 2.1-base with the UNet trained and the
text encoder and VAE frozen.
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from mmdialog.core.interfaces import GeneratedImage, PromptTokens
from mmdialog.plugins.bases.latent_diffusion import (
    LatentDiffusionGenerator,
    LatentDiffusionOptions,
    encode_text_tower,
    load_tokenizer,
    pad_to_longest,
    tiny_clip_text_config,
)

TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], block_out_channels=[32, 64],
                 layers_per_block=1, norm_num_groups=32, cross_attention_dim=64,
                 attention_head_dim=[2, 4], use_linear_projection=True)


class SDOptions(LatentDiffusionOptions):
    """``path``: a diffusers SD 1.5 / 2.1 folder; otherwise random-init from these configs."""

    text_encoder: dict[str, Any] = Field(default_factory=tiny_clip_text_config)
    unet: dict[str, Any] = Field(default_factory=lambda: dict(TINY_UNET))


class SDGenerator(LatentDiffusionGenerator):
    Options = SDOptions

    def __init__(self, options: SDOptions) -> None:
        from transformers import CLIPTextConfig, CLIPTextModel

        super().__init__(options, ("text_encoder", "tokenizer"), "sd")
        o, folder, dtype = options, self.folder, self.dtype_
        if folder:
            encoder = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", dtype=dtype,
                                                    variant=o.variant)
            self.tokenizers = [load_tokenizer(str(folder / "tokenizer"))]
        else:
            encoder = CLIPTextModel(CLIPTextConfig(**o.text_encoder)).to(dtype)
            self.tokenizers = [load_tokenizer(o.tokenizer)]
        self.text_encoders = nn.ModuleList([encoder])
        self.init_towers()

    def encode(self, prompts: list[PromptTokens]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        encoder = self.text_encoders[0]
        if self.options.training_conditioning == "padded" and torch.is_grad_enabled():
            # The reference's training: descriptions padded to the longest, padding masked in CLIP.
            prompt, mask = pad_to_longest(prompts[0], encoder.config.eos_token_id)
            hidden, _ = encode_text_tower(encoder, prompt, padding_mask=mask)  # (N, M_max, d)
            return (hidden, mask) if self.options.unet_padding_mask else hidden
        hidden, _ = encode_text_tower(encoder, prompts[0])
        return hidden                                                        # (N, 77, d)

    def unet_conditioning(self, conditioning: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                          batch: int) -> dict[str, Any]:
        if isinstance(conditioning, tuple):  # (states, padding mask): the UNet masks the padding too
            hidden, mask = conditioning
            return {"encoder_hidden_states": hidden.to(self.unet.dtype), "encoder_attention_mask": mask}
        return {"encoder_hidden_states": conditioning.to(self.unet.dtype)}

    @torch.no_grad()
    def generate(self, conditioning: torch.Tensor, **options: Any) -> list[GeneratedImage]:
        from diffusers import StableDiffusionPipeline

        negative = self.encode(self.text_prompts([""] * conditioning.shape[0]))
        pipe = StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0], unet=self.unet,
            scheduler=self.sample_scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False)
        dt = self.unet.dtype
        return self.draw(pipe, "sd", prompt_embeds=conditioning.to(dt), negative_prompt_embeds=negative.to(dt),
                         **options)
