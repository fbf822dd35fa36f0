"""Image generators (and the library retriever), one file each. They register here, through the same hook as
an installed package's plugins, by ``"module:Class"``: listing them imports
none of them (nor torch); a plugin's module is imported when it is built."""
from mmdialog.core.hookspecs import Plugin, hookimpl


@hookimpl
def mmdialog_plugins() -> list[Plugin]:
    return [
        Plugin("generator", "sd", "mmdialog.plugins.generators.sd:SDGenerator",
               "Stable Diffusion 1.5 / 2.1 (diffusers folder or tiny)"),
        Plugin("generator", "sdxl", "mmdialog.plugins.generators.sdxl:SDXLGenerator",
               "Stable Diffusion XL, two text towers (folder or tiny)"),
        Plugin("generator", "library", "mmdialog.plugins.generators.library:LibraryGenerator",
               "shares a real photo from a folder (MiniLM caption match); first of a chain: library,sd"),
    ]
