"""The project's user-facing error types. This module imports nothing from the package, so any layer can raise
them without pulling in the config schema (and without an import cycle)."""


class ConfigError(ValueError):
    """A configuration problem, with the file or key that caused it."""
