"""Typed configuration: component specs, the model, data and training.

A config is a YAML file or a preset name (``tiny``, ``paper``) plus overrides.
Each component spec is ``{name: <plugin>, **options}``; the options are
checked against that plugin's own ``Options`` model when the config loads, so
a typo fails before any weight is read, with the field's dotted name.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mmdialog.core.errors import ConfigError, validation_message
from mmdialog.core.hookspecs import KIND_NAMES

PRESETS = ("tiny", "paper", "paper-24gb")
#: Config sections that name a plugin: the four kinds, and the optional retriever
#: a generator chain (``library,sd``) puts in front of the generator.
SLOTS = (*KIND_NAMES, "retriever")

#: The freeze policy's defaults (the reference trains the same set, except that
#: it trains *all* rows of embed_tokens / lm_head: docs/design.md §2). Keys are
#: ``component.group``; groups come from each plugin's ``parameter_groups``.
DEFAULT_TRAINABLE: dict[str, bool] = {
    "llm.lora": True,
    "llm.new_token_rows": True,
    "llm.embeddings": False,
    "llm.base": False,
    "perceiver.projection": True,
    "perceiver.qformer": False,
    "perceiver.vision": False,
    "generator.unet": True,
    "generator.text_encoder": False,
    "generator.vae": False,
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ComponentSpec(BaseModel):
    """``name`` picks the plugin; every other key is one of its options."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(description="registered plugin name, see `mmdialog plugins`")

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class ModelConfig(_Strict):
    llm: ComponentSpec
    perceiver: ComponentSpec
    bridge: ComponentSpec
    generator: ComponentSpec
    retriever: ComponentSpec | None = Field(
        None, description="shares a real photo instead of drawing one when it matches the description "
                          "well enough (e.g. library); the generator draws the others")
    trainable: dict[str, bool] = Field(
        default_factory=dict,
        description="freeze-policy overrides, e.g. {'llm.embeddings': true}; see DEFAULT_TRAINABLE")
    image_loss_weight: float = Field(1.0, ge=0, description="λ in loss = L_text + λ·L_img")
    max_length: int = Field(512, gt=8, description="LLM tokens per training sample (right-truncated)")
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _chain_from_fallback(cls, raw: Any) -> Any:
        """Configs written before the retriever slot nest the generator in the
        retriever: ``generator: {name: library, fallback: {name: sd}}``."""
        if isinstance(raw, dict) and isinstance(raw.get("generator"), dict) and "fallback" in raw["generator"]:
            retriever = dict(raw["generator"])
            raw = {**raw, "generator": retriever.pop("fallback"), "retriever": retriever}
        return raw


class DataConfig(_Strict):
    path: str = Field("embedded:demo", description="dataset file/folder, or an embedded set: 'embedded:demo' "
                                                    "(PhotoChat excerpt + demo chats), 'embedded:demo-share' "
                                                    "(when to share: the tiny preset's)")
    format: str = Field("auto", description="auto (detect from the records), or a dataset format: "
                                            "photochat, dialogcc, jsonl, or one a plugin registers")
    split: str | None = Field(None, description="split folder/file to read (train, dev, test)")
    image_dir: str | None = Field(None, description="folder with photos named by id or URL hash")
    both_speakers: bool = Field(True, description="one sample per speaker as the agent; else sharer only "
                                                  "(prompt format template; reference: one per dialogue)")
    strict: bool = Field(False, description="stop with a one-line error at the first bad record or photo, before "
                                            "any step (default: skip it for the image loss, count and report it)")
    batch_size: int = Field(2, gt=0)
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="loader processes per device; auto: none on a CPU accelerator (the step has the "
                            "cores), else up to 4 per device, as the node's CPUs allow")
    feature_store: str | None = Field(
        None, description="folder of the per-photo encoder outputs (Q-Former features, VAE posteriors), "
                          "shared by every run, rank and node that can reach it; default $MMDIALOG_CACHE/features")
    order: Literal["shuffle", "length"] = Field(
        "shuffle", description="training order: shuffle (a new permutation each epoch, from the seed) or "
                               "length (shortest dialogue first, the same every epoch, as the reference)")


class TrainConfig(_Strict):
    max_steps: int = Field(1000, gt=0, description="optimizer steps")
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(400, ge=0)
    warmup_start_factor: float | None = Field(
        None, ge=0, le=1, description="lr factor at step 0 of the linear warm-up (the reference's LinearLR: "
                                      "0.01); None: step s uses (s+1)/warmup_steps")
    accumulate: int = Field(1, gt=0, description="micro-batches per optimizer step")
    precision: str = Field("auto", description="Lightning precision: auto (bf16-mixed where supported, "
                                               "else 32-true), 32-true, bf16-mixed, bf16-true, 16-mixed")
    accelerator: str = "auto"
    devices: int | str = "auto"
    num_nodes: int = Field(1, gt=0)
    strategy: str = Field("auto", description="auto, ddp, fsdp, deepspeed")
    out_dir: str = "runs/mmdialog"
    log_every: int = Field(1, gt=0)
    checkpoint_every: int = Field(100, gt=0, description="optimizer steps between checkpoints (last.ckpt)")
    gradient_clip: float = Field(1.0, ge=0, description="max gradient norm; 0 disables clipping")
    fused_optimizer: bool = Field(True, description="fused AdamW kernel where all parameters are on GPU")
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        "adamw", description="adamw: torch's AdamW, float32 moments; adamw8bit: bitsandbytes' AdamW with the "
                             "moments of optimizer_8bit_groups stored blockwise-quantized in 8 bits (uint8 + one "
                             "float32 scale per 256 numbers: 2 bytes per weight instead of 8; the update reads "
                             "them de-quantized, so it carries their rounding error; tensors under 4096 numbers "
                             "keep float32 moments) and float32 moments for every other weight")
    optimizer_8bit_groups: list[str] = Field(
        default_factory=lambda: ["generator.unet"],
        description="with optimizer adamw8bit: the freeze-policy groups (component.group, see DEFAULT_TRAINABLE) "
                    "whose moments are 8-bit")
    compile: bool = Field(False, description="regional torch.compile of the repeated blocks (decoder and "
                                             "encoder layers, UNet transformer blocks); the first steps "
                                             "compile")
    offload_cached_encoders: bool = Field(
        True, description="single-device runs: after the first epoch this process ran whole, every training "
                          "photo is cached, so the frozen encoders behind the caches (BLIP-2's ViT and Q-Former, "
                          "the VAE) move to the CPU and come back only for a photo not yet cached, for dev "
                          "evaluation and after training; same numerics")
    activation_memory_budget: float | None = Field(
        None, gt=0, le=1, description="with compile: the share of a compiled block's activations kept for the "
                                      "backward pass; the compiler recomputes the cheapest ops to fit it "
                                      "(torch's activation memory budget; None: its default, 1.0); same "
                                      "numerics. Eager blocks: the components' checkpoint_policy")
    val_every: Annotated[int, Field(ge=0)] | Literal["epoch"] = Field(
        0, description="optimizer steps between dev evaluations (0: none), or 'epoch': after every "
                             "pass over the training data, as the reference")
    val_turns: int = Field(200, ge=0, description="dev turns generated per evaluation (gold context; "
                                                  "0: the whole dev split)")
    val_max_new_tokens: int = Field(32, gt=0)
    val_num_beams: int = Field(1, gt=0, description="beam width of the dev replies (1: greedy)")
    plateau_patience: int = Field(1, ge=0, description="after warm-up, the lr halves when more than this many dev "
                                                       "evaluations in a row did not improve BLEU-2 "
                                                       "(ReduceLROnPlateau's patience, as the reference)")
    early_stop_patience: int = Field(6, gt=0, description="evaluations without a better dev BLEU-2 before stopping")
    deterministic: bool = Field(True, description="reseed every step from (seed, step, rank): "
                                                  "resumed runs repeat uninterrupted ones")

    @model_validator(mode="after")
    def _sharded_runs_evaluate_afterwards(self) -> TrainConfig:
        if self.strategy == "fsdp" and self.val_every != 0:
            raise ValueError("dev evaluation generates replies outside FSDP's sharded forward: with strategy "
                             "fsdp set train.val_every 0 and run `mmdialog eval` on the run afterwards")
        return self


#: The authors' training recipe (Guo et al., E2E_PSDG), merged over any config by
#: ``load_config(..., reference_recipe=True)`` (``--reference-recipe``); flags and
#: ``--set`` still override it. What remains different from it: README, "The
#: reference recipe".
REFERENCE_RECIPE: dict[str, Any] = {
    "model": {
        # One sample per dialogue in their Llama-2 format and system prompt, every token trained.
        # Llama-2's tokenizer as their transformers 4 loaded it: "<s>[INST]" → <s> ▁[ INST ].
        "llm": {"prompt_format": "reference", "system_prompt": None, "tokenizer_options": {"legacy": True}},
        # Their DVTM: the bag of predicted tokens times the re-tokenised description.
        "bridge": {"name": "gumbel", "alignment": "bag", "tau": 1.0, "noise": False, "hard": True},
        "trainable": {"llm.embeddings": True},  # all rows of embed_tokens and lm_head train
        "image_loss_weight": 1.0,
    },
    # Micro-batches of 4 dialogues, 4 accumulated (16 per step), shortest dialogue first, no shuffling.
    "data": {"batch_size": 4, "order": "length"},
    "train": {
        "accumulate": 4, "lr": 5.0e-5, "weight_decay": 0.01,
        "warmup_steps": 400, "warmup_start_factor": 0.01,      # LinearLR(0.01 → 1, 400 steps)
        "gradient_clip": 400.0,                                # clip_grad_norm_(…, 400): effectively off
        # Dev BLEU-2 on the whole dev split after every epoch, replies with 2 beams and 30 new tokens.
        "val_every": "epoch", "val_turns": 0, "val_max_new_tokens": 30, "val_num_beams": 2,
        "plateau_patience": 1,                                 # ReduceLROnPlateau(patience=6 // 3 - 1)
        # They stop when more than 6 evaluations in a row did not improve: at the 7th.
        "early_stop_patience": 7,
    },
}


class Config(_Strict):
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping with 'model', 'data', 'train'")
    return data


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; one-line ``ConfigError`` otherwise."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{what} file '{path}' is not valid JSON: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} file '{path}' must hold a JSON object")
    return data


def config_from_yaml(text: str, where: str, **components: Any) -> Config:
    """A ``Config`` from YAML text stored with a model (a checkpoint, an export)."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: config is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: config must be a mapping with 'model', 'data', 'train'")
    return load_config(raw, **components)


def preset_dict(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; available: {', '.join(PRESETS)} "
                          "(or give a path to a YAML file)")
    text = resources.files("mmdialog.core.presets").joinpath(f"{name}.yaml").read_text()
    data = yaml.safe_load(text)
    # A preset may start from another one, as a YAML file may.
    return _merge(preset_dict(data.pop("preset")), data) if "preset" in data else data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"cannot set '{dotted}': '{k}' is not a section")
    d[keys[-1]] = value


def generator_chain(names: str) -> tuple[str | None, str]:
    """``"library,sd"`` → ``("library", "sd")``: the retriever shares a photo when
    one matches, the generator draws the others; ``"sd"`` → ``(None, "sd")``."""
    parts = [n.strip() for n in names.split(",")]
    if not all(parts) or len(parts) > 2:
        raise ConfigError(f"generator '{names}': give a generator (sd) or a retriever and a generator "
                          "separated by a comma (library,sd)")
    return (parts[0] if len(parts) == 2 else None), parts[-1]


def load_config(source: str | Path | dict[str, Any] | Config = "tiny", /,
                overrides: dict[str, Any] | None = None, reference_recipe: bool = False,
                **components: Any) -> Config:
    """Load a preset name, YAML path or dict, apply overrides, validate everything.

    ``reference_recipe`` merges ``REFERENCE_RECIPE`` over the source first; the
    components and overrides then apply on top of it.

    ``components`` switch plugins: ``perceiver="caption"`` (a name; options of
    the old plugin are dropped unless the name is unchanged) or
    ``bridge={"name": "gumbel", "tau": 0.5}``. ``overrides`` are dotted keys:
    ``{"train.lr": 1e-4, "model.bridge.tau": 0.5}``.
    """
    if isinstance(source, Config):
        raw = source.model_dump()
    elif isinstance(source, dict):
        raw = source
    elif isinstance(source, (str, Path)) and (str(source).endswith((".yaml", ".yml")) or Path(source).is_file()):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        raw = _read_yaml(path)
        if "preset" in raw:  # a YAML file may start from a preset and override it
            raw = _merge(preset_dict(raw.pop("preset")), raw)
    else:
        raw = preset_dict(str(source))
    raw = _merge(raw, REFERENCE_RECIPE if reference_recipe else {})
    model = raw.setdefault("model", {})
    if isinstance(model, dict):
        model.update(ModelConfig._chain_from_fallback(model))
    for kind, value in components.items():
        if kind not in SLOTS:
            raise ConfigError(f"unknown component '{kind}'; use {', '.join(SLOTS)}")
        if value is None:
            continue
        if kind == "generator" and isinstance(value, str):
            # Naming the generator names the whole chain: "sd" drops a retriever, "library,sd" sets one.
            retriever, value = generator_chain(value)
            model["retriever"] = _switch(model.get("retriever"), retriever)
        elif kind == "generator" and isinstance(value, dict) and "fallback" in value:
            value = dict(value)
            model["generator"] = _switch(model.get("generator"), value.pop("fallback"))
            kind = "retriever"
        model[kind] = _switch(model.get(kind), value)
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    try:
        config = Config.model_validate(raw)
    except ValidationError as e:
        field, _, msg = validation_message(e).partition(": ")
        raise ConfigError(f"config field '{field}': {msg}") from None
    validate_plugins(config)
    return config


def _switch(old: dict[str, Any] | None, value: str | dict[str, Any] | None) -> dict[str, Any] | None:
    """A component spec after switching to ``value``: the options of the old plugin
    are kept when the name is unchanged (and merged under a dict), dropped otherwise."""
    old = old or {}
    if value is None:
        return None
    if isinstance(value, str):
        return old if old.get("name") == value else {"name": value}
    if value.get("name", old.get("name")) == old.get("name"):
        return _merge(old, value)
    return value


def validate_plugins(config: Config) -> dict[str, Any]:
    """Check every component's options against its plugin; return parsed options
    by slot (``retriever`` only when the config has one)."""
    from mmdialog.core.interfaces import Retriever
    from mmdialog.core.registry import default_registry

    reg = default_registry()
    parsed = {}
    for slot in SLOTS:
        spec: ComponentSpec | None = getattr(config.model, slot)
        if spec is None:
            continue
        kind = "generator" if slot == "retriever" else slot
        plugin = reg.get(kind, spec.name)
        if slot == "retriever" and not issubclass(plugin.factory, Retriever):
            raise ConfigError(f"config field 'model.retriever': generator plugin '{spec.name}' cannot "
                              f"retrieve photos; use one of: {', '.join(reg.retrievers()) or 'none'}")
        try:
            parsed[slot] = plugin.factory.Options.model_validate(spec.options)
        except ValidationError as e:
            field, _, msg = validation_message(e, f"model.{slot}").partition(": ")
            raise ConfigError(f"config field '{field}' ({kind} plugin '{spec.name}'): {msg}") from None
    prompt_format = getattr(parsed.get("llm"), "prompt_format", None)
    if prompt_format is not None and prompt_format not in reg.prompt_formats():
        raise ConfigError(f"config field 'model.llm.prompt_format': unknown prompt format '{prompt_format}'; "
                          f"use {', '.join(reg.prompt_formats())}")
    if config.data.format != "auto" and config.data.format not in reg.dataset_formats():
        raise ConfigError(f"config field 'data.format': unknown dataset format '{config.data.format}'; "
                          f"use auto, {', '.join(reg.dataset_formats())}")
    unknown = set(config.model.trainable) - set(DEFAULT_TRAINABLE)
    for key in unknown:
        if "." not in key:
            raise ConfigError(f"config field 'model.trainable.{key}': use 'component.group', "
                              f"e.g. {', '.join(list(DEFAULT_TRAINABLE)[:3])}")
    return parsed


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
