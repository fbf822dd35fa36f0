"""``build(config) → DialogueModel``: composition and the freeze policy, in one place.

Components are built in dependency order — LLM, generator, perceiver (needs
the LLM width), bridge (needs both vocabularies) — each by its registered
plugin, and then the retriever of a generator chain (``library,sd``), which
the model puts in front of the generator. No plugin builds another one.
Then every parameter is frozen and exactly the groups the policy names are
unfrozen. The policy's defaults are what each plugin marks
``trainable_by_default`` (it knows its own parts).

``load`` builds a saved model back (an exported folder, a training
checkpoint, or a preset) and ``export`` turns a checkpoint into a folder: both
compose through ``build``; the folder format is ``core/export.py``.
"""
from __future__ import annotations

import contextlib
import zlib
from pathlib import Path
from typing import Any

import torch

from mmdialog.core import assets
from mmdialog.core.checkpoint import BEST, LAST, TRAINABLE, find_checkpoint, read_checkpoint
from mmdialog.core.config import (
    PRESETS,
    Config,
    config_from_yaml,
    load_config,
    plugin_options,
)
from mmdialog.core.errors import ConfigError
from mmdialog.core.export import (
    MANIFEST,
    check_destination,
    check_finite,
    check_tokens,
    load_weights,
    read_folder,
    save_pretrained,
)
from mmdialog.core.interfaces import BUILD_ORDER, BuildContext
from mmdialog.core.model import DialogueModel
from mmdialog.core.quantization import is_quantized
from mmdialog.core.reading import read_json
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
    ctx = BuildContext(cache_dir=str(assets.cache_dir()), trust_remote_code=trust_remote_code)
    built = {}
    with torch.device(device) if device is not None else contextlib.nullcontext():
        for kind in BUILD_ORDER:
            plugin = reg.get(kind, getattr(cfg.model, kind).name)
            torch.manual_seed(component_seed(cfg.model.seed, kind))
            built[kind] = plugin.factory.from_options(options[kind], ctx)
            if kind in ("llm", "generator"):  # later factories depend on these two
                setattr(ctx, kind, built[kind])
    # Outside the device context: a retriever loads its pretrained encoder, moved below.
    retriever = None
    if cfg.model.retriever is not None:
        plugin = reg.get("generator", cfg.model.retriever.name)
        torch.manual_seed(component_seed(cfg.model.seed, "retriever"))
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


def component_seed(seed: int, slot: str) -> int:
    """The seed of one slot's random init: from ``model.seed`` and the slot alone, so a
    component initialises the same whatever was built, prepared or drawn before it (a
    first run that converts the embedded LLM, another perceiver, a retriever or none)."""
    return zlib.crc32(f"{seed}:{slot}".encode())


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


# -- saved models -------------------------------------------------------------------------------
@quietly
def load(path: str | Path = "tiny", *, generator: str | dict[str, Any] | None = None,
         retriever: str | dict[str, Any] | None = None, device: str | torch.device | None = None,
         trust_remote_code: bool = False, allow_unverified: bool = False) -> DialogueModel:
    """Restore a model from a folder written by ``save_pretrained`` / ``export``.

    A preset name (``"tiny"``) or a training checkpoint (``trainable.pt``,
    ``.ckpt``, run folder) is accepted too. ``generator`` swaps the generator
    chain (``"library"``, ``"library,sd"``, ``{"name": "sd", ...}``): the
    trained generator weights are kept when the chain's generator is the
    plugin they were trained with, and left out when it is another one.
    ``retriever`` (a spec) sets the chain's retriever after ``generator``.

    ``trust_remote_code``: as ``build``. ``allow_unverified`` loads an exported
    folder whose manifest predates SHA-256 digests of every file (format 1 or
    2) — only for a folder you trust; ``mmdialog export --upgrade`` re-hashes one.
    """
    components = {k: v for k, v in (("generator", generator), ("retriever", retriever)) if v is not None}
    text = str(path)
    if text in PRESETS or (text.endswith((".yaml", ".yml")) and Path(text).is_file()):
        model = build(text, trust_remote_code=trust_remote_code, **components)
        model.eval()
        return model.to(device) if device is not None else model
    folder = Path(text).expanduser()
    is_run = folder.is_file() or any((folder / f).is_file() for f in (BEST, TRAINABLE, LAST))
    if not is_run or (folder / MANIFEST).exists():
        weights, config_yaml, tokens, where = read_folder(folder, allow_unverified=allow_unverified)
    else:
        where = f"checkpoint '{find_checkpoint(folder)}'"
        weights, config_yaml, _ = read_checkpoint(folder)
        tokens = None
        check_finite(weights, where)  # before anything is built or copied
    trained = config_from_yaml(config_yaml, where)
    config = load_config(trained, **components)
    swapped = () if config.model.generator.name == trained.model.generator.name else ("generator",)
    model = build(config, trust_remote_code=trust_remote_code)
    if tokens is not None:
        check_tokens(model, tokens, where)
    load_weights(model, weights, where, swapped)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def export(ckpt: str | Path, out_dir: str | Path, metrics: dict[str, Any] | str | Path | None = None,
           *, overwrite: bool = False, trust_remote_code: bool = False) -> Path:
    """Turn a training checkpoint into a self-contained folder (``core/export.py``).

    The model is rebuilt once, to check that every weight has its place and to
    record the tokenizer additions the weights were trained with.
    """
    out = check_destination(out_dir, overwrite)  # before the build: a typo should not cost a minute
    weights, config_yaml, ckpt_metrics = read_checkpoint(ckpt)
    check_finite(weights, f"refusing to export checkpoint '{ckpt}'")
    if isinstance(metrics, (str, Path)):
        metrics = read_json(Path(metrics).expanduser(), "metrics")
    config = config_from_yaml(config_yaml, f"checkpoint '{ckpt}'")
    model = build(config, trust_remote_code=trust_remote_code)
    load_weights(model, weights, f"checkpoint '{ckpt}'")
    return save_pretrained(model, out, {**ckpt_metrics, **(metrics or {})}, overwrite=True)
