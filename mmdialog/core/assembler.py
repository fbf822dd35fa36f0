"""``build(config) → DialogueModel``: composition and the freeze policy, in one place.

Components are built in dependency order — LLM, generator, perceiver (needs
the LLM width), bridge (needs both vocabularies) — each by its registered
plugin, and then the retriever of a generator chain (``library,sd``), which
the model puts in front of the generator. No plugin builds another one.
Then every parameter is frozen and exactly the groups the policy names are
unfrozen. The policy's defaults are ``config.DEFAULT_TRAINABLE``.

``load`` builds a saved model back (an exported folder, a training
checkpoint, or a preset) and ``export`` turns a checkpoint into a folder: both
compose through ``build``; the folder format is ``core/export.py``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from mmdialog.core import assets
from mmdialog.core.checkpoint import BEST, LAST, TRAINABLE, find_checkpoint, read_checkpoint
from mmdialog.core.config import (
    DEFAULT_TRAINABLE,
    PRESETS,
    Config,
    config_from_yaml,
    load_config,
    read_json,
    validate_plugins,
)
from mmdialog.core.errors import ConfigError
from mmdialog.core.export import MANIFEST, check_finite, check_tokens, load_weights, read_folder, save_pretrained
from mmdialog.core.interfaces import BUILD_ORDER, BuildContext
from mmdialog.core.model import DialogueModel
from mmdialog.core.quantization import is_quantized
from mmdialog.core.registry import default_registry
from mmdialog.core.verbosity import quietly


@quietly  # the libraries' notices and bars are not the user's business (MMDIALOG_VERBOSE=1 shows them)
def build(config: str | Path | dict[str, Any] | Config = "tiny", /,
          overrides: dict[str, Any] | None = None, *, device: str | torch.device | None = None,
          **components: Any) -> DialogueModel:
    """Build a model from a preset name, YAML path, dict or ``Config``.

    ``build("tiny", perceiver="qformer", bridge="gumbel")`` switches plugins;
    ``overrides={"model.bridge.tau": 0.5}`` sets any field. ``device="cuda"``
    creates the parameters there (the default device while the plugins build):
    random weights at 7B initialise in seconds on a GPU instead of minutes on
    a CPU. State that plugins keep on the CPU by design (vocabulary maps, noise
    schedules, caches) stays there.
    """
    cfg = load_config(config, overrides, **components)
    options = validate_plugins(cfg)
    reg = default_registry()
    torch.manual_seed(cfg.model.seed)  # random-init components are reproducible
    ctx = BuildContext(cache_dir=str(assets.cache_dir()))
    built = {}
    with torch.device(device) if device is not None else contextlib.nullcontext():
        for kind in BUILD_ORDER:
            plugin = reg.get(kind, getattr(cfg.model, kind).name)
            built[kind] = plugin.factory.from_options(options[kind], ctx)
            if kind in ("llm", "generator"):  # later factories depend on these two
                setattr(ctx, kind, built[kind])
    # Built last, so every other component gets the random init a build without it gets, and
    # outside the device context: a retriever loads its pretrained encoder, moved below.
    retriever = None
    if cfg.model.retriever is not None:
        plugin = reg.get("generator", cfg.model.retriever.name)
        retriever = plugin.factory.from_options(options["retriever"], BuildContext(cache_dir=ctx.cache_dir))
    model = DialogueModel(built["llm"], built["perceiver"], built["bridge"], built["generator"], cfg,
                          retriever=retriever)
    if device is not None:
        model.to(device)  # anything a plugin created on the CPU explicitly
    apply_freeze_policy(model, cfg.model.trainable)
    return model


def freeze_policy(model: DialogueModel, overrides: dict[str, bool]) -> dict[str, bool]:
    """Group → trainable: the built-in defaults, then what each plugin marks
    ``trainable_by_default`` (it knows its own parts), then the config's overrides."""
    plugins = {f"{slot}.{group}": True for slot, comp in model.components().items()
               for group in comp.trainable_by_default}
    return {**DEFAULT_TRAINABLE, **plugins, **overrides}


def apply_freeze_policy(model: DialogueModel, overrides: dict[str, bool]) -> list[str]:
    """Freeze everything, then unfreeze the groups the policy marks trainable.

    Returns the trainable group names. A group named in ``overrides`` that no
    component has is an error (a typo would otherwise silently train nothing).
    """
    groups = model.parameter_groups()
    unknown = sorted(set(overrides) - set(groups))
    if unknown:
        raise ConfigError(f"config field 'model.trainable.{unknown[0]}': no such parameter group; "
                          f"this model has: {', '.join(sorted(groups))}")
    policy = freeze_policy(model, overrides)
    model.requires_grad_(False)
    on = sorted(k for k in groups if policy.get(k, False))
    stored_quantized = [k for k in on if any(is_quantized(p) for p in groups[k])]
    if stored_quantized:
        raise ConfigError(f"config field 'model.trainable.{stored_quantized[0]}': this group is stored quantized "
                          "(model.llm.base_quantization) and cannot train; freeze it or store it unquantized")
    for key in on:
        for p in groups[key]:
            p.requires_grad_(True)
    model.trainable_groups = on
    return on


# -- saved models -------------------------------------------------------------------------------
@quietly
def load(path: str | Path = "tiny", *, generator: str | dict[str, Any] | None = None,
         device: str | torch.device | None = None) -> DialogueModel:
    """Restore a model from a folder written by ``save_pretrained`` / ``export``.

    A preset name (``"tiny"``) or a training checkpoint (``trainable.pt``,
    ``.ckpt``, run folder) is accepted too. ``generator`` swaps the generator
    chain (``"library"``, ``"library,sd"``, ``{"name": "sd", ...}``): the
    trained generator weights are kept when the chain's generator is the
    plugin they were trained with, and left out when it is another one.
    """
    components = {"generator": generator} if generator is not None else {}
    text = str(path)
    if text in PRESETS or (text.endswith((".yaml", ".yml")) and Path(text).is_file()):
        model = build(text, **components)
        model.eval()
        return model.to(device) if device is not None else model
    folder = Path(text).expanduser()
    is_run = folder.is_file() or any((folder / f).is_file() for f in (BEST, TRAINABLE, LAST))
    if not is_run or (folder / MANIFEST).exists():
        weights, config_yaml, tokens, where = read_folder(folder)
    else:
        where = f"checkpoint '{find_checkpoint(folder)}'"
        weights, config_yaml, _ = read_checkpoint(folder)
        tokens = None
        check_finite(weights, where)  # before anything is built or copied
    trained = config_from_yaml(config_yaml, where)
    config = config_from_yaml(config_yaml, where, **components)
    swapped = () if config.model.generator.name == trained.model.generator.name else ("generator",)
    model = build(config)
    if tokens is not None:
        check_tokens(model, tokens, where)
    load_weights(model, weights, where, swapped)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def export(ckpt: str | Path, out_dir: str | Path, metrics: dict[str, Any] | str | Path | None = None,
           *, overwrite: bool = False) -> Path:
    """Turn a training checkpoint into a self-contained folder (``core/export.py``).

    The model is rebuilt once, to check that every weight has its place and to
    record the tokenizer additions the weights were trained with.
    """
    weights, config_yaml, ckpt_metrics = read_checkpoint(ckpt)
    check_finite(weights, f"refusing to export checkpoint '{ckpt}'")
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output folder '{out}' is not empty; choose a new folder (or --force)")
    if isinstance(metrics, (str, Path)):
        metrics = read_json(Path(metrics).expanduser(), "metrics")
    config = config_from_yaml(config_yaml, f"checkpoint '{ckpt}'")
    model = build(config)
    load_weights(model, weights, f"checkpoint '{ckpt}'")
    return save_pretrained(model, out, {**ckpt_metrics, **(metrics or {})}, overwrite=True)
