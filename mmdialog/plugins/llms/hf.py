"""llm ``hf``: any Hugging Face causal LM (hub id, local folder or GGUF file),
with the tokens ``[img]``/``[/img]`` added and LoRA through peft.

New tokens get their own small embedding and output rows
(``AddedTokenEmbedding`` / ``AddedTokenHead``) instead of resizing the base
tables: the base rows stay frozen and untouched, only 3×D numbers per table
train (the reference trains all of ``embed_tokens`` and ``lm_head``; set
``model.trainable: {llm.embeddings: true}`` for that).
"""
from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from mmdialog.core import assets, quantization
from mmdialog.core.activation_checkpointing import CheckpointPolicy, checkpoint_kwargs
from mmdialog.core.errors import ConfigError
from mmdialog.core.interfaces import BuildContext, LanguageModel, PluginOptions
from mmdialog.core.markup import IMAGE_TOKEN, IMG_CLOSE, IMG_OPEN
from mmdialog.core.pretrained import is_local, no_remote_code, require_folder
from mmdialog.core.reading import check_gguf

#: Used when a tokenizer has no chat template of its own.
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: transformers' own attention implementations; any other name is a Hub kernel repository (code from
#: outside mmdialog and the model folder), which runs only with trust_remote_code.
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
#: A model-config value (``config`` / ``config_overrides``): plain numbers, text, lists and mappings of them.
Scalar = bool | int | float | str | None
ConfigValue = Scalar | list[Scalar] | dict[str, Scalar]
#: Model-config keys that would load code or files: never from a config file.
UNSAFE_CONFIG_KEYS = ("auto_map", "trust_remote_code", "attn_implementation", "custom_pipelines")


class LoraOptions(PluginOptions):
    r: int = Field(8, ge=0, description="LoRA rank; 0 disables LoRA")
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    targets: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    dtype: Literal["float32", "model"] = Field(
        "float32", description="adapter weights: float32 (peft's default; full-precision AdamW updates of "
                               "the only LLM weights that train) or the model's dtype, as the reference's "
                               "all-bf16 recipe (no casts of the layer input; bf16 rounding in the update)")


class TokenizerOptions(PluginOptions):
    """The keyword options of ``AutoTokenizer.from_pretrained`` a config may set: an
    allow-list (no file paths, no remote code); unset ones keep the tokenizer's own."""

    legacy: bool | None = Field(None, description="Llama/T5 tokenizers: true is how transformers 4 tokenized "
                                                  "text after special tokens (the reference's '<s>[INST]' is "
                                                  "▁[ INST ])")
    use_fast: bool | None = None
    add_prefix_space: bool | None = None
    add_bos_token: bool | None = None
    add_eos_token: bool | None = None
    clean_up_tokenization_spaces: bool | None = None
    padding_side: Literal["left", "right"] | None = None
    truncation_side: Literal["left", "right"] | None = None
    model_max_length: int | None = Field(None, gt=0)


class HFOptions(PluginOptions):
    path: str = Field(assets.SMOLLM2, description="hub id, local folder, or folder holding `gguf_file`")
    variant: str | None = Field(None, description="weights file variant to read, e.g. fp16 "
                                                  "(model.fp16.safetensors); None: the plain files")
    gguf_file: str | None = Field(None, pattern=r"^[^/\\]+$",
                                  description="GGUF file name inside `path` (a name, not a path)")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    lora: LoraOptions = Field(default_factory=LoraOptions)
    random_weights: bool = Field(False, description="random weights from `path`'s config.json, or from "
                                                    "`config` (benchmarks at real shapes, no download)")
    config: dict[str, ConfigValue] | None = Field(None, description="with random_weights: a full model config "
                                                                    "(with model_type) instead of path/config.json")
    config_overrides: dict[str, ConfigValue] = Field(default_factory=dict, description="with random_weights")
    gradient_checkpointing: bool | int = Field(
        False, ge=0, description="recompute decoder-layer activations in the backward pass: true (or 1) "
                                 "every layer; k > 1 every k-th layer only (selective: less recompute, "
                                 "more memory)")
    checkpoint_policy: CheckpointPolicy = Field(
        "full", description="what a checkpointed layer keeps: full (only its input; everything is "
                            "recomputed) or save_matmuls (matmul and attention outputs kept, element-wise ops "
                            "recomputed: less recompute, more memory); same numerics")
    attn_implementation: str = Field(
        "sdpa", pattern=r"^[A-Za-z0-9_.:/-]+$",
        description=f"{', '.join(ATTENTION)}; a Hub kernel repository (org/name) runs code from outside the "
                    "model folder and needs --trust-remote-code (trust_remote_code=True)")
    prompt_format: str = Field("template", description="how a dialogue becomes text and labels: template "
                                                       "(the tokenizer's chat template, the agent's turns "
                                                       "trained), reference (the authors' Llama-2 format, one "
                                                       "sample per dialogue, every token trained), or a "
                                                       "registered one (`mmdialog plugins`)")
    tokenizer_options: TokenizerOptions = Field(
        default_factory=TokenizerOptions, description="options of AutoTokenizer.from_pretrained, e.g. {legacy: "
                                                      "true} (Llama-2: '<s>[INST]' is ▁[ INST ], not [ INST ]; for "
                                                      "all of transformers 4's ids see tokenizer_pipeline)")
    tokenizer_pipeline: Literal["as_loaded", "transformers4"] = Field(
        "as_loaded", description="transformers4: a SentencePiece tokenizer (Llama-2's) runs as transformers 4 ran "
                                 "it from Llama-2's tokenizer.json, giving the reference's ids: the normalizer "
                                 "prepends '▁' to each piece between special tokens and writes spaces as '▁', and "
                                 "there is no pre-tokenizer. transformers 5 pre-tokenizes with Metaspace instead "
                                 "(with or without legacy), which splits a lone '▁' before [img]/[/img] and gives "
                                 "the text after </s> no '▁' of its own. Tokenizers without Metaspace (byte-level, "
                                 "as SmolLM2's) are loaded alike by both and stay as loaded")
    system_prompt: str | None = Field(None, description="system prompt (None: the format's default; template: "
                                                        "none, reference: the authors')")
    kv_cache: Literal["dynamic", "static"] = Field(
        "dynamic", description="inference only: the KV cache of `generate`. dynamic grows every step; static "
                               "is allocated once per batch size (rounded up to 256 positions, kept across "
                               "replies) with fixed shapes a compiled decode step can replay. Greedy replies are "
                               "the same token for token")
    compile_decode: bool = Field(
        False, description="inference only, needs kv_cache: static: torch.compile the one-token decode step "
                           "(transformers' CompileConfig, CUDA graphs on CUDA). The first reply of each batch "
                           "size compiles (seconds to a minute); later ones replay")
    base_quantization: quantization.BaseQuantization = Field(
        "none", description="store the frozen decoder's Linear weights quantized (torchao, weight-only; the "
                            "embeddings, LM head and LoRA adapters keep `dtype`): nf4 (4-bit NormalFloat in "
                            "blocks of 64, QLoRA's), int8 (per output channel) or float8 (e4m3, per output "
                            "channel). Each matmul de-quantizes the weight: the base's outputs carry its "
                            "rounding error, activations and gradients keep their dtype. The base cannot "
                            "train (model.trainable llm.base)")
    float8_matmul: bool = Field(
        False, description="run the frozen decoder's Linear matmuls in float8 (torchao Float8Linear: input, "
                           "weight and output gradient cast to e4m3/e5m2 with dynamic per-tensor scales, forward "
                           "and backward; weights stored in `dtype`). Needs a CUDA GPU of compute capability "
                           "8.9+ (Ada, Hopper); the LoRA adapters, embeddings and LM head keep `dtype`")

    @model_validator(mode="after")
    def _no_code_doors(self) -> HFOptions:
        for field in ("config", "config_overrides"):
            bad = [k for k in getattr(self, field) or {} if k in UNSAFE_CONFIG_KEYS or k.startswith("_")]
            if bad:
                raise ValueError(f"{field}.{bad[0]} cannot be set from a config: it would load code or files "
                                 "the model folder does not hold")
        return self

    @model_validator(mode="after")
    def _one_base_numerics(self) -> HFOptions:
        if self.float8_matmul and self.base_quantization != "none":
            raise ValueError("float8_matmul casts the base weights itself; use it with base_quantization: none")
        return self


class AddedTokenEmbedding(nn.Module):
    """Base embedding for ids < base_vocab, a trainable table for the new ids."""

    def __init__(self, base: nn.Embedding, n_new: int) -> None:
        super().__init__()
        self.base = base
        self.base_vocab = base.num_embeddings
        # New rows start at the mean embedding (a common, stable init).
        init = base.weight.detach().float().mean(0, keepdim=True).repeat(n_new, 1)
        self.new = nn.Parameter(init.to(base.weight.dtype))

    @property
    def weight(self) -> torch.Tensor:  # generate() and peft look for .weight
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = ids >= self.base_vocab
        out = self.base(ids.clamp(max=self.base_vocab - 1))  # (B, T, D)
        if is_new.any():
            out = torch.where(is_new[..., None], self.new[(ids - self.base_vocab).clamp(min=0)], out)
        return out


class AddedTokenHead(nn.Module):
    """logits = [h·W_baseᵀ, h·W_newᵀ]: the new tokens' output rows, trainable."""

    def __init__(self, base: nn.Linear, n_new: int) -> None:
        super().__init__()
        self.base = base
        init = base.weight.detach().float().mean(0, keepdim=True).repeat(n_new, 1)
        self.new = nn.Parameter(init.to(base.weight.dtype))

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.base(h), h @ self.new.t()], dim=-1)  # (B, T, V_base + n_new)


class HFLanguageModel(LanguageModel):
    Options = HFOptions
    # LoRA and the rows of the added tokens train; the base weights stay frozen (the reference
    # also trains every row of embed_tokens / lm_head: its recipe sets llm.embeddings, docs/design.md §2).
    trainable_by_default = ("lora", "new_token_rows")

    def __init__(self, options: HFOptions, trust_remote_code: bool = False) -> None:
        super().__init__()
        self.options = options
        if options.float8_matmul:  # before the weights are read
            quantization.require_float8_device()
        self.tokenizer, base = _load(options, trust_remote_code)
        n_before = len(self.tokenizer)
        self.tokenizer.add_tokens([IMG_OPEN, IMG_CLOSE])
        self.tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
        n_new = len(self.tokenizer) - n_before
        emb = base.get_input_embeddings()
        if emb.num_embeddings != n_before:
            # Some checkpoints pad the table (e.g. to a multiple of 64): new ids
            # must start right after the table, so re-map the tokenizer ids.
            raise ConfigError(f"LLM '{options.path}': tokenizer has {n_before} tokens but the "
                              f"embedding table {emb.num_embeddings} rows; resize it first")
        base.set_input_embeddings(AddedTokenEmbedding(emb, n_new))
        base.set_output_embeddings(AddedTokenHead(base.get_output_embeddings(), n_new))
        if not getattr(self.tokenizer, "chat_template", None):
            self.tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = _with_lora(base, options.lora)
        quantization.quantize_weights(base.get_decoder(), options.base_quantization)
        if options.float8_matmul:
            quantization.float8_matmuls(base.get_decoder())
        self.set_gradient_checkpointing(options.gradient_checkpointing, options.checkpoint_policy)
        self.hidden_size = base.config.hidden_size
        ids = self.tokenizer.convert_tokens_to_ids
        self.img_open_id, self.img_close_id = ids(IMG_OPEN), ids(IMG_CLOSE)
        self.image_token_id = ids(IMAGE_TOKEN)
        self.pad_token_id = self.tokenizer.pad_token_id
        self.base_vocab = n_before
        # End of the assistant's turn: EOS and, for ChatML templates, <|im_end|>.
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.stop_ids = sorted({i for i in (self.tokenizer.eos_token_id, im_end)
                                if isinstance(i, int) and i != self.tokenizer.unk_token_id})
        self.prompt_format, self.system_prompt = options.prompt_format, options.system_prompt
        self.user_first = not _renders(self.tokenizer, [{"role": "assistant", "content": "hi"}])
        if options.compile_decode and options.kv_cache != "static":
            raise ConfigError("llm.compile_decode needs llm.kv_cache: static (a dynamic cache changes shape "
                              "every step)")
        self._static_cache: Any = None

    @classmethod
    def from_options(cls, options: HFOptions, ctx: BuildContext) -> HFLanguageModel:
        return cls(options, trust_remote_code=ctx.trust_remote_code)

    @property
    def base_model(self) -> nn.Module:
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def set_gradient_checkpointing(self, every: bool | int, policy: CheckpointPolicy = "full") -> None:
        """Checkpoint every ``every``-th decoder layer (True: all; False or 0: none)
        under ``policy`` (``core/checkpointing.py``)."""
        base = self.base_model
        # transformers ≥ 5.2x names it "activation checkpointing"; earlier 5.x "gradient checkpointing".
        new_api = hasattr(base, "activation_checkpointing_enable")
        if every:
            enable = base.activation_checkpointing_enable if new_api else base.gradient_checkpointing_enable
            enable(checkpoint_kwargs(policy), every_n_layers=int(every))
        elif new_api:
            base.activation_checkpointing_disable()
        else:
            base.gradient_checkpointing_disable()

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        base = self.base_model
        emb, head = base.get_input_embeddings(), base.get_output_embeddings()
        groups: dict[str, list[nn.Parameter]] = {
            "lora": [p for n, p in self.model.named_parameters() if "lora_" in n],
            "new_token_rows": [emb.new, head.new],
            "embeddings": list({id(p): p for p in (emb.base.weight, head.base.weight)}.values()),
        }
        taken = {id(p) for ps in groups.values() for p in ps}
        groups["base"] = [p for p in self.model.parameters() if id(p) not in taken]
        return groups

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base_model.get_input_embeddings()(input_ids)  # (B, T, D)

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        if positions is None:
            out = self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
            return out.logits                                                # (B, T, V)
        # Only the positions that are scored go through the LM head: it is the
        # widest matmul of a small LLM, and most positions are context.
        base = self.base_model
        h = base.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                               use_cache=False).last_hidden_state            # (B, T, D)
        return base.get_output_embeddings()(h[positions])                    # (N, V)

    @torch.no_grad()
    def generate(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                 max_new_tokens: int = 64, temperature: float = 0.0, num_beams: int = 1,
                 top_p: float = 1.0, stop_ids: list[int] | None = None,
                 suppress: list[list[int]] | None = None,
                 on_step: Callable[[list[int]], None] | None = None, min_new_tokens: int = 0) -> torch.Tensor:
        """New token ids (B, T'). ``min_new_tokens``: no stop id before that many
        (fixed reply lengths for timing)."""
        from transformers import LogitsProcessorList

        sample = temperature > 0
        processors = LogitsProcessorList([_Markup(self.img_open_id, self.img_close_id, self.image_token_id)])
        if suppress and any(suppress):
            processors.append(_Suppress(suppress, num_beams))
        # transformers streams greedy and sampled decoding only; beam search decides at the end.
        streamer = _step_streamer()(on_step) if on_step is not None and num_beams == 1 else None
        return self.model.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens or None,
            do_sample=sample, temperature=temperature if sample else None, top_p=top_p if sample else None,
            num_beams=num_beams, eos_token_id=stop_ids or self.stop_ids, pad_token_id=self.pad_token_id,
            logits_processor=processors, streamer=streamer,
            **self._cache_options(inputs_embeds.shape[0] * num_beams, inputs_embeds.shape[1] + max_new_tokens))

    def _cache_options(self, rows: int, length: int) -> dict[str, Any]:
        """``generate``'s cache arguments. The static cache is one object kept while the
        batch size stays and the reply fits: its tensors keep their addresses, which a
        compiled (CUDA-graph) decode step needs to replay rather than re-record."""
        o = self.options
        if o.kv_cache == "dynamic":
            return {}
        from transformers import CompileConfig, StaticCache

        held_rows, held_len, cache = self._static_cache or (0, 0, None)
        if held_rows != rows or held_len < length:
            size = max(-(-length // 256) * 256, held_len)
            cache = StaticCache(config=self.base_model.config, max_cache_len=size)
            self._static_cache = (rows, size, cache)
        else:
            cache.reset()
        compile_config = None
        if o.compile_decode:
            compile_config = CompileConfig()
            # transformers compiles on accelerators only unless told otherwise: the option means it.
            compile_config._compile_all_devices = True
        return {"cache": cache, "compile_config": compile_config, "disable_compile": not o.compile_decode}

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt)


@functools.cache
def _step_streamer() -> type:
    """transformers' streamer protocol for a batch (``TextStreamer`` takes one row only):
    ``generate`` puts the prompt ids (B, T) once, then each step's new token of every
    row (B,), which go to ``on_step``. Built on first use: transformers is a heavy import."""
    from transformers.generation.streamers import BaseStreamer

    class StepStreamer(BaseStreamer):
        def __init__(self, on_step: Callable[[list[int]], None]) -> None:
            self.on_step = on_step

        def put(self, value: torch.Tensor) -> None:
            if value.dim() == 1:
                self.on_step(value.tolist())

        def end(self) -> None:
            pass

    return StepStreamer


class _Markup:
    """The description markup as a grammar, over the tokens written in this call: ``[/img]``
    only closes an ``[img]`` that is open, ``[img]`` does not open inside a description, and
    ``<image>`` (a slot the perceiver fills, never a word) is not written. A reply goes on
    after its photo with no span open, where a stray ``[/img]`` was the likeliest next token
    of a model that has just seen one."""

    def __init__(self, open_id: int, close_id: int, image_id: int) -> None:
        self.open_id, self.close_id, self.image_id = open_id, close_id, image_id

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        # A span is open when the last markup token written is [img].
        is_open = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)      # (B·beams,)
        for t in range(input_ids.shape[1]):
            tok = input_ids[:, t]
            is_open = torch.where(tok == self.open_id, True, torch.where(tok == self.close_id, False, is_open))
        scores = scores.clone()
        scores[:, self.image_id] = float("-inf")
        scores[is_open, self.open_id] = float("-inf")
        scores[~is_open, self.close_id] = float("-inf")
        return scores


class _Suppress:
    """A logits processor that never lets row b write ``ids[b]`` (rows expanded per beam)."""

    def __init__(self, ids: list[list[int]], num_beams: int) -> None:
        self.ids, self.num_beams = ids, num_beams

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        banned = torch.zeros(len(self.ids), scores.shape[-1], dtype=torch.bool)
        for b, ids in enumerate(self.ids):
            banned[b, ids] = True
        banned = banned.repeat_interleave(self.num_beams, dim=0).to(scores.device)   # (B·beams, V)
        return scores.masked_fill(banned, float("-inf"))


def _renders(tokenizer: Any, messages: list[dict[str, str]]) -> bool:
    """Whether the chat template accepts ``messages`` (Llama-2-chat's raises unless
    the roles alternate starting with the user)."""
    from jinja2 import TemplateError

    try:
        tokenizer.apply_chat_template(messages, tokenize=False)
        return True
    except TemplateError:
        return False


def _load(o: HFOptions, trust_remote_code: bool = False) -> tuple[Any, nn.Module]:
    """(tokenizer, model). Code from the folder or the Hub (a custom class in
    ``auto_map``, a kernel repository) runs only with ``trust_remote_code``,
    which is never an option of the config: the caller passes it (``--trust-remote-code``)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = assets.resolve(o.path)
    dtype = DTYPES[o.dtype]
    if o.attn_implementation not in ATTENTION and not trust_remote_code:
        raise ConfigError(f"llm.attn_implementation '{o.attn_implementation}' is not one of transformers' own "
                          f"({', '.join(ATTENTION)}): a Hub kernel runs code from outside the model folder; pass "
                          "--trust-remote-code (Python: trust_remote_code=True) if you trust its source")
    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if o.gguf_file:
        folder = require_folder(path, [o.gguf_file], "llm (GGUF)")
        check_gguf(folder / o.gguf_file, "llm GGUF file", root=folder)
        kw["gguf_file"] = o.gguf_file
    elif is_local(path):
        require_folder(path, ["tokenizer_config.json"] if o.config else ["config.json"], "llm")
    attn = {"attn_implementation": o.attn_implementation}
    try:
        with no_remote_code(f"llm '{o.path}'"):
            tok = AutoTokenizer.from_pretrained(path, **kw, **o.tokenizer_options.model_dump(exclude_none=True))
            if o.tokenizer_pipeline == "transformers4":
                _transformers4_pipeline(tok)
            if o.random_weights:
                cfg = AutoConfig.for_model(**o.config) if o.config else AutoConfig.from_pretrained(path, **kw)
                for k, v in o.config_overrides.items():
                    setattr(cfg, k, v)
                model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, trust_remote_code=trust_remote_code,
                                                         **attn)
            else:
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, variant=o.variant, **attn, **kw)
    except OSError as e:
        raise ConfigError(f"llm '{o.path}' could not be loaded ({str(e).splitlines()[0]}); "
                          "give a local folder, or a hub id with network access") from None
    except (ValueError, EOFError, IndexError, struct.error) as e:
        if not o.gguf_file:
            raise
        # The GGUF header passed check_gguf; a tensor the file is too short for fails in the parser.
        raise ConfigError(f"llm GGUF file '{path}/{o.gguf_file}' cannot be read ({type(e).__name__}: "
                          f"{' '.join(str(e).split())[:160]}); is it complete?") from None
    if o.gguf_file:  # GGUF weights arrive de-quantised in float32
        model = model.to(dtype)
    return tok, model


def _transformers4_pipeline(tokenizer: Any) -> None:
    """The SentencePiece pipeline of transformers 4 (Llama-2's tokenizer.json, and its
    LlamaConverter with legacy): normalizer Prepend('▁') + Replace(' ', '▁'), no pre-tokenizer.
    The normalizer runs on each piece between special tokens, so " hi" after </s> is ▁ ▁hi;
    a normalized added token is matched normalized, with its '▁' (" [img]" is the one token
    [img]). The tokenizer's added tokens are re-matched under the new normalizer."""
    from tokenizers import normalizers, pre_tokenizers

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not isinstance(backend.pre_tokenizer, pre_tokenizers.Metaspace):
        return
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.pre_tokenizer = None


def _with_lora(model: nn.Module, lora: LoraOptions) -> nn.Module:
    if lora.r == 0:
        return model
    from peft import LoraConfig, get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in lora.targets if t not in names]
    if missing:
        raise ConfigError(f"llm.lora.targets: no module named {', '.join(missing)} in this model")
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                     target_modules=lora.targets, bias="none")
    return get_peft_model(model, cfg, autocast_adapter_dtype=lora.dtype == "float32")
