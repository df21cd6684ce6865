"""Errors every layer may raise about the user's config (kept apart from config.py, which reads
the data modules, so those modules can raise it too)."""


class ConfigError(ValueError):
    """An invalid experiment config; the message names the field."""
