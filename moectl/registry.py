"""The strategy registry.

A strategy is named by: an entry point in the group `moectl.strategies` (the built-ins are declared
there in moectl's own pyproject.toml, exactly as a third-party package declares its own);
`package.module:ClassName`; or a path to a `.py` file (optionally `path.py:ClassName`).
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import tomllib
from importlib.metadata import EntryPoint, PackageNotFoundError, distribution, entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

from moectl.config import PARALLEL_KEYS, RunConfig
from moectl.errors import UsageError
from moectl.io.paths import require_file
from moectl.strategy import Strategy, StrategyOptions

ENTRY_POINT_GROUP = "moectl.strategies"


def _entry_points() -> dict[str, EntryPoint]:
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return {**_source_tree_entry_points(), **found}


def _source_tree_entry_points() -> dict[str, EntryPoint]:
    """The built-ins declared in pyproject.toml, when moectl runs from a source checkout that was not
    installed (PYTHONPATH=checkout): the same declarations the installed metadata would hold."""
    try:
        distribution("moectl")
        return {}
    except PackageNotFoundError:
        pass
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if not pyproject.is_file():
        return {}
    declared = tomllib.loads(pyproject.read_text())["project"].get("entry-points", {})
    group = declared.get(ENTRY_POINT_GROUP, {})
    return {name: EntryPoint(name, target, ENTRY_POINT_GROUP) for name, target in group.items()}


def short_name(spec: str) -> str:
    """A strategy's name for rows and run directories: a registered name as it is, a .py file's stem, or
    a module's last part (`plugins/my_layout.py:Layout` and `pkg.layouts:Fast` give my_layout, layouts)."""
    if spec.endswith(".py") or ".py:" in spec:
        return Path(spec.split(".py:")[0].removesuffix(".py") + ".py").stem
    if ":" in spec:
        return spec.split(":", 1)[0].rsplit(".", 1)[-1]
    return spec


def available_strategies() -> list[str]:
    """Registered names (moectl's own and those of installed plugins)."""
    return list(_entry_points())


#: members of the contract that were replaced, and by what (a plugin still defining one is refused)
REPLACED_MEMBERS = {
    "flags_for_world": "layouts(world_size, model), returning moectl.strategy.Layout objects",
    "params_per_rank": "step_cost(train, ranks_per_node, precision), returning a moectl.parallel.cost.StepCost",
    "grad_params_per_rank": "step_cost(train, ranks_per_node, precision), returning a moectl.parallel.cost.StepCost",
}


def _check_class(cls: object, what: str) -> type[Strategy]:
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise UsageError(f"{what} is not a Strategy subclass (moectl.strategy.Strategy); fix the plugin")
    for member, replacement in REPLACED_MEMBERS.items():
        if hasattr(cls, member):
            raise UsageError(
                f"{what} defines {member}, which the strategy contract replaced by {replacement}; "
                "update the plugin (README, Writing a strategy)"
            )
    return cls


def _strategies_in(module: ModuleType) -> list[type[Strategy]]:
    return [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj)
        and issubclass(obj, Strategy)
        and obj is not Strategy
        and obj.__module__ == module.__name__
    ]


def _pick(module: ModuleType, class_name: str | None, spec: str) -> type[Strategy]:
    if class_name:
        return _check_class(getattr(module, class_name, None), f"{spec}: {class_name} (in {module.__name__})")
    candidates = _strategies_in(module)
    if len(candidates) != 1:
        raise UsageError(f"{spec}: found {len(candidates)} Strategy classes; name one as {spec}:ClassName")
    return candidates[0]


def _import_failure(what: str, exc: BaseException) -> UsageError:
    """One line for a plugin that cannot be imported, whatever it raised (SystemExit included)."""
    detail = f"exit({exc.code})" if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
    return UsageError(f"{what} failed to import ({' '.join(detail.split())}); fix the plugin")


def _load_file(spec: str) -> type[Strategy]:
    path_text, _, class_name = spec.partition(".py:")
    path = require_file(Path(path_text if not class_name else path_text + ".py"), "strategy file",
                        "give --strategy an existing .py file")  # fmt: skip
    module_name = f"moectl_plugin_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        raise _import_failure(f"strategy file {path}", exc) from None
    return _pick(module, class_name or None, spec)


def get_strategy(spec: str) -> type[Strategy]:
    """Resolve a strategy name, entry point, `module:Class` or `.py` path to its class."""
    registered = _entry_points()
    if spec in registered:
        try:
            cls = registered[spec].load()
        except (Exception, SystemExit) as exc:
            raise _import_failure(f"strategy {spec!r} ({registered[spec].value})", exc) from None
        return _check_class(cls, f"entry point {spec!r}")
    if spec.endswith(".py") or ".py:" in spec:
        return _load_file(spec)
    if ":" in spec:
        module_name, class_name = spec.split(":", 1)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                raise UsageError(f"cannot import strategy module {module_name!r}; check the name") from None
            raise _import_failure(f"strategy module {module_name!r}", exc) from None
        except (Exception, SystemExit) as exc:
            raise _import_failure(f"strategy module {module_name!r}", exc) from None
        return _pick(module, class_name, spec)
    known = available_strategies()
    if not known:
        raise UsageError(
            f"no strategies are registered (entry-point group {ENTRY_POINT_GROUP}); install moectl "
            "with 'make setup' (pip install -e .)"
        )
    raise UsageError(
        f"unknown strategy {spec!r}; choose one of {', '.join(known)}, "
        "or give package.module:Class or a .py file"
    )


def build_strategy(
    cfg: RunConfig, world_size: int | None, strategy_cls: type[Strategy] | None = None
) -> Strategy:
    """The strategy (`cfg.parallel.strategy` unless given) with its options and its degrees checked
    against the world and the model: the one place they are checked."""
    strategy_cls = strategy_cls or get_strategy(cfg.parallel.strategy)
    options = strategy_options(strategy_cls, cfg.parallel.options)
    dims = strategy_cls.parallel_dims(cfg.parallel, world_size)
    dims.check(cfg.model, strategy_cls.name)
    return strategy_cls(dims, cfg.model, options)


def strategy_options(strategy_cls: type[Strategy], values: dict[str, Any]) -> StrategyOptions:
    """The strategy's options from the `parallel` keys it owns; a key it does not own is refused,
    naming the strategy that does."""
    owned = strategy_cls.Options.keys()
    for key in values:
        if key in owned:
            continue
        owners = [name for name in option_owners(key) if name != strategy_cls.name]
        if owners:
            raise UsageError(
                f"parallel.{key} belongs to --strategy {' or '.join(owners)}, not {strategy_cls.name}; drop it"
            )
        raise UsageError(
            f"unknown key 'parallel.{key}'; known keys in 'parallel': {', '.join(PARALLEL_KEYS)}, "
            f"and {strategy_cls.name}'s own: {', '.join(owned) or 'none'}"
        )
    return strategy_cls.Options.from_config(values)


def option_owners(key: str) -> list[str]:
    """The registered strategies that own `parallel.<key>` (a plugin that fails to import owns none)."""
    owners = []
    for name in available_strategies():
        try:
            if key in get_strategy(name).Options.keys():
                owners.append(name)
        except UsageError:
            continue
    return owners


def drop_defaults_of_others(strategy_name: str, values: dict[str, Any]) -> dict[str, Any]:
    """`values` without the keys the strategy does not own that hold their owner's default: a config.yaml
    written before strategies owned their options lists every strategy's, at their defaults."""
    owned = get_strategy(strategy_name).Options.keys()
    kept = {}
    for key, value in values.items():
        defaults = [get_strategy(name).Options().by_key()[key] for name in option_owners(key)]
        if key in owned or value not in defaults:
            kept[key] = value
    return kept
