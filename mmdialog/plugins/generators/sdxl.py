"""generator ``sdxl``: Stable Diffusion XL (Podell et al. 2023) — two CLIP text
towers whose penultimate layers are concatenated for cross-attention, plus the
second tower's projected pooled embedding and the size/crop "time ids" as
extra UNet conditioning. A bridge feeds both towers."""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from mmdialog.core.errors import ConfigError
from mmdialog.core.interfaces import GeneratedImage, PromptTokens
from mmdialog.plugins.bases.latent_diffusion import (
    LatentDiffusionGenerator,
    LatentDiffusionOptions,
    encode_text_tower,
    load_tokenizer,
    tiny_clip_text_config,
)

TINY_TIME_DIM = 8
TINY_SDXL_UNET = dict(sample_size=16, in_channels=4, out_channels=4,
                      down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                      up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], block_out_channels=[32, 64],
                      layers_per_block=1, norm_num_groups=32, cross_attention_dim=32 + 64,
                      attention_head_dim=[2, 4], use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=TINY_TIME_DIM,
                      projection_class_embeddings_input_dim=32 + 6 * TINY_TIME_DIM,
                      transformer_layers_per_block=1)


class SDXLOptions(LatentDiffusionOptions):
    """``path``: a diffusers SDXL folder; otherwise random-init from these configs."""

    text_encoder: dict[str, Any] = Field(default_factory=lambda: tiny_clip_text_config(32))
    text_encoder_2: dict[str, Any] = Field(default_factory=lambda: tiny_clip_text_config(64) | {"projection_dim": 32})
    unet: dict[str, Any] = Field(default_factory=lambda: dict(TINY_SDXL_UNET))
    guidance_scale: float = Field(5.0, ge=0)


class SDXLGenerator(LatentDiffusionGenerator):
    Options = SDXLOptions

    def __init__(self, options: SDXLOptions) -> None:
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        if options.training_conditioning != "full":
            raise ConfigError("generator sdxl: training_conditioning padded is the reference's SD 2.1 training; "
                              "sdxl conditions on 77 positions (full)")
        super().__init__(options, ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"), "sdxl")
        o, folder, dtype = options, self.folder, self.dtype_
        if folder:
            enc1 = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", dtype=dtype,
                                                 variant=o.variant)
            enc2 = CLIPTextModelWithProjection.from_pretrained(str(folder), subfolder="text_encoder_2", dtype=dtype,
                                                               variant=o.variant)
            self.tokenizers = [load_tokenizer(str(folder / "tokenizer")), load_tokenizer(str(folder / "tokenizer_2"))]
        else:
            enc1 = CLIPTextModel(CLIPTextConfig(**o.text_encoder)).to(dtype)
            enc2 = CLIPTextModelWithProjection(CLIPTextConfig(**o.text_encoder_2)).to(dtype)
            tok2 = load_tokenizer(o.tokenizer)
            tok2.pad_token = "!"  # SDXL's second tokenizer pads with "!" (id 0)
            self.tokenizers = [load_tokenizer(o.tokenizer), tok2]
        self.text_encoders = nn.ModuleList([enc1, enc2])
        self.init_towers()

    def encode(self, prompts: list[PromptTokens]) -> dict[str, torch.Tensor]:
        h1, _ = encode_text_tower(self.text_encoders[0], prompts[0], hidden_layer=-2)     # (N, 77, d1)
        h2, pooled = encode_text_tower(self.text_encoders[1], prompts[1], hidden_layer=-2)  # (N, 77, d2)
        return {"prompt_embeds": torch.cat([h1, h2], dim=-1),                              # (N, 77, d1+d2)
                "pooled": self.text_encoders[1].text_projection(pooled)}                   # (N, p)

    def time_ids(self, batch: int, device) -> torch.Tensor:
        r = self.resolution  # (original size, crop top-left, target size): a centred square crop
        return torch.tensor([[r, r, 0, 0, r, r]] * batch, device=device, dtype=torch.float32)

    def unet_conditioning(self, conditioning: dict[str, torch.Tensor], batch: int) -> dict[str, Any]:
        dt = self.unet.dtype
        pe = conditioning["prompt_embeds"]
        return {"encoder_hidden_states": pe.to(dt),
                "added_cond_kwargs": {"text_embeds": conditioning["pooled"].to(dt),
                                      "time_ids": self.time_ids(batch, pe.device).to(dt)}}

    @torch.no_grad()
    def generate(self, conditioning: dict[str, torch.Tensor], **options: Any) -> list[GeneratedImage]:
        from diffusers import StableDiffusionXLPipeline

        neg = self.encode(self.text_prompts([""] * conditioning["prompt_embeds"].shape[0]))
        dt = self.unet.dtype
        pipe = StableDiffusionXLPipeline(
            vae=self.vae, text_encoder=self.text_encoders[0], text_encoder_2=self.text_encoders[1],
            tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1], unet=self.unet,
            scheduler=self.sample_scheduler, add_watermarker=False)
        return self.draw(pipe, "sdxl", prompt_embeds=conditioning["prompt_embeds"].to(dt),
                         pooled_prompt_embeds=conditioning["pooled"].to(dt),
                         negative_prompt_embeds=neg["prompt_embeds"].to(dt),
                         negative_pooled_prompt_embeds=neg["pooled"].to(dt), **options)
