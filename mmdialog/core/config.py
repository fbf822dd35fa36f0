"""Typed configuration: component specs, the model, data and training.

A config is a YAML file or a preset name (``tiny``, ``paper``) plus overrides.
Each component spec is ``{name: <plugin>, **options}``; the options are
checked against that plugin's own ``Options`` model when the config loads, so
a typo fails before any weight is read, with the field's dotted name.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmdialog.core.errors import ConfigError

PRESETS = ("tiny", "paper")

#: The freeze policy's defaults (DESIGN.md §2; the reference trains the same
#: set except that it trains *all* rows of embed_tokens / lm_head). Keys are
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
    trainable: dict[str, bool] = Field(
        default_factory=dict,
        description="freeze-policy overrides, e.g. {'llm.embeddings': true}; see DEFAULT_TRAINABLE")
    image_loss_weight: float = Field(1.0, ge=0, description="λ in loss = L_text + λ·L_img")
    max_length: int = Field(512, gt=8, description="LLM tokens per training sample (right-truncated)")
    seed: int = 0


class DataConfig(_Strict):
    path: str = Field("embedded:demo", description="dataset file/folder, or 'embedded:demo'")
    format: Literal["auto", "photochat", "dialogcc", "jsonl"] = "auto"
    split: str | None = Field(None, description="split folder/file to read (train, dev, test)")
    image_dir: str | None = Field(None, description="folder with photos named by id or URL hash")
    both_speakers: bool = Field(True, description="one sample per speaker as the agent; else sharer only")
    batch_size: int = Field(2, gt=0)
    num_workers: int = Field(0, ge=0)


class TrainConfig(_Strict):
    max_steps: int = Field(1000, gt=0, description="optimizer steps")
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_steps: int = Field(400, ge=0)
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
    compile: bool = Field(False, description="regional torch.compile of the repeated blocks (decoder and "
                                             "encoder layers, UNet transformer blocks); the first steps "
                                             "compile")
    val_every: int = Field(0, ge=0, description="optimizer steps between dev evaluations (0: none)")
    val_turns: int = Field(200, gt=0, description="dev turns generated per evaluation (gold context)")
    val_max_new_tokens: int = Field(32, gt=0)
    plateau_patience: int = Field(1, gt=0, description="evaluations without a better dev BLEU-2 before the lr halves")
    early_stop_patience: int = Field(6, gt=0, description="evaluations without a better dev BLEU-2 before stopping")
    deterministic: bool = Field(True, description="reseed every step from (seed, step, rank): "
                                                  "resumed runs repeat uninterrupted ones")


class Config(_Strict):
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)


def _field_path(loc: tuple) -> str:
    return ".".join(str(x) for x in loc)


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


def preset_dict(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset '{name}'; available: {', '.join(PRESETS)} "
                          "(or give a path to a YAML file)")
    text = resources.files("mmdialog.sdk.presets").joinpath(f"{name}.yaml").read_text()
    return yaml.safe_load(text)


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


def chain_spec(names: str) -> dict[str, Any]:
    """``"library,sd"`` → ``{"name": "library", "fallback": {"name": "sd"}}``: each
    plugin falls back to the next (e.g. retrieve a photo, else draw one)."""
    parts = [n.strip() for n in names.split(",")]
    if not all(parts):
        raise ConfigError(f"'{names}': give plugin names separated by commas, e.g. library,sd")
    spec: dict[str, Any] = {"name": parts[-1]}
    for name in reversed(parts[:-1]):
        spec = {"name": name, "fallback": spec}
    return spec


def load_config(source: str | Path | dict[str, Any] | Config = "tiny", /,
                overrides: dict[str, Any] | None = None, **components: Any) -> Config:
    """Load a preset name, YAML path or dict, apply overrides, validate everything.

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
    raw = _merge(raw, {})
    for kind, value in components.items():
        if kind not in ("llm", "perceiver", "bridge", "generator"):
            raise ConfigError(f"unknown component '{kind}'; use llm, perceiver, bridge or generator")
        if value is None:
            continue
        old = raw.setdefault("model", {}).get(kind) or {}
        if isinstance(value, str) and "," in value:
            value = chain_spec(value)
        elif isinstance(value, str):
            value = old if old.get("name") == value else {"name": value}
        elif isinstance(value, dict) and value.get("name", old.get("name")) == old.get("name"):
            value = _merge(old, value)
        raw["model"][kind] = value
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    try:
        config = Config.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        raise ConfigError(f"config field '{_field_path(err['loc'])}': {err['msg']}") from None
    validate_plugins(config)
    return config


def validate_plugins(config: Config) -> dict[str, Any]:
    """Check every component's options against its plugin; return parsed options."""
    from mmdialog.core.registry import default_registry

    reg = default_registry()
    parsed = {}
    for kind in ("llm", "perceiver", "bridge", "generator"):
        spec: ComponentSpec = getattr(config.model, kind)
        plugin = reg.get(kind, spec.name)
        try:
            parsed[kind] = plugin.factory.Options.model_validate(spec.options)
        except ValidationError as e:
            err = e.errors()[0]
            raise ConfigError(f"config field 'model.{kind}.{_field_path(err['loc'])}' "
                              f"({kind} plugin '{spec.name}'): {err['msg']}") from None
    unknown = set(config.model.trainable) - set(DEFAULT_TRAINABLE)
    for key in unknown:
        if "." not in key:
            raise ConfigError(f"config field 'model.trainable.{key}': use 'component.group', "
                              f"e.g. {', '.join(list(DEFAULT_TRAINABLE)[:3])}")
    return parsed


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
