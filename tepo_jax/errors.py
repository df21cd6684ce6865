"""Errors every layer may raise about the user's config (kept apart from config.py, which reads
the data modules, so those modules can raise it too)."""


class ConfigError(ValueError):
    """An invalid experiment config; the message names the field."""


def one_line(text: str, limit: int = 60) -> str:
    """`text` on one line (whitespace runs collapsed), cut to `limit` characters with '…':
    how an error message quotes a user's text or an exception."""
    text = " ".join(str(text).split())
    return text[:limit] + "…" if len(text) > limit else text
