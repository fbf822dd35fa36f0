"""The plugin manager: built-ins and entry-point packages, found the same way."""
from __future__ import annotations

import importlib
from functools import lru_cache

import pluggy

from mmdialog.core import hookspecs
from mmdialog.core.errors import PluginError
from mmdialog.core.hookspecs import Plugin
from mmdialog.core.interfaces import KINDS

BUILTIN_MODULES = (
    "mmdialog.plugins.llms.hf",
    "mmdialog.plugins.perceivers.qformer",
    "mmdialog.plugins.perceivers.caption",
    "mmdialog.plugins.bridges.gumbel",
    "mmdialog.plugins.bridges.text",
    "mmdialog.plugins.generators.sd",
    "mmdialog.plugins.generators.sdxl",
    "mmdialog.plugins.generators.library",
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
        for batch in self.pm.hook.mmdialog_plugins():
            for plugin in batch:
                self._add(plugin)

    def register(self, plugin: Plugin) -> None:
        """Register one plugin at run time (tests, notebooks)."""
        self._add(plugin)

    def _add(self, plugin: Plugin) -> None:
        if plugin.kind not in KINDS:
            raise PluginError(f"plugin '{plugin.name}' has kind '{plugin.kind}'; "
                              f"use one of: {', '.join(KINDS)}")
        if not (isinstance(plugin.factory, type) and issubclass(plugin.factory, KINDS[plugin.kind])):
            raise PluginError(f"{plugin.kind} plugin '{plugin.name}' must be a subclass of "
                              f"mmdialog.{KINDS[plugin.kind].__name__}")
        self._plugins[(plugin.kind, plugin.name)] = plugin

    def names(self, kind: str) -> list[str]:
        return sorted(n for k, n in self._plugins if k == kind)

    def get(self, kind: str, name: str) -> Plugin:
        try:
            return self._plugins[(kind, name)]
        except KeyError:
            raise PluginError(f"unknown {kind} plugin '{name}'; available: "
                              f"{', '.join(self.names(kind)) or 'none'}") from None

    def all(self) -> list[Plugin]:
        return sorted(self._plugins.values(), key=lambda p: (list(KINDS).index(p.kind), p.name))


@lru_cache(maxsize=1)
def default_registry() -> Registry:
    return Registry()
