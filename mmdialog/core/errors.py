"""User-facing errors: the CLI prints their message as one line, no traceback."""


class MMDialogError(Exception):
    """Base class of errors caused by the user's input, not by a bug."""


class ConfigError(MMDialogError, ValueError):
    """A config, preset, plugin name or checkpoint folder that cannot be used."""


class PluginError(ConfigError):
    """An unknown plugin name or a plugin that failed to register."""
