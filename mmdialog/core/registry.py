"""The plugin manager: built-ins and entry-point packages, found the same way."""
from __future__ import annotations

import importlib
from functools import lru_cache

import pluggy

from mmdialog.core import hookspecs
from mmdialog.core.errors import PluginError
from mmdialog.core.hookspecs import KIND_NAMES, DatasetFormat, Plugin
from mmdialog.core.prompts import PromptFormat

BUILTIN_MODULES = (
    "mmdialog.plugins",
    # Dataset readers, in the order ``format: auto`` tries them (after any installed one).
    "mmdialog.core.data.jsonl",
    "mmdialog.core.data.dialogcc",
    "mmdialog.core.data.photochat",
    # How a dialogue becomes LLM text: model.llm.prompt_format.
    "mmdialog.core.prompts",
)


class Registry:
    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        for name in BUILTIN_MODULES:
            self.pm.register(importlib.import_module(name), name)
        if load_entry_points:
            self.pm.load_setuptools_entrypoints(hookspecs.PROJECT)
        self._plugins: dict[tuple[str, str], Plugin] = {}
        self._formats: dict[str, DatasetFormat] = {}
        self._prompt_formats: dict[str, type[PromptFormat]] = {}
        for batch in self.pm.hook.mmdialog_plugins():
            for plugin in batch:
                self._add(plugin)
        # Installed formats first (they are the more specific), then the built-ins in their order:
        # these are ``trylast``, and pluggy calls ``trylast`` implementations in registration order.
        for batch in self.pm.hook.mmdialog_dataset_formats():
            for fmt in batch:
                self.register_format(fmt)
        for batch in self.pm.hook.mmdialog_prompt_formats():
            for cls in batch:
                self.register_prompt_format(cls)

    def register(self, plugin: Plugin) -> None:
        """Register one plugin at run time (tests, notebooks)."""
        self._add(plugin)

    def register_format(self, fmt: DatasetFormat) -> None:
        """Register one dataset format at run time; a name registered twice is an error."""
        if not isinstance(fmt, DatasetFormat):
            raise PluginError(f"dataset formats must be mmdialog.DatasetFormat, not {type(fmt).__name__}")
        if fmt.name in self._formats or fmt.name == "auto":
            raise PluginError(f"dataset format '{fmt.name}' is registered twice; rename one")
        self._formats[fmt.name] = fmt

    def register_prompt_format(self, cls: type[PromptFormat]) -> None:
        """Register one prompt format (a ``PromptFormat`` subclass); a name registered twice is an error."""
        if not (isinstance(cls, type) and issubclass(cls, PromptFormat)):
            raise PluginError(f"prompt formats must be subclasses of mmdialog.PromptFormat, not {cls!r}")
        if cls.name in self._prompt_formats:
            raise PluginError(f"prompt format '{cls.name}' is registered twice; rename one")
        self._prompt_formats[cls.name] = cls

    def prompt_formats(self) -> list[str]:
        return list(self._prompt_formats)

    def prompt_format(self, name: str) -> type[PromptFormat]:
        try:
            return self._prompt_formats[name]
        except KeyError:
            raise PluginError(f"unknown prompt format '{name}'; available: "
                              f"{', '.join(self._prompt_formats)}") from None

    def _add(self, plugin: Plugin) -> None:
        if plugin.kind not in KIND_NAMES:
            raise PluginError(f"plugin '{plugin.name}' has kind '{plugin.kind}'; "
                              f"use one of: {', '.join(KIND_NAMES)}")
        if not isinstance(plugin.factory, str):
            plugin = _checked(plugin)
        elif ":" not in plugin.factory:
            raise PluginError(f"{plugin.kind} plugin '{plugin.name}': factory '{plugin.factory}' must be a class "
                              "or 'module:Class'")
        self._plugins[(plugin.kind, plugin.name)] = plugin

    def names(self, kind: str) -> list[str]:
        return sorted(n for k, n in self._plugins if k == kind)

    def retrievers(self) -> list[str]:
        """Generators that can stand in front of another one (``library,sd``)."""
        from mmdialog.core.interfaces import Retriever

        return [n for n in self.names("generator") if issubclass(self.get("generator", n).factory, Retriever)]

    def get(self, kind: str, name: str) -> Plugin:
        """The plugin, its class imported (and checked) on first use."""
        try:
            plugin = self._plugins[(kind, name)]
        except KeyError:
            raise PluginError(f"unknown {kind} plugin '{name}'; available: "
                              f"{', '.join(self.names(kind)) or 'none'}") from None
        if isinstance(plugin.factory, str):
            plugin = self._plugins[(kind, name)] = _checked(plugin)
        return plugin

    def all(self) -> list[Plugin]:
        """Every plugin, as registered (nothing is imported)."""
        return sorted(self._plugins.values(), key=lambda p: (KIND_NAMES.index(p.kind), p.name))

    def dataset_formats(self) -> list[str]:
        """Format names, in the order ``format: auto`` tries them."""
        return list(self._formats)

    def dataset_format(self, name: str) -> DatasetFormat:
        try:
            return self._formats[name]
        except KeyError:
            raise PluginError(f"unknown dataset format '{name}'; available: auto, "
                              f"{', '.join(self._formats)}") from None


def _checked(plugin: Plugin) -> Plugin:
    """``plugin`` with its class imported, which must implement its kind's contract."""
    from mmdialog.core.interfaces import KINDS

    cls = plugin.load()
    if not (isinstance(cls, type) and issubclass(cls, KINDS[plugin.kind])):
        raise PluginError(f"{plugin.kind} plugin '{plugin.name}' must be a subclass of "
                          f"mmdialog.{KINDS[plugin.kind].__name__}")
    return Plugin(plugin.kind, plugin.name, cls, plugin.description)


@lru_cache(maxsize=1)
def default_registry() -> Registry:
    return Registry()
