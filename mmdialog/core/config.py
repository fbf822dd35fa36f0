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
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from mmdialog.core.data.limits import MAX_RECORD_CHARS, MAX_TURN_CHARS
from mmdialog.core.errors import ConfigError, validation_message
from mmdialog.core.hookspecs import KIND_NAMES
from mmdialog.core.reading import CONFIG_BYTES, parse_yaml, read_yaml
from mmdialog.core.reading import read_json as read_json  # where core/checkpoint.py imports it from

#: Presets and recipes are YAML files in ``core/presets/``: ``NAME.yaml`` is a preset (a whole
#: config, or one that starts from another with ``preset: NAME``), ``NAME.recipe.yaml`` a recipe,
#: an overlay merged over any config (``--reference-recipe``).
PRESET_FILES = resources.files("mmdialog.core.presets")
RECIPE_SUFFIX = ".recipe.yaml"
PRESETS = tuple(sorted(f.name.removesuffix(".yaml") for f in PRESET_FILES.iterdir()
                       if f.name.endswith(".yaml") and not f.name.endswith(RECIPE_SUFFIX)))
#: Config sections that name a plugin: the four kinds, and the optional retriever
#: a generator chain (``library,sd``) puts in front of the generator.
SLOTS = (*KIND_NAMES, "retriever")


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
        description="freeze-policy overrides by 'component.group' (e.g. {'llm.embeddings': true}); "
                    "the defaults are what each plugin marks trainable_by_default")
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
    description: str = Field(
        "objects", description="the text of a PhotoChat photo's description, what the LLM writes and the "
                               "generator draws: objects ('Drink, Head, Face'), reference (the authors' "
                               "'Objects in the photo: Drink, Head, Face'), raw, sentence, or the name of "
                               "another field of the record (e.g. photo_caption), verbatim")
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
    # Size caps (core/data/limits.py), as `mmdialog data check` applies them.
    max_turn_chars: int = Field(MAX_TURN_CHARS, gt=0, description="a record with a turn (text + photo descriptions) "
                                                          "over this many characters is skipped and counted")
    max_record_chars: int = Field(MAX_RECORD_CHARS, gt=0, description="a record over this many characters in all is "
                                                             "skipped and counted")


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
    optimizer_8bit_groups: list[str] | None = Field(
        None, description="with optimizer adamw8bit: the freeze-policy groups (component.group) whose moments "
                          "are 8-bit; None: those each plugin names in optimizer_8bit_by_default (the UNet)")
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
    val_decoding: Literal["ours", "reference"] = Field(
        "ours", description="dev replies: ours (stop at [/img], go on after it) or reference (one decode per "
                            "turn across [/img], scored with the reference's text clean-up)")
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


class Config(_Strict):
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    # The plugins' parsed options (``plugin_options``), with the specs they were parsed from.
    _plugin_options: tuple[Any, dict[str, Any]] | None = PrivateAttr(None)


def _read_yaml(path: Path) -> dict[str, Any]:
    data = read_yaml(path, "config", max_bytes=CONFIG_BYTES)
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping with 'model', 'data', 'train'")
    return data


def config_from_yaml(text: str, where: str, **components: Any) -> Config:
    """A ``Config`` from YAML text stored with a model (a checkpoint, an export)."""
    if len(text) > CONFIG_BYTES:
        raise ConfigError(f"{where}: config is {len(text):,} characters, more than the {CONFIG_BYTES:,} allowed")
    raw = parse_yaml(text, f"{where}: config")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: config must be a mapping with 'model', 'data', 'train'")
    try:
        return load_config(raw, **components)
    except ConfigError as e:
        raise type(e)(f"{where}: {e}") from None


def preset_dict(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; available: {', '.join(PRESETS)} "
                          "(or give a path to a YAML file)")
    data = yaml.safe_load(PRESET_FILES.joinpath(f"{name}.yaml").read_text(encoding="utf-8"))
    # A preset may start from another one, as a YAML file may.
    return _merge(preset_dict(data.pop("preset")), data) if "preset" in data else data


def recipe(name: str) -> dict[str, Any]:
    """The overlay ``core/presets/NAME.recipe.yaml``: config sections, and its
    ``decoding`` (``GenerationOptions`` fields), which is not one."""
    return yaml.safe_load(PRESET_FILES.joinpath(f"{name}{RECIPE_SUFFIX}").read_text(encoding="utf-8"))


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
                overrides: dict[str, Any] | None = None, reference_recipe: bool | Literal["pipeline"] = False,
                plugins: bool = True, **components: Any) -> Config:
    """Load a preset name, YAML path or dict, apply overrides, validate everything.

    ``reference_recipe`` merges the reference recipe (``presets/reference.recipe.yaml``,
    less its ``decoding``) over the source first (``"pipeline"``: and the pipeline
    baseline's, ``presets/reference-pipeline.recipe.yaml``, over that, the bridge
    replaced); the components and overrides then apply on top of it.

    A ``Config`` with nothing to apply over it is returned as it is: it was
    validated when it was made (a command validates its config once).

    ``components`` switch plugins: ``perceiver="caption"`` (a name; options of
    the old plugin are dropped unless the name is unchanged) or
    ``bridge={"name": "gumbel", "tau": 0.5}``. ``overrides`` are dotted keys:
    ``{"train.lr": 1e-4, "model.bridge.tau": 0.5}``. ``plugins=False`` leaves the
    plugins' own options to ``validate_plugins`` (which imports the plugins, and torch).
    """
    if isinstance(source, Config) and not (overrides or reference_recipe or any(components.values())):
        return source
    origin = ""  # a file's errors name it
    if isinstance(source, Config):
        raw = source.model_dump()
    elif isinstance(source, dict):
        raw = source
    elif isinstance(source, (str, Path)) and (str(source).endswith((".yaml", ".yml")) or Path(source).is_file()):
        path = Path(source)
        origin = f"config {path}: "
        if not path.exists() and not path.is_symlink():
            raise ConfigError(f"config file {path} does not exist")
        raw = _read_yaml(path)
        if "preset" in raw:  # a YAML file may start from a preset and override it
            raw = _merge(preset_dict(raw.pop("preset")), raw)
    else:
        raw = preset_dict(str(source))
    if reference_recipe:
        overlay = recipe("reference")
        overlay.pop("decoding")
        raw = _merge(raw, overlay)
    model = raw.setdefault("model", {})
    if reference_recipe == "pipeline":
        overlay = recipe("reference-pipeline")
        overlay.pop("decoding")
        raw = _merge(raw, overlay)
        model = raw["model"]
        model["bridge"] = dict(overlay["model"]["bridge"])  # another plugin: none of the recipe's bridge options
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
        raise ConfigError(f"{origin}config field '{field}': {msg}") from None
    if plugins:
        try:
            plugin_options(config)
        except ConfigError as e:
            raise type(e)(f"{origin}{e}") from None
    return config


def plugin_options(config: Config) -> dict[str, Any]:
    """Every component's options parsed by its plugin (``validate_plugins``), by slot;
    parsed once per config (again only if its component specs were changed since)."""
    specs = tuple(config.model.model_dump(include=set(SLOTS)).items())
    if config._plugin_options is None or config._plugin_options[0] != specs:
        config._plugin_options = (specs, validate_plugins(config))
    return config._plugin_options[1]


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
        _refuse_remote_code(spec.options, f"model.{slot}")
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
    for key in config.model.trainable:
        if "." not in key:
            raise ConfigError(f"config field 'model.trainable.{key}': use 'component.group' with a component "
                              f"of {', '.join(SLOTS)}, e.g. llm.{key}")
    return parsed


def _refuse_remote_code(options: Any, where: str) -> None:
    """Code runs only when the caller says so (transformers' convention): the
    option is never read from a config, which may have come with a model folder."""
    if isinstance(options, dict):
        for key, value in options.items():
            if key == "trust_remote_code":
                raise ConfigError(f"config field '{where}.{key}': a config cannot let a model run its own code; "
                                  "pass --trust-remote-code (Python: trust_remote_code=True) if you trust its "
                                  "source")
            _refuse_remote_code(value, f"{where}.{key}")
    elif isinstance(options, list):
        for i, value in enumerate(options):
            _refuse_remote_code(value, f"{where}.{i}")


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
