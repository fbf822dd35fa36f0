"""mmdialog: photo-sharing multimodal dialogue, trained end to end.

    from mmdialog import build
    model = build("tiny", perceiver="qformer", bridge="gumbel")
"""
from mmdialog.core.assembler import apply_freeze_policy, build
from mmdialog.core.config import Config, load_config
from mmdialog.core.data.schema import Dialogue, Photo, Turn
from mmdialog.core.errors import ConfigError, MMDialogError, PluginError
from mmdialog.core.hookspecs import Plugin, hookimpl
from mmdialog.core.interfaces import (Bridge, BuildContext, Generator, LanguageModel, Perceiver,
                                      PluginOptions, PromptTokens, TextTower)
from mmdialog.core.model import DialogueModel, Reply
from mmdialog.sdk.export import load
from mmdialog.sdk.session import Session

__version__ = "0.1.0"

__all__ = [
    "build", "load_config", "apply_freeze_policy", "Config", "DialogueModel", "Reply",
    "Dialogue", "Turn", "Photo", "Plugin", "hookimpl", "LanguageModel", "Perceiver", "Bridge",
    "Generator", "PluginOptions", "PromptTokens", "TextTower", "BuildContext",
    "ConfigError", "MMDialogError", "PluginError", "load", "Session", "__version__",
]
