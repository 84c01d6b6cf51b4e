"""Optional features and the pip extra that installs each (pyproject.toml [project.optional-dependencies]).

A command that needs one calls require_extra first thing, before any slow work (loading a model), so a
missing package ends it at once with one line naming the extra, not a ModuleNotFoundError minutes in.
The server needs no extra: `pip install lserve` installs it.

    require_extra("calibrate", "lserve calibrate", ["torch", "transformers", "gguf"])
    # lserve: error: lserve calibrate needs torch, which is not installed: pip install 'lserve[calibrate]'
"""
from __future__ import annotations

import importlib.util
from typing import Sequence


class MissingExtraError(RuntimeError):
    """A feature's optional packages are missing; the message names the extra that installs them."""


def _is_installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package is missing, or sys.modules holds None for it
        return False


def require_extra(extra: str, feature: str, modules: Sequence[str]) -> None:
    """Raises MissingExtraError unless every module in modules can be imported (found, not imported:
    the check costs no import time)."""
    missing = [module for module in modules if not _is_installed(module)]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise MissingExtraError(f"{feature} needs {', '.join(missing)}, which {verb} not installed: "
                                f"pip install 'lserve[{extra}]'")
