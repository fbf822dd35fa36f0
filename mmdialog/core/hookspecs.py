"""pluggy hook specifications: one hook per extension point.

A plugin package implements any of these hooks and declares an entry point in
the group ``mmdialog``::

    [project.entry-points.mmdialog]
    my_plugins = "my_package.plugins"

    # my_package/plugins.py
    from mmdialog import hookimpl, Plugin
    @hookimpl
    def mmdialog_plugins():
        return [Plugin(kind="perceiver", name="clip", factory=ClipPerceiver)]
        # or factory="my_package.clip:ClipPerceiver": imported only when built

The built-in components (by ``"module:Class"``, so that listing them imports
no torch), dataset readers and prompt formats register through exactly the
same hooks.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

from mmdialog.core.errors import PluginError

if TYPE_CHECKING:
    from mmdialog.core.data.records import RawRecord
    from mmdialog.core.data.report import LoadReport
    from mmdialog.core.data.schema import Dialogue

PROJECT = "mmdialog"
#: The component kinds, in the order they are listed (their contracts: ``interfaces.KINDS``).
KIND_NAMES = ("llm", "perceiver", "bridge", "generator")
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class Plugin:
    """One component implementation: ``kind`` is llm|perceiver|bridge|generator;
    ``factory`` is a ``Component`` subclass (its ``Options`` validate the config),
    or ``"module:Class"``, imported only when the plugin is built."""

    kind: str
    name: str
    factory: type | str
    description: str = ""

    @property
    def module(self) -> str:
        return self.factory.split(":")[0] if isinstance(self.factory, str) else self.factory.__module__

    def load(self) -> type:
        """The class ``factory`` names (imported on first use)."""
        if not isinstance(self.factory, str):
            return self.factory
        module, _, name = self.factory.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise PluginError(f"{self.kind} plugin '{self.name}': cannot import '{self.factory}' ({e}); "
                              "is its package installed?") from None


@dataclass(frozen=True)
class DatasetFormat:
    """A dataset reader. The loader finds the files (``.json``/``.jsonl``, gzip,
    split folders), reads their records and calls:

    * ``detect(record) -> bool``: does a raw record (parsed JSON) look like this
      format (for ``format: auto``)?
    * ``record_id(record, raw) -> str``: its id, for problem reports;
    * ``parse(raw, *, file, report, split, **options) -> (Dialogue, n_messages)``:
      raise ``RecordError`` for a bad record (it is reported, skipped and counted);
      ``options`` are the keyword options named in ``options``;
    * ``check(**options)``: raise ``ValueError`` for a bad option value, before
      any file is read (the loader calls it with the options named in ``options``).
    """

    name: str
    detect: Callable[[Any], bool]
    record_id: Callable[[Any, RawRecord], str]
    parse: Callable[..., tuple[Dialogue, int]]
    description: str = ""
    options: tuple[str, ...] = ()
    check: Callable[..., None] | None = None


@hookspec
def mmdialog_plugins() -> list[Plugin]:
    """Return the components (llm, perceiver, bridge, generator) this module provides."""


@hookspec
def mmdialog_dataset_formats() -> list[DatasetFormat]:
    """Return the dataset formats this module can read (``--data PATH --set data.format=NAME``)."""


@hookspec
def mmdialog_prompt_formats() -> list[type]:
    """Return the prompt formats (``mmdialog.PromptFormat`` subclasses) this module provides:
    how a dialogue becomes LLM text and labels (``--set model.llm.prompt_format=NAME``)."""


__all__ = ["DatasetFormat", "LoadReport", "Plugin", "hookimpl", "hookspec"]
