"""``build(config) → DialogueModel``: composition and the freeze policy, in one place.

Components are built in dependency order — LLM, generator, perceiver (needs
the LLM width), bridge (needs both vocabularies) — each by its registered
plugin, and then the retriever of a generator chain (``library,sd``), which
the model puts in front of the generator. No plugin builds another one.
Then every parameter is frozen and exactly the groups the policy names are
unfrozen. The policy's defaults are what each plugin marks
``trainable_by_default`` (it knows its own parts).

Saved models (``load``, ``export``) compose through ``build`` too; they live
beside their folder format in ``core/export.py``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from mmdialog.core import assets
from mmdialog.core.config import (
    Config,
    load_config,
    plugin_options,
)
from mmdialog.core.errors import ConfigError
from mmdialog.core.interfaces import BUILD_ORDER, BuildContext
from mmdialog.core.model import DialogueModel
from mmdialog.core.quantization import is_quantized
from mmdialog.core.registry import default_registry
from mmdialog.core.verbosity import quietly


@quietly  # the libraries' notices and bars are not the user's business (MMDIALOG_VERBOSE=1 shows them)
def build(config: str | Path | dict[str, Any] | Config = "tiny", /,
          overrides: dict[str, Any] | None = None, *, device: str | torch.device | None = None,
          trust_remote_code: bool = False, **components: Any) -> DialogueModel:
    """Build a model from a preset name, YAML path, dict or ``Config``.

    ``build("tiny", perceiver="qformer", bridge="gumbel")`` switches plugins;
    ``overrides={"model.bridge.tau": 0.5}`` sets any field. ``device="cuda"``
    creates the parameters there (the default device while the plugins build):
    random weights at 7B initialise in seconds on a GPU instead of minutes on
    a CPU. State that plugins keep on the CPU by design (vocabulary maps, noise
    schedules, caches) stays there.

    ``trust_remote_code=True`` lets the LLM's base checkpoint run its own code
    (a custom class in its ``auto_map``, a Hub attention kernel); a config
    cannot ask for that, only the caller.
    """
    cfg = load_config(config, overrides, **components)
    options = plugin_options(cfg)
    reg = default_registry()
    torch.manual_seed(cfg.model.seed)  # random-init components are reproducible
    ctx = BuildContext(cache_dir=str(assets.cache_dir()), trust_remote_code=trust_remote_code)
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
        retriever = plugin.factory.from_options(
            options["retriever"], BuildContext(cache_dir=ctx.cache_dir, trust_remote_code=trust_remote_code))
    llm = built["llm"]
    prompt_format = reg.prompt_format(llm.prompt_format)(llm, llm.system_prompt)
    model = DialogueModel(llm, built["perceiver"], built["bridge"], built["generator"], cfg, prompt_format,
                          retriever=retriever)
    if device is not None:
        model.to(device)  # anything a plugin created on the CPU explicitly
    apply_freeze_policy(model, cfg.model.trainable)
    return model


def freeze_policy(model: DialogueModel, overrides: dict[str, bool]) -> dict[str, bool]:
    """Group → trainable: what each plugin marks ``trainable_by_default`` (it
    knows its own parts), then the config's overrides; any other group is frozen."""
    plugins = {f"{slot}.{group}": True for slot, comp in model.components().items()
               for group in comp.trainable_by_default}
    return {**plugins, **overrides}


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
