"""pluggy hook specifications.

A plugin package implements ``mmdialog_plugins`` and declares an entry point
in the group ``mmdialog``::

    [project.entry-points.mmdialog]
    my_plugins = "my_package.plugins"

    # my_package/plugins.py
    from mmdialog import hookimpl, Plugin
    @hookimpl
    def mmdialog_plugins():
        return [Plugin(kind="perceiver", name="clip", factory=ClipPerceiver)]

Built-in plugins register through exactly the same hook.
"""
from __future__ import annotations

from dataclasses import dataclass

import pluggy

PROJECT = "mmdialog"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class Plugin:
    """One component implementation: ``kind`` is llm|perceiver|bridge|generator;
    ``factory`` is a ``Component`` subclass (its ``Options`` validate the config)."""

    kind: str
    name: str
    factory: type
    description: str = ""


@hookspec
def mmdialog_plugins() -> list[Plugin]:
    """Return the plugins this module provides."""
