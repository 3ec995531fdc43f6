"""The strategy registry.

A strategy is named by: a built-in file in this folder (`single`, `ddp`, ...); an entry point in the
group `moectl.strategies`; `package.module:ClassName`; or a path to a `.py` file (optionally
`path.py:ClassName`). Built-ins are discovered, not listed: adding a file adds a strategy.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import sys
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from moectl.errors import UsageError
from strategies.base import Strategy

ENTRY_POINT_GROUP = "moectl.strategies"
_NOT_STRATEGIES = {"base"}


def _strategies_in(module: ModuleType) -> list[type[Strategy]]:
    return [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, Strategy)
        and obj is not Strategy
        and obj.__module__ == module.__name__
    ]


def builtin_strategies() -> dict[str, type[Strategy]]:
    found: dict[str, type[Strategy]] = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_STRATEGIES or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for cls in _strategies_in(module):
            found[cls.name] = cls
    return found


def _entry_point_strategies() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def available_strategies() -> list[str]:
    return sorted(set(builtin_strategies()) | set(_entry_point_strategies()))


def _pick(module: ModuleType, class_name: str | None, spec: str) -> type[Strategy]:
    if class_name:
        cls = getattr(module, class_name, None)
        if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
            raise UsageError(f"{spec}: {class_name} is not a Strategy subclass in {module.__name__}")
        return cls
    candidates = _strategies_in(module)
    if len(candidates) != 1:
        raise UsageError(f"{spec}: found {len(candidates)} Strategy classes; name one as {spec}:ClassName")
    return candidates[0]


def _load_file(spec: str) -> type[Strategy]:
    path_text, _, class_name = spec.partition(".py:")
    path = Path(path_text if not class_name else path_text + ".py")
    if not path.is_file():
        raise UsageError(f"strategy file {path} does not exist; give an existing .py file")
    module_name = f"moectl_plugin_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise UsageError(
            f"strategy file {path} failed to import ({type(exc).__name__}: {exc}); fix the plugin"
        ) from None
    return _pick(module, class_name or None, spec)


def get_strategy(spec: str) -> type[Strategy]:
    """Resolve a strategy name, entry point, `module:Class` or `.py` path to its class."""
    builtins = builtin_strategies()
    if spec in builtins:
        return builtins[spec]
    plugins = _entry_point_strategies()
    if spec in plugins:
        try:
            cls = plugins[spec].load()
        except Exception as exc:
            raise UsageError(
                f"strategy plugin {spec!r} failed to load ({type(exc).__name__}: {exc})"
            ) from None
        if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
            raise UsageError(f"entry point {spec!r} does not name a Strategy subclass")
        return cls
    if spec.endswith(".py") or ".py:" in spec:
        return _load_file(spec)
    if ":" in spec:
        module_name, class_name = spec.split(":", 1)
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise UsageError(
                f"cannot import strategy module {module_name!r} ({exc}); check the name"
            ) from None
        return _pick(module, class_name, spec)
    raise UsageError(
        f"unknown strategy {spec!r}; choose one of {', '.join(available_strategies())}, "
        "or give package.module:Class or a .py file"
    )
