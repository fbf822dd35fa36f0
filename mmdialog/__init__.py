"""mmdialog: photo-sharing multimodal dialogue, trained end to end.

    from mmdialog import build
    model = build("tiny", perceiver="qformer", bridge="gumbel")

Everything a user or a third-party plugin may import is exported here (and
only here is a promise); names load on first use, so ``import mmdialog``
stays fast.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name → the module that defines it.
_EXPORTS = {
    # build, load, talk
    "build": "mmdialog.core.assembler",
    "apply_freeze_policy": "mmdialog.core.assembler",
    "load": "mmdialog.core.assembler",
    "save_pretrained": "mmdialog.core.export",
    "Config": "mmdialog.core.config",
    "load_config": "mmdialog.core.config",
    "DialogueModel": "mmdialog.core.model",
    "Reply": "mmdialog.core.reply",
    "GenerationOptions": "mmdialog.core.reply",
    "Session": "mmdialog.core.session",
    "set_verbosity": "mmdialog.core.verbosity",
    "Dialogue": "mmdialog.core.data.schema",
    "Turn": "mmdialog.core.data.schema",
    "Photo": "mmdialog.core.data.schema",
    "load_dialogues": "mmdialog.core.data.loader",
    # errors
    "MMDialogError": "mmdialog.core.errors",
    "ConfigError": "mmdialog.core.errors",
    "PluginError": "mmdialog.core.errors",
    "DataError": "mmdialog.core.errors",
    "ImageError": "mmdialog.core.errors",
    "TrainingError": "mmdialog.core.errors",
    # writing a plugin: the contracts and hooks
    "hookimpl": "mmdialog.core.hookspecs",
    "Plugin": "mmdialog.core.hookspecs",
    "DatasetFormat": "mmdialog.core.hookspecs",
    "PromptFormat": "mmdialog.core.prompts",
    "LanguageModel": "mmdialog.core.interfaces",
    "Perceiver": "mmdialog.core.interfaces",
    "Bridge": "mmdialog.core.interfaces",
    "Generator": "mmdialog.core.interfaces",
    "Retriever": "mmdialog.core.interfaces",
    "Match": "mmdialog.core.interfaces",
    "GeneratedImage": "mmdialog.core.interfaces",
    "PluginOptions": "mmdialog.core.interfaces",
    "PromptTokens": "mmdialog.core.interfaces",
    "TextTower": "mmdialog.core.interfaces",
    "BuildContext": "mmdialog.core.interfaces",
    "markup": "mmdialog.core.markup",
    # writing a plugin: helpers
    "LatentDiffusionGenerator": "mmdialog.plugins.bases.latent_diffusion",
    "LatentDiffusionOptions": "mmdialog.plugins.bases.latent_diffusion",
    "encode_text_tower": "mmdialog.plugins.bases.latent_diffusion",
    "tokenize_for_tower": "mmdialog.core.vocab",
    "cached_per_photo": "mmdialog.core.caching",
    "require_folder": "mmdialog.core.pretrained",
    "load_prefixed": "mmdialog.core.pretrained",
    "RecordError": "mmdialog.core.data.records",
    "RawRecord": "mmdialog.core.data.records",
    "atomic_write": "mmdialog.core.files",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mmdialog' has no attribute '{name}'")
    mod = importlib.import_module(module)
    value = mod if module.endswith("." + name) else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from mmdialog.core import markup
    from mmdialog.core.assembler import apply_freeze_policy, build, load
    from mmdialog.core.caching import cached_per_photo
    from mmdialog.core.config import Config, load_config
    from mmdialog.core.data.loader import load_dialogues
    from mmdialog.core.data.records import RawRecord, RecordError
    from mmdialog.core.data.schema import Dialogue, Photo, Turn
    from mmdialog.core.errors import ConfigError, DataError, ImageError, MMDialogError, PluginError, TrainingError
    from mmdialog.core.export import save_pretrained
    from mmdialog.core.files import atomic_write
    from mmdialog.core.hookspecs import DatasetFormat, Plugin, hookimpl
    from mmdialog.core.interfaces import (
        Bridge,
        BuildContext,
        GeneratedImage,
        Generator,
        LanguageModel,
        Match,
        Perceiver,
        PluginOptions,
        PromptTokens,
        Retriever,
        TextTower,
    )
    from mmdialog.core.model import DialogueModel
    from mmdialog.core.pretrained import load_prefixed, require_folder
    from mmdialog.core.prompts import PromptFormat
    from mmdialog.core.reply import GenerationOptions, Reply
    from mmdialog.core.session import Session
    from mmdialog.core.verbosity import set_verbosity
    from mmdialog.core.vocab import tokenize_for_tower
    from mmdialog.plugins.bases.latent_diffusion import (
        LatentDiffusionGenerator,
        LatentDiffusionOptions,
        encode_text_tower,
    )
