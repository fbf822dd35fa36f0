"""The built-in components, one file each under llms/, perceivers/, bridges/ and
generators/. They register here, through the same hook as an installed
package's plugins, by ``"module:Class"``: listing them imports none of them
(nor torch); a plugin's module is imported when it is built."""
from mmdialog.core.hookspecs import Plugin, hookimpl


@hookimpl
def mmdialog_plugins() -> list[Plugin]:
    return [
        Plugin("llm", "hf", "mmdialog.plugins.llms.hf:HFLanguageModel",
               "Hugging Face causal LM + LoRA (hub id, folder, GGUF)"),
        Plugin("perceiver", "qformer", "mmdialog.plugins.perceivers.qformer:QFormerPerceiver",
               "BLIP-2 ViT + Q-Former → K LLM embeddings (end-to-end model)"),
        Plugin("perceiver", "caption", "mmdialog.plugins.perceivers.caption:CaptionPerceiver",
               "photo → its caption text (pipeline baseline)"),
        Plugin("bridge", "gumbel", "mmdialog.plugins.bridges.gumbel:GumbelBridge",
               "straight-through Gumbel-softmax + dynamic vocabulary matrix (end-to-end)"),
        Plugin("bridge", "text", "mmdialog.plugins.bridges.text:TextBridge",
               "decoded text → generator tokenizer, no gradient (pipeline)"),
        Plugin("generator", "sd", "mmdialog.plugins.generators.sd:SDGenerator",
               "Stable Diffusion 1.5 / 2.1 (diffusers folder or tiny)"),
        Plugin("generator", "sdxl", "mmdialog.plugins.generators.sdxl:SDXLGenerator",
               "Stable Diffusion XL, two text towers (folder or tiny)"),
        Plugin("generator", "library", "mmdialog.plugins.generators.library:LibraryGenerator",
               "shares a real photo from a folder (MiniLM caption match); first of a chain: library,sd"),
    ]
