"""LLM → generator bridges, one file each. They register here, through the same hook as
an installed package's plugins, by ``"module:Class"``: listing them imports
none of them (nor torch); a plugin's module is imported when it is built."""
from mmdialog.core.hookspecs import Plugin, hookimpl


@hookimpl
def mmdialog_plugins() -> list[Plugin]:
    return [
        Plugin("bridge", "gumbel", "mmdialog.plugins.bridges.gumbel:GumbelBridge",
               "straight-through Gumbel-softmax + dynamic vocabulary matrix (end-to-end)"),
        Plugin("bridge", "text", "mmdialog.plugins.bridges.text:TextBridge",
               "decoded text → generator tokenizer, no gradient (pipeline)"),
    ]
