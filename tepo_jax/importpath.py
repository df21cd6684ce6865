"""Objects named by an import path, `package.module:NAME` (user plug-ins on the command line)."""
from __future__ import annotations

import importlib


class ImportPathError(ValueError):
    """An import path that does not name an object; the message is one line."""


def import_object(spec: str, what: str = "object"):
    """The object `NAME` of module `package.module` for `spec` = "package.module:NAME"."""
    module_name, sep, name = spec.partition(":")
    if not sep or not module_name or not name:
        raise ImportPathError(f"{what} {spec!r}: expected package.module:NAME")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # any failure inside the user's module is theirs to see, in one line
        raise ImportPathError(f"{what} {spec!r}: cannot import {module_name!r} "
                              f"({type(e).__name__}: {e})") from None
    try:
        return getattr(module, name)
    except AttributeError:
        raise ImportPathError(f"{what} {spec!r}: module {module_name!r} has no {name!r}") from None
