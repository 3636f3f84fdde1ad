"""Finding user code by name: ``path/to/file.py:NAME``, ``package.module:NAME``, or an entry point.

The one loader behind tasks (``shared/tasks.py``), selection rules (``shared/selection.py``) and
update rules (``shared/rules.py``). Every failure is a ``PluginError``: one line that names the
spec and what is wrong, never a traceback of the user's import.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import sys
from collections.abc import Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from dssgd.shared.errors import ConfigError

log = logging.getLogger(__name__)


class PluginError(ConfigError, ValueError):
    """User code that cannot be found or does not keep its contract (a user mistake)."""


def is_spec(name: str) -> bool:
    """Whether a name points at user code (``something:NAME``) rather than a registered name."""
    where, sep, attr = name.rpartition(":")
    return bool(sep and where and attr)


def import_file(path: Path) -> Any:
    if not path.is_file():
        raise PluginError(f"file {path} does not exist")
    name = "dssgd_user_" + hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"cannot load {path} as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling inside the file look themselves up
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # the user's code: whatever it raises is their mistake, in one line
        del sys.modules[name]
        log.debug("importing %s failed", path, exc_info=True)
        raise PluginError(f"{path} fails to import: {type(exc).__name__}: {exc}") from exc
    return module


def import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise PluginError(f"cannot import module {name!r}: {exc}") from exc
    except Exception as exc:
        raise PluginError(f"module {name} fails to import: {type(exc).__name__}: {exc}") from exc


def attribute(module: Any, name: str, where: str) -> Any:
    if not hasattr(module, name):
        public = sorted(k for k in vars(module) if not k.startswith("_"))
        raise PluginError(f"{where} has no {name!r}; it defines {', '.join(public) or 'nothing'}")
    return getattr(module, name)


def load_object(spec: str) -> Any:
    """The object ``FILE.py:NAME`` or ``package.module:NAME`` names."""
    where, _, attr = spec.rpartition(":")
    if not is_spec(spec):
        raise PluginError(f"{spec!r} must look like FILE.py:NAME or package.module:NAME")
    if where.endswith(".py") or "/" in where or "\\" in where:
        return attribute(import_file(Path(where).expanduser()), attr, where)
    return attribute(import_module(where), attr, f"module {where}")


def entry_point(group: str, name: str) -> Any | None:
    """The object registered as ``name`` under an entry-point group, or None."""
    for ep in entry_points(group=group):
        if ep.name == name:
            try:
                return ep.load()
            except Exception as exc:
                raise PluginError(
                    f"entry point {name!r} ({ep.value}) fails to load: {exc}"
                ) from exc
    return None


def entry_point_names(group: str) -> list[str]:
    return sorted(ep.name for ep in entry_points(group=group))


def instance(obj: Any, spec: str) -> Any:
    """A class is instantiated without arguments; anything else is used as it is."""
    if not isinstance(obj, type):
        return obj
    try:
        return obj()
    except Exception as exc:
        raise PluginError(f"{spec}: {obj.__name__}() failed: {type(exc).__name__}: {exc}") from exc


def registered_or_loaded(
    name: str, registry: Mapping[str, Any], kind: str, method: str, choices: str
) -> Any:
    """``registry[name]``, or the object ``pkg.mod:Name`` / ``FILE.py:Name`` names, which must
    have a callable ``method`` (the plug-in points' one resolution rule). ``choices`` is how the
    refusal lists the registered names; ``method`` is named with its arguments in the refusal."""
    if name in registry:
        return registry[name]
    if not is_spec(name):
        raise PluginError(f"unknown {kind} {name!r}; {choices} or pkg.mod:Name")
    obj = instance(load_object(name), name)
    if not callable(getattr(obj, method.partition("(")[0], None)):
        raise PluginError(f"{kind} {name} has no {method}")
    return obj
