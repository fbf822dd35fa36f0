"""Language models, one file each. They register here, through the same hook as
an installed package's plugins, by ``"module:Class"``: listing them imports
none of them (nor torch); a plugin's module is imported when it is built."""
from mmdialog.core.hookspecs import Plugin, hookimpl


@hookimpl
def mmdialog_plugins() -> list[Plugin]:
    return [
        Plugin("llm", "hf", "mmdialog.plugins.llms.hf:HFLanguageModel",
               "Hugging Face causal LM + LoRA (hub id, folder, GGUF)"),
    ]
