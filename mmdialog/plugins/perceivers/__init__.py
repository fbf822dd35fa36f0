"""Image perceivers, one file each. They register here, through the same hook as
an installed package's plugins, by ``"module:Class"``: listing them imports
none of them (nor torch); a plugin's module is imported when it is built."""
from mmdialog.core.hookspecs import Plugin, hookimpl


@hookimpl
def mmdialog_plugins() -> list[Plugin]:
    return [
        Plugin("perceiver", "qformer", "mmdialog.plugins.perceivers.qformer:QFormerPerceiver",
               "BLIP-2 ViT + Q-Former → K LLM embeddings (end-to-end model)"),
        Plugin("perceiver", "caption", "mmdialog.plugins.perceivers.caption:CaptionPerceiver",
               "photo → its caption text (pipeline baseline)"),
    ]
