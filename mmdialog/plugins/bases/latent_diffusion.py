"""What the Stable Diffusion generators share: loading a diffusers folder,
running a CLIP text tower on embeddings, and the latent-diffusion ε-loss.

``sd`` and ``sdxl`` subclass ``LatentDiffusionGenerator`` and add only what
differs: how text towers become UNet conditioning, and which diffusers
pipeline samples. A third-party latent-diffusion generator subclasses it too
(``from mmdialog import LatentDiffusionGenerator``).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from mmdialog.core import assets
from mmdialog.core.activation_checkpointing import CheckpointPolicy, checkpoint_function
from mmdialog.core.caching import Entry, FeatureStore, cached_per_photo, component_store, require_pixels, resident
from mmdialog.core.compiling import compile_repeated_blocks
from mmdialog.core.errors import ConfigError
from mmdialog.core.interfaces import GeneratedImage, Generator, PluginOptions, PromptTokens, TextTower
from mmdialog.core.pretrained import no_remote_code, resolve_folder
from mmdialog.core.vocab import check_bridgeable, embed_for_tower

#: Noise schedule of SD 1.x / 2.x (scheduler_config.json of both).
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                   beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                   steps_offset=1, prediction_type="epsilon")


def tiny_clip_text_config(hidden: int = 64, **kw: Any) -> dict[str, Any]:
    """Random-init CLIP text tower over the real 49 408-token CLIP vocabulary."""
    return dict(vocab_size=49408, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden,
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, **kw)


def tiny_vae_config() -> dict[str, Any]:
    # Three blocks: a 64² photo becomes 16² latents, as 512² becomes 64² in SD.
    return dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[32, 64, 64],
                layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=64,
                scaling_factor=0.18215)


def _cast(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast only when needed (diffusers warns on every ``.to(dtype)``)."""
    return module if dtype == torch.float32 else module.to(dtype)


#: The store's key suffix of a photo's mirror image (``random_flip``).
HFLIP = "-hflip"

#: ``scheduler`` option → diffusers class that samples (None: the folder's own).
SAMPLERS = {"default": None, "ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler"}


def load_schedulers(folder: Path | None = None, sampler: str = "default") -> tuple[Any, Any]:
    """(DDPM for training, the sampling scheduler: the folder's own class, or
    ``SAMPLERS[sampler]``, on the same noise schedule)."""
    import diffusers

    cfg = diffusers.DDPMScheduler.load_config(str(folder), subfolder="scheduler") if folder else \
        {"_class_name": "DDIMScheduler", **SD_SCHEDULE}
    name = SAMPLERS[sampler] or cfg.get("_class_name", "DDIMScheduler")
    sampler = getattr(diffusers, name, diffusers.DDIMScheduler)
    with torch.device("cpu"):  # schedule tables are CPU state in diffusers, whatever the default device
        return diffusers.DDPMScheduler.from_config(cfg), sampler.from_config(cfg)


def check_diffusers_folder(path: str, subfolders: list[str], what: str) -> Path:
    files = ["model_index.json"]
    files += [f"{s}/config.json" for s in subfolders if not s.startswith(("tokenizer", "scheduler"))]
    files += [f"{s}" for s in subfolders if s.startswith("tokenizer")]
    files += ["scheduler/scheduler_config.json"]
    return resolve_folder(path, files, what)


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    with no_remote_code(f"generator tokenizer '{path}'"):  # a CLIP tokenizer is transformers' own class
        tok = AutoTokenizer.from_pretrained(assets.resolve(path), trust_remote_code=False)
    tok.model_max_length = min(tok.model_max_length, 77)
    return tok


@functools.cache
def _no_cache_kwarg() -> dict[str, None]:
    """transformers renamed create_causal_mask's ``past_key_values`` to ``cache`` in 5.x."""
    import inspect

    from transformers.masking_utils import create_causal_mask

    params = inspect.signature(create_causal_mask).parameters
    return {"cache": None} if "cache" in params else {"past_key_values": None}


def encode_text_tower(model: nn.Module, prompt: PromptTokens, hidden_layer: int | None = None,
                      padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a CLIP text tower on (differentiable) token embeddings.

    Returns (hidden (N,S,d), pooled (N,d)). ``hidden_layer=None`` gives the
    final-layer-normed last layer (SD 1.x/2.x); ``-2`` the penultimate layer
    without the final norm (SDXL). ``pooled`` is the normed state at the EOS
    token, like ``CLIPTextModel``'s ``pooler_output``. transformers 5 removed
    ``.text_model`` from CLIPTextModel and requires ``input_ids`` in forward,
    so the tower's parts are called directly (docs/design.md §7).
    ``padding_mask`` (N, S): 1 on the text; padding positions are then keys no
    position attends to, besides the causal mask (``pad_to_longest``).
    """
    from transformers.masking_utils import create_causal_mask

    tm = getattr(model, "text_model", model)
    emb = prompt.inputs_embeds.to(tm.embeddings.token_embedding.weight.dtype)
    h = tm.embeddings(inputs_embeds=emb)                                 # (N, S, d) + positions
    mask = create_causal_mask(config=tm.config, inputs_embeds=h, attention_mask=padding_mask, **_no_cache_kwarg())
    captured: list[torch.Tensor] = []
    handle = None
    if hidden_layer is not None:
        # hidden_states[i] is the output of layer i-1 (index 0 is the embeddings);
        # transformers 5 encoders no longer take output_hidden_states, so hook it.
        layer = tm.encoder.layers[hidden_layer + 1 if hidden_layer < -1 else hidden_layer]
        handle = layer.register_forward_hook(
            lambda mod, args, output: captured.append(output[0] if isinstance(output, tuple) else output))
    try:
        out = tm.encoder(inputs_embeds=h, attention_mask=mask, is_causal=True)
    finally:
        if handle is not None:
            handle.remove()
    last = tm.final_layer_norm(out.last_hidden_state)
    eos = tm.config.eos_token_id
    ids = prompt.input_ids.to(h.device)
    # The pooled state sits at the first EOS (HF's rule when eos_token_id != 2).
    pos = (ids == eos).int().argmax(-1) if eos is not None and eos != 2 else ids.argmax(-1)
    pooled = last[torch.arange(last.shape[0], device=h.device), pos]      # (N, d)
    hidden = last if hidden_layer is None else captured[-1]
    return hidden, pooled


def pad_to_longest(prompt: PromptTokens, eos: int) -> tuple[PromptTokens, torch.Tensor]:
    """The reference's training conditioning: each description tokenised alone
    (BOS … EOS), padded to the batch's longest, with a padding mask. ``prompt``
    holds the tower's ``max_length`` positions; returns its first M_max
    positions and the mask (N, M_max), 1 from BOS to the first EOS."""
    ids = prompt.input_ids                                                 # (N, S)
    length = (ids == eos).int().argmax(-1) + 1                             # (N,) BOS … first EOS
    m_max = int(length.max())
    mask = (torch.arange(m_max, device=ids.device)[None] < length[:, None]).long()  # (N, M_max)
    return PromptTokens(ids[:, :m_max], prompt.inputs_embeds[:, :m_max], prompt.texts), mask


class LatentDiffusionOptions(PluginOptions):
    """Options every Stable Diffusion generator has; plugins add their towers and UNet."""

    path: str | None = Field(None, description="local diffusers folder (or a hub id)")
    variant: str | None = Field(None, description="weights file variant to read from the folder, e.g. fp16 "
                                                  "(diffusion_pytorch_model.fp16.safetensors: what the reference "
                                                  "downloads); None: the plain files")
    training_conditioning: Literal["full", "padded"] = Field(
        "full", description="what the UNet sees while a loss is taken: full (the tower's 77 positions under the "
                            "causal mask, as at inference) or padded (the reference's training: the batch's "
                            "longest description, BOS to EOS, padding masked out in the text tower; the UNet "
                            "then sees M_max states). Inference always uses 77 positions, as SD's pipeline")
    unet_padding_mask: bool = Field(False, description="with padded: the UNet's cross-attention also masks the "
                                                       "padding (the reference's pipeline baseline)")
    tokenizer: str = Field(assets.CLIP_BPE, description="tokenizer for random-init components")
    vae: dict[str, Any] = Field(default_factory=tiny_vae_config, description="random-init VAE config")
    resolution: int | None = Field(None, gt=0, description="photo side; default from the UNet/VAE")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    gradient_checkpointing: bool | list[str] = Field(
        False, description="recompute UNet activations in the backward pass: true for every block, or "
                           "the blocks to checkpoint (selective), e.g. [down_blocks.0, up_blocks.3] — "
                           "the 64² blocks hold most of SD's activations")
    checkpoint_policy: CheckpointPolicy = Field(
        "full", description="what a checkpointed block keeps: full (only its input) or save_matmuls "
                            "(convolution, matmul and attention outputs kept, element-wise ops recomputed); "
                            "same numerics")
    # The frozen VAE gives the same distribution for a photo every epoch: keep its
    # (mean, std) and sample from it, so nothing the UNet sees changes.
    latent_cache: bool = Field(True, description="encode each training photo once (frozen VAE), keep its "
                                                 "latent mean/std in the feature store on disk (core/caching.py)")
    random_flip: bool = Field(False, description="training only: mirror each gold photo left-right with "
                                                 "probability ½ (SD fine-tuning's --random_flip); the feature "
                                                 "store then holds both flips of a photo")
    num_inference_steps: int = Field(30, gt=0)
    guidance_scale: float = Field(7.5, ge=0)
    scheduler: Literal["default", "ddim", "dpm"] = Field(
        "default", description="inference only: the sampler, on the folder's noise schedule. default: the "
                               "folder's own scheduler class (DDIM for random-init parts); ddim; dpm: "
                               "DPM-Solver++ multistep (2nd order: as good in 15-20 steps as DDIM in 50)")
    compile_unet: bool = Field(False, description="inference only: regional torch.compile of the UNet's "
                                                  "repeated transformer blocks before the first photo is "
                                                  "drawn (the first photo compiles, later ones are faster)")


class LatentDiffusionGenerator(Generator):
    """VAE + UNet + text tower(s) + scheduler, separately held (diffusers style).

    A subclass calls ``super().__init__(options, text_parts, name)``, which reads
    the VAE, UNet and schedulers (from ``options.path`` or random-init from the
    options), then sets ``text_encoders`` and ``tokenizers`` and calls
    ``init_towers()``. ``self.folder`` is the checked diffusers folder or None,
    ``self.dtype_`` the parts' dtype.
    """

    vae: nn.Module
    unet: nn.Module
    text_encoders: nn.ModuleList
    # The UNet trains fully; the text encoder(s) and the VAE stay frozen (docs/design.md §2).
    trainable_by_default = ("unet",)
    # The UNet holds nearly all trainable weights: with train.optimizer adamw8bit its moments are 8-bit.
    optimizer_8bit_by_default = ("unet",)
    tokenizers: list[Any]
    train_scheduler: Any
    sample_scheduler: Any

    def __init__(self, options: LatentDiffusionOptions, text_parts: tuple[str, ...], name: str) -> None:
        super().__init__()
        self.options = options
        self.dtype_ = getattr(torch, options.dtype)
        self.folder = check_diffusers_folder(options.path, ["unet", "vae", *text_parts], f"generator {name}") \
            if options.path else None
        self._init_image_parts(self.folder, options, self.dtype_)

    def _init_image_parts(self, folder: Path | None, options: Any, dtype: torch.dtype) -> None:
        """VAE, UNet and schedulers from a diffusers folder, or random-init from the options."""
        from diffusers import AutoencoderKL, UNet2DConditionModel

        if folder is not None:
            self.vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae", torch_dtype=dtype,
                                                     variant=options.variant)
            self.unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet", torch_dtype=dtype,
                                                             variant=options.variant)
        else:
            self.vae = _cast(AutoencoderKL(**options.vae), dtype)
            self.unet = _cast(UNet2DConditionModel(**options.unet), dtype)
        self.train_scheduler, self.sample_scheduler = load_schedulers(folder, options.scheduler)
        self.set_gradient_checkpointing(options.gradient_checkpointing, options.checkpoint_policy)
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.resolution = options.resolution or self.unet.config.sample_size * factor

    def set_gradient_checkpointing(self, blocks: bool | list[str], policy: CheckpointPolicy = "full") -> None:
        """Checkpoint every UNet block (True), none (False), or the named ones,
        under ``policy`` (``core/checkpointing.py``)."""
        unet = self.unet
        if not blocks:
            unet.disable_gradient_checkpointing()
            return
        if blocks is not True:
            names = [n for n, m in unet.named_children() if n.endswith("_blocks")]
            known = [f"{n}.{i}" for n in names for i in range(len(getattr(unet, n)))] + ["mid_block"]
            unknown = sorted(set(blocks) - set(known))
            if unknown:
                raise ConfigError(f"generator.gradient_checkpointing: unknown UNet block(s) {unknown}; "
                                  f"choose from {known}")
        unet.enable_gradient_checkpointing(checkpoint_function(policy))  # sets it everywhere…
        if blocks is not True:
            for name, module in unet.named_modules():  # …then keeps the flag only inside the chosen blocks
                if hasattr(module, "gradient_checkpointing"):
                    module.gradient_checkpointing = any(name == b or name.startswith(b + ".") for b in blocks)

    def init_towers(self) -> None:
        """The ``text_towers`` a bridge feeds, from ``tokenizers`` and ``text_encoders``."""
        for i, tok in enumerate(self.tokenizers):
            check_bridgeable(tok, f"generator text tower {i}")
        self.text_towers = [
            TextTower(tok, enc.get_input_embeddings(), tok.model_max_length)
            for tok, enc in zip(self.tokenizers, self.text_encoders)]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"unet": list(self.unet.parameters()), "vae": list(self.vae.parameters()),
                "text_encoder": list(self.text_encoders.parameters())}

    @torch.no_grad()
    def text_prompts(self, texts: list[str]) -> list[PromptTokens]:
        """Plain-text path (negative prompts, baselines): no gradient."""
        return [embed_for_tower(tower, texts)[1] for tower in self.text_towers]

    def draw(self, pipe: Any, plugin: str, num_inference_steps: int | None = None,
             guidance_scale: float | None = None, seed: int | list[int] | None = None,
             **call: Any) -> list[GeneratedImage]:
        """Run a diffusers pipeline built around this generator's parts, with the
        options' defaults, at the training resolution. ``seed``: one for the batch,
        or one per photo (each photo's noise then depends on its own seed only)."""
        pipe.set_progress_bar_config(disable=True)
        if self.options.compile_unet and not getattr(self, "_unet_compiled", False):
            compile_repeated_blocks(self.unet)
            self._unet_compiled = True
        if isinstance(seed, list):  # diffusers draws photo i's latents from generator i
            gen: Any = [torch.Generator(device="cpu").manual_seed(s) for s in seed]
        else:
            gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        with resident(self.unet.device, self.vae):
            images = pipe(num_inference_steps=num_inference_steps or self.options.num_inference_steps,
                          guidance_scale=self.options.guidance_scale if guidance_scale is None else guidance_scale,
                          height=self.resolution, width=self.resolution, generator=gen, **call).images
        return [GeneratedImage(image, "drawn", plugin) for image in images]

    def unet_conditioning(self, conditioning: Any, batch: int) -> dict[str, Any]:
        """Keyword arguments for ``unet(...)`` from ``encode``'s result."""
        raise NotImplementedError

    def latents(self, pixels: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        """Scaled VAE latents of photos in [0, 1], sampled from the posterior."""
        vae = self.vae
        frozen = self._vae_frozen()
        store = self.feature_store() if frozen and keys and all(keys) else None
        if store is not None:
            entries = cached_per_photo(store, keys, lambda i: self.encode_photo(
                require_pixels(pixels[i:i + 1], keys[i], store)))
            mean = torch.stack([e["mean"] for e in entries]).to(pixels.device)  # (N, 4, H/f, W/f)
            std = torch.stack([e["std"] for e in entries]).to(pixels.device)
            # The same draw DiagonalGaussianDistribution.sample() makes.
            z = mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        else:
            x = (pixels * 2 - 1).to(vae.dtype)                                # (N, 3, H, W) in [-1, 1]
            with resident(pixels.device, vae), torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                z = vae.encode(x).latent_dist.sample()                        # (N, 4, H/f, W/f)
        return z * vae.config.scaling_factor

    def feature_store(self, root: str | None = None) -> FeatureStore | None:
        if not (self.options.latent_cache and self._vae_frozen()):
            return None
        variants = ("", HFLIP) if self.options.random_flip else ("",)
        return component_store(self, root, "vae-v1", (self.vae,), self.resolution, variants)

    def encode_photo(self, pixels: torch.Tensor, variant: str = "") -> Entry:
        """The VAE posterior (mean, std) of one photo, or of its mirror image (``HFLIP``)."""
        x = ((pixels.flip(-1) if variant == HFLIP else pixels) * 2 - 1).to(self.vae.dtype)
        with resident(x.device, self.vae), torch.no_grad():
            dist = self.vae.encode(x).latent_dist
        return {"mean": dist.mean[0], "std": dist.std[0]}

    def _vae_frozen(self) -> bool:
        return not any(p.requires_grad for p in self.vae.parameters())

    def cached_encoders(self) -> list[nn.Module]:
        # With random flips an epoch need not show both mirror images of every photo.
        cached = self.options.latent_cache and self._vae_frozen() and not self.options.random_flip
        return [self.vae] if cached else []

    def loss(self, conditioning: Any, pixels: torch.Tensor, keys: list[str] | None = None) -> torch.Tensor:
        """Diffusion loss E‖ε − ε_θ(z_t, t, c)‖² (Ho et al. 2020; v-target when
        the scheduler predicts v, as SD 2.1-768 does)."""
        sch = self.train_scheduler
        if self.options.random_flip and torch.is_grad_enabled():
            flip = torch.rand(pixels.shape[0]) < 0.5                             # (N,)
            pixels = torch.where(flip.to(pixels.device)[:, None, None, None], pixels.flip(-1), pixels)
            if keys:
                keys = [k + HFLIP if k and f else k for k, f in zip(keys, flip.tolist())]
        z0 = self.latents(pixels, keys)
        noise = torch.randn_like(z0)
        t = torch.randint(0, sch.config.num_train_timesteps, (z0.shape[0],), device=z0.device)
        zt = sch.add_noise(z0, noise, t)
        if sch.config.prediction_type == "v_prediction":
            target = sch.get_velocity(z0, noise, t)
        else:
            target = noise
        pred = self.unet(zt, t, **self.unet_conditioning(conditioning, z0.shape[0])).sample
        return F.mse_loss(pred.float(), target.float())
